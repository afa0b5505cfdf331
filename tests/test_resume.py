"""Long runs (kill -9 and resume: test_reliability.py): torn backups, divergence, determinism, mixed precision, two devices."""

import json
import os

import keras
import numpy as np
import pytest

from tfrobust import experiment
from tfrobust.callbacks import EpochBackup, TrainingDiverged
from tfrobust.config import load_config


def tiny_config(**extra):
    overrides = {"data.train_examples": 384, "data.validation_examples": 64, "data.batch_size": 32,
                 "attack.steps": 2, "eval.pgd_steps": 2, "runtime.verbose": 0, "runtime.seed": 3,
                 "eval.images_every": 0}
    overrides.update(extra)
    return load_config("configs/fashion_mnist.yaml", overrides)


def test_backup_survives_a_torn_write(tmp_path):
    from conftest import tiny_cnn

    model = tiny_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model(np.zeros((1, 28, 28, 1), "float32"))
    backup = EpochBackup(str(tmp_path))
    backup.set_model(model)
    backup.on_epoch_end(0)
    saved = [w.numpy().copy() for w in model.weights]
    # A later epoch killed while writing: a partial file, no new state.
    (tmp_path / "partial-epoch-00002.weights.h5").write_bytes(b"\x89HDF\r\n garbage")
    for w in model.weights:
        w.assign(w + 1.0)
    assert EpochBackup.restore(model, str(tmp_path)).epoch == 1
    for a, b in zip(model.weights, saved):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    with pytest.raises(TrainingDiverged, match="became nan at epoch 2"):
        experiment.train(tiny_config(**{"optim.epochs": 3}), workdir, extra_callbacks=[_PoisonAt(epoch=1)])
    last = os.path.join(workdir, "checkpoints", "last.weights.h5")
    assert os.path.exists(last)
    with open(os.path.join(workdir, "backup", "state.json")) as f:
        assert json.load(f)["epoch"] == 1
    model, _, _ = experiment.build(tiny_config())
    model.load_weights(last)
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


