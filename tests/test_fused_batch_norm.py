"""The fused-BatchNorm twin of a network in mixed precision (tfrobust/step/fused_batch_norm.py).

In bfloat16 the twin's BatchNorm is one fused op in both modes; these tests
check it against an independent float64 computation (the output, and in
training mode the batch moments and the moving statistics' update), its
gradients against Keras' own bfloat16 layer and a float32 network, that the
twin is the network itself wherever it could differ (float32, subclassed
networks, no BatchNorm), that it shares the network's variables, and that a
RobustModel's passes use it without leaving the eps-ball, on one device and on
two replicas.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfrobust as tr
from tfrobust.step.fused_batch_norm import FusedBatchNorm, fusable, fused_network

BF16_EPS = 2.0 ** -8  # bfloat16 keeps 8 significant bits: one rounding moves a value by at most 2**-8 of it


@pytest.fixture
def bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy("float32")


def bn_net(seed=0, dense_bn=False):
    """conv - BN - ReLU - conv - BN - ReLU - pool - logits, with non-trivial BatchNorm statistics."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = inputs
    for filters in (6, 5):
        h = keras.layers.Conv2D(filters, 3, padding="same")(h)
        h = keras.layers.BatchNormalization(epsilon=1e-5)(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    if dense_bn:
        h = keras.layers.BatchNormalization()(h)
    network = keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))
    rng = np.random.RandomState(seed)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.normal(0, 0.3, n))
    return network


def images(n=16, seed=1):
    return np.random.RandomState(seed).uniform(size=(n, 8, 8, 3)).astype("float32")


def test_fused_batch_norm_equals_float64_within_one_bfloat16_rounding(bfloat16):
    network = bn_net()
    bn = [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    assert fusable(bn)
    x = tf.cast(np.random.RandomState(2).normal(0, 2, (4, 5, 5, 6)), tf.bfloat16)
    fused = FusedBatchNorm(bn)(x).numpy().astype(np.float64)
    keras_out = np.asarray(tf.cast(bn(x, training=False), tf.float32), np.float64)
    v = lambda w: np.asarray(w.numpy(), np.float64)  # noqa: E731
    exact = ((np.asarray(tf.cast(x, tf.float32), np.float64) - v(bn.moving_mean))
             / np.sqrt(v(bn.moving_variance) + 1e-5) * v(bn.gamma) + v(bn.beta))
    # One rounding of the float32 result, plus float32's own error near zero, where the offset cancels the rest
    # (absolute, about 2**-24 of the operands' size of ~1).
    bound = BF16_EPS * np.abs(exact) + 1e-6
    assert np.all(np.abs(fused - exact) <= bound)
    assert np.all(np.abs(keras_out - exact) <= bound)
    assert FusedBatchNorm(bn)(x).dtype == tf.bfloat16


def batch_norm_layer(network, index=0):
    return [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)][index]


def float64(value):
    return np.asarray(tf.cast(value, tf.float32), np.float64)


def test_training_mode_equals_float64_with_the_batch_moments(bfloat16):
    keras_bn, fused_bn = batch_norm_layer(bn_net()), batch_norm_layer(bn_net())  # equal weights and statistics
    before = [float64(v) for v in (fused_bn.moving_mean, fused_bn.moving_variance)]
    x = tf.cast(np.random.RandomState(2).normal(1.0, 2.0, (4, 5, 5, 6)), tf.bfloat16)
    fused = float64(FusedBatchNorm(fused_bn)(x, training=True))
    keras_out = float64(keras_bn(x, training=True))
    values = float64(x).reshape(-1, 6)
    mean, variance = values.mean(0), values.var(0)  # the biased variance, as Keras normalises and averages
    exact = (float64(x) - mean) / np.sqrt(variance + 1e-5) * float64(fused_bn.gamma) + float64(fused_bn.beta)
    # One bfloat16 rounding of the output, plus float32's error in the moments of 100 values (each sum within
    # 100 * 2**-24 of its terms' size, ~1e-5 of values of size ~3 after normalising).
    bound = BF16_EPS * np.abs(exact) + 2e-5
    assert np.all(np.abs(fused - exact) <= bound)
    assert np.all(np.abs(keras_out - exact) <= bound)
    m = fused_bn.momentum
    for variable, old, batch in zip((fused_bn.moving_mean, fused_bn.moving_variance), before, (mean, variance)):
        expected = old * m + batch * (1 - m)
        np.testing.assert_allclose(float64(variable), expected, rtol=1e-5, atol=1e-6)  # float32 moments, as above
    for ours, theirs in zip(fused_bn.non_trainable_variables, keras_bn.non_trainable_variables):
        np.testing.assert_allclose(float64(ours), float64(theirs), rtol=1e-5, atol=1e-6)


