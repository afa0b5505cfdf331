"""Tests of tfrobust.autoattack: APGD, APGD-T, FAB-T, Square and the ensemble."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrobust import autoattack as aa
from tfrobust.errors import UserError

H = W = 8


def _linear_model(n_classes, seed):
    """Dense logits on flattened 8x8x1 inputs, with fixed weights and bias."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((H, W, 1)), keras.layers.Flatten(), keras.layers.Dense(n_classes)])
    kernel = rng.normal(size=(H * W, n_classes)).astype(np.float32)
    bias = rng.normal(scale=0.5, size=n_classes).astype(np.float32)
    model.layers[-1].set_weights([kernel, bias])
    return model, kernel, bias


def _minimal_perturbation(x, y, kernel, bias, norm):
    """min_k (z_y - z_k) / ||w_y - w_k||_dual: the exact distance to the decision boundary."""
    z = x.reshape(len(x), -1) @ kernel + bias
    out = np.full(len(x), np.inf)
    for i in range(len(x)):
        for k in range(kernel.shape[1]):
            if k == y[i]:
                continue
            dw = kernel[:, y[i]] - kernel[:, k]
            dual = np.abs(dw).sum() if norm == "linf" else np.sqrt((dw ** 2).sum())
            out[i] = min(out[i], (z[i, y[i]] - z[i, k]) / dual)
    return out


@pytest.fixture(scope="module")
def linear_cases():
    cases = {}
    for n_classes, seed in ((2, 1), (5, 2)):
        model, kernel, bias = _linear_model(n_classes, seed)
        rng = np.random.default_rng(seed + 10)
        # Well inside [0, 1], so that the box never binds at these radii.
        x = rng.uniform(0.4, 0.6, size=(8, H, W, 1)).astype(np.float32)
        y = (x.reshape(8, -1) @ kernel + bias).argmax(1)
        cases[n_classes] = (model, kernel, bias, x, y)
    return cases


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("n_classes", [2, 5])
def test_linear_closed_form(linear_cases, norm, n_classes):
    """APGD and FAB break every example at 1.05x its exact boundary distance and none at 0.95x."""
    model, kernel, bias, x, y = linear_cases[n_classes]
    r = _minimal_perturbation(x, y, kernel, bias, norm)
    assert np.all(r > 0)
    # The box is irrelevant: the optimal perturbation stays inside [0, 1].
    assert r.max() * 1.05 < 0.35
    if n_classes == 2:
        gradient_attack = functools.partial(aa.apgd, loss="ce", n_iter=50)
    else:
        gradient_attack = functools.partial(aa.apgd_targeted, n_iter=50, n_target_classes=n_classes - 1)
    fab = functools.partial(aa.fab_targeted, n_iter=50, n_target_classes=n_classes - 1)
    for name, attack in (("apgd", gradient_attack), ("fab", fab)):
        for i in range(len(x)):
            for factor, should_break in ((1.05, True), (0.95, False)):
                eps = float(r[i] * factor)
                x_adv = attack(model, x[i:i + 1], y[i:i + 1], eps, norm=norm, seed=0).numpy()
                broken = model(x_adv).numpy().argmax(1)[0] != y[i]
                assert broken == should_break, (name, norm, i, factor)
                assert aa.perturbation_norms(x_adv, x[i:i + 1], norm)[0] <= eps + 1e-6


