"""Catastrophic overfitting: the collapse detector, its actions, the command line and resuming (tfrobust.collapse)."""

import json
import os

import keras
import numpy as np
import pytest

from conftest import tiny_cnn
from tfrobust.collapse import CollapseMonitor, collapse_epochs, is_collapse
from tfrobust.trainer import RobustModel

EPS = 0.1


def make(name):
    model = RobustModel(tiny_cnn(), name, eps=EPS, step_size=EPS / 4, steps=2, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


def test_collapse_detector_on_a_synthetic_history():
    accuracies = [0.20, 0.30, 0.35, 0.34, 0.05, 0.33, 0.02, 0.40]
    assert collapse_epochs(accuracies, 0.2) == [4, 6]
    assert collapse_epochs(accuracies, 0.4) == []
    assert not is_collapse([], 0.0, 0.1)  # the first epoch is never a collapse
    assert is_collapse([0.5, 0.3], 0.29, 0.2) and not is_collapse([0.5, 0.3], 0.3, 0.2)


def test_collapse_monitor_stops_and_rolls_back(fashion_subset):
    x, y = fashion_subset
    for action in ("stop", "rollback"):
        model = make("fgsm_rs")
        monitor = CollapseMonitor(x[:40], y[:40], eps=EPS, step_size=EPS / 4, steps=2, drop=0.15, action=action,
                                  verbose=False)
        good_weights = {}

        class Spy(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                good_weights[epoch] = [w.copy() for w in self.model.get_weights()]

        values = iter([0.5, 0.2, 0.45])
        monitor.measure = lambda: next(values)  # a collapse in the second epoch
        history = model.fit(x[:64], y[:64], batch_size=32, epochs=3, verbose=0, callbacks=[monitor, Spy()])
        assert history.history["collapse"][:2] == [0.0, 1.0]
        assert monitor.get_state() == {"accuracies": [0.5, 0.2, 0.45][:len(history.history["loss"])], "collapses": [1],
                                       "good_epoch": 0 if action == "stop" else 2,
                                       "pgd_until": 0 if action == "stop" else 3}
        if action == "stop":
            assert len(history.history["loss"]) == 2
        else:  # after epoch 2 the weights are epoch 1's again
            assert len(history.history["loss"]) == 3
            for a, b in zip(good_weights[1], good_weights[0]):
                np.testing.assert_array_equal(a, b)


def test_cli_trains_n_fgsm_with_awp_and_records_collapse(tmp_path):
    from tfrobust.cli import train_main

    workdir = str(tmp_path / "run")
    code = train_main([
        "--defense", "n_fgsm+awp", "--workdir", workdir, "--epochs", "1", "--no-eval",
        "--set", "data.train_examples=64", "--set", "data.validation_examples=32", "--set", "data.test_examples=32",
        "--set", "data.batch_size=32", "--set", "eval.pgd_steps=2", "--set", "eval.collapse_examples=50",
        "--set", "runtime.verbose=0", "--set", "eval.images_every=0"])
    assert code in (0, None)
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert history["collapse"] == [0.0] and 0 <= history["train_subset_pgd_accuracy"][0] <= 1
    assert history["train_subset_lin_err"][0] >= 0
    assert os.path.isdir(os.path.join(workdir, "tensorboard", "collapse"))


def interrupt_after(last):
    """A callback that stops the run after the backup of epoch ``last`` (extra callbacks follow EpochBackup)."""

    def stop(epoch, logs=None):
        if epoch == last:
            raise KeyboardInterrupt

    return keras.callbacks.LambdaCallback(on_epoch_end=stop)


def test_a_resumed_run_keeps_the_collapse_record(tmp_path):
    from tfrobust import experiment
    from tfrobust.callbacks import EpochBackup
    from tfrobust.config import load_config

    config = lambda: load_config("configs/fashion_mnist.yaml", {  # noqa: E731
        "defense.name": "fgsm_rs", "data.train_examples": 64, "data.validation_examples": 32, "data.batch_size": 32,
        "eval.pgd_steps": 1, "optim.epochs": 3, "runtime.verbose": 0, "eval.images_every": 0,
        "eval.collapse_examples": 32, "eval.collapse_drop": 0.0, "eval.collapse_action": "rollback"})
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        experiment.train(config(), workdir, extra_callbacks=[interrupt_after(1)])
    saved = EpochBackup.read_state(os.path.join(workdir, "backup"))["callbacks"]["collapse"]
    assert len(saved["accuracies"]) == 2
    experiment.train(config(), workdir)
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert history["train_subset_pgd_accuracy"][:2] == saved["accuracies"]
    assert len(history["collapse"]) == 3
    assert os.path.exists(os.path.join(workdir, "checkpoints", "last_good.npz"))


def test_rollback_raises_elle_a_weight(fashion_subset):
    x, y = fashion_subset
    model = make("n_fgsm+elle_a")
    monitor = CollapseMonitor(x[:32], y[:32], eps=EPS, step_size=EPS / 4, steps=1, drop=0.1, action="rollback",
                              verbose=False)
    values = iter([0.5, 0.1])
    monitor.measure = lambda: next(values)
    model.fit(x[:64], y[:64], batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    assert monitor.collapses == [1]
    assert float(model.objective.input_terms[0].weight()) == 4000.0  # the paper's maximum, after the rollback
    assert monitor.pgd_until == 0 and not model.train_on_pgd  # the regulariser is the stronger setting, not PGD


def test_rollback_trains_a_single_step_base_on_pgd_for_the_next_epochs(fashion_subset, monkeypatch):
    from tfrobust import attacks

    x, y = fashion_subset
    model = make("fgsm_rs")
    monitor = CollapseMonitor(x[:32], y[:32], eps=EPS, step_size=EPS / 4, steps=1, drop=0.1, action="rollback",
                              verbose=False, pgd_epochs=2)
    values = iter([0.5, 0.1, 0.45, 0.46, 0.47])
    monitor.measure = lambda: next(values)  # a collapse at the end of the second epoch
    traced, epoch = [], [None]
    for name in ("pgd", "single_step"):  # the step's attack, recorded each time the step is traced
        original = getattr(attacks, name)
        monkeypatch.setattr(attacks, name, lambda *a, _f=original, _n=name, **k: traced.append((epoch[0], _n))
                            or _f(*a, **k))
    flags = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs=None: epoch.__setitem__(0, e))
    seen = []
    spy = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda b, logs=None: seen.append(model.train_on_pgd))
    model.fit(x[:64], y[:64], batch_size=32, epochs=5, verbose=0, callbacks=[flags, monitor, spy])
    assert monitor.collapses == [1] and monitor.pgd_until == 4
    assert seen == [False] * 4 + [True] * 4 + [False] * 2  # two steps per epoch; epochs 3 and 4 on PGD
    assert traced == [(0, "single_step"), (2, "pgd"), (4, "single_step")]
    assert monitor.get_state()["pgd_until"] == 4  # kept in the epoch backup


def test_the_pgd_fallback_is_pgd_with_the_step_settings(fashion_subset):
    import tensorflow as tf

    from tfrobust import attacks

    x, y = tf.constant(fashion_subset[0][:16]), tf.constant(fashion_subset[1][:16])
    model = make("n_fgsm")
    x_init = attacks.uniform_noise(tf.shape(x), (1, 2)) * EPS + x  # inside the eps-ball, not N-FGSM's 2 eps
    single = model.adversarial_examples(x, y, x_init=x_init)
    model.train_on_pgd = True
    pgd = model.adversarial_examples(x, y, x_init=x_init)
    expected = attacks.pgd(lambda t: tf.cast(model.network(t, training=False), tf.float32), x, y, EPS, EPS / 4, 2,
                           x_init=x_init)
    np.testing.assert_array_equal(pgd.numpy(), expected.numpy())
    assert np.abs(pgd.numpy() - x.numpy()).max() <= EPS + 1e-6
    assert np.abs(single.numpy() - x.numpy()).max() > EPS + 1e-3  # N-FGSM's own step leaves the ball


def test_the_subset_accuracy_is_pgd_accuracy_with_fixed_starts(fashion_subset):
    from tfrobust import attacks, seeds
    from tfrobust.collapse import COLLAPSE_PURPOSE

    x, y = fashion_subset
    model = make("fgsm_rs")
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    monitor = CollapseMonitor(x[:50], y[:50], eps=EPS, step_size=EPS / 4, steps=3, seed=4, batch_size=32)
    monitor.set_model(model)
    fn = lambda t: model.network(t, training=False)  # noqa: E731
    correct = []
    for b, i in enumerate(range(0, 50, 32)):  # the independent computation: PGD from the batch's seed
        x_adv = attacks.pgd(fn, x[i:i + 32][:50 - i], y[i:i + 32][:50 - i], EPS, EPS / 4, 3,
                            seed=seeds.batch_seed(4, b, COLLAPSE_PURPOSE))
        correct.append(np.argmax(fn(x_adv).numpy(), 1) == y[i:i + 32][:50 - i])
    expected = float(np.mean(np.concatenate(correct)))
    assert monitor.measure() == pytest.approx(expected, abs=1e-9) and monitor.measure() == monitor.measure()
    assert 0 < monitor.linearity_error() == monitor.linearity_error()  # fixed triplets
