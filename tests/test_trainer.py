"""The adversarial train_step: AWP, S2O and RAT inside one compiled step (ALGORITHMS.md sections 3-5)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import attacks
from tfrobust.defenses import DEFENSES, parse_defense
from tfrobust.trainer import RobustModel


def defense(name, **changes):
    return dataclasses.replace(parse_defense(name), **changes)


def make(name_or_defense, network=None, lr=0.05, momentum=0.9, steps=3, eps=0.1, weight_decay=0.0,
         steps_per_epoch=1, run_eagerly=False, batch_norm=False, cls=RobustModel, **kwargs):
    d = name_or_defense if not isinstance(name_or_defense, str) else defense(name_or_defense, awp_warmup_epochs=0)
    network = network or tiny_cnn(batch_norm=batch_norm)
    model = cls(network, d, eps=eps, step_size=eps / 4, steps=steps, steps_per_epoch=steps_per_epoch,
                weight_decay=weight_decay, seed=1, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), run_eagerly=run_eagerly)
    return model


def values(variables):
    return [np.array(v.numpy()) for v in variables]


def kernels(network):
    return [v for v in network.trainable_variables if len(v.shape) >= 2]


@pytest.fixture(scope="module")
def batch(fashion_subset):
    x, y = fashion_subset
    return x[:64], y[:64]


# --- AWP ---------------------------------------------------------------------


def test_awp_perturbs_only_kernels_with_relative_size(batch):
    x, y = batch
    model = make("at+awp", batch_norm=True)
    model(x[:1])
    net = model.network
    v = model.weight_perturbation(tf.constant(x), tf.constant(x), tf.constant(y))
    ks = kernels(net)
    assert len(v) == len(ks) == 3  # conv kernel, dense kernel, logits kernel
    assert all(len(k.shape) >= 2 for k in ks)
    for k, vi in zip(ks, v):
        assert vi.shape == k.shape
        np.testing.assert_allclose(np.linalg.norm(vi.numpy()), 0.01 * np.linalg.norm(k.numpy()), rtol=1e-5)
    perturbed = {id(k) for k in ks}
    not_perturbed = [w for w in net.trainable_variables if id(w) not in perturbed]
    assert any("bias" in w.path for w in not_perturbed) and any("gamma" in w.path for w in not_perturbed)


def test_awp_step_equals_manual_sgd_at_perturbed_weights(batch):
    x, y = batch
    lr, gamma = 0.1, 0.01
    model = make("at+awp", lr=lr, momentum=0.0, steps=0, eps=0.0)
    model(x[:1])
    net = model.network
    w0 = values(net.trainable_variables)
    # Independent computation: g at w, v = gamma ||w|| g / ||g||, gradient at w + v.
    shadow = tiny_cnn()
    for s, w in zip(shadow.trainable_variables, w0):
        s.assign(w)
    ks = [s for s in shadow.trainable_variables if len(s.shape) >= 2]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(attacks.cross_entropy(shadow(x, training=True), y))
    g = tape.gradient(loss, ks)
    for k, gk in zip(ks, g):
        k.assign_add(gamma * tf.norm(k) * gk / (tf.norm(gk) + 1e-20))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(attacks.cross_entropy(shadow(x, training=True), y))
    grads = tape.gradient(loss, shadow.trainable_variables)
    expected = [w - lr * gr.numpy() for w, gr in zip(w0, grads)]
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    for got, want in zip(values(net.trainable_variables), expected):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_awp_ascent_leaves_batchnorm_statistics_unchanged(batch):
    x, y = batch
    model = make("trades+awp", batch_norm=True)
    model(x[:1])
    before = values(model.network.non_trainable_variables)
    model.weight_perturbation(tf.constant(x), tf.constant(x), tf.constant(y))
    for b, a in zip(before, values(model.network.non_trainable_variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["at+awp", "trades+awp+rat", "mart+awp"])
def test_awp_with_zero_learning_rate_restores_exactly(batch, name):
    x, y = batch
    model = make(name, lr=0.0, batch_norm=True)
    model(x[:1])
    before = values(model.network.trainable_variables)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert history.history["awp_relative_norm"][-1] > 0
    for b, a in zip(before, values(model.network.trainable_variables)):
        np.testing.assert_array_equal(a, b)


def test_no_perturbation_during_warmup(batch):
    x, y = batch
    warm = defense("at+awp", awp_warmup_epochs=1)

    class Recorder(RobustModel):
        pass

    model = make(warm, steps_per_epoch=2)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    sizes = history.history["awp_relative_norm"]
    assert sizes[0] == 0.0
    np.testing.assert_allclose(sizes[1], 0.01, rtol=1e-4)


# --- S2O ---------------------------------------------------------------------


def numpy_s2o_matrix(m):
    m = np.abs(m)
    c = m.shape[0]
    cc = 1 - 2 / c
    a = m.max(axis=1, keepdims=True) - m
    np.fill_diagonal(a, 0)
    a = cc * a / a.sum(axis=1, keepdims=True)
    np.fill_diagonal(a, 1 - cc)
    return a


@pytest.mark.parametrize("classes", [10, 100])
def test_s2o_soft_targets_match_numpy(classes):
    from tfrobust.defenses import s2o

    rng = np.random.default_rng(classes)
    z = rng.standard_normal((64, classes)).astype("float32")
    m = s2o.second_moment(z).numpy()
    np.testing.assert_allclose(m, sum(np.outer(v, v) for v in z), rtol=1e-4, atol=1e-4)
    a = s2o.soft_target_matrix(m).numpy()
    np.testing.assert_allclose(a, numpy_s2o_matrix(m.astype(np.float64)), atol=1e-6)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(a), 2.0 / classes, atol=1e-7)
    y = rng.integers(0, classes, 64)
    q = numpy_s2o_matrix(m.astype(np.float64))[y]
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - logp), 0).sum(axis=1)
    np.testing.assert_allclose(s2o.s2o_loss(z, y, m).numpy(), expected, rtol=1e-4, atol=1e-6)


# --- RAT ---------------------------------------------------------------------


def numpy_reg_gap(v):
    c = len(v)
    cc = 1 - 2 / c
    u = v - v.min()
    u = u / u.sum()
    t = np.tile(u, (c, 1))
    np.fill_diagonal(t, 0)
    t = cc * t / t.sum(axis=1, keepdims=True)
    np.fill_diagonal(t, 1 - cc)
    return t


@pytest.mark.parametrize("classes", [10, 100])
def test_rat_reg_gap_matches_numpy(classes):
    from tfrobust.defenses import rat

    rng = np.random.default_rng(classes)
    v = rng.standard_normal(classes)
    got = rat.reg_gap(v.astype("float32")).numpy()
    np.testing.assert_allclose(got, numpy_reg_gap(v), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(got), 2.0 / classes, atol=1e-7)


def test_rat_reference_quirk_changes_only_yy1():
    from tfrobust.defenses import rat

    rng = np.random.default_rng(0)
    g_nat = rng.standard_normal((32, 10)).astype("float32")
    g_adv = rng.standard_normal((32, 10)).astype("float32")
    y = rng.integers(0, 10, 16)
    paper = [t.numpy() for t in rat.taylor_targets(g_nat, g_adv, y, reference_quirk=False)]
    quirk = [t.numpy() for t in rat.taylor_targets(g_nat, g_adv, y, reference_quirk=True)]
    for i in (0, 1, 3):
        np.testing.assert_array_equal(paper[i], quirk[i])
    assert not np.allclose(paper[2], quirk[2])
    np.testing.assert_array_equal(quirk[2], quirk[3])
    s_nat, s_adv = g_nat.sum(axis=0), g_adv.sum(axis=0)
    np.testing.assert_allclose(paper[2], numpy_reg_gap(s_nat**2 - s_adv**2)[y], atol=1e-6)
    np.testing.assert_allclose(paper[0], numpy_reg_gap(np.abs(s_nat) - np.abs(s_adv))[y], atol=1e-6)


def test_rat_attack_sees_noisy_kernels_and_weights_stay(batch):
    x, y = batch
    seen = []

    class Spy(RobustModel):
        def _attack_model_fn(self):
            inner = super()._attack_model_fn()
            conv = [v for v in self.network.trainable_variables if len(v.shape) == 4][0]

            def fn(t):
                seen.append(conv.numpy().copy())
                return inner(t)

            return fn

    model = make("trades+rat", lr=0.0, run_eagerly=True, cls=Spy)
    model(x[:1])
    conv = [v for v in model.network.trainable_variables if len(v.shape) == 4][0]
    original = conv.numpy().copy()
    before = values(model.network.trainable_variables)
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)
    assert seen, "the attack did not run"
    noise = seen[-1] - original
    assert np.abs(noise).max() > 0
    assert 0.5e-4 < noise.std() < 2e-4  # sigma = 1e-4
    for b, a in zip(before, values(model.network.trainable_variables)):
        np.testing.assert_array_equal(a, b)


# --- every defense learns -------------------------------------------------------


@pytest.mark.parametrize("name", DEFENSES)
def test_every_defense_lowers_its_objective(fashion_subset, name):
    x, y = fashion_subset
    model = make(name, lr=0.05, steps=2, batch_norm=True)
    history = model.fit(x[:256], y[:256], batch_size=64, epochs=4, verbose=0, shuffle=False)
    loss = history.history["loss"]
    assert np.isfinite(loss).all()
    assert loss[-1] < loss[0], f"{name}: {loss}"


def test_validation_reports_clean_and_pgd_accuracy(fashion_subset):
    x, y = fashion_subset
    model = make("at", steps=2)
    history = model.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0, validation_data=(x[500:], y[500:]))
    for key in ("val_clean_accuracy", "val_pgd_accuracy", "val_pgd_loss"):
        assert key in history.history
    assert history.history["val_pgd_accuracy"][0] <= history.history["val_clean_accuracy"][0]


@pytest.mark.parametrize("name", ["at", "trades"])
def test_train_clean_accuracy_off_skips_only_at_clean_pass(fashion_subset, name):
    x, y = fashion_subset
    runs = {}
    for report in (True, False):
        keras.utils.set_random_seed(0)
        model = make(name, steps=2, batch_norm=True, train_clean_accuracy=report)
        assert model.get_config()["train_clean_accuracy"] is report  # saved with the model
        history = model.fit(x[:128], y[:128], batch_size=64, epochs=2, verbose=0, shuffle=False,
                            validation_data=(x[500:564], y[500:564]))
        runs[report] = (history.history, values(model.network.weights))
    (on, weights_on), (off, weights_off) = runs[True], runs[False]
    # AT's clean pass comes after the update and changes no state: the same training without it (up to the
    # run-to-run order of multi-threaded float32 sums). TRADES reports it from its own forward pass either way.
    assert ("clean_accuracy" in off) is (name == "trades") and "clean_accuracy" in on
    for key in ("loss", "adv_accuracy", "val_clean_accuracy", "val_pgd_accuracy"):
        np.testing.assert_allclose(off[key], on[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(weights_off, weights_on):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attack_in_batchnorm_train_mode_leaves_statistics_unchanged(batch):
    x, y = batch
    model = make("trades", batch_norm=True, bn_mode="train")
    model(x[:1])
    before = values(model.network.non_trainable_variables)
    x_adv_train = model.adversarial_examples(tf.constant(x), tf.constant(y)).numpy()
    for b, a in zip(before, values(model.network.non_trainable_variables)):
        np.testing.assert_array_equal(a, b)
    evaluating = make("trades", network=model.network, bn_mode="eval")
    evaluating.compile(optimizer=keras.optimizers.SGD(0.1))
    x_adv_eval = evaluating.adversarial_examples(tf.constant(x), tf.constant(y)).numpy()
    assert not np.array_equal(x_adv_train, x_adv_eval)  # the mode really changed what the attack saw
    assert np.abs(x_adv_train - x).max() <= 0.1 + 1e-6