def test_box_hyperplane_projection_is_exact():
    """The FAB projection lands on the hyperplane, inside the box, with the minimal norm."""
    rng = np.random.default_rng(0)
    t = rng.uniform(0.2, 0.8, size=(6, 30))
    w = rng.normal(size=(6, 30))
    b = (w * t).sum(1) + rng.normal(scale=0.5, size=6)
    for norm in ("linf", "l2"):
        d = aa._box_hyperplane_projection(tf.constant(t), tf.constant(w), tf.constant(b), norm).numpy()
        np.testing.assert_allclose(((t + d) * w).sum(1), b, atol=1e-4)
        assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
        r = np.abs(b - (w * t).sum(1))
        if norm == "linf":
            expected = r / np.abs(w).sum(1)
            got = np.abs(d).max(1)
        else:
            expected = r / np.sqrt((w ** 2).sum(1))
            got = np.sqrt((d ** 2).sum(1))
        np.testing.assert_allclose(got, expected, rtol=1e-4)  # box not active at these sizes
    # Infeasible: the hyperplane misses the box, so the step goes to the best corner.
    t1 = np.full((1, 4), 0.5)
    w1 = np.ones((1, 4))
    d = aa._box_hyperplane_projection(tf.constant(t1), tf.constant(w1), tf.constant([10.0]), "linf").numpy()
    np.testing.assert_allclose(t1 + d, np.ones((1, 4)), atol=1e-7)
    # Binding box in L2: the clipped coordinate stops at the face, the others take up the rest.
    t2 = np.array([[0.95, 0.5]])
    w2 = np.array([[1.0, 1.0]])
    d = aa._box_hyperplane_projection(tf.constant(t2), tf.constant(w2), tf.constant([1.75]), "l2").numpy()
    np.testing.assert_allclose(t2 + d, [[1.0, 0.75]], atol=1e-6)


@pytest.fixture(scope="module")
def bn_cnn():
    """A small CNN with BatchNorm (whose moving statistics must not change) and random weights."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(6, 3)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(6)(h)
    model = keras.Model(inputs, outputs)
    bn = model.layers[2]
    bn.moving_mean.assign(np.full(6, 0.1, np.float32))
    bn.moving_variance.assign(np.full(6, 0.5, np.float32))
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, size=(24, 12, 12, 1)).astype(np.float32)
    y = model.predict(x, verbose=0).argmax(1)
    y[:3] = (y[:3] + 1) % 6  # a few clean mistakes
    return model, x, y


def _small_budget():
    return {
        "apgd-ce": functools.partial(aa.apgd, loss="ce", n_iter=20),
        "apgd-t": functools.partial(aa.apgd_targeted, n_iter=10, n_target_classes=3),
        "fab-t": functools.partial(aa.fab_targeted, n_iter=10, n_target_classes=3),
        "square": functools.partial(aa.square, n_queries=150),
    }


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.5)])
def test_ensemble_invariants(bn_cnn, norm, eps):
    model, x, y = bn_cnn
    weights = [w.numpy().copy() for w in model.weights]
    result = aa.run_autoattack(model, x, y, eps, norm=norm, attacks=_small_budget(), batch_size=10, seed=1,
                               verbose=False, individual=True)
    # Model variables (kernels and BatchNorm statistics) are untouched.
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    clean_mask = model.predict(x, verbose=0).argmax(1) == y
    assert result["clean"] == pytest.approx(clean_mask.mean())
    assert not clean_mask.all()
    # Cumulative accuracies never increase; the worst case is below every single number.
    per = list(result["per_attack"].values())
    assert per == sorted(per, reverse=True)
    assert per[0] < result["clean"]  # the attacks did something
    assert result["worst_case"] <= min(per) + 1e-12
    assert result["worst_case"] <= min(result["individual"].values()) + 1e-12
    assert result["worst_case"] == pytest.approx(result["robust_mask"].mean())
    # Individual runs are consistent with the robust mask: robust examples survived each attack alone.
    for name in result["individual"]:
        assert result["individual"][name] >= result["worst_case"]
    # x_adv stays in the ball and in [0, 1], and the non-robust points are misclassified there.
    x_adv = result["x_adv"]
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert aa.perturbation_norms(x_adv, x, norm).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    pred_adv = model.predict(x_adv, verbose=0).argmax(1)
    assert np.all(pred_adv[~result["robust_mask"]] != y[~result["robust_mask"]])
    assert np.all(pred_adv[result["robust_mask"]] == y[result["robust_mask"]])
    # Same seed, same result.
    again = aa.run_autoattack(model, x, y, eps, norm=norm, attacks=_small_budget(), batch_size=10, seed=1,
                              verbose=False)
    assert again["per_attack"] == result["per_attack"]
    broken = ~again["robust_mask"]
    np.testing.assert_array_equal(again["x_adv"][broken], result["x_adv"][broken])
    np.testing.assert_array_equal(again["x_adv"][~broken], x[~broken])
    assert np.all(again["robust_mask"] >= result["robust_mask"])


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.5)])
def test_each_attack_stays_in_ball_and_is_deterministic(bn_cnn, norm, eps):
    model, x, y = bn_cnn
    weights = [w.numpy().copy() for w in model.weights]
    for name, attack in _small_budget().items():
        first = attack(model, x, y, eps, norm=norm, seed=5).numpy()
        second = attack(model, x, y, eps, norm=norm, seed=5).numpy()
        np.testing.assert_array_equal(first, second, err_msg=name)
        assert aa.perturbation_norms(first, x, norm).max() <= eps + 1e-6, name
        assert first.min() >= 0.0 and first.max() <= 1.0, name
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    # The seed matters for randomised attacks.
    a = aa.square(model, x, y, eps, norm=norm, n_queries=30, seed=1).numpy()
    b = aa.square(model, x, y, eps, norm=norm, n_queries=30, seed=2).numpy()
    assert not np.array_equal(a, b)


def test_reference_quirks_run(bn_cnn):
    model, x, y = bn_cnn
    for norm, eps in (("linf", 0.03), ("l2", 0.5)):
        xa = aa.square(model, x, y, eps, norm=norm, n_queries=40, reference_quirks=True).numpy()
        assert aa.perturbation_norms(xa, x, norm).max() <= eps + 1e-6
        xa = aa.apgd(model, x, y, eps, norm=norm, n_iter=10, reference_quirks=True).numpy()
        assert aa.perturbation_norms(xa, x, norm).max() <= eps + 1e-6


def test_standard_version_runs(bn_cnn):
    """The default budgets through the public registry ("fast": APGD-CE and APGD-T, 100 iterations)."""
    model, x, y = bn_cnn
    res = aa.run_autoattack(model, x[:8], y[:8], 0.03, version="fast", verbose=False)
    assert list(res["per_attack"]) == aa.VERSIONS["fast"]
    assert res["individual"] is None
    assert set(aa.ATTACKS) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert aa.VERSIONS["standard"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_saved_model_serve_function(bn_cnn, tmp_path):
    """A SavedModel's serve endpoint works as model_fn, with the same result as the keras model."""
    model, x, y = bn_cnn
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))  # keep the owner of the variables alive
    serve = loaded.serve
    a = aa.apgd(model, x, y, 0.03, n_iter=10, seed=0).numpy()
    b = aa.apgd(serve, x, y, 0.03, n_iter=10, seed=0).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert aa.perturbation_norms(b, x, "linf").max() <= 0.03 + 1e-6


