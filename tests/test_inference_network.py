"""The inference-mode twin of a network in mixed precision (tfrobust/step/inference.py).

In bfloat16 the twin's BatchNorm is one fused op; these tests check it
against an independent float64 computation, check that the twin is the
network itself wherever it could differ (float32, subclassed networks, no
BatchNorm), that it shares the network's variables, and that a RobustModel's
training attack and metrics use it without leaving the eps-ball, on one device
and on two replicas.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfrobust as tr
from tfrobust.step.inference import FusedInferenceBatchNorm, fusable, inference_network

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
    fused = FusedInferenceBatchNorm(bn)(x).numpy().astype(np.float64)
    keras_out = np.asarray(tf.cast(bn(x, training=False), tf.float32), np.float64)
    v = lambda w: np.asarray(w.numpy(), np.float64)  # noqa: E731
    exact = ((np.asarray(tf.cast(x, tf.float32), np.float64) - v(bn.moving_mean))
             / np.sqrt(v(bn.moving_variance) + 1e-5) * v(bn.gamma) + v(bn.beta))
    # One rounding of the float32 result, plus float32's own error near zero, where the offset cancels the rest
    # (absolute, about 2**-24 of the operands' size of ~1).
    bound = BF16_EPS * np.abs(exact) + 1e-6
    assert np.all(np.abs(fused - exact) <= bound)
    assert np.all(np.abs(keras_out - exact) <= bound)
    assert FusedInferenceBatchNorm(bn)(x).dtype == tf.bfloat16


def test_twin_computes_the_network_in_bfloat16_and_shares_its_variables(bfloat16):
    network = bn_net()
    twin = inference_network(network)
    assert twin is not network and inference_network(network) is twin  # made once
    assert sum(isinstance(layer, FusedInferenceBatchNorm) for layer in twin.layers) == 2
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

    g_net, g_twin = gradient(network), gradient(inference_network(network))
    # Cosine of the two input gradients: a few bfloat16 roundings apart, far from the ~0 of unrelated directions.
    cosine = (g_net * g_twin).sum() / np.linalg.norm(g_net) / np.linalg.norm(g_twin)
    assert cosine > 0.99


def test_the_network_itself_in_float32_without_batch_norm_and_for_subclassed_networks(bfloat16):
    keras.config.set_dtype_policy("float32")
    network = bn_net()
    assert inference_network(network) is network  # float32: Keras' own layers, bit for bit
    keras.config.set_dtype_policy("mixed_bfloat16")
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert inference_network(plain) is plain

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()
            self.head = keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.head(keras.ops.mean(self.bn(self.conv(x), training=training), axis=(1, 2)))

    sub = Subclassed()
    sub(images(2))
    assert inference_network(sub) is sub


def test_batch_norm_of_a_vector_runs_keras_layer(bfloat16):
    network = bn_net(dense_bn=True)
    twin = inference_network(network)
    vector_bn = [layer for layer in twin.layers if isinstance(layer, FusedInferenceBatchNorm)][-1]
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
    assert inference_network(model.network) is not model.network
    x_adv = model.adversarial_examples(tf.constant(x[:16]), tf.constant(y[:16]))
    assert np.abs(x_adv.numpy() - x[:16]).max() <= 0.1 + 1e-6  # the attack on the twin stays in the eps-ball
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, validation_data=(x[:32], y[:32]))
    assert np.isfinite(history.history["loss"]).all()
    assert all(0.0 <= a <= 1.0 for a in history.history["val_pgd_accuracy"])
