"""Catastrophic overfitting as an event of the run: measured each epoch, recorded, and acted on.

Single-step adversarial training can collapse within an epoch: PGD accuracy
falls to near zero while the training attack's accuracy soars (Wong et al.
2020, Andriushchenko and Flammarion 2020). :class:`CollapseMonitor` measures,
after every epoch, PGD accuracy on a fixed subset of the training examples
(the same examples and the same random starts every epoch) and calls the
epoch a collapse when that accuracy is more than ``drop`` below the best of
the earlier epochs (:func:`is_collapse`). Each epoch it adds
``train_subset_pgd_accuracy`` and ``collapse`` (1.0 or 0.0) to the logs (so
to the history and TensorBoard), writes them to TensorBoard's ``collapse``
run, prints one line on a collapse, and, as ``action`` says:

* ``record``: nothing more;
* ``stop``: stops training after the epoch;
* ``rollback``: restores the weights (and the weight average) and the
  optimizer's slots (momentum) of the last epoch without a collapse, keeps
  the optimizer's step counter (so the learning-rate schedule and the
  step's seeds go on), makes the training stronger and continues: an
  adaptive input-space regulariser's weight jumps to its maximum (ELLE-A);
  without one, a single-step base (FGSM, FGSM-RS, N-FGSM) trains the next
  ``pgd_epochs`` epochs on PGD with the step's settings
  (``RobustModel.train_on_pgd``; the step is traced again on each switch),
  then on its own attack again.

The measurements, the collapses and the last good epoch are its state
(``get_state``/``set_state``), kept across a resume by the epoch backup; the
last good epoch's weights are written to ``snapshot_path`` when one is given.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfrobust import attacks, seeds
from tfrobust.defenses.input_space import linearity_error
from tfrobust.errors import UserError
from tfrobust.step.attack import single_step_base

ACTIONS = ("record", "stop", "rollback")
COLLAPSE_PURPOSE = 20  # the batch_seed purpose of the subset's PGD starts (21-23: its linearity triplets)


def is_collapse(earlier, accuracy: float, drop: float) -> bool:
    """Whether ``accuracy`` lies more than ``drop`` below the best of the ``earlier`` accuracies."""
    earlier = list(earlier)
    return bool(earlier) and max(earlier) - float(accuracy) > float(drop)


def collapse_epochs(accuracies, drop: float) -> list:
    """The epochs (indices) of a history of subset accuracies that :func:`is_collapse` flags, each against the
    epochs before it that were not collapses themselves (the epochs a rollback keeps)."""
    good, flagged = [], []
    for epoch, accuracy in enumerate(accuracies):
        if is_collapse(good, accuracy, drop):
            flagged.append(epoch)
        else:
            good.append(float(accuracy))
    return flagged


class CollapseMonitor(keras.callbacks.Callback):
    """PGD accuracy on a fixed training subset after each epoch, and the action on a collapse (module docstring).

    Args:
      x, y: the fixed subset of training examples (a few hundred).
      eps, step_size, steps, norm: the PGD attack (uniform start).
      drop: a collapse is a fall of more than ``drop`` (a fraction: 0.2 is 20 points) below the best earlier epoch.
      action: ``record``, ``stop`` or ``rollback``.
      seed: the base seed of the attack's starts (the same every epoch).
      log_dir: TensorBoard directory (scalars in ``log_dir/collapse``), or None.
      snapshot_path: a ``.npz`` file for the last good epoch's weights (``rollback`` across a resume), or None.
      pgd_epochs: after a rollback with no adaptive regulariser, the epochs a single-step base trains on PGD.
    """

    def __init__(self, x, y, eps: float, step_size: float, steps: int, norm: str = "linf", drop: float = 0.2,
                 action: str = "record", seed: int = 0, batch_size: int = 256, log_dir: Optional[str] = None,
                 snapshot_path: Optional[str] = None, verbose: bool = True, pgd_epochs: int = 1):
        super().__init__()
        if action not in ACTIONS:
            raise UserError(f"unknown collapse action {action!r}; allowed: {', '.join(ACTIONS)}")
        if not 0 <= float(drop) <= 1:
            raise UserError(f"the collapse drop must be in [0, 1], got {drop!r}")
        self.x, self.y = np.asarray(x, np.float32), np.asarray(y, np.int32)
        self.attack = dict(eps=float(eps), step_size=float(step_size), steps=int(steps), norm=norm)
        self.drop, self.action, self.seed, self.batch_size = float(drop), action, int(seed), int(batch_size)
        self.log_dir, self.snapshot_path, self.verbose = log_dir, snapshot_path, verbose
        self.accuracies, self.collapses, self.good_epoch = [], [], None
        self.pgd_epochs, self.pgd_until = int(pgd_epochs), 0  # PGD while epoch < pgd_until
        self._snapshot = None
        self._writer = None

    def measure(self) -> float:
        """PGD accuracy of the live network on the subset (the same starts every time)."""
        network = getattr(self.model, "network", self.model)
        model_fn = lambda t: tf.cast(network(t, training=False), tf.float32)  # noqa: E731
        a = self.attack

        def attack(fn, x, y, seed):
            return attacks.pgd(fn, x, y, a["eps"], a["step_size"], a["steps"], norm=a["norm"], seed=seed)

        correct, _ = attacks.attack_batches(  # correct predictions, and finite outputs
            model_fn, self.x, self.y, attack, batch_size=self.batch_size,
            seeds=lambda b, r: seeds.batch_seed(self.seed, b, COLLAPSE_PURPOSE))
        return float(np.mean(correct))

    def linearity_error(self) -> float:
        """ELLE's local linearity error of the live network (inference mode) on the subset, with the same
        triplets every time (:func:`tfrobust.defenses.input_space.linearity_error`)."""
        network = getattr(self.model, "network", self.model)
        model_fn = lambda t: tf.cast(network(t, training=False), tf.float32)  # noqa: E731
        errors = []
        for b, i in enumerate(range(0, len(self.x), self.batch_size)):
            x = tf.constant(self.x[i:i + self.batch_size])

            def draw(k, shape, b=b):
                return attacks.uniform_noise(shape, seeds.batch_seed(self.seed, b, COLLAPSE_PURPOSE + k))

            alpha = (draw(3, tf.shape(x)[:1]) + 1.0) / 2.0
            errors.append(linearity_error(model_fn, x, tf.constant(self.y[i:i + self.batch_size]), self.attack["eps"],
                                          draw(1, tf.shape(x)), draw(2, tf.shape(x)), alpha).numpy())
        return float(np.mean(np.concatenate(errors)))

    def on_epoch_begin(self, epoch, logs=None):
        pgd = epoch < self.pgd_until
        if bool(getattr(self.model, "train_on_pgd", False)) != pgd:
            self.model.train_on_pgd = pgd
            if getattr(self.model, "train_function", None) is not None:
                self.model.make_train_function(force=True)  # fit calls model.train_function at every step

    def on_epoch_end(self, epoch, logs=None):
        accuracy = self.measure()
        good = [a for e, a in enumerate(self.accuracies) if e not in self.collapses]
        collapse = is_collapse(good, accuracy, self.drop)
        self.accuracies.append(accuracy)
        lin_err = self.linearity_error()
        if logs is not None:
            logs["train_subset_pgd_accuracy"] = accuracy
            logs["train_subset_lin_err"] = lin_err
            logs["collapse"] = float(collapse)
        self._write(epoch, {"train_subset_pgd_accuracy": accuracy, "train_subset_lin_err": lin_err,
                            "collapse": float(collapse)})
        if not collapse:
            self.good_epoch = int(epoch)
            if self.action == "rollback":
                self._keep_snapshot()
            return
        self.collapses.append(int(epoch))
        best = max(good)
        then = {"record": "recorded", "stop": "stopping", "rollback": f"rolled back to epoch {self.good_epoch + 1}"}
        done = then[self.action]
        if self.action == "stop":
            self.model.stop_training = True
        elif self.action == "rollback":
            self._roll_back()
            done = "; ".join([done] + self._strengthen(epoch))
        if self.verbose:
            print(f"catastrophic overfitting at epoch {epoch + 1}: training-subset PGD accuracy {accuracy:.3f}, "
                  f"{best - accuracy:.3f} below the best {best:.3f} (drop > {self.drop:g}); {done}", flush=True)

    def _strengthen(self, epoch: int) -> list:
        """Each input-space regulariser made stronger (ELLE-A's weight to its maximum), or else PGD for the next
        ``pgd_epochs`` epochs of a single-step base; what was done."""
        objective = getattr(self.model, "objective", None)
        done = [d for d in (term.strengthen() for term in getattr(objective, "input_terms", [])) if d]
        defense = getattr(self.model, "defense", None)
        if not done and self.pgd_epochs > 0 and defense is not None and single_step_base(defense.objective):
            self.pgd_until = int(epoch) + 1 + self.pgd_epochs
            steps = getattr(self.model.settings, "steps", "N")
            done.append(f"PGD-{steps} for the next {self.pgd_epochs} epoch(s)")
        return done

    # -- the last good epoch ---------------------------------------------------

    def _optimizer_slots(self):
        """The optimizer's variables but its step counter."""
        optimizer = self.model.optimizer
        return [v for v in optimizer.variables if v is not optimizer.iterations]

    def _keep_snapshot(self):
        self._snapshot = [np.array(w) for w in self.model.get_weights()] + [
            np.array(v.numpy()) for v in self._optimizer_slots()]
        if self.snapshot_path:
            tmp = self.snapshot_path + ".tmp.npz"
            np.savez(tmp, *self._snapshot)
            os.replace(tmp, self.snapshot_path)

    def _roll_back(self):
        if self._snapshot is None and self.snapshot_path and os.path.exists(self.snapshot_path):
            with np.load(self.snapshot_path) as f:
                self._snapshot = [f[f"arr_{i}"] for i in range(len(f.files))]
        if self._snapshot is None:
            return  # no good epoch yet (a collapse needs one, so only after a resume without its file)
        n = len(self.model.get_weights())
        self.model.set_weights(self._snapshot[:n])
        for v, value in zip(self._optimizer_slots(), self._snapshot[n:]):
            v.assign(value)

    # -- TensorBoard and state -------------------------------------------------

    def _write(self, epoch, values):
        if not self.log_dir:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "collapse"))
        with self._writer.as_default():
            for key, value in values.items():
                tf.summary.scalar(f"epoch_{key}", value, step=int(epoch))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def get_state(self) -> dict:
        return {"accuracies": list(self.accuracies), "collapses": list(self.collapses), "good_epoch": self.good_epoch,
                "pgd_until": self.pgd_until}

    def set_state(self, state: dict) -> None:
        self.accuracies = [float(a) for a in state.get("accuracies", [])]
        self.collapses = [int(e) for e in state.get("collapses", [])]
        self.good_epoch = state.get("good_epoch")
        self.pgd_until = int(state.get("pgd_until", 0))


__all__ = ["CollapseMonitor", "is_collapse", "collapse_epochs", "ACTIONS", "COLLAPSE_PURPOSE"]
