"""Reliability promises: kill -9 anywhere resumes to the uninterrupted run (last AND best networks,
history, report); one owner per run directory; atomic writes; an explicit finished marker."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfrobust import callbacks as callbacks_lib
from tfrobust import experiment, rundir
from tfrobust.cli import train_main
from tfrobust.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny: 256 training examples in batches of 32 (8 steps per epoch), 2-step PGD, 64 test examples.
# Early stopping with patience 1 makes its counters part of what must survive a resume.
COMMAND = ["--defense", "at+awp", "--epochs", "4", "--seed", "3",
           "--set", "data.train_examples=256", "--set", "data.validation_examples=64", "--set", "data.batch_size=32",
           "--set", "data.test_examples=64", "--set", "attack.steps=2", "--set", "eval.pgd_steps=2",
           "--set", "runtime.verbose=0", "--set", "eval.images_every=0", "--set", "eval.integrity_examples=0",
           "--set", "defense.awp.warmup_epochs=1", "--set", "optim.early_stopping_patience=1",
           "--set", "runtime.deterministic=true"]

# Runs train.py's entry point; KILL_AT names a moment at which the process SIGKILLs itself.
DRIVER = r"""
import os, signal, sys
from tfrobust import callbacks as cb, evaluation, export

at = os.environ.get("KILL_AT", "")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if at == "mid_epoch":  # the 4th batch of the second epoch
    guard = cb.NonFiniteLossGuard.on_train_batch_end
    def on_batch(self, batch, logs=None):
        guard(self, batch, logs)
        if self._epoch == 1 and batch == 3:
            die()
    cb.NonFiniteLossGuard.on_train_batch_end = on_batch
elif at.endswith("_write"):  # a complete temporary file, not yet renamed into place
    target = {"checkpoint_write": os.path.join("checkpoints", "last.weights.h5"), "history_write": "history.csv",
              "weights_write": os.path.join("backup", "epoch-"), "state_write": os.path.join("backup", "state.json")}[at]
    replace = os.replace
    def on_replace(src, dst):
        if target in str(dst):
            die()
        replace(src, dst)
    os.replace = on_replace
elif at == "final_save":  # last network saved, best one not yet
    save = export.save_network
    def on_save(network, workdir, keras_name, export_name):
        if keras_name == "best.keras":
            die()
        save(network, workdir, keras_name, export_name)
    export.save_network = on_save
elif at == "final_evaluation":  # while evaluating the best network
    evaluate = evaluation.evaluate
    calls = []
    def on_evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            die()
        return evaluate(*a, **k)
    evaluation.evaluate = on_evaluate
from tfrobust.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