class _PoisonAt(keras.callbacks.Callback):
    """Turns the weights into NaN at the start of the given epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            for w in self.model.network.trainable_variables:
                w.assign(w * np.nan)


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tmp_path):
    cfg = tiny_config(**{"optim.epochs": 1, "runtime.deterministic": True, "defense.name": "trades+rat"})
    a, _, _ = experiment.train(cfg, str(tmp_path / "a"))
    b, _, _ = experiment.train(cfg, str(tmp_path / "b"))
    for u, v in zip(a.network.weights, b.network.weights):
        np.testing.assert_array_equal(u.numpy(), v.numpy())


@pytest.mark.slow
def test_mixed_bfloat16_trains_on_cpu(tmp_path):
    cfg = tiny_config(**{"optim.epochs": 2, "runtime.mixed_precision": "mixed_bfloat16", "defense.name": "at+awp",
                         "defense.awp.warmup_epochs": 0})
    model, _, history = experiment.train(cfg, str(tmp_path / "bf16"))
    assert model.network.layers[-1].compute_dtype == "bfloat16"
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


@pytest.mark.slow
def test_mirrored_run_matches_one_device(tmp_path):
    """Two epochs of trades+awp through experiment.train on two replicas and on one device.

    The weight-space step on two replicas equals one device to rounding
    (tests/test_distributed.py, with the attack fixed). Here the TRADES attack
    runs too, and a gradient entry within rounding of zero may take the other
    sign under another summation order (one device against two replicas, Intel
    against AMD kernels); that pixel then moves a whole step, so the weights
    drift apart by up to ~1e-3 after a few steps and no weight tolerance holds on
    every CPU. The runs are compared by what such drift cannot change much: the
    per-epoch mean losses (measured apart by 1e-4 relative; a relative tolerance
    of 2% still fails for a per-replica perturbation or a loss not divided by
    the replica count, which double a term or move it by more than 10%), and
    accuracies up to a few examples whose margin is within the drift.
    """
    import tensorflow as tf

    common = {"optim.epochs": 2, "data.train_examples": 128, "defense.name": "trades+awp",
              "defense.awp.warmup_epochs": 0}
    single = tiny_config(**common)
    mirrored = tiny_config(**common, **{"runtime.strategy": "mirrored", "runtime.devices": '["/cpu:0", "/cpu:1"]'})
    a, _, one = experiment.train(single, str(tmp_path / "one"))
    b, _, two = experiment.train(mirrored, str(tmp_path / "two"))
    assert isinstance(b.distribute_strategy, tf.distribute.MirroredStrategy)
    for v in b.network.trainable_variables:
        # Every replica applies the same all-reduced update: identical on any CPU.
        np.testing.assert_array_equal(v.value.values[0].numpy(), v.value.values[1].numpy())
    assert one["epoch"] == two["epoch"] == [0.0, 1.0]
    np.testing.assert_array_equal(one["learning_rate"], two["learning_rate"])
    np.testing.assert_allclose(one["awp_relative_norm"], two["awp_relative_norm"], rtol=1e-5)
    for key in ("loss", "ce_clean", "val_pgd_loss"):
        np.testing.assert_allclose(two[key], one[key], rtol=0.02, err_msg=key)
    # TRADES' KL term is small (~2e-3) and relative to it the drift is larger; its
    # contribution to the loss is checked through "loss" above.
    np.testing.assert_allclose(two["kl"], one["kl"], rtol=0.2, atol=1e-3)
    # Accuracies: up to 4 of 128 training and 4 of 64 validation examples may flip.
    for key, n in (("clean_accuracy", 128), ("adv_accuracy", 128), ("val_clean_accuracy", 64),
                   ("val_pgd_accuracy", 64)):
        np.testing.assert_allclose(two[key], one[key], atol=4.5 / n, err_msg=key)


@pytest.mark.slow
def test_mixed_float16_scales_losses_and_learns(tmp_path):
    cfg = tiny_config(**{"optim.epochs": 2, "runtime.mixed_precision": "mixed_float16", "defense.name": "at+awp",
                         "defense.awp.warmup_epochs": 0})
    model, _, history = experiment.train(cfg, str(tmp_path / "fp16"))
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert model._attack_gradient_scale() > 1
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert history["awp_relative_norm"][-1] == pytest.approx(0.01, rel=1e-2)



def _steps(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # purge_orphaned_data=False: the steps as they are in the files, without TensorBoard's own clean-up.
    accumulator = EventAccumulator(str(directory), purge_orphaned_data=False).Reload()
    if tag in accumulator.Tags().get("scalars", []):
        return [e.step for e in accumulator.Scalars(tag)]
    return [e.step for e in accumulator.Tensors(tag)]


def test_resumed_run_drops_what_the_interrupted_attempt_logged_after_its_backup(tmp_path):
    """An attempt that logged epochs 0, 1 and 2 and was killed before the backup of epoch 2 (backup of 2 epochs):
    the summaries of steps >= 2 go, everything else stays, and bytes of a write cut short by the kill go too."""
    import glob

    import tensorflow as tf

    from tfrobust.callbacks import drop_events_from

    for sub in ("train", "images"):
        with tf.summary.create_file_writer(str(tmp_path / sub)).as_default():
            for step in range(3):
                tf.summary.scalar("epoch_loss", 1.0 / (step + 1), step=step)
                tf.summary.image("grid", tf.zeros((1, 4, 4, 1)), step=step)
    torn = glob.glob(str(tmp_path / "train" / "*tfevents*"))[0]
    with open(torn, "ab") as f:
        f.write(b"\x10\x00\x00\x00")  # the start of a record header: a write cut short
    size = os.path.getsize(torn)
    assert drop_events_from(str(tmp_path), 2) == 4  # two summaries of step 2 per directory
    assert os.path.getsize(torn) < size - 4  # rewritten without them and without the torn bytes
    for sub in ("train", "images"):
        assert _steps(tmp_path / sub, "epoch_loss") == [0, 1]
        assert _steps(tmp_path / sub, "grid") == [0, 1]
    assert drop_events_from(str(tmp_path), 2) == 0  # nothing left to drop: the files are not rewritten


def test_resume_drops_each_series_by_its_own_step(tmp_path):
    """8 optimizer steps per epoch; the backup holds 2 epochs (16 iterations), the attempt logged 3. Epoch series
    keep steps 0 and 1; Keras' validation series indexed by iteration keep 8 and 16 (epochs 0 and 1), not just
    the steps below 2."""
    import tensorflow as tf

    from tfrobust.callbacks import drop_events_from

    with tf.summary.create_file_writer(str(tmp_path / "validation")).as_default():
        for epoch in range(3):
            tf.summary.scalar("epoch_pgd_accuracy", 0.1 * epoch, step=epoch)
            tf.summary.scalar("evaluation_pgd_accuracy_vs_iterations", 0.1 * epoch, step=8 * (epoch + 1))
    assert drop_events_from(str(tmp_path), 2, iterations=16) == 2
    assert _steps(tmp_path / "validation", "epoch_pgd_accuracy") == [0, 1]
    assert _steps(tmp_path / "validation", "evaluation_pgd_accuracy_vs_iterations") == [8, 16]
    # Without the iteration count every series is cut by epoch (what a resume did before).
    assert drop_events_from(str(tmp_path), 1) == 3
    assert _steps(tmp_path / "validation", "epoch_pgd_accuracy") == [0]
