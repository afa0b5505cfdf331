"""The weight-averaging recipe: EMA of the weights, label smoothing, weight decay
without BatchNorm/bias, cosine learning rate, validation PGD on the CW margin
(docs/algorithms.md, sections 10-12)."""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import random_logits, tiny_cnn
from tfrobust import attacks
from tfrobust.config import OptimConfig, load_config
from tfrobust.defenses import parse_defense
from tfrobust.errors import UserError
from tfrobust.experiment import learning_rate_schedule
from tfrobust.trainer import RobustModel, start_point


def make(name="at", network=None, lr=0.1, momentum=0.9, batch_norm=True, steps=2, **kwargs):
    d = dataclasses.replace(parse_defense(name), awp_warmup_epochs=0)
    network = network or tiny_cnn(batch_norm=batch_norm, seed=2)
    model = RobustModel(network, d, eps=0.1, step_size=0.025, steps=steps, steps_per_epoch=1, seed=1, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum))
    return model


def numpy_values(variables):
    return [np.array(v.numpy(), np.float64) for v in variables]


@pytest.fixture(scope="module")
def batches(fashion_subset):
    x, y = fashion_subset
    return [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(6)]


# --- weight averaging ----------------------------------------------------------


def reference_decay(t, tau, start):
    """The references' decay after t optimizer steps, written out in Python."""
    if t < start:
        return 0.0
    d = t - start
    return min(tau, (1.0 + d) / (10.0 + d))


@pytest.mark.parametrize("name", ["at", "trades+awp", "mart+s2o", "trades+awp+rat"])  # every base and every term
def test_average_follows_the_numpy_recurrence_and_copies_batchnorm(batches, name):
    tau, start = 0.2, 2.0  # small tau so that min(tau, (1+d)/(10+d)) takes both branches in 6 steps
    model = make(name, ema_decay=tau, ema_start_step=start)
    live, averaged = model.network, model.averaged_network
    trainable = {id(v) for v in live.trainable_weights}
    pairs = [(a, w) for a, w in zip(averaged.weights, live.weights) if id(w) in trainable]
    state_pairs = [(a, w) for a, w in zip(averaged.weights, live.weights) if id(w) not in trainable]
    assert pairs and state_pairs  # the network has BatchNorm moving statistics
    expected = numpy_values([w for _, w in pairs])  # the average starts as a copy of the weights
    initial_state = numpy_values([w for _, w in state_pairs])
    for t, (x, y) in enumerate(batches, start=1):
        model.train_on_batch(x, y)
        decay = reference_decay(t, tau, start)
        expected = [decay * a + (1 - decay) * w for a, w in zip(expected, numpy_values([w for _, w in pairs]))]
    assert [reference_decay(t, tau, start) for t in (1, 2, 3, 4)] == [0.0, 0.1, 2 / 11, 0.2]
    # float32 updates against a float64 recurrence over 6 steps of O(0.1) weights: a few ulps.
    for (a, w), e in zip(pairs, expected):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-6)
    # The average really differs from the live weights.
    assert max(np.abs(a.numpy() - w.numpy()).max() for a, w in pairs) > 1e-4
    # BatchNorm statistics: copied from the live network exactly, and they did move.
    for a, w in state_pairs:
        np.testing.assert_array_equal(a.numpy(), w.numpy())
    assert max(np.abs(w.numpy() - s).max() for (_, w), s in zip(state_pairs, initial_state)) > 1e-4


def test_no_averaging_by_default_and_bad_settings_refused():
    model = make()
    assert model.averaged_network is None and model.evaluated_network() is model.network
    with pytest.raises(UserError, match="ema_decay must be in"):
        make(ema_decay=1.0)
    with pytest.raises(UserError, match="ema_start_step must be >= 0"):
        make(ema_decay=0.9, ema_start_step=-1)


