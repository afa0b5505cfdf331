"""One AutoAttack attack over a set of examples, in batches: replayed from the resume log, or run and re-classified."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfrobust.autoattack import sharding
from tfrobust.autoattack.core import perturbation_norms, predict_logits, predicted, project_numpy


class BatchAttacker:
    """Runs attacks on chosen examples of (x, y) in batches of ``batch_size``.

    A batch recorded in ``log`` (a :class:`~tfrobust.autoattack.resume.PartialLog`)
    is replayed instead of run; its broken examples are marked in
    :attr:`replayed`. Other batches run on ``devices`` as
    :func:`~tfrobust.autoattack.sharding.batch_plan` decides; every returned
    point is projected onto the eps-ball and [0, 1], classified again (mean
    logits of ``passes`` forward passes) and recorded in ``log``.
    """

    def __init__(self, model_fn, x, y, eps, norm, seed, batch_size, passes, log, devices, verbose):
        self.model_fn, self.x, self.y = model_fn, x, y
        self.eps, self.norm, self.seed = eps, norm, seed
        self.batch_size, self.passes = batch_size, passes
        self.log, self.devices, self.verbose = log, devices, verbose
        self.replayed = np.zeros(len(x), bool)

    def attack(self, fn, idx, desc):
        """Runs ``fn`` on x[idx]; returns (fooled mask over idx, adversarial points, their norms where fooled)."""
        from tqdm.auto import tqdm

        fooled = np.zeros(len(idx), bool)
        points = self.x[idx].copy()
        norms = np.full(len(idx), np.nan)
        n_batches = max(1, math.ceil(len(idx) / self.batch_size))
        split, group = sharding.batch_plan(self.devices, n_batches)
        with tqdm(total=len(idx), desc=desc, disable=not self.verbose, leave=False) as bar:
            pending = []
            for b in range(n_batches):
                sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, len(idx)))
                if sl.start >= sl.stop:
                    continue
                if self._replay(desc, b, idx[sl], fooled[sl], norms[sl]):
                    bar.update(sl.stop - sl.start)
                    continue
                pending.append((b, sl))
                if len(pending) < group and b < n_batches - 1:
                    continue
                batches = [(self.x[idx[s]], self.y[idx[s]]) for _, s in pending]
                outs = sharding.run_batches(fn, self.model_fn, batches, self.eps, self.norm, self.seed, self.devices,
                                            split)
                for (b_, s), (xb, yb), out in zip(pending, batches, outs):
                    self._finish(desc, b_, idx[s], xb, yb, out, fooled[s], points[s], norms[s])
                    bar.update(len(xb))
                pending = []
        return fooled, points, norms

    def _replay(self, desc, b, examples, fooled, norms) -> bool:
        """Fills the views ``fooled`` and ``norms`` of batch ``b`` from the log; False if it is not recorded."""
        done = self.log.lookup(desc, b, examples)
        if done is None:
            return False
        fooled_idx, fooled_norms = done
        where = np.searchsorted(examples, fooled_idx)
        fooled[where] = True
        norms[where] = fooled_norms
        self.replayed[fooled_idx] = True
        return True

    def _finish(self, desc, b, examples, xb, yb, out, fooled, points, norms):
        """Projects and re-classifies the attack's output ``out`` for batch ``b`` into the views; logs the batch."""
        out = project_numpy(np.asarray(out, np.float32).reshape(xb.shape), xb, self.eps, self.norm)
        logits = predict_logits(self.model_fn, tf.constant(out), self.batch_size, passes=self.passes)
        fooled[:] = predicted(logits).numpy() != yb
        points[:] = out
        norms[:] = np.where(fooled, perturbation_norms(out, xb, self.norm), np.nan)
        self.log.record(desc, b, examples, examples[fooled], norms[fooled])


__all__ = ["BatchAttacker"]
