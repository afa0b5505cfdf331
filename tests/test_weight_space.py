"""Weight-space selection, drawing, projection and restore (tfrobust.weight_space) used by flatness, AWP and RAT."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import weight_space as ws
from tfrobust.defenses import awp, rat


def _norm(a):
    return float(np.linalg.norm(np.asarray(a, np.float64).ravel()))


@pytest.fixture
def bn_model():
    model = tiny_cnn(batch_norm=True)
    model(np.zeros((1, 28, 28, 1), np.float32))
    return model


# --- which variables: one rule per paper -----------------------------------------


def test_each_paper_has_its_own_selection_rule(bn_model):
    paths = {v.path: v for v in bn_model.trainable_variables}
    flat = [v.path for v in ws.variables_outside_normalisation(bn_model)]
    awp_rule = [v.path for v in ws.conv_and_dense_kernels(bn_model.trainable_variables)]
    rat_rule = [v.path for v in ws.conv_kernels(bn_model.trainable_variables)]
    # Stutz et al.: kernels and biases of conv and dense layers, never the BatchNormalization scale/offset.
    assert all("batch_normalization" not in p for p in flat)
    assert sorted(flat) == sorted(p for p in paths if "batch_normalization" not in p)
    assert any(p.endswith("bias") for p in flat)
    # AWP: every kernel of rank >= 2 (the conv and both dense kernels), no bias.
    assert sorted(awp_rule) == sorted(p for p, v in paths.items() if p.endswith("kernel"))
    assert len(awp_rule) == 3
    # RAT: only the convolution kernel.
    assert [len(paths[p].shape) for p in rat_rule] == [4]
    # The defenses' names are these rules, in the order of the variables.
    assert [v.path for v in awp.perturbed_variables(bn_model.trainable_variables)] == awp_rule
    assert [v.path for v in rat.noisy_variables(bn_model.trainable_variables)] == rat_rule
    assert ws.perturbable_variables is ws.variables_outside_normalisation


def test_built_perturbable_variables_builds_and_refuses_a_model_with_none():
    from tfrobust.errors import UserError

    model = keras.Sequential([keras.layers.Dense(3)])
    x = tf.zeros((2, 4))
    assert [tuple(v.shape) for v in ws.built_perturbable_variables(model, x)] == [(4, 3), (3,)]
    only_norm = keras.Sequential([keras.layers.BatchNormalization()])
    with pytest.raises(UserError, match="no trainable variables outside normalisation"):
        ws.built_perturbable_variables(only_norm, x)


# --- drawing ----------------------------------------------------------------------


def test_gaussian_noise_has_the_right_scale_and_is_reproducible(bn_model):
    kernels = ws.conv_kernels(bn_model.trainable_variables) + ws.conv_and_dense_kernels(bn_model.trainable_variables)
    seed = tf.constant([3, 4])
    noise = ws.gaussian_noise(kernels, 1e-2, seed)
    again = ws.gaussian_noise(kernels, 1e-2, seed)
    other = ws.gaussian_noise(kernels, 1e-2, tf.constant([3, 5]))
    for u, v, a, o in zip(noise, kernels, again, other):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_array_equal(u.numpy(), a.numpy())
        assert not np.array_equal(u.numpy(), o.numpy())
    big = noise[-2].numpy().ravel()  # the 1352 x 32 dense kernel: 43k draws
    # Sample mean and std of 43k N(0, 1e-4) draws: standard errors 5e-5 and 3.4e-5 (relative 0.34%).
    assert abs(big.mean()) < 5 * 1e-2 / np.sqrt(big.size)
    assert big.std() == pytest.approx(1e-2, rel=0.02)
    # Each variable gets its own stream: the conv kernel appears twice in the list, with different noise.
    assert not np.array_equal(noise[0].numpy(), noise[1].numpy())
    # rat.weight_noise is this draw.
    for u, r in zip(noise, rat.weight_noise(kernels, 1e-2, seed)):
        np.testing.assert_array_equal(u.numpy(), r.numpy())


def test_ball_samples_stay_inside_and_vary_in_radius():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((5, 7)).astype("float32"), rng.standard_normal(9).astype("float32")]
    ratios = []
    for attempt in range(20):
        for nu, w in zip(ws.sample_ball_perturbation(weights, 0.3, seed=1, attempt=attempt), weights):
            assert nu.shape == w.shape
            ratios.append(_norm(nu) / (0.3 * _norm(w)))
    # float32 rounding of a norm: a relative 1e-6 above the radius at most.
    assert max(ratios) <= 1 + 1e-6
    # Uniform radii: 40 draws spread over [0, 1] (P(all above 0.5) = 2^-40).
    assert min(ratios) < 0.5 < max(ratios)


def test_relative_gradient_step_has_relative_size_and_zero_for_zero_gradient():
    g = tf.constant([[3.0, -4.0], [0.0, 12.0]])
    step = ws.relative_gradient_step(g, tf.constant(2.0), 0.01)
    # ||g|| = 13: step = 0.01 * 2 * g / 13, computed independently in float64.
    np.testing.assert_allclose(step.numpy(), 0.02 * np.array([[3, -4], [0, 12]]) / 13.0, rtol=1e-6)
    zero = ws.relative_gradient_step(tf.zeros((2, 2)), tf.constant(2.0), 0.01)
    assert np.array_equal(zero.numpy(), np.zeros((2, 2)))


def test_projection_keeps_inside_points_and_shrinks_outside_ones():
    w = [np.full((4,), 2.0, np.float32), np.ones((2, 2), np.float32)]  # norms 4 and 2
    inside = np.array([0.1, 0.0, 0.0, 0.0], np.float32)
    outside = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)  # norm 5
    p_in, p_out = ws.project_perturbation([inside, outside], w, 0.5)  # radii 2 and 1
    np.testing.assert_array_equal(p_in.numpy(), inside)
    np.testing.assert_allclose(p_out.numpy(), outside / 5.0, rtol=1e-6)  # radius 1, same direction


def test_landscape_direction_is_scale_invariant_and_seeded():
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((3, 3)).astype("float32"), np.zeros(4, np.float32)]
    raw = ws.gaussian_direction(weights, seed=2)
    assert [d.shape for d in raw] == [(3, 3), (4,)]
    np.testing.assert_array_equal(raw[0], ws.gaussian_direction([w * 100 for w in weights], seed=2)[0])
    assert not np.array_equal(raw[0], ws.gaussian_direction(weights, seed=3)[0])
    d = ws.rescale_direction(raw, weights)
    assert np.max(np.abs(d[0])) == pytest.approx(ws.DIRECTION_SCALE * np.max(np.abs(weights[0])), rel=1e-6)
    assert np.array_equal(d[1], np.zeros(4))  # a zero layer gets a zero direction


# --- applying and undoing -----------------------------------------------------------


def test_offset_then_restore_is_bitwise(bn_model):
    variables = ws.conv_and_dense_kernels(bn_model.trainable_variables)
    before = [v.numpy().copy() for v in variables]
    base = ws.snapshot(variables)
    offsets = ws.sample_sphere_perturbation(base, 0.3, seed=1)
    ws.assign_offset(variables, base, offsets, scale=-0.5)
    for v, w, d in zip(variables, before, offsets):
        np.testing.assert_array_equal(v.numpy(), w + np.float32(-0.5) * d.numpy())
    ws.assign_offset(variables, base, offsets)
    for v, w, d in zip(variables, before, offsets):
        np.testing.assert_array_equal(v.numpy(), w + d.numpy())
    ws.restore(variables, base)
    for v, w in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), w)


def test_weights_preserved_restores_every_variable_after_an_exception(bn_model):
    before = [v.numpy().copy() for v in bn_model.variables]
    with pytest.raises(RuntimeError, match="inside"):
        with ws.weights_preserved(bn_model):
            for v in bn_model.variables:
                v.assign(v + 1.0)  # also the BatchNormalization moving statistics
            raise RuntimeError("inside")
    for v, w in zip(bn_model.variables, before):
        np.testing.assert_array_equal(v.numpy(), w)


def test_snapshot_restore_inside_tf_function(bn_model):
    variables = ws.conv_kernels(bn_model.trainable_variables)
    before = [v.numpy().copy() for v in variables]

    @tf.function
    def perturb_and_measure(seed):
        base = ws.snapshot(variables)
        ws.assign_offset(variables, base, ws.gaussian_noise(variables, 0.1, seed))
        moved = tf.add_n([tf.reduce_sum(tf.abs(v - w)) for v, w in zip(variables, base)])
        ws.restore(variables, base)
        return moved

    assert float(perturb_and_measure(tf.constant([1, 2]))) > 0
    for v, w in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), w)
