"""Gradient accumulation: N micro-batches make the update of the whole batch, for every defense.

The attack is replaced by a fixed elementwise map of the batch (as in
tests/test_distributed.py), so both runs train on bitwise the same ``x'``
and a PGD sign step cannot turn a rounding difference into a whole step.
What remains differs between one batch and N micro-batches only in the order
of float32 sums (per-micro-batch partial sums of gradients, second moments
and last-layer gradients), which moves the weights by a few ulps of the
gradients' size; an algorithmic slip (a perturbation or a statistic formed
per micro-batch, a mean over the micro-batch instead of the batch) moves
them by orders of magnitude more (``test_the_check_detects_a_per_micro_batch_perturbation``).
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust.config import load_config
from tfrobust.defenses import parse_defense
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel

EPS = 0.1
# Two SGD steps (lr 0.1, momentum 0.9) from weights of size ~0.1: a reordered
# float32 sum changes a gradient entry by ~1e-7 of its size, the weights by
# ~1e-8; a per-micro-batch AWP direction changes them by ~1e-4 and more
# (measured by the test below), so 2e-6 separates the two.
TIGHT = 2e-6


class FixedAttackModel(RobustModel):
    """``x' = clip(x + eps/2 * (1 if x <= 0.5 else -1), 0, 1)``, pixel by pixel: the same for any split."""

    def adversarial_examples(self, x, y, x_init=None):
        push = tf.where(x > 0.5, -1.0, 1.0)
        return tf.clip_by_value(x + 0.5 * self.settings.eps * push, 0.0, 1.0)


class PerMicroBatchDirection(FixedAttackModel):
    """A wrong accumulation: each micro-batch's ascent gradient normalised per layer before the sum,
    as if each micro-batch formed its own AWP perturbation."""

    def ascent_gradients(self, x, x_adv, y, weights=None, variables=None, fraction=None):
        grads = super().ascent_gradients(x, x_adv, y, weights, variables, fraction)
        return grads if fraction is None else [g / (tf.norm(g) + 1e-20) for g in grads]


def regularized_cnn():
    """tiny_cnn's layers with L2 kernel regularizers (the network's own losses)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3))(inputs)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dense(32, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3))(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def train(name, accumulate_steps, x, y, batch=32, model_class=FixedAttackModel, strategy=None, sample_weight=None,
          network=tiny_cnn, **settings):
    d = dataclasses.replace(parse_defense(name), awp_warmup_epochs=0)
    with (strategy or tf.distribute.get_strategy()).scope():
        net = network(seed=3) if network is tiny_cnn else network()
        model = model_class(net, d, eps=EPS, step_size=0.025, steps=3, weight_decay=5e-4, seed=7,
                            accumulate_steps=accumulate_steps, **settings)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    history = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(batch), epochs=1, verbose=0, shuffle=False)
    return model, {k: v[-1] for k, v in history.history.items()}


def largest_gap(a, b):
    gaps = []
    for u, v in zip(a.network.trainable_variables, b.network.trainable_variables):
        for replica in getattr(v.value, "values", [v.value]):
            gaps.append(float(np.abs(u.numpy() - replica.numpy()).max()))
    return max(gaps)


def moved(model):
    fresh = tiny_cnn(seed=3)
    return max(float(np.abs(f.numpy() - s.numpy()).max())
               for f, s in zip(fresh.trainable_variables, model.network.trainable_variables))


def check_logs(whole, split):
    assert whole.keys() == split.keys()
    for key in whole:  # means of the same per-example values, summed in another order
        np.testing.assert_allclose(split[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name,n", [
    ("at", 2), ("mart", 4), ("at+awp", 4), ("trades+awp", 2), ("mart+awp", 2), ("at+s2o", 4), ("trades+s2o", 2),
    ("trades+awp+s2o", 4), ("trades+rat", 4), ("trades+awp+rat", 2),
])
def test_micro_batches_make_the_update_of_the_whole_batch(fashion_subset, name, n):
    x, y = fashion_subset[0][:64], fashion_subset[1][:64]
    whole, whole_logs = train(name, 1, x, y)
    split, split_logs = train(name, n, x, y)
    assert int(split.optimizer.iterations) == int(whole.optimizer.iterations) == 2  # one update per batch
    assert largest_gap(whole, split) < TIGHT
    assert moved(whole) > 1e-3  # the steps really moved the weights
    check_logs(whole_logs, split_logs)


def test_micro_batches_with_sample_weights_regularizers_and_a_partial_batch(fashion_subset):
    """trades+awp+rat: weighted mean, the network's own losses, label smoothing, a last batch of 30 = 9 + 7 + 7 + 7."""
    x, y = fashion_subset[0][:62], fashion_subset[1][:62]
    w = np.linspace(0.2, 1.5, len(x)).astype("float32")
    settings = dict(sample_weight=w, label_smoothing=0.1, network=regularized_cnn)
    whole, whole_logs = train("trades+awp+rat", 1, x, y, **settings)
    split, split_logs = train("trades+awp+rat", 4, x, y, **settings)
    assert whole.network.losses
    assert largest_gap(whole, split) < TIGHT
    check_logs(whole_logs, split_logs)


