"""Single-step adversarial training: FGSM, FGSM-RS, N-FGSM, GradAlign and ELLE(-A) (docs/algorithms.md, section 18)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import seeds
from tfrobust.defenses import Defense
from tfrobust.defenses.input_space import AdaptiveLocalLinearity, GradAlign, LocalLinearity
from tfrobust.trainer import RobustModel

EPS = 0.1


def make(name, network=None, **kwargs):
    model = RobustModel(network or tiny_cnn(), Defense(name), eps=EPS, step_size=EPS / 4, steps=10, seed=3, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


@pytest.fixture(scope="module")
def batch(fashion_subset):
    x, y = fashion_subset
    return tf.constant(x[:48]), tf.constant(y[:48])


def sign_of_gradient(network, x0, y):
    with tf.GradientTape() as tape:
        tape.watch(x0)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, network(x0, training=False)))
    return np.sign(tape.gradient(loss, x0).numpy())


def start_from_seed(model, x, radius):
    """The start drawn independently: x + radius * U(-1, 1) from the step's seed, clipped to [0, 1]."""
    seed = seeds.step_seed(3, seeds.TRAIN_ATTACK_START, 0)
    noise = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0).numpy()
    return np.clip(x.numpy() + radius * noise, 0.0, 1.0)


def test_fgsm_rs_is_one_projected_step_of_1_25_eps_from_a_uniform_start(batch):
    x, y = batch
    model = make("fgsm_rs")
    model(x[:1])
    x_adv = model.adversarial_examples(x, y).numpy()
    x0 = start_from_seed(model, x, EPS)
    g = sign_of_gradient(model.network, tf.constant(x0), y)
    expected = np.clip(np.clip(x0 + 1.25 * EPS * g, x.numpy() - EPS, x.numpy() + EPS), 0.0, 1.0)
    np.testing.assert_allclose(x_adv, expected, atol=1e-6)  # float32 rounding of x +- eps
    assert np.abs(x_adv - x.numpy()).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_n_fgsm_is_not_projected_onto_the_ball(batch):
    x, y = batch
    model = make("n_fgsm")
    model(x[:1])
    x_adv = model.adversarial_examples(x, y).numpy()
    x0 = start_from_seed(model, x, 2 * EPS)
    g = sign_of_gradient(model.network, tf.constant(x0), y)
    np.testing.assert_allclose(x_adv, np.clip(x0 + EPS * g, 0.0, 1.0), atol=1e-6)
    distance = np.abs(x_adv - x.numpy())
    assert distance.max() <= 3 * EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (distance > 1.5 * EPS).mean() > 0.05  # many pixels lie well outside the eps-ball: no projection


def linear_model(rng, d=12, k=4):
    w = rng.standard_normal((d, k)).astype("float32")
    b = rng.standard_normal(k).astype("float32")
    return w, b, (lambda t: tf.matmul(tf.reshape(t, [tf.shape(t)[0], -1]), w) + b)


def ce_and_gradient(w, b, x, y):
    """Per-example CE of a linear softmax model and its input gradient (numpy, float64)."""
    z = x.reshape(len(x), -1).astype(np.float64) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(w.shape[1])[y]
    return -np.log((p * onehot).sum(1)), (p - onehot) @ w.T


def test_gradalign_penalty_against_an_independent_cosine():
    rng = np.random.default_rng(0)
    w, b, model_fn = linear_model(rng)
    x = rng.uniform(0, 1, (16, 12)).astype("float32")
    y = rng.integers(0, 4, 16).astype("int32")
    u = rng.uniform(-1, 1, x.shape).astype("float32")
    term = GradAlign(Defense("fgsm_rs+gradalign", gradalign_weight=0.5), "gradalign")
    penalty, terms = term.penalty(model_fn, tf.constant(x), tf.constant(y), EPS, [tf.constant(u)])
    _, g1 = ce_and_gradient(w, b, x, y)
    _, g2 = ce_and_gradient(w, b, x + EPS * u, y)
    cos = (g1 * g2).sum(1) / np.linalg.norm(g1, axis=1) / np.linalg.norm(g2, axis=1)
    np.testing.assert_allclose(terms["grad_cosine"].numpy(), cos, atol=1e-5)  # float32 against float64
    np.testing.assert_allclose(penalty.numpy(), 0.5 * (1 - cos), atol=1e-5)


def test_gradalign_differentiates_through_the_second_gradient():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((12, 4)).astype("float32")
    w = tf.Variable(w0)
    model_fn = lambda t: tf.matmul(tf.reshape(t, [tf.shape(t)[0], -1]), w)  # noqa: E731
    x = tf.constant(rng.uniform(0, 1, (8, 12)).astype("float32"))
    y = tf.constant(rng.integers(0, 4, 8).astype("int32"))
    u = tf.constant(rng.uniform(-1, 1, (8, 12)).astype("float32"))
    term = GradAlign(Defense("fgsm+gradalign"), "gradalign")
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(term.penalty(model_fn, x, y, 0.5, [u])[0])
    grad = tape.gradient(value, w).numpy()
    # Central differences along one direction; the first gradient is a constant, so it is held at w0.
    g1 = tf.stop_gradient(tf.constant(ce_and_gradient(w0, np.zeros(4, np.float32), x.numpy(), y.numpy())[1],
                                      tf.float32))
    direction = rng.standard_normal(w0.shape).astype("float32")

    def at(h):
        w.assign(w0 + h * direction)
        from tfrobust.defenses.input_space import gradient_cosine, input_gradient
        return float(tf.reduce_mean(0.2 * (1 - gradient_cosine(g1, input_gradient(model_fn, x + 0.5 * u, y)))))

    numeric = (at(1e-2) - at(-1e-2)) / 2e-2
    w.assign(w0)
    assert abs(float((grad * direction).sum()) - numeric) <= 0.05 * abs(numeric) + 1e-4  # float32 differences


