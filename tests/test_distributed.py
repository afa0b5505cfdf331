"""Weight-space defenses under tf.distribute.MirroredStrategy on two logical CPU devices.

One step on two replicas must give the weights of the same step on one device:
the AWP perturbation is computed from gradients all-reduced across replicas,
S2O's second moment and RAT's last-layer gradients likewise, random starts
are drawn for the global batch, and hand-built losses are divided by the
number of replicas.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust.defenses import parse_defense
from tfrobust.trainer import RobustModel


def one_step(name, strategy, x, y, steps=1, **attack):
    d = dataclasses.replace(parse_defense(name), awp_warmup_epochs=0)
    with strategy.scope():
        settings = dict(eps=0.1, step_size=0.025, steps=3)
        settings.update(attack)
        model = RobustModel(tiny_cnn(batch_norm=False, seed=3), d, weight_decay=5e-4, seed=7, **settings)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x) // steps)
    model.fit(ds, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def mirrored_strategy():
    # One strategy per process: TensorFlow caches collective instances by key,
    # and a second strategy over the same devices would reuse the keys.
    # experiment.build_strategy keeps one instance per device list for the process.
    from tfrobust.config import RuntimeConfig
    from tfrobust.experiment import build_strategy

    assert len(tf.config.list_logical_devices("CPU")) >= 2
    return build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))


@pytest.mark.parametrize("name,attack", [
    ("at+awp", {}), ("trades+s2o", {}), ("trades+rat", {}),
    ("at+awp", {"norm": "l2", "eps": 1.0, "step_size": 0.3}),
])
def test_two_replicas_match_one_device(fashion_subset, mirrored_strategy, name, attack):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    single = one_step(name, tf.distribute.OneDeviceStrategy("/cpu:0"), x, y, **attack)
    mirrored = one_step(name, mirrored_strategy, x, y, **attack)
    for a, b in zip(single.network.trainable_variables, mirrored.network.trainable_variables):
        replicas = [r.numpy() for r in b.value.values]
        assert len(replicas) == 2
        np.testing.assert_array_equal(replicas[0], replicas[1])
        np.testing.assert_allclose(replicas[0], a.numpy(), atol=1e-5)
    # The step really moved the weights (the comparison is not between two no-ops).
    fresh = tiny_cnn(seed=3)
    moved = max(np.abs(f.numpy() - s.numpy()).max() for f, s in zip(fresh.trainable_variables, single.network.trainable_variables))
    assert moved > 1e-3