def test_a_frozen_layer_and_one_value_per_channel_behave_as_keras(bfloat16):
    network = bn_net()
    bn = batch_norm_layer(network)
    x = tf.cast(np.random.RandomState(4).normal(size=(3, 4, 4, 6)), tf.bfloat16)
    bn.trainable = False  # Keras: normalise with the moving moments, leave them alone
    before = [v.numpy() for v in bn.weights]  # gamma, beta and the moving statistics
    fused = FusedBatchNorm(bn)
    np.testing.assert_array_equal(float64(fused(x, training=True)), float64(fused(x, training=False)))
    for variable, old in zip(bn.weights, before):
        np.testing.assert_array_equal(variable.numpy(), old)
    bn.trainable = True
    single = tf.cast(np.random.RandomState(5).normal(size=(1, 1, 1, 6)), tf.bfloat16)
    out = float64(fused(single, training=True))  # variance 0 (the unbiased one would be 0/0)
    np.testing.assert_allclose(out, np.broadcast_to(float64(bn.beta), out.shape), atol=BF16_EPS * 2)
    np.testing.assert_allclose(bn.moving_variance.numpy(), bn.momentum * before[3], rtol=1e-6)


def test_training_mode_gradients_are_as_close_to_float32_as_keras_own(bfloat16):
    x, y = tf.constant(images()), tf.constant(np.arange(16) % 3)

    def gradients(network, model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, tf.cast(model(x, training=True), tf.float32), from_logits=True))
        variables = [v for v in network.trainable_variables if "bias" not in v.path or "logits" in v.path]
        return [float64(g) for g in tape.gradient(loss, [x] + variables)], network.non_trainable_variables

    keras.config.set_dtype_policy("float32")
    reference = bn_net()
    exact, _ = gradients(reference, reference)
    keras.config.set_dtype_policy("mixed_bfloat16")
    network, twin_network = bn_net(), bn_net()
    ours, our_stats = gradients(twin_network, fused_network(twin_network))
    theirs, their_stats = gradients(network, network)
    # The convolutions' biases (before BatchNorm) have an exact gradient of 0 and are left out. Every other
    # gradient is a bfloat16 computation of the same function in both; the twin's BatchNorm outputs differ from
    # Keras' by at most one rounding each, so its error may exceed Keras' own by about one rounding.
    for g, k, e in zip(ours, theirs, exact):
        size = np.linalg.norm(e)
        assert np.linalg.norm(g - e) <= 1.5 * np.linalg.norm(k - e) + BF16_EPS * size
    for a, b in zip(our_stats, their_stats):  # the moving statistics: float32 moments of the same tensors
        np.testing.assert_allclose(float64(a), float64(b), rtol=1e-5, atol=1e-6)


