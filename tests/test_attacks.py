import numpy as np
import pytest
import tensorflow as tf

from tfrobust import attacks
from tfrobust.errors import UserError


def model_fn_of(model):
    return lambda x: model(x, training=False)


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, 5)).astype("float32") * 3
    q = rng.standard_normal((8, 5)).astype("float32") * 3
    y = rng.integers(0, 5, 8)
    p = np_softmax(z)
    np.testing.assert_allclose(attacks.cross_entropy(z, y).numpy(), -np.log(p[np.arange(8), y]), rtol=1e-5)
    other = np.where(np.eye(5)[y] == 1, -np.inf, z).max(axis=1)
    np.testing.assert_allclose(attacks.cw_margin(z, y).numpy(), other - z[np.arange(8), y], rtol=1e-5)
    pq = np_softmax(q)
    kl = (p * (np.log(p) - np.log(pq))).sum(axis=1)
    np.testing.assert_allclose(attacks.kl_divergence(z, q).numpy(), kl, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.025), ("l2", 1.5, 0.4)])
@pytest.mark.parametrize("loss", ["ce", "cw", "trades_kl"])
def test_pgd_stays_in_ball_and_box(trained_tiny, fashion_subset, norm, eps, step, loss):
    x, y = fashion_subset[0][:64], fashion_subset[1][:64]
    x_adv = attacks.pgd(model_fn_of(trained_tiny), x, y, eps, step, 5, norm=norm, loss=loss, seed=3).numpy()
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.025), ("l2", 1.5, 0.4)])
def test_pgd_raises_loss_and_lowers_accuracy(trained_tiny, fashion_subset, norm, eps, step):
    x, y = fashion_subset[0][500:600], fashion_subset[1][500:600]
    fn = model_fn_of(trained_tiny)
    x_adv = attacks.pgd(fn, x, y, eps, step, 10, norm=norm, seed=1)
    clean_loss = attacks.cross_entropy(fn(x), y).numpy()
    adv_loss = attacks.cross_entropy(fn(x_adv), y).numpy()
    assert adv_loss.mean() > clean_loss.mean() + 0.5
    assert (adv_loss >= clean_loss - 1e-4).mean() > 0.95
    clean_acc = (fn(x).numpy().argmax(1) == y).mean()
    adv_acc = (fn(x_adv).numpy().argmax(1) == y).mean()
    assert clean_acc > 0.6 and adv_acc < clean_acc - 0.3


def test_eps_zero_returns_input(trained_tiny, fashion_subset):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    for start in ("uniform", "gaussian", "none"):
        x_adv = attacks.pgd(model_fn_of(trained_tiny), x, y, 0.0, 0.01, 3, random_start_kind=start, seed=0)
        np.testing.assert_array_equal(x_adv.numpy(), x)


def test_fgsm_is_one_signed_step(trained_tiny, fashion_subset):
    x, y = fashion_subset[0][:16], fashion_subset[1][:16]
    fn = model_fn_of(trained_tiny)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(attacks.cross_entropy(fn(xt), y))
    expected = np.clip(x + 0.05 * np.sign(tape.gradient(loss, xt).numpy()), 0, 1)
    np.testing.assert_allclose(attacks.fgsm(fn, x, y, 0.05).numpy(), expected, atol=1e-6)


def test_attacks_leave_variables_unchanged():
    from conftest import tiny_cnn

    model = tiny_cnn(batch_norm=True)
    before = [v.numpy().copy() for v in model.variables]
    rng = np.random.default_rng(0)
    x = rng.random((8, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 8)
    fn = lambda t: model(t, training=False)  # noqa: E731
    attacks.pgd(fn, x, y, 0.1, 0.03, 3, seed=0)
    attacks.pgd(fn, x, y, 0.1, 0.03, 3, loss="trades_kl", random_start_kind="gaussian", seed=0)
    attacks.fgsm(fn, x, y, 0.1)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(v.numpy(), b)


def test_same_seed_same_result(trained_tiny, fashion_subset):
    x, y = fashion_subset[0][:16], fashion_subset[1][:16]
    a = attacks.pgd(model_fn_of(trained_tiny), x, y, 0.1, 0.025, 3, seed=5).numpy()
    b = attacks.pgd(model_fn_of(trained_tiny), x, y, 0.1, 0.025, 3, seed=5).numpy()
    np.testing.assert_array_equal(a, b)


def test_works_inside_tf_function(trained_tiny, fashion_subset):
    x, y = fashion_subset[0][:16], fashion_subset[1][:16]

    @tf.function
    def run(x, y):
        return attacks.pgd(model_fn_of(trained_tiny), x, y, 0.1, 0.025, 3, seed=tf.constant([1, 2]))

    x_adv = run(tf.constant(x), tf.constant(y)).numpy()
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6


def test_bad_arguments():
    x = np.zeros((2, 4, 4, 1), "float32")
    y = np.zeros(2, "int32")
    fn = lambda t: tf.zeros((2, 3))  # noqa: E731
    with pytest.raises(UserError, match="eps must be >= 0"):
        attacks.pgd(fn, x, y, -0.1, 0.01, 1)
    with pytest.raises(UserError, match="allowed: l2, linf"):
        attacks.pgd(fn, x, y, 0.1, 0.01, 1, norm="l1")
    with pytest.raises(UserError, match="unknown attack loss"):
        attacks.pgd(fn, x, y, 0.1, 0.01, 1, loss="mse")
