"""Tests of tfrobust.flatness (Stutz et al., ICCV 2021: robust loss, average- and worst-case flatness)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrobust import flatness as F
from tfrobust import seeds
from tfrobust.attacks import cross_entropy
from tfrobust.errors import UserError

SMALL = dict(eps=8 / 255, step_size=0.007, steps=3, batch_size=16, progress=False)


def _data(n=24, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, classes, n).astype("int64")
    return x, y


def _dense_relu_dense(seed=0, hidden=16, classes=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(hidden, activation="relu", bias_initializer="random_normal", name="hidden")(h)
    out = keras.layers.Dense(classes, bias_initializer="random_normal", name="logits")(h)
    return keras.Model(inp, out)


def _bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", bias_initializer="random_normal"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3, bias_initializer="random_normal"),
    ])
    bn = model.layers[1]
    rng = np.random.default_rng(seed)
    # Moving statistics that differ from any batch's statistics, so that
    # training=True and training=False give different outputs.
    bn.moving_mean.assign(rng.normal(0.0, 0.3, 4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    return model


def _snapshot(model):
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _assert_unchanged(model, snapshot):
    now = [v.numpy() for v in model.variables]
    assert len(now) == len(snapshot)
    for a, b in zip(now, snapshot):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def _norm(a):
    return float(np.linalg.norm(np.asarray(a, np.float64).ravel()))


# ---------------------------------------------------------------------------
# Which variables are perturbed
# ---------------------------------------------------------------------------


def test_perturbable_variables_excludes_normalisation_layers():
    keras.utils.set_random_seed(0)
    norm = keras.layers.Normalization(mean=0.5, variance=0.25)
    inner = keras.Sequential(
        [keras.layers.Dense(6, name="inner_dense"), keras.layers.BatchNormalization(name="inner_bn")], name="inner")
    inp = keras.Input((8, 8, 1))
    h = norm(inp)
    h = keras.layers.Conv2D(4, 3, name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GroupNormalization(groups=2, name="gn")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = keras.layers.UnitNormalization(name="un")(h)
    h = inner(h)
    out = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inp, out)
    names = sorted(v.path for v in F.perturbable_variables(model))
    assert names == sorted(["conv/kernel", "conv/bias", "inner/inner_dense/kernel", "inner/inner_dense/bias",
                            "out/kernel", "out/bias"])
    # Everything else that is trainable belongs to a normalisation layer.
    excluded = {v.path for v in model.trainable_variables} - set(names)
    assert {p.split("/")[-2] for p in excluded} == {"bn", "gn", "ln", "inner_bn"}


# ---------------------------------------------------------------------------
# Perturbation geometry
# ---------------------------------------------------------------------------


def test_sphere_samples_have_exact_relative_norm():
    model = _dense_relu_dense()
    weights = [v.numpy() for v in F.perturbable_variables(model)]
    for xi in (0.1, 0.5, 1.0):
        for sample in range(3):
            nus = F.sample_sphere_perturbation(weights, xi, seed=7, sample=sample)
            for nu, w in zip(nus, weights):
                assert nu.shape == w.shape
                assert _norm(nu) == pytest.approx(xi * _norm(w), rel=1e-5)
    # Deterministic in (seed, sample), different across samples.
    a = F.sample_sphere_perturbation(weights, 0.5, seed=7, sample=0)
    b = F.sample_sphere_perturbation(weights, 0.5, seed=7, sample=0)
    c = F.sample_sphere_perturbation(weights, 0.5, seed=7, sample=1)
    assert all(np.array_equal(p.numpy(), q.numpy()) for p, q in zip(a, b))
    assert not np.allclose(a[0].numpy(), c[0].numpy())


def test_average_case_perturbations_lie_on_the_sphere():
    model = _dense_relu_dense()
    x, y = _data()
    weights = [v.numpy() for v in F.perturbable_variables(model)]
    res = F.average_case_flatness(model, x, y, xi=0.3, samples=4, return_perturbations=True, **SMALL)
    assert len(res["perturbations"]) == 4 and len(res["perturbed_losses"]) == 4
    for nus in res["perturbations"]:
        for nu, w in zip(nus, weights):
            assert _norm(nu) == pytest.approx(0.3 * _norm(w), rel=1e-5)


def test_worst_case_perturbations_lie_in_the_ball():
    model = _dense_relu_dense()
    x, y = _data()
    weights = [v.numpy() for v in F.perturbable_variables(model)]
    xi = 0.01
    for attempt in range(3):
        start = F.sample_ball_perturbation(weights, xi, seed=3, attempt=attempt)
        for nu, w in zip(start, weights):
            assert _norm(nu) <= xi * _norm(w) + 1e-6
    # Projection: a vector outside lands on the sphere, one inside is unchanged.
    big = [10.0 * np.ones_like(w) for w in weights]
    small = [1e-9 * np.ones_like(w) for w in weights]
    for nu, w in zip(F.project_perturbation(big, weights, xi), weights):
        assert _norm(nu) == pytest.approx(xi * _norm(w), rel=1e-5)
    for nu, s in zip(F.project_perturbation(small, weights, xi), small):
        np.testing.assert_allclose(nu.numpy(), s)
    res = F.worst_case_flatness(model, x, y, xi=xi, attempts=2, passes=3, return_perturbations=True, **SMALL)
    assert len(res["perturbations"]) == 2
    on_boundary = 0
    for nus in res["perturbations"]:
        for nu, w in zip(nus, weights):
            assert _norm(nu) <= xi * _norm(w) + 1e-6
            on_boundary += _norm(nu) > 0.99 * xi * _norm(w)
    # weight_step (0.01 ||w_l||) >= xi ||w_l||: the ascent reaches the boundary.
    assert on_boundary >= len(weights)


# ---------------------------------------------------------------------------
# Scale invariance of relative perturbations
# ---------------------------------------------------------------------------


def _rescaled_copy(model, k):
    other = _dense_relu_dense(seed=123)
    hidden, logits = model.get_layer("hidden"), model.get_layer("logits")
    other.get_layer("hidden").kernel.assign(hidden.kernel.numpy() * k)
    other.get_layer("hidden").bias.assign(hidden.bias.numpy() * k)
    other.get_layer("logits").kernel.assign(logits.kernel.numpy() / k)
    other.get_layer("logits").bias.assign(logits.bias.numpy())
    return other


def test_measures_are_scale_invariant():
    k = 3.0
    model = _dense_relu_dense()
    scaled = _rescaled_copy(model, k)
    x, y = _data()
    # Positive homogeneity of ReLU: the function is unchanged...
    np.testing.assert_allclose(model(x).numpy(), scaled(x).numpy(), rtol=1e-4, atol=1e-5)
    # ...but the weights are not.
    assert not np.allclose(model.get_layer("hidden").kernel.numpy(), scaled.get_layer("hidden").kernel.numpy())

    # The two networks agree to rounding, not bitwise, and PGD inside the robust
    # loss takes signs of input gradients: an entry within rounding of zero may
    # flip and move its pixel by a step. Such a pixel has a gradient of ~0, so
    # the loss moves only at second order (far below 1e-4 at step 0.007 on 24
    # examples); any real scale dependence moves the flatness by > 1e-2.
    avg_a = F.average_case_flatness(model, x, y, xi=0.5, samples=3, return_perturbations=True, **SMALL)
    avg_b = F.average_case_flatness(scaled, x, y, xi=0.5, samples=3, return_perturbations=True, **SMALL)
    assert abs(avg_a["flatness"]) > 1e-2
    assert avg_b["loss"] == pytest.approx(avg_a["loss"], abs=1e-4)
    assert avg_b["flatness"] == pytest.approx(avg_a["flatness"], abs=1e-4)
    # The sampled perturbations follow the weights: k * nu on layer 1, nu / k on layer 2's kernel.
    factors = [k, k, 1.0 / k, 1.0]
    for nus_a, nus_b in zip(avg_a["perturbations"], avg_b["perturbations"]):
        for nu_a, nu_b, f in zip(nus_a, nus_b, factors):
            np.testing.assert_allclose(nu_b, f * nu_a, rtol=1e-4, atol=1e-7)

    worst_a = F.worst_case_flatness(model, x, y, xi=0.05, attempts=2, passes=3, **SMALL)
    worst_b = F.worst_case_flatness(scaled, x, y, xi=0.05, attempts=2, passes=3, **SMALL)
    assert abs(worst_a["flatness"]) > 1e-2
    assert worst_b["flatness"] == pytest.approx(worst_a["flatness"], abs=1e-4)
    np.testing.assert_allclose(worst_b["perturbed_losses"], worst_a["perturbed_losses"], atol=1e-4)

    clean_a = F.worst_case_flatness(model, x, y, xi=0.05, attempts=1, passes=3, clean=True, **SMALL)
    clean_b = F.worst_case_flatness(scaled, x, y, xi=0.05, attempts=1, passes=3, clean=True, **SMALL)
    assert clean_b["flatness"] == pytest.approx(clean_a["flatness"], abs=1e-5)


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


def test_worst_case_is_not_below_average_case():
    model = _dense_relu_dense()
    x, y = _data()
    for clean in (False, True):
        avg = F.average_case_flatness(model, x, y, xi=0.02, samples=4, clean=clean, **SMALL)
        worst = F.worst_case_flatness(model, x, y, xi=0.02, attempts=2, passes=3, clean=clean, **SMALL)
        assert worst["loss"] == pytest.approx(avg["loss"], abs=1e-9)
        assert worst["flatness"] >= avg["flatness"]
        assert worst["perturbed_loss"] >= max(avg["perturbed_losses"])
        assert worst["perturbed_loss"] == max(worst["perturbed_losses"])
        assert worst["perturbed_losses"][worst["best_attempt"]] == worst["perturbed_loss"]


def test_average_case_matches_closed_form_for_a_quadratic_loss():
    # L(w) = 0.5 * sum_i h_i w_i^2; nu uniform on the sphere of radius r_l = xi ||w_l|| in d_l
    # dimensions has E[nu_i] = 0 and E[nu_i^2] = r_l^2 / d_l, so
    # E[L(w + nu)] - L(w) = sum_l 0.5 * r_l^2 * mean(h_l).
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(5, bias_initializer="random_normal")])
    x, y = _data()
    variables = F.perturbable_variables(model)
    rng = np.random.default_rng(2)
    hs = [rng.uniform(0.5, 2.0, tuple(v.shape)).astype("float32") for v in variables]
    xi = 0.5

    def quadratic(m, xb, yb):
        return sum(0.5 * tf.reduce_sum(tf.constant(h) * tf.square(v.value)) for h, v in zip(hs, variables))

    res = F.average_case_flatness(model, x, y, xi=xi, samples=400, loss_fn=quadratic, batch_size=24, progress=False)
    weights = [v.numpy().astype(np.float64) for v in variables]
    expected = sum(0.5 * (xi * _norm(w)) ** 2 * float(np.mean(h)) for w, h in zip(weights, hs))
    loss_w = sum(0.5 * float(np.sum(h * w ** 2)) for w, h in zip(weights, hs))
    assert res["loss"] == pytest.approx(loss_w, rel=1e-5)
    assert res["robust"] is False
    assert res["std_error"] > 0 and expected > 10 * res["std_error"]
    assert abs(res["flatness"] - expected) < 4 * res["std_error"]


def test_robust_loss_against_independent_computations():
    model = _bn_model()
    x, y = _data()
    clean_ce = float(np.mean(cross_entropy(model(x, training=False), y).numpy()))
    train_ce = float(np.mean(cross_entropy(model(x, training=True), y).numpy()))
    assert abs(clean_ce - train_ce) > 1e-3  # the check below can tell the BN modes apart
    # eps = 0: PGD cannot move, RLoss is the clean CE in inference mode.
    assert F.robust_loss(model, x, y, eps=0.0, steps=3, batch_size=10) == pytest.approx(clean_ce, rel=1e-5)
    r1 = F.robust_loss(model, x, y, eps=8 / 255, steps=5, restarts=1, batch_size=10)
    r3 = F.robust_loss(model, x, y, eps=8 / 255, steps=5, restarts=3, batch_size=10)
    assert r1 > clean_ce
    assert r3 >= r1 - 1e-7  # restart 0 is shared; the max over more restarts cannot be lower
    assert F.robust_loss(model, x, y, eps=8 / 255, steps=5, restarts=1, batch_size=10) == r1  # deterministic
    # Batching does not change the value.
    assert F.robust_loss(model, x, y, eps=0.0, steps=2, batch_size=7) == pytest.approx(clean_ce, rel=1e-5)


def test_robust_loss_evaluator_is_the_worst_restart_per_example_with_its_own_seeds():
    model = _dense_relu_dense()
    x, y = _data()
    x, y = tf.constant(x, tf.float32), tf.constant(y, tf.int32)
    evaluator = F.RobustLossEvaluator(model, 8 / 255, 2 / 255, 3, 2, "linf", 10, seed=4, jit=False)
    model_fn = lambda t: model(t, training=False)  # noqa: E731
    expected = []
    for b, lo in enumerate(range(0, 24, 10)):  # batches of 10, 10 and 4
        xb, yb = x[lo:lo + 10], y[lo:lo + 10]
        starts = [seeds.flatness_seed(4, seeds.STREAM_PGD, r, b) for r in range(2)]
        runs = [cross_entropy(model_fn(evaluator.attack(model_fn, xb, yb, s)), yb).numpy() for s in starts]
        assert not np.array_equal(runs[0], runs[1])  # the restarts start from different points
        expected.append(np.maximum(*runs))
    # The same eager ops on the same inputs in one process: equal bit for bit.
    np.testing.assert_array_equal(evaluator.per_example(x, y), np.concatenate(expected))
    clean = F.RobustLossEvaluator(model, 8 / 255, 2 / 255, 3, 2, "linf", 10, seed=4, robust=False, jit=False)
    np.testing.assert_array_equal(clean.per_example(x, y), cross_entropy(model_fn(x), y).numpy())


def test_clean_measures_use_inference_mode_and_keep_batchnorm_fixed():
    model = _bn_model()
    x, y = _data()
    snap = _snapshot(model)
    clean_ce = float(np.mean(cross_entropy(model(x, training=False), y).numpy()))
    res = F.average_case_flatness(model, x, y, xi=0.5, samples=3, clean=True, **SMALL)
    assert res["loss"] == pytest.approx(clean_ce, rel=1e-5)
    assert res["robust"] is False and res["clean"] is True
    paths = res["variables"]
    assert not any("batch_normalization" in p for p in paths)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------
# The model is always restored bitwise
# ---------------------------------------------------------------------------


def test_weights_bitwise_unchanged_after_every_measurement():
    model = _bn_model()
    x, y = _data()
    snap = _snapshot(model)
    F.robust_loss(model, x, y, steps=2, batch_size=16)
    _assert_unchanged(model, snap)
    for clean in (False, True):
        F.average_case_flatness(model, x, y, xi=0.5, samples=2, clean=clean, **SMALL)
        _assert_unchanged(model, snap)
        F.worst_case_flatness(model, x, y, xi=0.01, attempts=1, passes=2, clean=clean, **SMALL)
        _assert_unchanged(model, snap)


def test_weights_restored_after_exception_in_loss_fn():
    model = _dense_relu_dense()
    x, y = _data()
    snap = _snapshot(model)
    calls = {"n": 0}

    def failing(m, xb, yb):
        calls["n"] += 1
        if calls["n"] == 3:
            # By now the weights are perturbed.
            assert not np.array_equal(m.get_layer("hidden").kernel.numpy(), snap[0])
            raise RuntimeError("boom")
        return tf.reduce_mean(cross_entropy(m(xb, training=False), yb))

    with pytest.raises(RuntimeError, match="boom"):
        F.average_case_flatness(model, x, y, xi=0.5, samples=5, loss_fn=failing, batch_size=24, progress=False)
    _assert_unchanged(model, snap)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        F.worst_case_flatness(model, x, y, xi=0.05, attempts=2, passes=3, loss_fn=failing, batch_size=24,
                              progress=False)
    _assert_unchanged(model, snap)


class _FailingModel(keras.Model):
    """A Dense-ReLU-Dense model whose k-th forward call raises."""

    def __init__(self, fail_at):
        super().__init__()
        self.flat = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(8, activation="relu", bias_initializer="random_normal")
        self.out = keras.layers.Dense(3)
        self.calls = 0
        self.fail_at = fail_at

    def call(self, inputs, training=False):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("model failed")
        return self.out(self.hidden(self.flat(inputs)))


@pytest.mark.parametrize("measure", ["average", "worst"])
def test_weights_restored_after_exception_in_model(measure):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = _FailingModel(fail_at=None)
    model(x[:2])
    snap = _snapshot(model)
    # Eager (jit=False) so that every forward pass is a Python call; fail in the middle
    # of the perturbed evaluations (RLoss(w) with PGD-3 takes 2 batches x 4 calls).
    model.calls, model.fail_at = 0, 13
    with pytest.raises(RuntimeError, match="model failed"):
        if measure == "average":
            F.average_case_flatness(model, x, y, xi=0.5, samples=3, jit=False, **SMALL)
        else:
            F.worst_case_flatness(model, x, y, xi=0.05, attempts=2, passes=3, jit=False, **SMALL)
    assert model.calls == 13
    _assert_unchanged(model, snap)


def test_jit_and_eager_agree():
    model = _dense_relu_dense()
    x, y = _data()
    a = F.average_case_flatness(model, x, y, xi=0.5, samples=2, jit=True, **SMALL)
    b = F.average_case_flatness(model, x, y, xi=0.5, samples=2, jit=False, **SMALL)
    assert a["flatness"] == pytest.approx(b["flatness"], abs=1e-5)
    c = F.worst_case_flatness(model, x, y, xi=0.02, attempts=1, passes=2, jit=True, **SMALL)
    d = F.worst_case_flatness(model, x, y, xi=0.02, attempts=1, passes=2, jit=False, **SMALL)
    assert c["flatness"] == pytest.approx(d["flatness"], abs=1e-5)


# ---------------------------------------------------------------------------
# Report, errors, callback
# ---------------------------------------------------------------------------


def test_flatness_report_has_all_measures_and_is_json():
    model = _dense_relu_dense()
    x, y = _data(n=30)
    settings = {"examples": 20, "steps": 2, "batch_size": 16, "average": {"samples": 2},
                "average_clean": {"samples": 3}, "worst": {"attempts": 1, "passes": 2},
                "worst_clean": {"attempts": 1, "passes": 2, "xi": 0.001}}
    rep = F.flatness_report(model, x, y, eps=8 / 255, settings=settings, progress=False)
    json.dumps(rep)
    assert rep["examples"] == 20
    for m in ("average", "worst", "average_clean", "worst_clean"):
        assert np.isfinite(rep[m]["flatness"])
        assert rep[m]["examples"] == 20
    assert rep["average"]["samples"] == 2 and rep["average_clean"]["samples"] == 3
    assert rep["worst_clean"]["xi"] == 0.001 and rep["worst"]["xi"] == 0.00075
    assert rep["average"]["loss"] == rep["robust_loss"] == rep["worst"]["loss"]
    assert rep["average_clean"]["loss"] == rep["clean_loss"]
    assert rep["robust_loss"] == pytest.approx(F.robust_loss(model, x[:20], y[:20], steps=2, batch_size=16))
    assert F.REPORT_DEFAULTS["average"] == {"xi": 0.5, "samples": 10}
    assert F.REPORT_DEFAULTS["examples"] == 1000
    with pytest.raises(UserError):
        F.flatness_report(model, x, y, eps=0.03, settings={"averag": {}})
    with pytest.raises(UserError):
        F.flatness_report(model, x, y, eps=0.03, settings={"worst": {"samples": 3}})


def test_user_errors():
    model = _dense_relu_dense()
    x, y = _data()
    with pytest.raises(UserError):
        F.average_case_flatness(model, x, y, xi=-1.0, **SMALL)
    with pytest.raises(UserError):
        F.average_case_flatness(model, x, y, samples=0, **SMALL)
    with pytest.raises(UserError):
        F.worst_case_flatness(model, x, y, attempts=0, **SMALL)
    with pytest.raises(UserError):
        F.robust_loss(model, x, y, norm="l1")
    with pytest.raises(UserError):
        F.robust_loss(model, x, y[:5])
    with pytest.raises(UserError):
        F.FlatnessMonitor(x, y, every=0)
    # The monitor checks its measure's settings when it is made, not at the end of the first epoch.
    with pytest.raises(UserError, match="samples must be >= 1"):
        F.FlatnessMonitor(x, y, samples=0)
    with pytest.raises(UserError, match="xi must be >= 0"):
        F.FlatnessMonitor(x, y, xi=-0.5)


def test_flatness_monitor_logs_to_history_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _dense_relu_dense()
    x, y = _data(n=32)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log_dir = str(tmp_path / "logs")
    monitor = F.FlatnessMonitor(x[:12], y[:12], every=1, xi=0.5, samples=2, steps=2, batch_size=12,
                                log_dir=log_dir)
    board = keras.callbacks.TensorBoard(log_dir=log_dir)
    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[monitor, board])
    values = hist.history["val_robust_flatness"]
    assert len(values) == 2 and all(np.isfinite(values))
    assert len(hist.history["val_robust_flatness_rloss"]) == 2
    assert [r["epoch"] for r in monitor.results] == [0, 1]
    assert values == [r["flatness"] for r in monitor.results]

    def scalars(run, tag):
        acc = EventAccumulator(os.path.join(log_dir, run), size_guidance={"tensors": 0})
        acc.Reload()
        assert tag in acc.Tags()["tensors"], acc.Tags()
        return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

    own = scalars("flatness", "epoch_robust_flatness")
    assert [s for s, _ in own] == [0, 1]
    np.testing.assert_allclose([v for _, v in own], values, rtol=1e-6)
    keras_board = scalars("validation", "epoch_robust_flatness")
    np.testing.assert_allclose([v for _, v in keras_board], values, rtol=1e-6)


def test_flatness_monitor_every_two_epochs():
    model = _dense_relu_dense()
    x, y = _data(n=16)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = F.FlatnessMonitor(x, y, every=2, samples=1, steps=1, batch_size=16)
    hist = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[monitor])
    assert [r["epoch"] for r in monitor.results] == [1]
    assert len(hist.history["val_robust_flatness"]) == 1


def test_step_size_defaults_to_the_reference_ratio():
    assert F.resolve_step_size(8 / 255) == 0.007
    assert F.resolve_step_size(0.1) == pytest.approx(0.1 * 0.007 / (8 / 255))
    assert F.resolve_step_size(0.1, 0.02) == 0.02
    model = _dense_relu_dense()
    x, y = _data()
    res = F.average_case_flatness(model, x, y, eps=0.1, samples=1, steps=1, batch_size=24, progress=False)
    assert res["step_size"] == pytest.approx(F.resolve_step_size(0.1))
    rep = F.flatness_report(model, x, y, eps=0.1, settings={"measures": ["average"], "steps": 1,
                                                             "average": {"samples": 1}}, progress=False)
    assert rep["settings"]["step_size"] == rep["average"]["step_size"] == pytest.approx(F.resolve_step_size(0.1))
    assert "worst" not in rep and rep["clean_loss"] is None


# ---------------------------------------------------------------------------
# Typed report settings
# ---------------------------------------------------------------------------


def test_flatness_settings_have_the_reference_defaults_and_inherit_report_wide_values():
    s = F.FlatnessSettings()
    assert (s.examples, s.steps, s.restarts, s.measures) == (1000, 20, 1, ("average", "worst", "average_clean",
                                                                           "worst_clean"))
    assert (s.average.xi, s.average.samples, s.average_clean.samples) == (0.5, 10, 50)
    assert (s.worst.xi, s.worst.attempts, s.worst.passes, s.worst.weight_step) == (0.00075, 10, 20, 0.01)
    assert F.REPORT_DEFAULTS == {"examples": 1000, "batch_size": 128, "step_size": None, "steps": 20, "restarts": 1,
                                 "measures": ["average", "worst", "average_clean", "worst_clean"],
                                 "average": {"xi": 0.5, "samples": 10}, "average_clean": {"xi": 0.5, "samples": 50},
                                 "worst": {"xi": 0.00075, "attempts": 10, "passes": 20, "weight_step": 0.01},
                                 "worst_clean": {"xi": 0.00075, "attempts": 10, "passes": 20, "weight_step": 0.01}}
    r = F.FlatnessSettings.from_mapping({"steps": 5, "batch_size": 32, "worst": {"steps": 7, "step_size": 0.01},
                                         "measures": "average"}).resolved(8 / 255)
    assert r.step_size == 0.007 and r.measures == ("average",)
    assert (r.average.steps, r.average.batch_size, r.average.step_size, r.average.restarts) == (5, 32, 0.007, 1)
    assert (r.worst.steps, r.worst.step_size, r.worst.batch_size) == (7, 0.01, 32)
    assert r.average_clean.batch_size == 32 and not hasattr(r.average_clean, "steps")
    assert F.FlatnessSettings.from_mapping({"step_size": None}).resolved(0.1).average.step_size == pytest.approx(
        F.resolve_step_size(0.1))
    json.dumps(r.as_dict())


@pytest.mark.parametrize("settings, message", [
    ({"averag": {}}, "averag"),
    ({"worst": {"samples": 3}}, "samples"),
    ({"average": 3}, "'average' must be a mapping"),
    ({"measures": ["average", "worse"]}, "worse"),
    ({"average": {"samples": "ten"}}, "average.samples must be a number"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"worst": {"passes": True}}, "worst.passes must be a number"),
    ({"worst": {"passes": -1}}, "worst.passes must be >= 0"),
    ({"average_clean": {"xi": -0.1}}, "average_clean.xi must be >= 0"),
    ({"restarts": 0}, "^restarts must be >= 1"),
    ({"average": {"restarts": 0}}, "average.restarts must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"examples": 0}, "examples must be >= 1"),
])
def test_flatness_settings_are_checked_before_anything_is_computed(settings, message):
    x, y = _data()
    # model=None: any computation before the check would fail with something other than a UserError.
    with pytest.raises(UserError, match=message) as info:
        F.flatness_report(None, x, y, eps=0.03, settings=settings, progress=False)
    assert "\n" not in str(info.value)


def test_flatness_report_takes_a_settings_object():
    model = _dense_relu_dense()
    x, y = _data(n=20)
    mapping = {"examples": 16, "steps": 1, "batch_size": 8, "measures": ["average", "worst_clean"],
               "average": {"samples": 2}, "worst_clean": {"attempts": 1, "passes": 1}}
    typed = F.FlatnessSettings(examples=16, steps=1, batch_size=8, measures=("average", "worst_clean"),
                               average=F.AverageCaseSettings(samples=2),
                               worst_clean=F.WorstCaseCleanSettings(attempts=1, passes=1))
    a = F.flatness_report(model, x, y, eps=0.05, settings=mapping, progress=False)
    b = F.flatness_report(model, x, y, eps=0.05, settings=typed, progress=False)
    assert a["settings"] == b["settings"]
    # The same computation twice in one process on one machine: deterministic, so equal exactly.
    assert (a["average"]["flatness"], a["worst_clean"]["flatness"]) == (b["average"]["flatness"],
                                                                        b["worst_clean"]["flatness"])