def test_agrees_with_cleverhans_pgd(trained_tiny, fashion_subset):
    """APGD-CE is at least as strong as cleverhans 4.0.0 PGD (within one percentage point)."""
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    model = trained_tiny
    x, y = fashion_subset
    x, y = x[500:600], y[500:600]
    model_fn = lambda t: model(t, training=False)  # noqa: E731
    clean = float(np.mean(model.predict(x, verbose=0).argmax(1) == y))
    for norm, ch_norm, eps in (("linf", np.inf, 0.04), ("l2", 2, 1.0)):
        tf.random.set_seed(0)
        x_ch = projected_gradient_descent(model_fn, tf.constant(x), eps, 2.5 * eps / 20, 20, ch_norm,
                                          loss_fn=tf.nn.sparse_softmax_cross_entropy_with_logits,
                                          clip_min=0.0, clip_max=1.0, y=tf.constant(y, tf.int64),
                                          rand_init=True, sanity_checks=False)
        ch_acc = float(np.mean(model.predict(x_ch.numpy(), verbose=0).argmax(1) == y))
        x_ap = aa.apgd(model_fn, x, y, eps, norm=norm, loss="ce", n_iter=50, seed=0).numpy()
        ap_acc = float(np.mean(model.predict(x_ap, verbose=0).argmax(1) == y))
        assert aa.perturbation_norms(x_ap, x, norm).max() <= eps + 1e-6
        # The comparison is informative: PGD works but does not break everything.
        assert 0.05 < ch_acc < clean - 0.1, (norm, clean, ch_acc)
        assert ap_acc <= ch_acc + 0.01, (norm, ap_acc, ch_acc)


