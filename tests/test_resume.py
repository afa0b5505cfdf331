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


def test_same_seed_gives_identical_weights(tmp_path):
    cfg = tiny_config(**{"optim.epochs": 1, "runtime.deterministic": True, "defense.name": "trades+rat"})
    a, _, _ = experiment.train(cfg, str(tmp_path / "a"))
    b, _, _ = experiment.train(cfg, str(tmp_path / "b"))
    for u, v in zip(a.network.weights, b.network.weights):
        np.testing.assert_array_equal(u.numpy(), v.numpy())


def test_mixed_bfloat16_trains_on_cpu(tmp_path):
    cfg = tiny_config(**{"optim.epochs": 2, "runtime.mixed_precision": "mixed_bfloat16", "defense.name": "at+awp",
                         "defense.awp.warmup_epochs": 0})
    model, _, history = experiment.train(cfg, str(tmp_path / "bf16"))
    assert model.network.layers[-1].compute_dtype == "bfloat16"
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_mirrored_run_matches_one_device(tmp_path):
    import tensorflow as tf

    single = tiny_config(**{"optim.epochs": 1, "data.train_examples": 128, "defense.name": "trades+awp",
                            "defense.awp.warmup_epochs": 0})
    mirrored = tiny_config(**{"optim.epochs": 1, "data.train_examples": 128, "defense.name": "trades+awp",
                              "defense.awp.warmup_epochs": 0, "runtime.strategy": "mirrored",
                              "runtime.devices": '["/cpu:0", "/cpu:1"]'})
    a, _, _ = experiment.train(single, str(tmp_path / "one"))
    b, _, _ = experiment.train(mirrored, str(tmp_path / "two"))
    assert isinstance(b.distribute_strategy, tf.distribute.MirroredStrategy)
    for u, v in zip(a.network.trainable_variables, b.network.trainable_variables):
        np.testing.assert_allclose(v.value.values[0].numpy(), u.numpy(), atol=1e-4)
        np.testing.assert_array_equal(v.value.values[0].numpy(), v.value.values[1].numpy())


def test_mixed_float16_scales_losses_and_learns(tmp_path):
    cfg = tiny_config(**{"optim.epochs": 2, "runtime.mixed_precision": "mixed_float16", "defense.name": "at+awp",
                         "defense.awp.warmup_epochs": 0})
    model, _, history = experiment.train(cfg, str(tmp_path / "fp16"))
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert model._attack_gradient_scale() > 1
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert history["awp_relative_norm"][-1] == pytest.approx(0.01, rel=1e-2)
