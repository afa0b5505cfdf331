"""Keras callbacks for long, safe runs: backup/resume, divergence, TensorBoard extras."""

from __future__ import annotations

import glob
import io
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from tfrobust import attacks


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training was stopped before anything was saved."""


class EpochBackup(keras.callbacks.Callback):
    """Saves the whole training state (weights and optimizer) after every epoch.

    Writes ``epoch-<N>.weights.h5`` under a temporary name, renames it into
    place, then replaces ``state.json`` (which names the file and the number
    of finished epochs) with an atomic rename. A kill at any moment, even
    during a write, leaves ``state.json`` pointing at a complete file.
    :func:`restore` reads it back before ``fit`` so the run resumes at the
    start of the first unfinished epoch. The directory is removed when
    training ends normally.
    """

    STATE = "state.json"

    def __init__(self, backup_dir: str):
        super().__init__()
        self.backup_dir = backup_dir

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{epoch + 1:05d}.weights.h5"
        final = os.path.join(self.backup_dir, name)
        partial = os.path.join(self.backup_dir, f"partial-{name}")
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, final)
        state_path = os.path.join(self.backup_dir, self.STATE)
        with open(state_path + ".tmp", "w") as f:
            json.dump({"epoch": epoch + 1, "weights": name}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(state_path + ".tmp", state_path)
        for old in glob.glob(os.path.join(self.backup_dir, "*.weights.h5")):
            if os.path.basename(old) != name:
                os.remove(old)

    def on_train_end(self, logs=None):
        import shutil

        shutil.rmtree(self.backup_dir, ignore_errors=True)

    @classmethod
    def restore(cls, model: keras.Model, backup_dir: str) -> int:
        """Loads the last complete backup into ``model``; returns the number of finished epochs."""
        state_path = os.path.join(backup_dir, cls.STATE)
        if not os.path.exists(state_path):
            return 0
        with open(state_path) as f:
            state = json.load(f)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(backup_dir, state["weights"]))
        return int(state["epoch"])


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops at the first NaN or infinite loss by raising :class:`TrainingDiverged`.

    Raising (rather than ``stop_training``) keeps Keras from running the
    epoch-end callbacks, so no checkpoint or backup is written from the
    diverged weights: the last good ones stay on disk.
    """

    def __init__(self, checkpoint_hint: str = ""):
        super().__init__()
        self.checkpoint_hint = checkpoint_hint
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            hint = f"; the last good checkpoint is {self.checkpoint_hint}" if self.checkpoint_hint else ""
            raise TrainingDiverged(
                f"the training loss became {float(loss)} at epoch {self._epoch + 1}, batch {batch + 1}{hint}; "
                "lower optim.lr or check the data"
            )


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the current learning rate to the epoch logs (TensorBoard, CSV, history)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def _grid_png(clean, adversarial, labels, clean_pred, adv_pred, class_names=None) -> bytes:
    from matplotlib.figure import Figure

    n = len(clean)
    fig = Figure(figsize=(1.6 * n, 3.6))
    for row, (images, preds, title) in enumerate(((clean, clean_pred, "clean"), (adversarial, adv_pred, "adversarial"))):
        for i in range(n):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            image = images[i]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            name = (lambda k: class_names[k] if class_names else str(k))
            ok = preds[i] == labels[i]
            ax.set_title(f"{name(preds[i])}", fontsize=8, color="green" if ok else "red")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle("prediction (green: correct, red: wrong); labels: " + " ".join(str(int(k)) for k in labels), fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


class AdversarialExamplesImages(keras.callbacks.Callback):
    """Writes a TensorBoard image grid of clean and PGD examples with their predictions."""

    def __init__(self, x, y, log_dir: str, eps: float, step_size: float, steps: int, norm: str = "linf", every: int = 1):
        super().__init__()
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y, np.int32)
        self.log_dir = log_dir
        self.eps, self.step_size, self.steps, self.norm = eps, step_size, steps, norm
        self.every = max(int(every), 1)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        network = getattr(self.model, "network", self.model)
        fn = lambda t: network(t, training=False)  # noqa: E731
        x_adv = attacks.pgd(fn, self.x, self.y, self.eps, self.step_size, self.steps, norm=self.norm, seed=0).numpy()
        clean_pred = np.argmax(fn(self.x).numpy(), axis=-1)
        adv_pred = np.argmax(fn(x_adv).numpy(), axis=-1)
        png = _grid_png(self.x, x_adv, self.y, clean_pred, adv_pred)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "images"))
        with self._writer.as_default():
            tf.summary.image("clean_and_adversarial", tf.image.decode_png(png)[tf.newaxis], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_hparams(log_dir: str, config: dict) -> None:
    """Records the flattened config with TensorBoard's hparams plugin."""
    from tensorboard.plugins.hparams import api as hp

    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", config)
    with tf.summary.create_file_writer(os.path.join(log_dir, "hparams")).as_default():
        hp.hparams(flat)


__all__ = [
    "TrainingDiverged",
    "EpochBackup",
    "NonFiniteLossGuard",
    "LearningRateLogger",
    "AdversarialExamplesImages",
    "write_hparams",
]
