"""The Keras callback that tracks average-case robust flatness during ``fit``."""

from __future__ import annotations

import os
from typing import Optional

import keras
import tensorflow as tf

from tfrobust.errors import UserError
from tfrobust.flatness.loss import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    DEFAULT_STEPS,
    check_attack_settings,
    evaluation_data,
    resolve_step_size,
)
from tfrobust.flatness.measures import average_case_flatness
from tfrobust.flatness.settings import check_average_case

__all__ = ["FlatnessMonitor"]


class FlatnessMonitor(keras.callbacks.Callback):
    """Measures average-case robust flatness (Stutz et al., ICCV 2021, (F2)) during ``fit``.

    Every ``every`` epochs (after epochs ``every - 1``, ``2 * every - 1``,
    ...), on the held-out ``(x, y)`` (keep it small: a few hundred examples),
    it computes :func:`~tfrobust.flatness.average_case_flatness` and

    * adds ``logs[key]`` (default ``"val_robust_flatness"``) and
      ``logs[key + "_rloss"]`` (``RLoss(w)``), so they appear in the
      ``History`` returned by ``fit`` and, when a ``keras.callbacks.TensorBoard``
      is listed *after* this callback, in its ``validation`` run as
      ``epoch_robust_flatness`` (Keras strips ``val_`` and adds ``epoch_``);
    * if ``log_dir`` is given, also writes the scalars
      ``epoch_robust_flatness`` and ``epoch_robust_loss`` with ``tf.summary``
      to ``log_dir/flatness`` (step = epoch), independent of callback order.

    Epochs without a measurement have no entry, so ``History`` lists are
    shorter than the number of epochs when ``every > 1``. The model's
    weights are restored bitwise after every measurement. The settings are
    checked when the callback is made.
    """

    def __init__(self, x, y, every: int = 1, eps: float = DEFAULT_EPS, xi: float = 0.5, samples: int = 10,
                 step_size: Optional[float] = None, steps: int = DEFAULT_STEPS, restarts: int = 1,
                 norm: str = "linf", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                 log_dir: Optional[str] = None, key: str = "val_robust_flatness", progress: bool = False):
        super().__init__()
        if int(every) < 1:
            raise UserError(f"every must be >= 1, got {every}")
        step_size = resolve_step_size(eps, step_size)
        check_attack_settings(eps, step_size, steps, restarts, norm)
        check_average_case(xi, samples)
        self.x, self.y = evaluation_data(x, y)
        self.every = int(every)
        self.settings = dict(eps=eps, xi=xi, samples=samples, step_size=step_size, steps=steps, restarts=restarts,
                             norm=norm, batch_size=batch_size, seed=seed)
        self.log_dir = log_dir
        self.key = key
        self.progress = progress
        self.results = []
        self._writer = None

    def _summary_writer(self):
        if self._writer is None and self.log_dir:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "flatness"))
        return self._writer

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every != 0:
            return
        network = getattr(self.model, "network", self.model)  # a RobustModel's live network
        res = average_case_flatness(network, self.x, self.y, progress=self.progress, **self.settings)
        res = {k: v for k, v in res.items() if k != "perturbations"}
        res["epoch"] = int(epoch)
        self.results.append(res)
        if logs is not None:
            logs[self.key] = res["flatness"]
            logs[self.key + "_rloss"] = res["loss"]
        writer = self._summary_writer()
        if writer is not None:
            with writer.as_default():
                tf.summary.scalar("epoch_robust_flatness", res["flatness"], step=int(epoch))
                tf.summary.scalar("epoch_robust_loss", res["loss"], step=int(epoch))
            writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