def test_bad_arguments(bn_cnn):
    model, x, y = bn_cnn
    with pytest.raises(UserError, match="allowed: apgd-ce, apgd-t, fab-t, square"):
        aa.run_autoattack(model, x, y, 0.03, attacks=["apgd-ce", "pgd"], verbose=False)
    with pytest.raises(UserError, match="allowed: fast, plus, rand, standard"):
        aa.run_autoattack(model, x, y, 0.03, version="plux", verbose=False)
    with pytest.raises(UserError, match="allowed: l2, linf"):
        aa.run_autoattack(model, x, y, 0.03, norm="l1", verbose=False)
    with pytest.raises(UserError, match="allowed: l2, linf"):
        aa.apgd(model, x, y, 0.03, norm="L1")
    with pytest.raises(UserError, match="eps"):
        aa.run_autoattack(model, x, y, -0.1, verbose=False)
    with pytest.raises(UserError, match="eps must be >= 0"):
        aa.square(model, x, y, -1.0)
    # the same words as every other eps check of tfrobust
    with pytest.raises(UserError, match="eps must be finite"):
        aa.run_autoattack(model, x, y, float("nan"), verbose=False)
    with pytest.raises(UserError, match="eps must be a number"):
        aa.apgd(model, x, y, "0.03")
    with pytest.raises(UserError, match="allowed: ce, dlr, dlr-targeted"):
        aa.apgd(model, x, y, 0.03, loss="hinge")
    with pytest.raises(UserError, match="target_class_rank"):
        aa.apgd(model, x, y, 0.03, loss="dlr-targeted")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        aa.apgd(model, x * 255.0, y, 0.03)
    with pytest.raises(UserError, match="labels must be in 0..5"):
        aa.square(model, x, y + 6, 0.03)
    with pytest.raises(UserError, match="batch_size"):
        aa.run_autoattack(model, x, y, 0.03, batch_size=0, verbose=False)
    binary, _, _ = _linear_model(2, 0)
    with pytest.raises(UserError, match="at least 4 classes"):
        aa.run_autoattack(binary, np.full((2, H, W, 1), 0.5, np.float32), [0, 1], 0.1, version="fast",
                          verbose=False)
    # Upper-case norm names are accepted.
    out = aa.apgd(model, x[:2], y[:2], 0.01, norm="Linf", n_iter=2)
    assert out.shape == x[:2].shape


# ---------------------------------------------------------------------------
# Versions "plus" and "rand", and the attacks they add (APGD-DLR, untargeted FAB, EOT)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_closed_form_untargeted_attacks(linear_cases, norm):
    """APGD-DLR and untargeted FAB break every example at 1.05x its exact boundary distance, none at 0.95x."""
    model, kernel, bias, x, y = linear_cases[5]
    r = _minimal_perturbation(x, y, kernel, bias, norm)
    for name in ("apgd-dlr", "fab"):
        attack = aa.ALL_ATTACKS[name]
        for factor, should_break in ((1.05, True), (0.95, False)):
            for i in range(len(x)):
                eps = float(r[i] * factor)
                x_adv = attack(model, x[i:i + 1], y[i:i + 1], eps, norm=norm, seed=0).numpy()
                broken = model(x_adv).numpy().argmax(1)[0] != y[i]
                assert broken == should_break, (name, norm, i, factor)
                assert aa.perturbation_norms(x_adv, x[i:i + 1], norm)[0] <= eps + 1e-6


