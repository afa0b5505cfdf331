"""Tests of tfrobust.landscape (Stutz et al., ICCV 2021: loss landscapes)."""

import json

import keras
import numpy as np
import pytest

from matplotlib import image as mpimg

from tfrobust import flatness as F
from tfrobust import landscape as L
from tfrobust.attacks import cross_entropy
from tfrobust.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = dict(eps=8 / 255, step_size=0.007, batch_size=16, progress=False)


def _data(n=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, classes, n).astype("int64")
    return x, y


def _model(seed=0, zero_bias=False):
    keras.utils.set_random_seed(seed)
    bias = "zeros" if zero_bias else "random_normal"
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, bias_initializer=bias, name="conv"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3, bias_initializer="random_normal"),
    ])


def _snapshot(model):
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _assert_unchanged(model, snapshot):
    for a, b in zip([v.numpy() for v in model.variables], snapshot):
        assert np.array_equal(a, b)


def _assert_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img)) > 0.0  # something was drawn


def test_random_direction_is_rescaled_per_layer():
    model = _model()
    weights = [v.numpy() for v in F.perturbable_variables(model)]
    d = L.random_direction(model, seed=3)
    assert len(d) == len(weights) == 4  # conv kernel/bias, dense kernel/bias; no BatchNorm
    for dl, wl in zip(d, weights):
        assert dl.shape == wl.shape and dl.dtype == wl.dtype
        assert float(np.max(np.abs(dl))) == pytest.approx(0.5 * float(np.max(np.abs(wl))), rel=1e-6)
    again = L.random_direction(model, seed=3)
    other = L.random_direction(model, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(d, again))
    assert not np.allclose(d[0], other[0])


def test_zero_layers_get_zero_direction():
    model = _model(zero_bias=True)
    d = L.random_direction(model)
    paths = [v.path for v in F.perturbable_variables(model)]
    conv_bias = paths.index(next(p for p in paths if p.endswith("conv/bias")))
    assert not np.any(d[conv_bias])
    assert all(np.any(dl) for i, dl in enumerate(d) if i != conv_bias)
    # rescale_direction on its own
    out = L.rescale_direction([np.ones((2, 2)), np.zeros(3)], [np.full((2, 2), -4.0), np.ones(3)])
    np.testing.assert_array_equal(out[0], np.full((2, 2), 2.0))
    np.testing.assert_array_equal(out[1], np.zeros(3))


def test_landscape_1d_against_robust_loss_and_manual_weights():
    model = _model()
    x, y = _data()
    snap = _snapshot(model)
    d = L.random_direction(model, seed=1)
    res = L.landscape_1d(model, x, y, d, points=3, seed=5, **SMALL)
    _assert_unchanged(model, snap)
    assert res["s"] == [-1.0, 0.0, 1.0] and res["steps"] == 10
    assert len(res["robust_loss"]) == len(res["clean_loss"]) == 3
    # s = 0: RLoss at w with the same seed (PGD-10).
    at_w = F.robust_loss(model, x, y, eps=8 / 255, step_size=0.007, steps=10, seed=5, batch_size=16)
    assert res["robust_loss"][1] == pytest.approx(at_w, abs=1e-6)
    clean = float(np.mean(cross_entropy(model(x, training=False), y).numpy()))
    assert res["clean_loss"][1] == pytest.approx(clean, rel=1e-5)
    # s = 1: the same numbers on a model whose weights were set to w + d by hand.
    moved = _model(seed=9)
    for v, w in zip(moved.variables, snap):
        v.assign(w)
    for v, dl in zip(F.perturbable_variables(moved), d):
        v.assign(v.numpy() + dl)
    clean_moved = float(np.mean(cross_entropy(moved(x, training=False), y).numpy()))
    assert res["clean_loss"][2] == pytest.approx(clean_moved, rel=1e-5)
    robust_moved = F.robust_loss(moved, x, y, eps=8 / 255, step_size=0.007, steps=10, seed=5, batch_size=16)
    assert res["robust_loss"][2] == pytest.approx(robust_moved, rel=1e-5)
    assert all(r >= c for r, c in zip(res["robust_loss"], res["clean_loss"]))


