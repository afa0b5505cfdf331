"""Weight-space defenses under tf.distribute.MirroredStrategy on two logical CPU devices.

A step on two replicas must compute the update of the same step on one device:
the AWP perturbation comes from gradients all-reduced across replicas, S2O's
second moment and RAT's last-layer gradients likewise, random starts are drawn
for the global batch, and hand-built losses are divided by the number of
replicas.

The property is checked in two parts, so that each check is exact where the
arithmetic is and holds on any x86-64 CPU:

* The weight-space part with the adversarial batch fixed. The attack is
  replaced by a fixed elementwise map of the clean batch, so both runs train on
  bitwise the same ``x_adv``; what remains differs between one device and two
  replicas only in the order of floating-point sums (per-replica partial sums
  added by the all-reduce). That moves the weights by a few float32 ulps of the
  gradients' size, far below the tolerance, while every algorithmic slip the
  check exists for (a per-replica AWP perturbation, a missing division by the
  replica count, per-replica S2O/RAT statistics) moves them by orders of
  magnitude more: ``test_the_check_detects_a_per_replica_perturbation`` shows it.
* The attack alone. Its random start is bitwise equal (stateless noise drawn
  for the global batch and sliced). Its PGD steps take the sign of input
  gradients, and a gradient entry within rounding of zero may take another
  sign on another summation order, moving that pixel by a whole step; so the
  attack is compared by its invariants and by the fraction of pixels that
  agree, not bitwise.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust.step import objective as objective_module
from tfrobust.defenses import parse_defense
from tfrobust.trainer import RobustModel, start_point

EPS = 0.1
NAMES = ["at+awp", "trades+awp", "mart+awp", "at+s2o", "trades+s2o", "trades+rat", "trades+awp+rat"]


class FixedAttackModel(RobustModel):
    """A RobustModel whose training attack is a fixed elementwise map of the batch.

    ``x_adv = clip(x + eps/2 * sign(0.5 - x) * (1 - 2 * (x > 0.9)), 0, 1)`` is
    computed pixel by pixel, so it is bitwise the same on any number of
    replicas and leaves only the weight-space part of the step to compare.
    """

    def adversarial_examples(self, x, y, x_init=None):
        push = tf.where(x > 0.5, -1.0, 1.0)
        return tf.clip_by_value(x + 0.5 * self.settings.eps * push, 0.0, 1.0)


def build(name, strategy, model_class=RobustModel, **attack):
    d = dataclasses.replace(parse_defense(name), awp_warmup_epochs=0)
    with strategy.scope():
        settings = dict(eps=EPS, step_size=0.025, steps=3)
        settings.update(attack)
        model = model_class(tiny_cnn(batch_norm=False, seed=3), d, weight_decay=5e-4, seed=7, **settings)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def train(name, strategy, x, y, steps=2, model_class=FixedAttackModel, **attack):
    model = build(name, strategy, model_class, **attack)
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


def largest_gap(single, mirrored):
    """Largest |w_one_device - w_replica| over trainable weights; replicas must agree bitwise."""
    gap = 0.0
    for a, b in zip(single.network.trainable_variables, mirrored.network.trainable_variables):
        replicas = [r.numpy() for r in b.value.values]
        assert len(replicas) == 2
        # Every replica applies the same all-reduced update: identical on any CPU.
        np.testing.assert_array_equal(replicas[0], replicas[1])
        gap = max(gap, float(np.abs(replicas[0] - a.numpy()).max()))
    return gap


def moved(model):
    fresh = tiny_cnn(seed=3)
    return max(float(np.abs(f.numpy() - s.numpy()).max())
               for f, s in zip(fresh.trainable_variables, model.network.trainable_variables))


# Two SGD steps with lr 0.1 on weights of size ~0.1: a reordered float32 sum
# changes a gradient entry by ~1e-7 of its size, the weights by ~1e-8. A
# per-replica perturbation or statistic changes them by ~1e-3 (see below).
TIGHT = 2e-6


@pytest.mark.parametrize("name", NAMES)
def test_weight_space_step_on_two_replicas_matches_one_device(fashion_subset, mirrored_strategy, name):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    single = train(name, tf.distribute.OneDeviceStrategy("/cpu:0"), x, y)
    mirrored = train(name, mirrored_strategy, x, y)
    assert largest_gap(single, mirrored) < TIGHT
    assert moved(single) > 1e-3  # the steps really moved the weights


def test_weight_space_step_l2_attack_settings(fashion_subset, mirrored_strategy):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    attack = dict(norm="l2", eps=1.0, step_size=0.3)
    single = train("at+awp", tf.distribute.OneDeviceStrategy("/cpu:0"), x, y, **attack)
    mirrored = train("at+awp", mirrored_strategy, x, y, **attack)
    assert largest_gap(single, mirrored) < TIGHT


@pytest.mark.parametrize("name", ["at+awp", "trades+s2o", "trades+rat"])
def test_the_check_detects_a_per_replica_statistic(fashion_subset, mirrored_strategy, monkeypatch, name):
    """Without the cross-replica sum each replica uses its own half-batch: far outside TIGHT."""
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    single = train(name, tf.distribute.OneDeviceStrategy("/cpu:0"), x, y)
    monkeypatch.setattr(objective_module, "all_reduce_sum", lambda values: values)
    broken = train(name, mirrored_strategy, x, y)
    gaps = [float(np.abs(r.numpy() - a.numpy()).max())
            for a, b in zip(single.network.trainable_variables, broken.network.trainable_variables)
            for r in b.value.values]
    assert max(gaps) > 100 * TIGHT


def replica_attack(model, strategy, x, y):
    """The training attack run per replica on the global batch, gathered back in order."""
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)))
    batch = next(iter(ds))
    out = strategy.run(model.adversarial_examples, args=batch)
    return np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])


@pytest.mark.parametrize("name,norm,eps,step_size", [
    ("at", "linf", EPS, 0.025), ("trades", "linf", EPS, 0.025), ("trades+rat", "linf", EPS, 0.025),
    ("at", "l2", 1.0, 0.3),
])
def test_attack_on_two_replicas_is_consistent_with_one_device(fashion_subset, mirrored_strategy, name, norm, eps,
                                                               step_size):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    runs = {}
    for key, strategy in (("one", tf.distribute.OneDeviceStrategy("/cpu:0")), ("two", mirrored_strategy)):
        model = build(name, strategy, eps=eps, step_size=step_size, norm=norm)
        runs[key] = replica_attack(model, strategy, x, y)
        # The random start is drawn for the global batch: bitwise equal slices.
        kind = model.defense.objective.ATTACK_START
        seed = tf.constant([7 * 1000 + 1, 0], tf.int32)
        if key == "one":
            start_one = start_point(tf.constant(x), eps, norm, kind, seed).numpy()
        else:
            starts = strategy.run(lambda xs: start_point(xs, eps, norm, kind, seed), args=(
                next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(32)))),))
            start_two = np.concatenate([t.numpy() for t in strategy.experimental_local_results(starts)])
    np.testing.assert_array_equal(start_one, start_two)
    for x_adv in runs.values():
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        delta = (x_adv - x).reshape(len(x), -1)
        norms = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert norms.max() <= eps * (1 + 1e-5)
    # A pixel may differ only where a rounding-level gradient changed sign (and,
    # in that example, downstream of it). With 3 steps that is a small share;
    # a wrong start or a replica attacking the other replica's examples would
    # make most pixels differ.
    agree = np.mean(np.abs(runs["one"] - runs["two"]) <= 1e-6)
    assert agree > 0.95, agree