def test_elle_penalty_against_an_independent_linearity_error():
    rng = np.random.default_rng(2)
    w, b, model_fn = linear_model(rng)
    x = rng.uniform(0, 1, (16, 12)).astype("float32")
    y = rng.integers(0, 4, 16).astype("int32")
    u_a, u_b = (rng.uniform(-1, 1, x.shape).astype("float32") for _ in range(2))
    alpha = rng.uniform(0, 1, 16).astype("float32")
    term = LocalLinearity(Defense("n_fgsm+elle", elle_weight=3.0), "elle")
    draws = [tf.constant(u_a), tf.constant(u_b), tf.constant(alpha)]
    penalty, terms = term.penalty(model_fn, tf.constant(x), tf.constant(y), EPS, draws)
    x_a, x_b = x + EPS * u_a, x + EPS * u_b
    x_c = (1 - alpha[:, None]) * x_a + alpha[:, None] * x_b
    l_a, l_b, l_c = (ce_and_gradient(w, b, t, y)[0] for t in (x_a, x_b, x_c))
    error = (l_c - (1 - alpha) * l_a - alpha * l_b) ** 2
    np.testing.assert_allclose(terms["lin_err"].numpy(), error, rtol=1e-3, atol=1e-7)  # float32 CE differences
    np.testing.assert_allclose(penalty.numpy(), 3.0 * error, rtol=1e-3, atol=1e-6)


def test_elle_a_weight_follows_the_reference_rule():
    term = AdaptiveLocalLinearity(Defense("n_fgsm+elle_a", elle_a_weight=10.0, elle_a_decay=0.5), "elle_a")
    errors = [1.0, 1.1, 0.9, 1.0, 5.0, 1.0, 1.0]
    history, weight, expected = [], 0.0, []
    for e in errors:  # the reference's loop: jump after more than two errors when e > mean + 2 std, else decay
        weight = 10.0 if len(history) > 2 and e > np.mean(history) + 2 * np.std(history) else weight * 0.5
        history.append(e)
        expected.append(weight)
    got = [float(term.after_step({"lin_err": tf.constant(e)})["elle_weight"]) for e in errors]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert expected[4] == 10.0 and expected[5] == 5.0


def test_composed_names_parse_with_at_defaults():
    d = Defense("N_FGSM + awp")
    assert (d.name, d.base, d.awp_gamma, d.awp_warmup_epochs) == ("n_fgsm+awp", "n_fgsm", 0.01, 0)
    assert Defense("fgsm_rs+s2o").s2o_a == 0.1
    assert Defense("fgsm_rs+gradalign").gradalign_weight == 0.2
    assert Defense("n_fgsm+elle_a+awp").name == "n_fgsm+awp+elle_a"


def test_single_step_runs_are_reproducible_and_train(fashion_subset):
    x, y = fashion_subset
    runs = []
    for _ in range(2):
        model = make("fgsm_rs+elle_a", network=tiny_cnn(batch_norm=True))
        history = model.fit(x[:128], y[:128], batch_size=32, epochs=2, verbose=0, shuffle=False)
        runs.append((history.history, [v.numpy() for v in model.network.trainable_variables]))
    assert runs[0][0] == runs[1][0]  # same seed: same numbers (same machine, same run)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    assert "lin_err" in runs[0][0] and "elle_weight" in runs[0][0]


def test_fgsm_rs_with_elle_lowers_its_objective_at_8_over_255(fashion_subset):
    # lambda = 1000 is the paper's value for eps 8/255 (at eps 0.1 this BatchNorm network diverges with lr 0.05).
    x, y = fashion_subset
    model = RobustModel(tiny_cnn(batch_norm=True), Defense("fgsm_rs+elle"), eps=8 / 255, step_size=2 / 255, steps=1,
                        seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    loss = model.fit(x[:192], y[:192], batch_size=64, epochs=3, verbose=0, shuffle=False).history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0], loss


def test_elle_a_state_is_saved_with_the_weights(tmp_path, fashion_subset):
    x, y = fashion_subset
    model = make("n_fgsm+elle_a")
    model.fit(x[:64], y[:64], batch_size=16, epochs=1, verbose=0)
    term = model.objective.input_terms[0]
    term.state_variables()[0].assign(7.0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    other = make("n_fgsm+elle_a")
    other(x[:1])
    other.load_weights(path)
    for a, b in zip(term.state_variables(), other.objective.input_terms[0].state_variables()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert float(other.objective.input_terms[0].weight()) == 7.0
    assert term.state_variables()[1].numpy()[0] == 4  # four steps counted
