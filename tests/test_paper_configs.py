"""The papers' CIFAR-10 settings in configs/ run end to end (a few steps, tfds mock data)."""

import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfrobust import experiment
from tfrobust.config import load_config
from tfrobust.defenses import parse_defense

CONFIGS = sorted(glob.glob("configs/cifar10_*.yaml"))


def test_every_weight_space_method_has_a_paper_config():
    names = {load_config(p).defense.name for p in CONFIGS}
    for needed in ("at", "trades", "mart", "at+awp", "trades+awp", "mart+awp", "at+s2o", "trades+s2o",
                   "trades+awp+s2o", "trades+rat", "trades+awp+rat"):
        assert needed in names, needed


def _tiny_pool() -> str:
    """A 32-image labelled pool in place of the generated-data files the recipe configs expect."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "pool.npz")
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, 32))
    return path


def small(path, **extra):
    full = load_config(path)
    if full.data.extra_data:
        extra.setdefault("data.extra_data", _tiny_pool())
    if full.optim.warmup_epochs:
        extra.setdefault("optim.warmup_epochs", 0.5)  # within the single epoch
    overrides = {
        # Keep the config's defense, attack norm/eps/step, optimizer and schedule; shrink only the sizes.
        "data.train_examples": 8, "data.validation_examples": 4, "data.test_examples": 4,
        "data.batch_size": 4, "data.eval_batch_size": 4, "attack.steps": 1, "eval.pgd_steps": 1,
        "optim.epochs": 1, "runtime.verbose": 0, "eval.images_every": 0, "eval.integrity_examples": 0,
    }
    overrides.update(extra)
    return load_config(path, overrides)


def adversarial_steps(cfg, steps=2):
    with tfds.testing.mock_data(num_examples=16):
        model, datasets, _ = experiment.build(cfg)
        assert datasets.info.image_shape == (32, 32, 3)
        history = model.fit(datasets.train_epochs(0, 1), epochs=1, steps_per_epoch=steps, verbose=0,
                            validation_data=datasets.validation)
    return model, history.history


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_paper_config_trains_a_few_steps(path):
    # Every setting of the config but the network, which is swapped for the small CNN
    # (tracing PreActResNet-18 or WRN-34-10 takes minutes on CPU); the networks
    # themselves are exercised below and in test_models.py.
    cfg = small(path, **{"model.name": "small_cnn"})
    model, history = adversarial_steps(cfg)
    assert model.defense == parse_defense(cfg.defense.name, cfg.defense)
    assert np.isfinite(history["loss"][0]) and "val_pgd_accuracy" in history
    assert model.optimizer.momentum == pytest.approx(cfg.optim.momentum)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["configs/cifar10_wrn34_10_trades_awp_rat.yaml",
                                  "configs/cifar10_wrn28_10_swish_trades_awp_edm1m.yaml"])
def test_paper_network_takes_adversarial_steps(path):
    """The papers' own networks through the double perturbation (WRN at depth 10, width 2)."""
    cfg = small(path, **{"model.depth": 10, "model.width": 2})
    model, history = adversarial_steps(cfg)
    assert np.isfinite(history["loss"][0])
    if model.defense.awp and model.defense.awp_warmup_epochs == 0:
        assert history["awp_relative_norm"][0] > 0


@pytest.mark.parametrize("path", ["configs/cifar10_preactresnet18_mart.yaml", "configs/cifar10_preactresnet18_mart_awp.yaml"])
def test_mart_configs_follow_marts_reference_schedule(path):
    # YisenWang/MART train_resnet.py: lr 0.01, x0.1 from epoch 75, x0.01 from 90, x0.001 from 100
    # (counted from 1 there; here the decay starts with the epoch after), 120 epochs, weight decay 3.5e-3.
    cfg = load_config(path)
    assert cfg.optim.epochs == 120 and cfg.optim.weight_decay == pytest.approx(3.5e-3)
    schedule = experiment.learning_rate_schedule(cfg.optim, steps_per_epoch=3)
    for epoch, factor in ((0, 1.0), (74, 1.0), (75, 0.1), (89, 0.1), (90, 0.01), (99, 0.01), (100, 0.001), (119, 0.001)):
        assert float(schedule(epoch * 3)) == pytest.approx(0.01 * factor), epoch
        assert float(schedule(epoch * 3 + 2)) == pytest.approx(0.01 * factor), epoch


@pytest.mark.parametrize("path", ["configs/cifar10_wrn28_10_swish_trades_edm1m.yaml",
                                  "configs/cifar10_wrn28_10_swish_trades_awp_edm1m.yaml"])
def test_recipe_configs_follow_wang_et_al(path):
    """The settings of Wang et al.'s WRN-28-10 command (DM-Improves-AT README, train-wa.py defaults)."""
    cfg = load_config(path)
    assert (cfg.model.name, cfg.model.depth, cfg.model.width) == ("wide_resnet_swish", 28, 10)
    assert (cfg.data.batch_size, cfg.data.extra_fraction, cfg.data.extra_data) == (512, 0.7, "edm_data/cifar10/1m.npz")
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.nesterov, cfg.optim.schedule) == (400, 0.2, True, "cosine")
    assert (cfg.optim.ema, cfg.optim.ema_decay, cfg.optim.ema_start) == (True, 0.995, 0.025)
    assert cfg.optim.weight_decay_exclude == "batchnorm" and cfg.optim.weight_decay == 5e-4
    assert (cfg.defense.beta, cfg.defense.label_smoothing) == (5.0, 0.1)
    assert (cfg.eval.pgd_loss, cfg.eval.pgd_steps) == ("cw", 40)
    assert cfg.attack.steps == 10 and cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.defense.name == ("trades+awp" if "awp" in path else "trades")