def test_plus_and_standard_on_a_linear_model(linear_cases):
    """The versions' verdicts equal the closed form wherever the boundary is not within 5% of eps."""
    model, kernel, bias, x, y = linear_cases[5]
    r = _minimal_perturbation(x, y, kernel, bias, "linf")
    eps = float(np.median(r))
    clear = np.abs(r / eps - 1) > 0.05
    assert clear.sum() >= 6 and (r[clear] > eps).any() and (r[clear] < eps).any()
    for version in ("plus", "standard"):
        res = aa.run_autoattack(model, x, y, eps, version=version, batch_size=4, verbose=False)
        assert list(res["per_attack"]) == aa.VERSIONS[version]
        np.testing.assert_array_equal(res["robust_mask"][clear], (r > eps)[clear])
        broken = ~res["robust_mask"]
        # every broken example names the attack that broke it, with the norm of its adversarial point
        assert set(res["broken_by"][broken]) <= set(aa.VERSIONS[version])
        np.testing.assert_allclose(res["perturbation_norm"][broken],
                                   aa.perturbation_norms(res["x_adv"][broken], x[broken], "linf"), rtol=1e-6)
        assert np.all(res["perturbation_norm"][broken] >= r[broken] * (1 - 1e-4))  # never below the exact distance
        assert np.all(np.isnan(res["perturbation_norm"][~broken]))
        assert res["verdict_passes"] == 1