def test_twin_computes_the_network_in_bfloat16_and_shares_its_variables(bfloat16):
    network = bn_net()
    twin = fused_network(network)
    assert twin is not network and fused_network(network) is twin  # made once
    assert sum(isinstance(layer, FusedBatchNorm) for layer in twin.layers) == 2
    assert {id(w) for w in twin.weights} == {id(w) for w in network.weights}
    x = images()
    a = np.asarray(tf.cast(network(x, training=False), tf.float32))
    b = np.asarray(tf.cast(twin(x, training=False), tf.float32))
    # The BatchNorm outputs differ by at most one bfloat16 rounding (test above); through a convolution, the
    # pooling and the logits layer, each computed in bfloat16, that stays within a few roundings of the logits.
    assert np.abs(a - b).max() <= 8 * BF16_EPS * np.abs(a).max()
    # A new value of a statistic reaches the twin: they are the same variables.
    bn = [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)][-1]
    bn.moving_mean.assign(bn.moving_mean + 1.0)
    a2 = np.asarray(tf.cast(network(x, training=False), tf.float32))
    b2 = np.asarray(tf.cast(twin(x, training=False), tf.float32))
    assert np.abs(a2 - a).max() > 0.05 and np.abs(a2 - b2).max() <= 8 * BF16_EPS * np.abs(a2).max()


def test_input_gradient_of_the_twin_matches_the_network(bfloat16):
    network, x = bn_net(), tf.constant(images())
    y = tf.constant(np.arange(16) % 3)

    def gradient(model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = keras.losses.sparse_categorical_crossentropy(y, tf.cast(model(x, training=False), tf.float32),
                                                                from_logits=True)
        return tape.gradient(loss, x).numpy()

    g_net, g_twin = gradient(network), gradient(fused_network(network))
    # Cosine of the two input gradients: a few bfloat16 roundings apart, far from the ~0 of unrelated directions.
    cosine = (g_net * g_twin).sum() / np.linalg.norm(g_net) / np.linalg.norm(g_twin)
    assert cosine > 0.99


def test_the_network_itself_in_float32_without_batch_norm_and_for_subclassed_networks(bfloat16):
    keras.config.set_dtype_policy("float32")
    network = bn_net()
    assert fused_network(network) is network  # float32: Keras' own layers, bit for bit
    keras.config.set_dtype_policy("mixed_bfloat16")
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert fused_network(plain) is plain

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()
            self.head = keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.head(keras.ops.mean(self.bn(self.conv(x), training=training), axis=(1, 2)))

    sub = Subclassed()
    sub(images(2))
    assert fused_network(sub) is sub


def test_batch_norm_of_a_vector_runs_keras_layer(bfloat16):
    network = bn_net(dense_bn=True)
    twin = fused_network(network)
    vector_bn = [layer for layer in twin.layers if isinstance(layer, FusedBatchNorm)][-1]
    h = tf.cast(np.random.RandomState(3).normal(size=(4, 5)), tf.bfloat16)
    inner = vector_bn._batch_norm[0]
    np.testing.assert_array_equal(np.asarray(tf.cast(vector_bn(h), tf.float32)),
                                  np.asarray(tf.cast(inner(h, training=False), tf.float32)))


@pytest.mark.parametrize("replicas", [1, 2])
def test_robust_model_trains_with_the_twin_in_bfloat16(bfloat16, replicas):
    x, y = images(64), np.arange(64) % 3
    if replicas == 2:  # the process's one mirrored strategy (a second one would reuse collective keys)
        from tfrobust.config import RuntimeConfig
        from tfrobust.experiment import build_strategy

        strategy = build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))
    else:
        strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = tr.RobustModel(bn_net(), "trades", eps=0.1, step_size=0.025, steps=3, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.05))
    assert fused_network(model.network) is not model.network
    x_adv = model.adversarial_examples(tf.constant(x[:16]), tf.constant(y[:16]))
    assert np.abs(x_adv.numpy() - x[:16]).max() <= 0.1 + 1e-6  # the attack on the twin stays in the eps-ball
    start = [float64(v) for v in model.network.non_trainable_variables]
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, validation_data=(x[:32], y[:32]))
    assert np.isfinite(history.history["loss"]).all()
    for variable, old in zip(model.network.non_trainable_variables, start):  # the twin's train-mode passes
        assert np.isfinite(float64(variable)).all() and np.abs(float64(variable) - old).max() > 1e-3
    assert all(0.0 <= a <= 1.0 for a in history.history["val_pgd_accuracy"])