def test_landscape_2d_grid_is_consistent_with_1d():
    model = _model()
    x, y = _data()
    d1 = L.random_direction(model, seed=1)
    d2 = L.random_direction(model, seed=2)
    snap = _snapshot(model)
    res2 = L.landscape_2d(model, x, y, d1, d2, points=3, steps=2, **SMALL)
    _assert_unchanged(model, snap)
    assert res2["s1"] == res2["s2"] == [-1.0, 0.0, 1.0]
    assert np.asarray(res2["robust_loss"]).shape == (3, 3)
    res1 = L.landscape_1d(model, x, y, d1, points=3, steps=2, **SMALL)
    # The column s2 = 0 is the 1-D landscape along d1.
    np.testing.assert_allclose([row[1] for row in res2["robust_loss"]], res1["robust_loss"], rtol=1e-5)
    np.testing.assert_allclose([row[1] for row in res2["clean_loss"]], res1["clean_loss"], rtol=1e-5)


def test_adversarial_direction_increases_the_loss():
    model = _model()
    x, y = _data()
    weights = [v.numpy() for v in F.perturbable_variables(model)]
    snap = _snapshot(model)
    d = L.adversarial_direction(model, x, y, xi=0.01, attempts=1, passes=3, **SMALL)
    _assert_unchanged(model, snap)
    for dl, wl in zip(d, weights):
        assert float(np.max(np.abs(dl))) == pytest.approx(0.5 * float(np.max(np.abs(wl))), rel=1e-6)
    res = L.landscape_1d(model, x, y, d, points=3, s_min=-0.02, s_max=0.02, steps=3, **SMALL)
    assert res["robust_loss"][2] > res["robust_loss"][1] > res["robust_loss"][0]


def test_plots_are_valid_pngs(tmp_path):
    one = {"s": [-1.0, 0.0, 1.0], "robust_loss": [2.0, 1.0, 2.5], "clean_loss": [1.5, 0.5, 1.6], "eps": 0.03,
           "steps": 10}
    two = {"s1": [-1.0, 0.0, 1.0], "s2": [-1.0, 0.0, 1.0],
           "robust_loss": [[3, 2, 3], [2, 1, 2], [3, 2, 3]], "clean_loss": [[2, 1, 2], [1, 0.5, 1], [2, 1, 2]]}
    p1 = L.plot_landscape_1d(one, str(tmp_path / "sub" / "one.png"))
    p2 = L.plot_landscape_2d(two, str(tmp_path / "two.png"), title="a plane")
    _assert_png(p1)
    _assert_png(p2)


def test_write_landscapes_defaults_to_51_points(tmp_path):
    model = _model()
    x, y = _data(n=12)
    snap = _snapshot(model)
    paths = L.write_landscapes(model, x, y, str(tmp_path), eps=8 / 255, steps=2, batch_size=16, progress=False)
    _assert_unchanged(model, snap)
    assert set(paths) == {"random"}
    with open(paths["random"]["json"]) as fh:
        data = json.load(fh)
    assert len(data["s"]) == len(data["robust_loss"]) == len(data["clean_loss"]) == 51
    assert data["s"][0] == -1.0 and data["s"][-1] == 1.0 and data["s"][25] == 0.0
    assert data["direction"] == "random" and data["examples"] == 12
    _assert_png(paths["random"]["png"])


def test_write_landscapes_adversarial_and_2d(tmp_path):
    model = _model()
    x, y = _data(n=12)
    paths = L.write_landscapes(model, x, y, str(tmp_path), eps=8 / 255, kind=("random", "adversarial"),
                               two_d=True, points=5, points_2d=3, steps=1, examples=10, batch_size=16,
                               adversarial={"xi": 0.01, "passes": 2}, progress=False)
    assert set(paths) == {"random", "adversarial", "random_2d", "adversarial_2d"}
    for entry in paths.values():
        _assert_png(entry["png"])
        with open(entry["json"]) as fh:
            data = json.load(fh)
        assert data["examples"] == 10
    with open(paths["adversarial_2d"]["json"]) as fh:
        assert np.asarray(json.load(fh)["robust_loss"]).shape == (3, 3)


def test_landscape_user_errors(tmp_path):
    model = _model()
    x, y = _data()
    with pytest.raises(UserError):
        L.write_landscapes(model, x, y, str(tmp_path), kind=("sideways",))
    d = L.random_direction(model)
    with pytest.raises(UserError):
        L.landscape_1d(model, x, y, d[:-1], points=3, **SMALL)
    with pytest.raises(UserError):
        L.landscape_1d(model, x, y, d, points=0, **SMALL)
