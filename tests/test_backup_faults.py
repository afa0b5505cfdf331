"""Damaged backups are noticed before they are used; a resumed run keeps the TensorBoard points of its
finished epochs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import TINY, snapshot
from tfrobust import experiment, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StopAfterFirstEpoch(keras.callbacks.Callback):
    """Interrupts training once the first epoch is backed up (as Ctrl-C there would)."""

    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


def interrupted_run(workdir, command):
    """The run of train.py ``command``, interrupted after its first epoch's backup (in this process: faster)."""
    from tfrobust.cli import train_parser
    from tfrobust.config import load_config, parse_overrides

    args = train_parser().parse_args(command)
    overrides = dict(parse_overrides(args.set), **{"optim.epochs": args.epochs, "runtime.seed": args.seed})
    with pytest.raises(KeyboardInterrupt):
        experiment.train(load_config(None, overrides), str(workdir), extra_callbacks=[StopAfterFirstEpoch()])


def test_a_damaged_backup_is_refused_before_it_is_used(tmp_path):
    workdir = tmp_path / "run"
    command = [*TINY, "--epochs", "2", "--no-eval", "--workdir", str(workdir)]
    interrupted_run(workdir, command)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    state = json.loads((workdir / "backup" / "state.json").read_text())
    weights = workdir / "backup" / state["weights"]
    assert state["sha256"] == {state["weights"]: rundir.sha256_of(str(weights))}
    # Random bytes in the middle of the file: the HDF5 structure stays readable, the numbers do not.
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
    weights.write_bytes(bytes(data))
    before = snapshot(workdir)
    done = subprocess.run([sys.executable, "train.py", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: the backup file {weights} is damaged (its sha256 differs from the one recorded when it was "
        "written); nothing was loaded or changed; the checkpoints keep the last good weights, but the run cannot "
        "resume: move the run directory aside and start again")
    assert snapshot(workdir) == before  # the checkpoints are not rewritten from the damaged file


def test_a_resumed_run_keeps_the_tensorboard_points_of_its_finished_epochs(tmp_path):
    """Interrupted after epoch 1 (2 optimizer steps per epoch) and resumed: every series holds each epoch once,
    the validation series indexed by iteration included (steps 2 and 4)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tfrobust.cli import train_parser
    from tfrobust.config import load_config, parse_overrides

    workdir = tmp_path / "run"
    command = [*TINY, "--epochs", "2", "--no-eval", "--workdir", str(workdir)]
    interrupted_run(workdir, command)
    args = train_parser().parse_args(command)
    experiment.train(load_config(None, dict(parse_overrides(args.set), **{"optim.epochs": 2, "runtime.seed": 3})),
                     str(workdir))

    def steps(sub, tag):
        accumulator = EventAccumulator(str(workdir / "tensorboard" / sub), purge_orphaned_data=False).Reload()
        return [e.step for e in accumulator.Tensors(tag)]

    assert steps("validation", "evaluation_pgd_accuracy_vs_iterations") == [2, 4]
    assert steps("validation", "epoch_pgd_accuracy") == [0, 1]
    assert steps("train", "epoch_loss") == [0, 1]


def test_the_best_checkpoint_is_checked_against_its_recorded_checksum(tmp_path):
    """What the final save reads back (checkpoints/best.weights.h5) is the file the checkpoint wrote."""
    from tfrobust.callbacks import AtomicModelCheckpoint, check_file
    from tfrobust.errors import UserError

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0)
    path = tmp_path / "best.weights.h5"
    checkpoint = AtomicModelCheckpoint(str(path), save_weights_only=True)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {})
    assert checkpoint.get_state()["sha256"] == rundir.sha256_of(str(path))
    restored = AtomicModelCheckpoint(str(path), save_weights_only=True)
    restored.set_state(checkpoint.get_state())  # as a resume does, from the backup
    check_file(str(path), restored.sha256, "the best checkpoint")  # intact: no error
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"^the best checkpoint .*best.weights.h5 is damaged \(its sha256 differs"):
        check_file(str(path), restored.sha256, "the best checkpoint")
