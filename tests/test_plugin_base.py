"""A base objective registered from outside the package trains like the built-in ones.

The toy base below is one module of pure functions (made here, in the test) and one
``register_base`` call: a margin-weighted adversarial cross-entropy, ``(1 + c) CE(f(x'), y)``
per example, with ``c = beta`` when the clean prediction is wrong and 0 otherwise. It
combines with AWP as AT does (``like="at"``), takes AT's AWP defaults, and its step is
checked against the same objective written out by hand.
"""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import attacks
from tfrobust.defense_names import check_defense_name, register_base, unregister_base
from tfrobust.defenses import Defense
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel


def toy_module():
    module = types.ModuleType("toy_base")

    def loss_terms(logits_clean, logits_adv, y, beta):
        wrong = tf.cast(tf.argmax(logits_clean, axis=-1, output_type=tf.int32) != tf.cast(y, tf.int32), tf.float32)
        ce = attacks.cross_entropy(logits_adv, y)
        primary = (1.0 + beta * tf.stop_gradient(wrong)) * ce
        return primary, tf.zeros_like(primary), {"toy_ce": primary}

    module.__dict__.update(
        NAME="toy", ATTACK_LOSS="ce", ATTACK_START="uniform", NEEDS_CLEAN_LOGITS=True, LABEL_FREE_TERM=False,
        DEFAULT_BETA=2.0, TERM_NAMES=("toy_ce",), CE_TERM="toy_ce", CE_LOGITS="adversarial", loss_terms=loss_terms,
    )
    return module


@pytest.fixture
def toy():
    register_base("toy", toy_module(), like="at")
    yield
    unregister_base("toy")


def test_a_registered_base_is_a_defense_name_with_its_terms(toy):
    assert check_defense_name("toy+awp") == "toy+awp"
    d = Defense("toy+awp")
    assert (d.base, d.beta, d.awp_gamma, d.awp_warmup_epochs) == ("toy", 2.0, 0.01, 0)  # AT's AWP defaults
    with pytest.raises(UserError, match="RAT builds on TRADES"):
        Defense("toy+rat")


def test_a_registered_base_is_forgotten_when_unregistered():
    register_base("toy", toy_module(), like="at")
    unregister_base("toy")
    with pytest.raises(UserError, match="unknown defense 'toy'"):
        Defense("toy")
    unregister_base("at")  # a built-in base stays
    assert Defense("at").base == "at"


def test_the_step_of_a_registered_base_is_its_objective(toy, fashion_subset):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    network = tiny_cnn()
    start = [w.numpy() for w in network.trainable_weights]
    model = RobustModel(network, "toy", eps=0.0, step_size=0.0, steps=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False).history

    reference = tiny_cnn()
    for w, value in zip(reference.trainable_weights, start):
        w.assign(value)
    with tf.GradientTape() as tape:  # eps 0: x' = x
        logits = reference(x, training=True)
        wrong = tf.cast(tf.argmax(logits, axis=-1, output_type=tf.int32) != y, tf.float32)
        loss = tf.reduce_mean((1.0 + 2.0 * wrong) * attacks.cross_entropy(logits, y))
    grads = tape.gradient(loss, reference.trainable_weights)
    # float32 sums of 32 examples in another order: 1e-5.
    assert logs["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert logs["toy_ce"][0] == pytest.approx(float(loss), rel=1e-5)
    for w, g, w0 in zip(network.trainable_weights, grads, start):
        np.testing.assert_allclose(w.numpy(), w0 - 0.1 * g.numpy(), rtol=1e-4, atol=1e-6)