def test_the_steps_training_passes_use_the_twin_and_move_the_statistics_as_keras(bfloat16, monkeypatch):
    from tfrobust.defenses import Defense
    from tfrobust.step import fused_batch_norm

    x, x_adv = tf.constant(images(16)), tf.constant(images(16, seed=7))
    models = [tr.RobustModel(bn_net(), Defense("trades+awp", awp_warmup_epochs=0), eps=0.1, step_size=0.025, steps=3, seed=0)
              for _ in range(2)]
    keras_path = models[1].network
    monkeypatch.setitem(fused_batch_norm._TWINS, keras_path, None)  # this one calls Keras' own layers
    assert fused_network(models[0].network) is not models[0].network and fused_network(keras_path) is keras_path
    outputs = [[float64(t) for t in model._forward(x, x_adv)] for model in models]
    # TRADES's two train-mode passes: logits a few bfloat16 roundings apart (as the twin test above) ...
    for ours, theirs in zip(*outputs):
        assert np.abs(ours - theirs).max() <= 8 * BF16_EPS * np.abs(theirs).max()
    # ... and both passes moved the moving statistics alike (float32 moments of the same bfloat16 tensors).
    start = [float64(v) for v in bn_net().non_trainable_variables]
    for a, b, s in zip(models[0].network.non_trainable_variables, keras_path.non_trainable_variables, start):
        assert np.abs(float64(b) - s).max() > 1e-3
        np.testing.assert_allclose(float64(a), float64(b), rtol=1e-4, atol=1e-5)
    # AWP's ascent pass runs in training mode on the twin and leaves the statistics exactly as they were.
    y = tf.constant(np.arange(16) % 3)
    models[0].compile(optimizer=keras.optimizers.SGD(0.05))
    before = [v.numpy() for v in models[0].network.non_trainable_variables]
    grads = models[0].ascent_gradients(x, x_adv, y)
    assert any(np.abs(float64(g)).max() > 0 for g in grads)
    for variable, old in zip(models[0].network.non_trainable_variables, before):
        np.testing.assert_array_equal(variable.numpy(), old)


def test_gradalign_differentiates_through_the_fused_gradient_as_through_keras(bfloat16):
    """GradAlign differentiates an input gradient again: the fused op's gradient has a gradient of its own."""
    from tfrobust.defenses.input_space import gradient_cosine, input_gradient

    x, y = tf.constant(images()), tf.constant(np.arange(16) % 3)
    u = tf.constant(np.random.RandomState(3).uniform(-1, 1, (16, 8, 8, 3)).astype("float32"))

    def penalty_and_gradients(network, model):
        model_fn = lambda t: tf.cast(model(t, training=True), tf.float32)  # noqa: E731
        with tf.GradientTape() as tape:
            g1 = tf.stop_gradient(input_gradient(model_fn, x, y))
            penalty = tf.reduce_mean(1.0 - gradient_cosine(g1, input_gradient(model_fn, x + 0.1 * u, y)))
        variables = [v for v in network.trainable_variables if "bias" not in v.path or "logits" in v.path]
        return float(penalty), [float64(g) for g in tape.gradient(penalty, variables)]

    keras.config.set_dtype_policy("float32")
    reference = bn_net()
    _, exact = penalty_and_gradients(reference, reference)
    keras.config.set_dtype_policy("mixed_bfloat16")
    network, twin_network = bn_net(), bn_net()
    theirs_penalty, theirs = penalty_and_gradients(network, network)
    ours_penalty, ours = penalty_and_gradients(twin_network, fused_network(twin_network))
    assert abs(ours_penalty - theirs_penalty) <= 4 * BF16_EPS * abs(theirs_penalty)
    # Second-order gradients in bfloat16 are coarse (Keras' own are 12-46% off float32 here); the twin's must
    # be of the same quality, not zero or unrelated (which would be 100% off).
    for g, k, e in zip(ours, theirs, exact):
        size = np.linalg.norm(e)
        assert np.linalg.norm(g - e) <= 1.5 * np.linalg.norm(k - e) + BF16_EPS * size
