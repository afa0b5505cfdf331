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
           "--set", "defense.awp.warmup_epochs=1", "--set", "optim.early_stopping_patience=1"]

# Runs train.py's entry point; KILL_AT names a moment at which the process SIGKILLs itself.
DRIVER = r"""
import os, signal, sys
from tfrobust import callbacks as cb, evaluation, experiment

at = os.environ.get("KILL_AT", "")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if at == "mid_epoch":  # the 4th batch of the second epoch
    guard = cb.NonFiniteLossGuard.on_train_batch_end
    def on_batch(self, batch, logs=None):
        guard(self, batch, logs)
        if self._epoch == 1 and batch == 3:
            die()
    cb.NonFiniteLossGuard.on_train_batch_end = on_batch
elif at in ("weights_write", "state_write"):  # a complete temporary file, not yet renamed into place
    target = "state.json" if at == "state_write" else ".weights.h5"
    replace = os.replace
    def on_replace(src, dst):
        if "backup" in str(dst) and str(dst).endswith(target):
            die()
        replace(src, dst)
    os.replace = on_replace
elif at == "final_save":  # last network saved, best one not yet
    save = experiment._save_network
    def on_save(network, workdir, keras_name, export_name):
        if keras_name == "best.keras":
            die()
        save(network, workdir, keras_name, export_name)
    experiment._save_network = on_save
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
    """One run killed five times in a row (mid-epoch, while writing the backup's weights, while writing its
    state, during the final save, during the final evaluation), resumed each time by the same command."""
    workdir = tmp_path / "killed"
    for kill_at in ("mid_epoch", "weights_write", "state_write", "final_save", "final_evaluation"):
        killed = run(workdir, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.returncode, killed.stderr[-2000:])
        assert not os.path.exists(workdir / "report.json"), kill_at
        finished = rundir.finished(str(workdir))
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
        assert json.load(f) == {"trained": True, "evaluated": True}

    history, report = outcome(workdir)
    ref_history, ref_report = outcome(reference)
    # Same machine, same process type, same seed: resuming must not change a single computation. The
    # tolerance only absorbs the order of multi-threaded float32 sums (differences ~1e-7), far below
    # the 0.15 weight difference that a wrongly chosen best epoch produced.
    assert history.keys() == ref_history.keys()
    for key in history:
        if key != "train_seconds":
            np.testing.assert_allclose(history[key], ref_history[key], atol=1e-5, err_msg=key)
    assert history["train_seconds"] > 0
    for name in ("model.keras", "best.keras"):
        for a, b in zip(weights_of(workdir / name), weights_of(reference / name)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    for which in ("last", "best"):
        for attack, accuracy in ref_report["models"][which]["accuracy"].items():
            # Equal weights (up to float32 summation order) give equal predictions on all 64 examples.
            assert report["models"][which]["accuracy"][attack] == pytest.approx(accuracy, abs=1e-9), (which, attack)


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