def test_validation_uses_the_averaged_weights(batches):
    model = make(ema_decay=0.5, ema_start_step=0)
    for x, y in batches[:4]:
        model.train_on_batch(x, y)
    x, y = batches[4]
    got = model.evaluate(x, y, verbose=0, return_dict=True)
    # The same evaluation of a model whose live network holds the averaged weights.
    copy = keras.models.clone_model(model.averaged_network)
    copy.set_weights(model.averaged_network.get_weights())
    plain = make(network=copy)
    want = plain.evaluate(x, y, verbose=0, return_dict=True)
    # The same graph on the same weights on one machine: only summation order could differ.
    for key in ("clean_accuracy", "pgd_accuracy", "pgd_loss"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    live_logits = model.network(x, training=False).numpy()
    averaged_logits = model.averaged_network(x, training=False).numpy()
    assert np.abs(live_logits - averaged_logits).max() > 1e-3


def test_checkpoint_and_keras_file_hold_the_average(tmp_path, batches):
    model = make("trades", ema_decay=0.5, ema_start_step=1)
    for x, y in batches[:3]:
        model.train_on_batch(x, y)
    model.save_weights(str(tmp_path / "w.weights.h5"))
    other = make("trades", ema_decay=0.5, ema_start_step=1)
    other.optimizer.build(other.trainable_variables)
    other.load_weights(str(tmp_path / "w.weights.h5"))
    for a, b in zip(model.averaged_network.weights, other.averaged_network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert loaded.settings.ema_decay == 0.5 and loaded.settings.ema_start_step == 1.0
    for a, b in zip(model.averaged_network.weights, loaded.averaged_network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # One more step continues the average identically in both.
    x, y = batches[3]
    model.train_on_batch(x, y)
    other.train_on_batch(x, y)
    for a, b in zip(model.averaged_network.weights, other.averaged_network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.fixture(scope="module")
def mirrored_strategy():
    # One strategy per process (see tests/test_distributed.py).
    from tfrobust.config import RuntimeConfig
    from tfrobust.experiment import build_strategy

    return build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))


def test_average_identical_on_two_replicas_and_equal_to_one_device(fashion_subset, mirrored_strategy):
    x, y = fashion_subset[0][:64], fashion_subset[1][:64]

    def run(strategy):
        with strategy.scope():
            model = RobustModel(tiny_cnn(batch_norm=False, seed=3), parse_defense("at"), eps=0.1, step_size=0.025,
                                steps=2, seed=7, ema_decay=0.5, ema_start_step=1)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
        return model

    single = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    mirrored = run(mirrored_strategy)
    for a, b in zip(single.averaged_network.weights, mirrored.averaged_network.weights):
        replicas = [r.numpy() for r in b.value.values]
        assert len(replicas) == 2
        np.testing.assert_array_equal(replicas[0], replicas[1])
        # The tolerance of tests/test_distributed.py: summation order differs between one and two devices.
        np.testing.assert_allclose(replicas[0], a.numpy(), atol=1e-5)
    moved = max(np.abs(a.numpy() - w.numpy()).max() for a, w in zip(single.averaged_network.weights, single.network.weights))
    assert moved > 1e-4


# --- label smoothing -----------------------------------------------------------


@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
def test_smoothed_cross_entropy_matches_numpy(s):
    rng = np.random.default_rng(0)
    logits = random_logits(rng, batch=8, classes=10)
    y = rng.integers(0, 10, 8)
    # Cross-entropy against the smoothed target q = (1 - s) onehot + s / K.
    z = logits.astype(np.float64)
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    q = (1 - s) * np.eye(10)[y] + s / 10
    want = -(q * log_p).sum(1)
    got = attacks.smoothed_cross_entropy(logits, y, s).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 softmax against float64
    if s == 0:
        np.testing.assert_allclose(got, attacks.cross_entropy(logits, y).numpy(), rtol=1e-6)


@pytest.mark.parametrize("name,smoothed", [("at", "ce_adv"), ("trades", "ce_clean"), ("trades+awp", "ce_clean")])
def test_label_smoothing_replaces_only_the_ce_term(name, smoothed):
    rng = np.random.default_rng(1)
    clean, adv = random_logits(rng), random_logits(rng)
    y = rng.integers(0, 10, 16)
    plain = make(name)
    smooth = make(name, label_smoothing=0.1)
    p0, r0, t0 = plain.objective.loss_terms(clean, adv, y)
    p1, r1, t1 = smooth.objective.loss_terms(clean, adv, y)
    logits = adv if name == "at" else clean
    np.testing.assert_allclose(p1.numpy(), attacks.smoothed_cross_entropy(logits, y, 0.1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(t1[smoothed].numpy(), p1.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(r0.numpy(), r1.numpy())  # the KL term is untouched
    np.testing.assert_array_equal(p0.numpy(), attacks.cross_entropy(logits, y).numpy())
    assert np.abs(p0.numpy() - p1.numpy()).max() > 1e-3


def test_label_smoothing_refused_for_mart_and_out_of_range():
    with pytest.raises(UserError, match="mart has none"):
        make("mart", label_smoothing=0.1)
    with pytest.raises(UserError, match=r"label_smoothing must be in \[0, 1\)"):
        make("at", label_smoothing=1.0)
    with pytest.raises(UserError, match="defense.label_smoothing"):
        load_config(overrides={"defense.label_smoothing": "-0.1"})


# --- weight decay without BatchNorm parameters and biases ------------------------


@pytest.mark.parametrize("exclude", ["none", "batchnorm", "batchnorm_and_bias"])
def test_weight_decay_reaches_only_the_chosen_variables(batches, exclude):
    x, y = batches[0]
    wd, lr = 0.05, 0.1
    with_decay = make(lr=lr, momentum=0.0, weight_decay=wd, weight_decay_exclude=exclude)
    without = make(lr=lr, momentum=0.0, weight_decay=0.0)
    before = numpy_values(with_decay.network.trainable_weights)
    with_decay.train_on_batch(x, y)
    without.train_on_batch(x, y)
    names = [v.path for v in with_decay.network.trainable_weights]
    for name, w0, a, b in zip(names, before, with_decay.network.trainable_weights, without.network.trainable_weights):
        is_bn = "batch_normalization" in name
        is_bias = name.endswith("bias")
        decayed = exclude == "none" or (exclude == "batchnorm" and not is_bn) or (
            exclude == "batchnorm_and_bias" and not (is_bn or is_bias))
        # Plain SGD: the penalty wd/2 ||w||^2 adds -lr * wd * w to the update; float32 rounding only.
        np.testing.assert_allclose(a.numpy() - b.numpy(), -lr * wd * w0 if decayed else 0 * w0, atol=2e-6)
    assert sum(("batch_normalization" in n) for n in names) == 2 and sum(n.endswith("bias") for n in names) == 3


def test_unknown_weight_decay_exclusion_refused():
    with pytest.raises(UserError, match="unknown weight_decay_exclude 'bn'"):
        make(weight_decay_exclude="bn")
    with pytest.raises(UserError, match="unknown optim.weight_decay_exclude"):
        load_config(overrides={"optim.weight_decay_exclude": "bn"})


# --- cosine learning rate with linear warm-up -------------------------------------


def test_cosine_schedule_with_linear_warmup():
    optim = OptimConfig(epochs=10, lr=0.2, schedule="cosine", warmup_epochs=2)
    schedule = learning_rate_schedule(optim, steps_per_epoch=5)
    total, warmup = 50, 10

    def want(k):
        if k < warmup:
            return 0.2 * k / warmup
        return 0.2 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))

    for k in (0, 3, 10, 17, 30, 49, 50):
        np.testing.assert_allclose(float(schedule(k)), want(k), rtol=1e-5, atol=1e-7)
    plain = learning_rate_schedule(OptimConfig(epochs=4, lr=0.1, schedule="cosine"), steps_per_epoch=5)
    np.testing.assert_allclose([float(plain(k)) for k in (0, 10, 20)], [0.1, 0.05, 0.0], atol=1e-7)
    with pytest.raises(UserError, match="unknown optim.schedule 'linear'"):
        load_config(overrides={"optim.schedule": "linear"})


# --- the validation attack -------------------------------------------------------


def test_validation_pgd_on_the_cw_margin(batches):
    x, y = batches[1]
    model = make(eval_steps=5, eval_loss="cw", batch_norm=False)
    model.train_on_batch(*batches[0])
    got = model.evaluate(x, y, verbose=0, return_dict=True)
    net = lambda inputs: model.network(inputs, training=False)  # noqa: E731
    x_init = start_point(tf.constant(x), 0.1, "linf", "uniform", tf.constant([1 * 1000 + 7, 0]))
    x_cw = attacks.pgd(net, x, y, 0.1, 0.025, 5, loss="cw", x_init=x_init)
    x_ce = attacks.pgd(net, x, y, 0.1, 0.025, 5, loss="ce", x_init=x_init)
    acc = lambda xa: float(np.mean(np.argmax(net(xa).numpy(), 1) == y))  # noqa: E731
    # The same attack on the same weights: equal up to a sign flip of an input gradient near zero (one example).
    assert abs(got["pgd_accuracy"] - acc(x_cw)) <= 1 / len(y) + 1e-6
    np.testing.assert_allclose(got["pgd_loss"], attacks.cross_entropy(net(x_cw), y).numpy().mean(), rtol=1e-3)
    assert not np.allclose(x_cw.numpy(), x_ce.numpy())  # the loss really changes the attack
    with pytest.raises(UserError, match="unknown eval_loss 'kl'"):
        make(eval_loss="kl")
    with pytest.raises(UserError, match="unknown eval.pgd_loss 'kl'"):
        load_config(overrides={"eval.pgd_loss": "kl"})


# --- the SiLU WideResNet ----------------------------------------------------------


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


@pytest.mark.parametrize("depth,width,shape,classes", [(10, 1, (32, 32, 3), 10), (16, 2, (28, 28, 1), 7), (22, 1, (32, 32, 3), 100)])
def test_swish_wide_resnet_parameter_formula_matches_built_networks(depth, width, shape, classes):
    from tfrobust.models import build_model, wide_resnet_swish_parameters

    model = build_model("wide_resnet_swish", shape, classes, depth=depth, width=width, seed=0)
    assert trainable_count(model) == wide_resnet_swish_parameters(depth, width, classes, shape[-1])
    assert model.count_params() == wide_resnet_swish_parameters(depth, width, classes, shape[-1], trainable_only=False)
    assert model(np.zeros((2,) + shape, np.float32)).shape == (2, classes)


def test_swish_wide_resnets_have_the_published_sizes():
    from tfrobust.models import build_model, wide_resnet_swish_parameters

    # WRN-28-10 is built (about 2 s); WRN-70-16 (1 GB of float32) is counted from its layer
    # shapes by the formula the test above checks against built networks.
    model = build_model("wide_resnet_swish", (32, 32, 3), 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26),
                        depth=28, width=10, seed=0)
    assert round(trainable_count(model) / 1e6, 1) == 36.5
    assert round(wide_resnet_swish_parameters(70, 16) / 1e6, 1) == 266.8
    layers = model.layers
    bns = [l for l in layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 2 * 12 + 1 and all(l.momentum == 0.99 and l.epsilon == 1e-5 for l in bns)
    assert all(l.get_config()["activation"] == "silu" for l in layers if isinstance(l, keras.layers.Activation))
    pads = [l for l in layers if isinstance(l, keras.layers.ZeroPadding2D)]
    assert len(pads) == 2 and all(tuple(map(tuple, l.padding)) == ((0, 1), (0, 1)) for l in pads)
    convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]
    assert not any(l.use_bias for l in convs) and len(convs) == 1 + 2 * 12 + 3
    assert model.get_layer("logits").bias.numpy().tolist() == [0.0] * 10
    assert model.layers[1].name == "normalize"  # normalisation inside the network


def test_swish_wide_resnet_stride_two_convolution_pads_bottom_right():
    """On a 4x4 map, the reference's stride-2 3x3 convolution sees rows/columns 0-2 and 2-3 plus one zero row."""
    from tfrobust.models import _swish_conv

    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, _swish_conv(inputs, 1, 3, 2, seed=0))
    conv = model.layers[-1]
    conv.kernel.assign(np.ones((3, 3, 1, 1), np.float32))
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    padded = np.pad(x[0, :, :, 0], ((0, 1), (0, 1)))
    want = np.array([[padded[i:i + 3, j:j + 3].sum() for j in (0, 2)] for i in (0, 2)])
    np.testing.assert_array_equal(model(x).numpy()[0, :, :, 0], want)


# --- a whole run with the recipe ------------------------------------------------------


class _Interrupt(Exception):
    pass


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise _Interrupt()


@pytest.mark.slow
def test_recipe_run_exports_the_average_and_resumes_exactly(tmp_path, fashion_subset, monkeypatch):
    import json
    import os

    from tfrobust import callbacks as callbacks_lib
    from tfrobust import experiment

    dropped = []  # (epoch) of every training start: a resume first drops what was logged after its backup
    drop = callbacks_lib.drop_events_from
    monkeypatch.setattr(callbacks_lib, "drop_events_from", lambda d, e, *i: dropped.append(e) or drop(d, e, *i))

    pool = str(tmp_path / "pool.npz")  # 300 images standing in for generated data, labelled
    np.savez(pool, image=(fashion_subset[0][300:] * 255).round().astype(np.uint8), label=fashion_subset[1][300:])

    overrides = {
        "data.train_examples": 96, "data.validation_examples": 64, "data.test_examples": 64, "data.batch_size": 64,
        "data.extra_data": pool, "data.extra_fraction": 0.5,
        "attack.steps": 2, "eval.pgd_steps": 2, "eval.pgd_loss": "cw", "eval.images_every": 0,
        "eval.integrity_examples": 0, "runtime.verbose": 0, "runtime.seed": 3, "runtime.deterministic": True,
        "defense.name": "trades+awp", "defense.awp.warmup_epochs": 1, "defense.label_smoothing": 0.1,
        "model.name": "wide_resnet_swish", "model.depth": 10, "model.width": 1,
        "optim.epochs": 3, "optim.schedule": "cosine", "optim.warmup_epochs": 1, "optim.nesterov": True,
        "optim.weight_decay_exclude": "batchnorm", "optim.ema": True, "optim.ema_decay": 0.9, "optim.ema_start": 0.3,
    }
    config = load_config("configs/fashion_mnist.yaml", overrides)
    straight = str(tmp_path / "straight")
    report = experiment.train_and_evaluate(config, straight, verbose=False)
    assert set(report["models"]) == {"last", "best"}
    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(_Interrupt):
        experiment.train(config, interrupted, extra_callbacks=[_StopAfterFirstEpoch()])
    model, _, history = experiment.train(config, interrupted)
    assert len(history["loss"]) == 3
    assert dropped == [0, 0, 1]  # the straight run, the interrupted attempt, the resume after one epoch
    exported = keras.saving.load_model(os.path.join(interrupted, "model.keras"))
    for a, b in zip(exported.weights, model.averaged_network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    live = keras.saving.load_model(os.path.join(interrupted, "model_live.keras"))
    for a, b in zip(live.weights, model.network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Resumed and uninterrupted runs: same machine, op determinism on; atol as tests/test_resume.py.
    for name in ("model.keras", "model_live.keras"):
        resumed = keras.saving.load_model(os.path.join(interrupted, name)).weights
        reference = keras.saving.load_model(os.path.join(straight, name)).weights
        for a, b in zip(resumed, reference):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(exported.weights, live.weights)) > 1e-4
    with open(os.path.join(straight, "history.json")) as f:
        lr = json.load(f)["learning_rate"]
    # Each epoch's rate at its first of 3 steps: the warm-up's start (0), its end (lr), half-way down the cosine.
    np.testing.assert_allclose(lr, [0.0, 0.05, 0.025], atol=1e-6)