def test_the_check_detects_a_per_micro_batch_perturbation(fashion_subset):
    x, y = fashion_subset[0][:64], fashion_subset[1][:64]
    whole, _ = train("trades+awp", 1, x, y)
    broken, _ = train("trades+awp", 4, x, y, model_class=PerMicroBatchDirection)
    assert largest_gap(whole, broken) > 100 * TIGHT


@pytest.mark.slow
def test_micro_batches_on_two_replicas_match_one_device(fashion_subset):
    from tfrobust.config import RuntimeConfig
    from tfrobust.experiment import build_strategy

    x, y = fashion_subset[0][:64], fashion_subset[1][:64]
    mirrored = build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))
    whole, whole_logs = train("trades+awp+s2o", 1, x, y, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
    split, split_logs = train("trades+awp+s2o", 2, x, y, strategy=mirrored)  # 16 per replica, 2 x 8
    replicas = [r.numpy() for r in split.network.trainable_variables[0].value.values]
    np.testing.assert_array_equal(replicas[0], replicas[1])  # one all-reduced update on both
    assert largest_gap(whole, split) < TIGHT
    check_logs(whole_logs, split_logs)


def test_a_batch_not_divisible_into_micro_batches_is_refused(fashion_subset):
    x, y = fashion_subset[0][:60], fashion_subset[1][:60]
    model = FixedAttackModel(tiny_cnn(), parse_defense("at"), eps=EPS, step_size=0.025, steps=1, accumulate_steps=4)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(UserError, match="batch of 30 examples does not split into accumulate_steps=4"):
        model.fit(x, y, batch_size=30, epochs=1, verbose=0)
    with pytest.raises(UserError, match="batch of 30 examples"):  # fixed in the data set's shapes
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(30, drop_remainder=True), epochs=1, verbose=0)
    with pytest.raises(UserError, match="accumulate_steps must be between 1"):
        RobustModel(tiny_cnn(), parse_defense("at"), eps=EPS, step_size=0.025, steps=1, accumulate_steps=0)
    with pytest.raises(UserError, match="data.batch_size 100 is not divisible by optim.accumulate_steps=3"):
        load_config(overrides={"data.batch_size": "100", "optim.accumulate_steps": "3"})
    assert load_config(overrides={"data.batch_size": "128", "optim.accumulate_steps": "4"}).optim.accumulate_steps == 4


@pytest.mark.slow
def test_a_run_with_accumulation_trains_and_reloads(tmp_path):
    """optim.accumulate_steps reaches the model; 200 examples in batches of 64 end with a partial batch of 8."""
    from tfrobust import experiment

    cfg = load_config("configs/fashion_mnist.yaml", {
        "data.train_examples": 200, "data.validation_examples": 32, "data.batch_size": 64, "attack.steps": 2,
        "eval.pgd_steps": 2, "optim.epochs": 1, "runtime.verbose": 0, "defense.name": "trades+awp",
        "defense.awp.warmup_epochs": 0, "optim.accumulate_steps": 2, "eval.images_every": 0,
    })
    model, _, history = experiment.train(cfg, str(tmp_path / "run"))
    assert model.settings.accumulate_steps == 2
    assert int(model.optimizer.iterations) == 4  # one update per batch of 64 (and the last one of 8)
    assert np.isfinite(history["loss"]).all()
    model.save(str(tmp_path / "robust.keras"))
    assert keras.models.load_model(str(tmp_path / "robust.keras")).settings.accumulate_steps == 2