def run(workdir, kill_at=""):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KILL_AT=kill_at)
    return subprocess.run([sys.executable, "-c", DRIVER, *COMMAND, "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def weights_of(path):
    return [w.numpy() for w in keras.saving.load_model(path).weights]


def outcome(workdir):
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    return history, report


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    done = run(workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    return workdir


@pytest.mark.slow
def test_kill_9_at_every_phase_resumes_to_the_uninterrupted_run(reference, tmp_path, capsys):
    """One run killed seven times in a row (mid-epoch, while writing the last checkpoint, the history, the
    backup's weights and its state, during the final save, during the final evaluation), resumed each time by
    the same command."""
    workdir = tmp_path / "killed"
    final_state_mtime = last_mtime = None
    for kill_at in ("mid_epoch", "checkpoint_write", "history_write", "weights_write", "state_write", "final_save",
                    "final_evaluation"):
        killed = run(workdir, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.returncode, killed.stderr[-2000:])
        assert not os.path.exists(workdir / "report.json"), kill_at
        finished = {k: v for k, v in rundir.finished(str(workdir)).items() if k != "networks"}
        assert finished == ({"trained": True, "evaluated": False} if kill_at == "final_evaluation" else {}), kill_at
        # The dead process's lock is left behind and is detected as stale by the next run.
        with open(workdir / rundir.LOCK) as f:
            assert f.read().split()[1] == socket.gethostname()
        state_mtime = os.path.getmtime(workdir / "backup" / "state.json")
        if kill_at == "final_evaluation":
            # Killed during the final save, the rerun did not train again (the backup's state is untouched).
            assert state_mtime == final_state_mtime
            last_mtime = os.path.getmtime(workdir / "model.keras")
        final_state_mtime = state_mtime
    resumed = run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Killed during the final evaluation, the rerun only evaluated: the networks were not saved again.
    assert os.path.getmtime(workdir / "model.keras") == last_mtime
    assert not os.path.exists(workdir / rundir.LOCK)
    assert not os.path.exists(workdir / "backup"), "the backup is removed once the run is finished"
    with open(workdir / rundir.FINISHED) as f:
        assert json.load(f) == {"trained": True, "evaluated": True, "networks": {
            name: rundir.sha256_of(str(workdir / name)) for name in ("model.keras", "best.keras")}}

    history, report = outcome(workdir)
    ref_history, ref_report = outcome(reference)
    # Same machine, same process type, same seed, TensorFlow's op determinism on: resuming must not change
    # a single computation. The weight tolerance is only a margin (far below the 0.15 weight difference
    # that a wrongly chosen best epoch produced); the predictions, hence the accuracies, must be identical.
    assert history.keys() == ref_history.keys()
    for key in history:
        if key != "train_seconds":
            np.testing.assert_allclose(history[key], ref_history[key], rtol=0, atol=1e-6, err_msg=key)
    assert history["train_seconds"] > 0
    for name in ("model.keras", "best.keras"):
        for a, b in zip(weights_of(workdir / name), weights_of(reference / name)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    for which in ("last", "best"):
        for attack, accuracy in ref_report["models"][which]["accuracy"].items():
            assert report["models"][which]["accuracy"][attack] == accuracy, (which, attack)


@pytest.mark.slow
def test_second_process_is_refused_while_the_first_runs(tmp_path, capsys):
    workdir = tmp_path / "busy"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.Popen([sys.executable, "-c", DRIVER, *COMMAND, "--workdir", str(workdir)], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = workdir / rundir.LOCK
        import time

        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert lock.exists(), "the first run never took the lock"
        with pytest.raises(SystemExit) as exit_info:
            train_main(COMMAND + ["--workdir", str(workdir)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert f"is in use by process {first.pid}" in err and len(err.strip().splitlines()) == 1
        assert first.poll() is None, "the refusal must not disturb the owner"
    finally:
        first.kill()
        first.wait()


def _compiled_tiny():
    from conftest import tiny_cnn

    model = tiny_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model(np.zeros((1, 28, 28, 1), "float32"))
    return model


def _callbacks(tmp_path):
    best = callbacks_lib.AtomicModelCheckpoint(str(tmp_path / "ckpt" / "best.weights.h5"), monitor="val_pgd_accuracy",
                                               mode="max", save_best_only=True, save_weights_only=True)
    stopping = callbacks_lib.ResumableEarlyStopping(monitor="val_pgd_accuracy", mode="max", patience=3)
    history = callbacks_lib.HistoryLog(str(tmp_path / "history.csv"))
    return best, stopping, history, {"best_checkpoint": best, "early_stopping": stopping, "history": history}


def test_backup_holds_best_score_early_stopping_counters_and_history(tmp_path):
    """Three epochs through the real callbacks; a fresh set of callbacks restored from the backup carries
    on exactly: the best score and its epoch's weights, the early-stopping counters, the history rows."""
    (tmp_path / "ckpt").mkdir()
    model = _compiled_tiny()
    best, stopping, history, stateful = _callbacks(tmp_path)
    backup = callbacks_lib.EpochBackup(str(tmp_path / "backup"), stateful, best=best)
    for cb in (best, stopping, history, backup):
        cb.set_model(model)
        cb.on_train_begin()
    best_weights = None
    for epoch, accuracy in enumerate([0.2, 0.5, 0.4]):  # the best is the second epoch
        for w in model.weights:
            w.assign(w + 0.01 * (epoch + 1))
        logs = {"loss": 1.0 / (epoch + 1), "val_pgd_accuracy": accuracy}
        for cb in (best, stopping, history, backup):
            cb.on_epoch_end(epoch, logs)
        if epoch == 1:
            best_weights = [w.numpy().copy() for w in model.weights]
    last_weights = [w.numpy().copy() for w in model.weights]
    # The checkpoints on disk are then torn or stale (a kill between a checkpoint and the backup).
    (tmp_path / "ckpt" / "best.weights.h5").write_bytes(b"torn")

    fresh = _compiled_tiny()
    best2, stopping2, history2, stateful2 = _callbacks(tmp_path)
    checkpoints = {"best": str(tmp_path / "ckpt" / "best.weights.h5"), "last": str(tmp_path / "ckpt" / "last.weights.h5")}
    resumed = callbacks_lib.EpochBackup.restore(fresh, str(tmp_path / "backup"), stateful2, checkpoints)
    stopping2.set_model(fresh)
    stopping2.on_train_begin()  # Keras resets the counters here; the restored ones must win
    assert resumed.epoch == 3 and not resumed.stopped
    assert (best2.best, best2.best_epoch) == (0.5, 2)
    assert (stopping2.wait, stopping2.best, stopping2.best_epoch, stopping2.stopped_epoch) == (1, 0.5, 1, 0)
    assert history2.history()["val_pgd_accuracy"] == [0.2, 0.5, 0.4]
    for w, expected in zip(fresh.weights, last_weights):
        np.testing.assert_array_equal(w.numpy(), expected)
    fresh.load_weights(checkpoints["best"])
    for w, expected in zip(fresh.weights, best_weights):
        np.testing.assert_array_equal(w.numpy(), expected)
    fresh.load_weights(checkpoints["last"])
    for w, expected in zip(fresh.weights, last_weights):
        np.testing.assert_array_equal(w.numpy(), expected)
    # A fourth epoch that is worse than the best neither replaces the best file nor resets the counter.
    best2.set_model(fresh)
    best2.on_epoch_end(3, {"val_pgd_accuracy": 0.45})
    stopping2.on_epoch_end(3, {"val_pgd_accuracy": 0.45})
    assert best2.best_epoch == 2 and stopping2.wait == 2
    fresh.load_weights(checkpoints["best"])
    np.testing.assert_array_equal(fresh.weights[0].numpy(), best_weights[0])


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock_one_owner_stale_locks_and_other_hosts(tmp_path):
    lock = tmp_path / rundir.LOCK
    with rundir.lock(str(tmp_path)):
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with rundir.lock(str(tmp_path)):  # re-entrant in the owning process
            pass
        assert lock.exists()
    assert not lock.exists()
    # A live process on this host (our parent) owns it: refused in one line.
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    with pytest.raises(UserError, match=f"in use by process {os.getppid()} "):
        with rundir.lock(str(tmp_path)):
            pass
    # Another host: refused, naming the host (its pid cannot be checked from here).
    lock.write_text("1 some-other-host\n")
    with pytest.raises(UserError, match="on host some-other-host"):
        with rundir.lock(str(tmp_path)):
            pass
    # A dead owner (kill -9) on this host: the lock is stale and taken over.
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    with rundir.lock(str(tmp_path)):
        assert lock.read_text().split()[0] == str(os.getpid())


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_writes_never_tear_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    rundir.atomic_write(str(path), '{"good": 1}')
    monkeypatch.setattr(os, "fsync", _enospc)  # the disk fills while the new file is written
    with pytest.raises(OSError):
        rundir.atomic_write(str(path), '{"new": 2, "much longer": "text"}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"good": 1}
    assert os.listdir(tmp_path) == ["report.json"], "the partial file is cleaned up"

    # A checkpoint whose save fails half-way keeps the previous good checkpoint.
    model = _compiled_tiny()
    last = tmp_path / "last.weights.h5"
    checkpoint = callbacks_lib.AtomicModelCheckpoint(str(last), save_weights_only=True)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {})
    good = [w.numpy().copy() for w in model.weights]
    for w in model.weights:
        w.assign(w + 1.0)

    def torn_save(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF\r\n half a file")
        _enospc()

    monkeypatch.setattr(model, "save_weights", torn_save)
    with pytest.raises(OSError):
        checkpoint.on_epoch_end(1, {})
    monkeypatch.undo()
    model.load_weights(str(last))
    for w, expected in zip(model.weights, good):
        np.testing.assert_array_equal(w.numpy(), expected)


def test_finished_only_by_the_marker(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "report.json").write_text('{"models": {"last": {"accur')  # torn (written by an older version)
    assert rundir.finished(str(tmp_path)) == {}
    assert experiment.workdir_status(str(tmp_path)) == "unfinished"
    (tmp_path / "report.json").write_text("{}")
    assert experiment.workdir_status(str(tmp_path)) == "finished"  # a complete report without a marker: older runs
    (tmp_path / rundir.FINISHED).write_text('{"trained": tr')  # a damaged marker: refused, never retrained
    with pytest.raises(UserError, match="marker is damaged"):
        experiment.workdir_status(str(tmp_path))
    rundir.mark_finished(str(tmp_path), evaluated=False)
    assert experiment.workdir_status(str(tmp_path)) == "trained"
    with pytest.raises(UserError, match="finished training run"):
        experiment.prepare_workdir(str(tmp_path))
    rundir.mark_finished(str(tmp_path), evaluated=True)
    with pytest.raises(UserError, match="holds a finished run"):
        experiment.prepare_workdir(str(tmp_path))
    with pytest.raises(UserError, match="must not be empty"):
        experiment.workdir_status("")


def test_interrupt_prints_the_exact_resume_command(monkeypatch, capsys):
    import shlex

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train_and_evaluate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--epochs", "1", "--set", "optim.lr=0.01"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 130
    workdir = out.split("run directory: ")[1].split()[0]
    assert err.startswith("interrupted; resume with: ")
    command = shlex.split(err.strip().split("resume with: ")[1])
    assert command[-2:] == ["--workdir", workdir]
    assert command[-6:-2] == ["--epochs", "1", "--set", "optim.lr=0.01"]
    assert not os.path.exists(workdir)


def test_refused_start_leaves_nothing_that_refuses_the_corrected_command(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--set", f"data.data_dir={empty}", "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is empty" in err and len(err.strip().splitlines()) == 1
    assert experiment.workdir_status(str(workdir)) == "new"  # no config.yaml, no lock left behind


@pytest.mark.slow
def test_finished_train_only_run_is_kept_and_can_be_evaluated(tmp_path):
    from tfrobust.config import load_config

    cfg = load_config("configs/fashion_mnist.yaml", {
        "data.train_examples": 64, "data.validation_examples": 32, "data.test_examples": 32, "data.batch_size": 32,
        "attack.steps": 1, "eval.pgd_steps": 1, "optim.epochs": 1, "runtime.verbose": 0,
        "eval.images_every": 0, "eval.integrity_examples": 0})
    workdir = str(tmp_path / "run")
    experiment.train(cfg, workdir)
    marker = rundir.finished(workdir)
    assert (marker["trained"], marker["evaluated"]) == (True, False)
    assert set(marker["networks"]) == {"model.keras", "best.keras"}
    assert not os.path.exists(os.path.join(workdir, "backup"))
    assert not os.path.exists(os.path.join(workdir, rundir.LOCK))
    mtime = os.path.getmtime(os.path.join(workdir, "model.keras"))
    with pytest.raises(UserError, match=r"finished training run \(--no-eval\)"):
        experiment.train(cfg, workdir)
    other = load_config("configs/fashion_mnist.yaml", {**{"optim.lr": 0.01}, **{
        "data.train_examples": 64, "data.validation_examples": 32, "data.test_examples": 32, "data.batch_size": 32,
        "attack.steps": 1, "eval.pgd_steps": 1, "optim.epochs": 1, "runtime.verbose": 0,
        "eval.images_every": 0, "eval.integrity_examples": 0}})
    with pytest.raises(UserError, match="different config"):
        experiment.train_and_evaluate(other, workdir, verbose=False)
    # Without --no-eval the same command evaluates the trained networks; it does not train again.
    report = experiment.train_and_evaluate(cfg, workdir, verbose=False)
    assert os.path.getmtime(os.path.join(workdir, "model.keras")) == mtime
    assert set(report["models"]) == {"last", "best"}
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["models"]["last"]["accuracy"] == report["models"]["last"]["accuracy"]
    assert rundir.finished(workdir)["evaluated"] is True
    with pytest.raises(UserError, match="holds a finished run"):
        experiment.train_and_evaluate(cfg, workdir, verbose=False)


def test_unreadable_backup_is_a_one_line_error(tmp_path):
    model = _compiled_tiny()
    (tmp_path / "state.json").write_text('{"epoch": 3, "weig')
    with pytest.raises(UserError, match="cannot be read") as info:
        callbacks_lib.EpochBackup.restore(model, str(tmp_path))
    assert "\n" not in str(info.value)
    (tmp_path / "state.json").write_text('{"epoch": 3, "weights": "epoch-00003.weights.h5"}')
    (tmp_path / "epoch-00003.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="cannot be loaded") as info:
        callbacks_lib.EpochBackup.restore(model, str(tmp_path))
    assert "\n" not in str(info.value)


def test_backup_holds_the_float16_loss_scale(tmp_path):
    """mixed_float16's non-finite guard lives in the LossScaleOptimizer (its dynamic scale and the count of
    good steps); both come back from the backup."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        model.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0)
        model.optimizer.dynamic_scale.assign(123.0)
        model.optimizer.step_counter.assign(7)
        backup = callbacks_lib.EpochBackup(str(tmp_path))
        backup.set_model(model)
        backup.on_epoch_end(0)
        model.optimizer.dynamic_scale.assign(1.0)
        model.optimizer.step_counter.assign(0)
        assert callbacks_lib.EpochBackup.restore(model, str(tmp_path)).epoch == 1
        assert float(model.optimizer.dynamic_scale.numpy()) == 123.0
        assert int(model.optimizer.step_counter.numpy()) == 7
    finally:
        keras.config.set_dtype_policy(previous)


class _PoisonFirstBatch(keras.callbacks.Callback):
    """Turns the weights into NaN before the first batch (a learning rate far too high, in effect)."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            for w in self.model.network.trainable_variables:
                w.assign(w * np.nan)


@pytest.mark.slow
def test_divergence_in_the_first_epoch_does_not_poison_the_directory(tmp_path):
    from tfrobust.callbacks import TrainingDiverged
    from tfrobust.config import load_config

    tiny = {"data.train_examples": 64, "data.validation_examples": 32, "data.batch_size": 32, "attack.steps": 1,
            "eval.pgd_steps": 1, "optim.epochs": 1, "runtime.verbose": 0, "eval.images_every": 0}
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="lower optim.lr .* new --workdir"):
        experiment.train(load_config("configs/fashion_mnist.yaml", tiny), workdir, extra_callbacks=[_PoisonFirstBatch()])
    assert experiment.workdir_status(workdir) == "unfinished" and not os.path.exists(os.path.join(workdir, rundir.LOCK))
    # No epoch was backed up: the corrected command (another learning rate) starts afresh in the same directory.
    corrected = load_config("configs/fashion_mnist.yaml", dict(tiny, **{"optim.lr": 0.01}))
    _, _, history = experiment.train(corrected, workdir)
    assert history["learning_rate"] == [pytest.approx(0.01)]
    import yaml

    with open(os.path.join(workdir, "config.yaml")) as f:
        assert yaml.safe_load(f)["optim"]["lr"] == 0.01