def test_version_budgets_follow_the_reference():
    """autoattack.py set_version (L-inf/L2): attacks, order, restarts, iterations, EOT, targets, queries."""
    assert aa.VERSIONS["plus"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert aa.VERSIONS["rand"] == ["apgd-ce", "apgd-dlr"]
    plus = {k: f.settings for k, f in aa.VERSION_ATTACKS["plus"].items()}
    assert plus["apgd-ce"] == {"loss": "ce", "n_iter": 100, "n_restarts": 5}
    assert plus["apgd-dlr"] == {"loss": "dlr", "n_iter": 100, "n_restarts": 5}
    assert plus["fab"] == {"n_iter": 100, "n_restarts": 5}
    assert plus["square"] == {"n_queries": 5000, "p_init": 0.8, "n_restarts": 1}
    assert plus["apgd-t"] == {"n_iter": 100, "n_target_classes": 9, "n_restarts": 1}
    assert plus["fab-t"] == {"n_iter": 100, "n_target_classes": 9, "n_restarts": 1}
    rand = {k: f.settings for k, f in aa.VERSION_ATTACKS["rand"].items()}
    assert rand == {"apgd-ce": {"loss": "ce", "n_iter": 100, "n_restarts": 1, "eot_iter": 20},
                    "apgd-dlr": {"loss": "dlr", "n_iter": 100, "n_restarts": 1, "eot_iter": 20}}
    assert aa.VERSION_VERDICT_PASSES == {"rand": 20}
    # The standard version is unchanged.
    assert [aa.VERSION_ATTACKS["standard"][k] for k in aa.VERSIONS["standard"]] == [
        aa.ATTACKS[k] for k in aa.VERSIONS["standard"]]


class TriangleNoise(keras.layers.Layer):
    """x + A T (|frac((x + phi) / T) - 1/2| - 1/4), phi ~ U[0, T) drawn anew per pass and input feature.

    The added term is at most A T / 4 = 7.5e-5 in size and zero in expectation, so the
    expected output is the linear model's; its derivative is +-A (A = 3) with equal
    probability, so d output / dx is 4 or -2: one pass gives every input coordinate a
    random gradient sign, and the mean of 20 passes has the right sign unless at most
    6 of the 20 signs are +1 (probability 5.8%).
    """

    A, T = 3.0, 1e-4

    def call(self, x):
        phase = tf.random.uniform(tf.shape(x), 0.0, self.T)
        v = (x + phase) / self.T
        return x + self.A * self.T * (tf.abs(v - tf.floor(v) - 0.5) - 0.25)


def _noisy_linear_model(kernel, bias, side):
    inputs = keras.Input((side, side, 1))
    h = keras.layers.Flatten()(TriangleNoise()(inputs))
    dense = keras.layers.Dense(kernel.shape[1])
    model = keras.Model(inputs, dense(h))
    dense.set_weights([kernel, bias])
    return model


@pytest.fixture(scope="module")
def noisy_linear():
    """Three classes (the third never competes: bias -100); every example at L-inf distance 0.05 from the boundary."""
    side, n, r = 16, 12, 0.05
    rng = np.random.default_rng(7)
    kernel = np.zeros((side * side, 3), np.float32)
    kernel[:, :2] = rng.normal(size=(side * side, 2))
    bias = np.array([0.0, 0.0, -100.0], np.float32)
    y = np.arange(n) % 2
    dw = (kernel[:, 1] - kernel[:, 0]) * np.where(y == 1, 1.0, -1.0)[:, None]  # grad of z_y - z_other, per example
    u = rng.uniform(0.4, 0.6, size=(n, side * side))
    # move u along sign(dw) until the margin z_y - z_other is exactly r * ||dw||_1
    c = (r * np.abs(dw).sum(1) - (dw * u).sum(1)) / np.abs(dw).sum(1)
    x = (u + c[:, None] * np.sign(dw)).reshape(n, side, side, 1).astype(np.float32)
    assert x.min() > 0.2 and x.max() < 0.8  # the box never binds at eps <= 0.075
    return _noisy_linear_model(kernel, bias, side), kernel, bias, x, y


def test_eot_beats_the_gradient_noise_that_fools_one_pass(noisy_linear):
    """On a model whose expected output is linear, APGD with EOT breaks what single-pass APGD cannot."""
    model, kernel, bias, x, y = noisy_linear
    r = _minimal_perturbation(x, y, kernel, bias, "linf")
    np.testing.assert_allclose(r, 0.05, rtol=1e-4)
    # 1.5 times the distance: EOT's mean gradient has the right sign on about 94% of the
    # coordinates (enough, the exact step needs 67%); single-pass signs are fair coins, and a
    # random corner of the ball moves the margin by eps ||dw||_2, about 8 standard
    # deviations short of the needed r ||dw||_1 (d = 256).
    eps = 1.5 * 0.05
    # The model is randomised, but its mean prediction is the linear model's.
    mean = np.mean([model(x).numpy() for _ in range(20)], axis=0)
    np.testing.assert_allclose(mean, x.reshape(len(x), -1) @ kernel + bias, atol=0.02)  # noise <= 7.5e-5 * |W|_1
    linear = lambda t: t.reshape(len(t), -1) @ kernel + bias  # noqa: E731
    single = aa.apgd(model, x, y, eps, loss="ce", n_iter=100, seed=0).numpy()
    eot = aa.apgd(model, x, y, eps, loss="ce", n_iter=100, seed=0, eot_iter=20).numpy()
    assert np.all(linear(single).argmax(1) == y)
    assert np.all(linear(eot).argmax(1) != y)
    assert aa.perturbation_norms(eot, x, "linf").max() <= eps + 1e-6
    # The versions: "rand" (APGD-CE and APGD-DLR with EOT, verdicts on 20-pass means) breaks all;
    # the same attacks without EOT break none.
    rand = aa.run_autoattack(model, x, y, eps, version="rand", batch_size=6, verbose=False)
    assert rand["verdict_passes"] == 20 and rand["clean"] == 1.0
    assert rand["worst_case"] == 0.0
    flags = {f["name"]: f for f in rand["flags"]}
    assert flags["deterministic_forward"]["passed"]  # randomness is expected under EOT
    plain = aa.run_autoattack(model, x, y, eps, attacks=["apgd-ce", "apgd-dlr"], batch_size=6, verbose=False)
    assert plain["worst_case"] == 1.0
    # Below the boundary distance nothing is broken, with or without EOT.
    low = aa.run_autoattack(model, x, y, 0.9 * 0.05, attacks=["apgd-ce-eot", "apgd-dlr-eot"],
                            batch_size=6, verbose=False)
    assert low["verdict_passes"] == 20 and low["worst_case"] == 1.0


def _clear_linear_examples(linear_cases):
    """12 examples of a linear model at least 20% away from the boundary (L-inf), half robust at eps."""
    model, kernel, bias, _, _ = linear_cases[5]
    x = np.random.default_rng(5).uniform(0.3, 0.7, size=(64, H, W, 1)).astype(np.float32)
    y = (x.reshape(len(x), -1) @ kernel + bias).argmax(1)
    r = _minimal_perturbation(x, y, kernel, bias, "linf")
    eps = float(np.median(r))
    clear = np.abs(r / eps - 1) > 0.2
    x, y, r = x[clear][:12], y[clear][:12], r[clear][:12]
    assert len(x) == 12 and 0 < np.sum(r > eps) < 12 and r.max() * 1.2 < 0.3  # the box never binds
    return model, x, y, r, eps


def _recording_budget(seen):
    def recording(attack):
        def run(model_fn, xb, yb, eps, norm, seed):
            seen.append((tf.constant(0.0).device.split("device:")[-1], len(xb)))
            return attack(model_fn, xb, yb, eps, norm=norm, seed=seed)
        return run

    return {"apgd-ce": recording(functools.partial(aa.apgd, n_iter=50)),
            "apgd-t": recording(functools.partial(aa.apgd_targeted, n_iter=50, n_target_classes=4)),
            "fab": recording(functools.partial(aa.fab, n_iter=50))}


def test_whole_batches_go_to_the_replicas_and_give_the_one_device_result(linear_cases):
    """Under a MirroredStrategy on two logical CPUs whole batches alternate between the replicas.

    Each batch is attacked exactly as on one device (same examples, same seed), so verdicts and
    points equal the single-device run. The points are compared with atol 1e-6 only because the two
    runs may partition a kernel's work across threads differently; the verdicts exactly.
    """
    model, x, y, r, eps = _clear_linear_examples(linear_cases)
    seen = []
    one = aa.run_autoattack(model, x, y, eps, attacks=_recording_budget(seen), batch_size=4, verbose=False)
    assert {d for d, _ in seen} == {"CPU:0"} and one["devices"] == []
    seen.clear()
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    two = aa.run_autoattack(model, x, y, eps, attacks=_recording_budget(seen), batch_size=4, verbose=False,
                            strategy=strategy)
    assert len(two["devices"]) == 2
    # APGD-CE runs on all 12 examples: 3 whole batches of 4, the first two at once on both devices.
    # (the first two run concurrently, so they may be recorded in either order).
    assert sorted(seen[:2]) == [("CPU:0", 4), ("CPU:1", 4)] and seen[2] == ("CPU:0", 4)
    assert {d for d, _ in seen} == {"CPU:0", "CPU:1"} and {k for _, k in seen} <= {1, 2, 3, 4}
    np.testing.assert_array_equal(two["robust_mask"], one["robust_mask"])
    np.testing.assert_array_equal(two["robust_mask"], r > eps)
    np.testing.assert_allclose(two["x_adv"], one["x_adv"], rtol=0, atol=1e-6)
    broken = ~two["robust_mask"]
    assert aa.perturbation_norms(two["x_adv"][broken], x[broken], "linf").max() <= eps + 1e-6


def test_accelerators_split_a_lone_batch_and_verdicts_stay(linear_cases, monkeypatch):
    """With fewer batches than devices, accelerator devices split each batch into one shard per device.

    No GPU here: the device-type test is replaced so that two logical CPUs count as accelerators.
    The examples are at least 20% away from the boundary, so the changed random draws of the split
    (they depend on an example's position) cannot flip a verdict.
    """
    from tfrobust.autoattack import sharding

    model, x, y, r, eps = _clear_linear_examples(linear_cases)
    assert not sharding.splits_batches(["/job:localhost/replica:0/task:0/device:CPU:0"] * 2)
    assert sharding.splits_batches(["/job:localhost/replica:0/task:0/device:GPU:0"] * 2)
    monkeypatch.setattr(sharding, "splits_batches", lambda devices: True)
    seen = []
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    two = aa.run_autoattack(model, x, y, eps, attacks=_recording_budget(seen), batch_size=len(x), verbose=False,
                            strategy=strategy)
    assert {d for d, _ in seen} == {"CPU:0", "CPU:1"}
    # Every call saw one shard of the batch: sizes of each attack's calls add up to the examples it ran on.
    assert sum(k for _, k in seen[:2]) == len(x)
    np.testing.assert_array_equal(two["robust_mask"], r > eps)
    broken = ~two["robust_mask"]
    assert aa.perturbation_norms(two["x_adv"][broken], x[broken], "linf").max() <= eps + 1e-6