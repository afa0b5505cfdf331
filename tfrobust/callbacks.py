"""Keras callbacks for long, safe runs: backup/resume, divergence, TensorBoard extras.

Every file these callbacks write is written under a temporary name and then
renamed into place (:func:`atomic_write`), so a kill or a failed write (disk
full) never leaves a torn file where a good one was.

They rely only on the calls and logs Keras' ``fit`` makes, which
:func:`tfrobust.multiworker.fit_distributed` makes too: the same objects run
on one device, under MirroredStrategy and on every worker of a cluster (there
each worker writes into its own directory; see
:func:`tfrobust.experiment.training_callbacks`, which builds the list).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from tfrobust import attacks
from tfrobust.rundir import (FILE_OVERHEAD_BYTES, atomic_path, atomic_write, check_free_space, partial_name, remove,
                             sha256_of, variables_nbytes)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training was stopped before anything was saved."""


def _json_number(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _from_json_number(value):
    return None if value is None else float(value)


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint writing to ``partial-<name>`` and renaming, with resumable state.

    The previous good checkpoint stays in place until a new one is complete.
    ``best_epoch`` (1-based) is the epoch whose weights are in the file; with
    ``save_best_only`` it is the epoch of the best monitored value ``best``;
    ``sha256`` is the checksum of the file as written, checked before the
    file is read back (:func:`check_file`). :meth:`get_state` /
    :meth:`set_state` carry the three across a resume.
    """

    def __init__(self, filepath: str, **kwargs):
        self.final_path = filepath
        super().__init__(partial_name(filepath), **kwargs)
        self.best_epoch = None
        self.sha256 = None

    def on_epoch_end(self, epoch, logs=None):
        remove(self.filepath)
        check_free_space(self.filepath, weights_file_nbytes(self.model))
        super().on_epoch_end(epoch, logs)
        if os.path.exists(self.filepath):
            checksum = sha256_of(self.filepath)
            os.replace(self.filepath, self.final_path)
            self.best_epoch, self.sha256 = epoch + 1, checksum

    def get_state(self) -> dict:
        return {"best": _json_number(self.best), "best_epoch": self.best_epoch, "sha256": self.sha256}

    def set_state(self, state: dict) -> None:
        self.best = _from_json_number(state.get("best"))
        self.best_epoch = state.get("best_epoch")
        self.sha256 = state.get("sha256")


def weights_file_nbytes(model) -> int:
    """An upper estimate of the size of ``model.save_weights``' file: the weights, the optimizer's variables
    and the file's structure."""
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + (list(optimizer.variables) if optimizer is not None else [])
    return variables_nbytes(variables) + FILE_OVERHEAD_BYTES


def check_file(path: str, checksum, what: str, hint: str = "") -> None:
    """Refuses (UserError, one line, ending with ``hint``) a file whose sha256 is not ``checksum``
    (None: not recorded, not checked)."""
    if checksum is None:
        return
    from tfrobust.errors import UserError

    if not os.path.isfile(path):
        raise UserError(f"{what} {path} is missing; nothing was changed{hint}")
    if sha256_of(path) != checksum:
        raise UserError(f"{what} {path} is damaged (its sha256 differs from the one recorded when it was written); "
                        f"nothing was loaded or changed{hint}")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping whose counters (wait, best, stopped epoch) survive a resume.

    Keras resets the counters in ``on_train_begin``; a state given to
    :meth:`set_state` is applied right after that reset.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._resume_state = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._resume_state is not None:
            state = self._resume_state
            self.wait = int(state["wait"])
            self.best = _from_json_number(state["best"])
            self.best_epoch = int(state["best_epoch"])
            self.stopped_epoch = int(state["stopped_epoch"])

    def get_state(self) -> dict:
        return {"wait": int(self.wait), "best": _json_number(self.best), "best_epoch": int(self.best_epoch),
                "stopped_epoch": int(self.stopped_epoch)}

    def set_state(self, state: dict) -> None:
        self._resume_state = dict(state)


class HistoryLog(keras.callbacks.Callback):
    """Every epoch's logs, kept in order and rewritten atomically to ``history.csv`` after each epoch.

    Unlike an appending CSV log, the rows are part of the backup state, so a
    resumed run's history is exactly the uninterrupted run's (no epoch twice,
    no torn row).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.rows: list = []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": int(epoch)}
        for key, value in sorted((logs or {}).items()):
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                continue
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        self.write()

    def write(self) -> None:
        keys = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in keys})
        atomic_write(self.path, buffer.getvalue())

    def history(self) -> dict:
        """Metric name -> per-epoch list (None where an epoch lacks the metric)."""
        keys = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        return {k: [None if r.get(k) is None else float(r[k]) for r in self.rows] for k in keys}

    def get_state(self) -> dict:
        return {"rows": [{k: _json_number(v) for k, v in r.items()} for r in self.rows]}

    def set_state(self, state: dict) -> None:
        self.rows = [{k: (int(v) if k == "epoch" else _from_json_number(v)) for k, v in r.items()}
                     for r in state.get("rows", [])]


def _csv_value(value):
    return "" if value is None else repr(float(value))


class ResumeState:
    """What :meth:`EpochBackup.restore` found: finished epochs, whether training is over, callback states."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.epoch = int(state.get("epoch", 0))
        self.stopped = bool(state.get("stopped", False))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.callbacks = state.get("callbacks", {})


class EpochBackup(keras.callbacks.Callback):
    """Saves the whole training state after every epoch, atomically.

    The state is: the weights and optimizer (``epoch-<N>.weights.h5``), the
    weights of the best epoch so far (the file of that epoch, kept), and in
    ``state.json`` the number of finished epochs, whether training stopped
    (early stopping), the training time so far, and the state of every
    callback in ``stateful`` (name -> callback with ``get_state`` returning
    JSON-able data and ``set_state`` taking it back: the best checkpoint's
    score and epoch, early stopping's counters, the history, and any other
    callback that implements the two methods). Weight files are written under a temporary name
    and renamed; ``state.json`` is replaced last by an atomic rename, so a
    kill at any moment leaves ``state.json`` naming complete files. The
    sha256 of each weight file is recorded in ``state.json`` (``"sha256"``)
    and checked before the file is used: a damaged file is refused in one
    line and nothing (weights, checkpoints) is changed.

    :meth:`restore` loads it back before ``fit``: the weights into the model,
    the callback states into the callbacks, and the last and best checkpoints
    are rewritten from the backup, so they match the restored epoch. The
    directory is kept when ``fit`` ends; :meth:`discard` removes it once the
    final networks (and report) are on disk.
    """

    STATE = "state.json"

    def __init__(self, backup_dir: str, stateful: dict | None = None, best: AtomicModelCheckpoint | None = None,
                 resumed: ResumeState | None = None):
        super().__init__()
        self.backup_dir = backup_dir
        self.stateful = dict(stateful or {})
        self.best = best
        resumed = resumed or ResumeState()
        self._seconds_before = resumed.train_seconds
        self._best_name = None
        self._sums = {}
        self._start = None
        state_path = os.path.join(backup_dir, self.STATE)
        if os.path.exists(state_path):
            state = self.read_state(backup_dir)
            self._best_name = state.get("best_weights")
            self._sums = dict(state.get("sha256") or {})

    def on_train_begin(self, logs=None):
        self._start = time.time()

    def train_seconds(self) -> float:
        return self._seconds_before + (time.time() - self._start if self._start is not None else 0.0)

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{epoch + 1:05d}.weights.h5"
        with atomic_path(os.path.join(self.backup_dir, name)) as partial:
            check_free_space(partial, weights_file_nbytes(self.model))
            self.model.save_weights(partial, overwrite=True)
            checksum = sha256_of(partial)
        if self.best is not None and self.best.best_epoch == epoch + 1:
            self._best_name = name
        self._sums = {key: value for key, value in self._sums.items() if key == self._best_name}
        self._sums[name] = checksum
        state = {
            "epoch": epoch + 1, "weights": name, "best_weights": self._best_name, "sha256": dict(self._sums),
            "stopped": bool(self.model.stop_training), "train_seconds": self.train_seconds(),
            "callbacks": {key: cb.get_state() for key, cb in self.stateful.items()},
        }
        atomic_write(os.path.join(self.backup_dir, self.STATE), json.dumps(state))
        keep = {name, self._best_name}
        for old in glob.glob(os.path.join(self.backup_dir, "*.weights.h5")):
            if os.path.basename(old) not in keep:
                remove(old)

    @classmethod
    def read_state(cls, backup_dir: str) -> dict:
        """The parsed ``state.json`` ({} when there is none)."""
        state_path = os.path.join(backup_dir, cls.STATE)
        if not os.path.exists(state_path):
            return {}
        try:
            with open(state_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            from tfrobust.errors import UserError

            raise UserError(f"the backup {state_path} cannot be read ({e}); move the run directory aside and start again") from None

    @classmethod
    def restore(cls, model: keras.Model, backup_dir: str, stateful: dict | None = None,
                checkpoints: dict | None = None) -> ResumeState:
        """Loads the last complete backup into ``model`` and ``stateful`` callbacks.

        ``checkpoints`` maps "last"/"best" to checkpoint paths that are
        rewritten (atomically) from the backup's weight files.
        """
        state = cls.read_state(backup_dir)
        if not state:
            return ResumeState()
        sums = state.get("sha256") or {}
        for name in {state["weights"], state.get("best_weights")} - {None}:
            check_file(os.path.join(backup_dir, name), sums.get(name), "the backup file",
                       "; the checkpoints keep the last good weights, but the run cannot resume: move the run "
                       "directory aside and start again")
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(os.path.join(backup_dir, state["weights"]))
        except (OSError, ValueError, KeyError) as e:
            from tfrobust.errors import UserError

            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"the backup in {backup_dir} cannot be loaded ({first}); "
                            "move the run directory aside and start again") from None
        for key, cb in (stateful or {}).items():
            if key in state.get("callbacks", {}):
                cb.set_state(state["callbacks"][key])
        for which, source in (("last", state["weights"]), ("best", state.get("best_weights"))):
            target = (checkpoints or {}).get(which)
            if target and source:
                with atomic_path(target) as partial:
                    shutil.copyfile(os.path.join(backup_dir, source), partial)
                for cb in (stateful or {}).values():  # the checkpoint now holds the backup's file
                    if getattr(cb, "final_path", None) == target and sums.get(source):
                        cb.sha256 = sums[source]
        return ResumeState(state)

    @staticmethod
    def discard(backup_dir: str) -> None:
        shutil.rmtree(backup_dir, ignore_errors=True)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops at the first NaN or infinite loss by raising :class:`TrainingDiverged`.

    Raising (rather than ``stop_training``) keeps Keras from running the
    epoch-end callbacks, so no checkpoint or backup is written from the
    diverged weights: the last good ones stay on disk. The guard keeps no
    state across epochs (its decision depends on the current batch only), so
    a resumed run guards exactly as an uninterrupted one.
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
                "lower optim.lr (or check the data) and start again in a new --workdir; rerunning the same command "
                "retries from the last backup"
            )


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the epoch's learning rate to the epoch logs (TensorBoard, CSV, history).

    The rate is read at the epoch's first step: read at the epoch's end, a
    schedule would already give the next epoch's rate.
    """

    def __init__(self):
        super().__init__()
        self._rate = None

    def on_epoch_begin(self, epoch, logs=None):
        self._rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._rate is not None:
            logs["learning_rate"] = self._rate


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
        self._runner = None

    def _attack(self, model_fn, x, y, seed):
        return attacks.pgd(model_fn, x, y, self.eps, self.step_size, self.steps, norm=self.norm, seed=seed)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        network = getattr(self.model, "network", self.model)
        fn = lambda t: network(t, training=False)  # noqa: E731
        if self._runner is None:  # compiled once, reused every epoch (it reads the current weights)
            self._runner = attacks.AttackRunner(fn, self._attack, measure=lambda _, x_adv, x, y: x_adv)
        x_adv = self._runner(self.x, self.y, batch_size=len(self.x), seeds=lambda b, r: 0)
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


ITERATION_SERIES = "_vs_iterations"


def drop_events_from(log_dir: str, epoch: int, iterations: int | None = None) -> int:
    """Removes from the event files under ``log_dir`` what was logged after the backup of ``epoch`` epochs.

    A run resumed from that backup repeats the epochs after it; what an
    interrupted attempt logged for them (an epoch written to TensorBoard
    before its backup was) would show twice. Each series is cut by its own
    step: a series indexed by epoch (``epoch_*``, images, flatness) loses its
    steps ``>= epoch``; a series indexed by optimizer iteration (Keras'
    ``evaluation_*_vs_iterations``, logged at the optimizer's iteration count
    after each epoch's validation) loses its steps ``> iterations``, the count
    at the backup (None: the epoch rule for every series). Each event file
    that holds such summaries is rewritten without them under a temporary
    name and renamed into place, which also leaves out bytes of a record cut
    short by a kill (TensorBoard skips those anyway). Returns the number of
    summary values removed.
    """
    from tensorboard.compat.proto import event_pb2

    def late(tag, step):
        if iterations is not None and tag.endswith(ITERATION_SERIES):
            return step > iterations
        return step >= epoch

    removed = 0
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "*tfevents*"), recursive=True)):
        kept, dropped = [], 0
        try:
            for record in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(record.numpy())
                values = list(event.summary.value) if event.HasField("summary") else []
                keep = [v for v in values if not late(v.tag, event.step)]
                dropped += len(values) - len(keep)
                if len(keep) == len(values):
                    kept.append(record.numpy())
                elif keep:
                    del event.summary.value[:]
                    event.summary.value.extend(keep)
                    kept.append(event.SerializeToString())
        except tf.errors.DataLossError:
            dropped += 1  # a corrupt record: the file is rewritten without it
        if not dropped:
            continue
        partial = os.path.join(os.path.dirname(path), "partial-rewrite")
        with tf.io.TFRecordWriter(partial) as writer:
            for record in kept:
                writer.write(record)
        os.replace(partial, path)
        removed += dropped
    return removed


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
    "drop_events_from",
    "TrainingDiverged",
    "EpochBackup",
    "AtomicModelCheckpoint",
    "check_file",
    "NonFiniteLossGuard",
    "LearningRateLogger",
    "AdversarialExamplesImages",
    "write_hparams",
]
