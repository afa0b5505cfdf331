"""attacks.AttackRunner / attack_batches (one batched attack runner) and attacks.random_start (one random start)."""

import numpy as np
import pytest
import tensorflow as tf

from tfrobust import attacks, seeds
from tfrobust.errors import UserError


def noise_attack(model_fn, x, y, seed):
    """A stand-in attack whose result is a known function of the seed: x + 0.01 U(-1, 1)."""
    return x + 0.01 * tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)


def returned_points(_, x_adv, x, y):
    return x_adv


def data(n=10):
    rng = np.random.default_rng(0)
    return rng.random((n, 4, 4, 1)).astype("float32"), (np.arange(n) % 3).astype("int32")


def test_each_batch_gets_its_own_seed_and_results_come_back_in_order():
    x, y = data(10)
    out = attacks.attack_batches(None, x, y, noise_attack, batch_size=4, measure=returned_points,
                                 seeds=lambda b, _: seeds.batch_seed(5, b))
    # Stateless noise is a function of the integer seed alone (Philox), and one float add is one rounding:
    # the traced runner and this eager computation agree bit for bit.
    expected = np.concatenate([
        (x[i:i + 4] + 0.01 * tf.random.stateless_uniform(x[i:i + 4].shape, seeds.batch_seed(5, b), -1.0, 1.0)).numpy()
        for b, i in enumerate(range(0, 10, 4))])
    np.testing.assert_array_equal(out, expected)


def test_restarts_keep_the_per_example_maximum_of_the_measure():
    x, y = data(6)

    def total(_, x_adv, x, y):
        return tf.reduce_sum(tf.reshape(x_adv - x, [tf.shape(x)[0], -1]), axis=1)

    runs = [attacks.attack_batches(None, x, y, noise_attack, batch_size=3, measure=total,
                                   seeds=lambda b, _, r=r: seeds.batch_seed(r, b)) for r in range(3)]
    best = attacks.attack_batches(None, x, y, noise_attack, batch_size=3, measure=total, restarts=3,
                                  seeds=lambda b, r: seeds.batch_seed(r, b))
    np.testing.assert_array_equal(best, np.maximum.reduce(runs))
    assert not np.array_equal(runs[0], runs[1])


def test_one_trace_serves_every_batch_of_one_shape():
    x, y = data(20)
    traces = []

    def counting(model_fn, x, y, seed):
        traces.append(x.shape)
        return x

    runner = attacks.AttackRunner(None, counting, measure=returned_points)
    runner(x, y, batch_size=5, seeds=lambda b, _: seeds.batch_seed(0, b))
    runner(x, y, batch_size=5, seeds=lambda b, _: seeds.batch_seed(1, b))
    assert len(traces) == 1


def test_default_measure_counts_a_non_finite_output_as_wrong():
    x, y = data(4)

    def model_fn(t):
        logits = tf.one_hot(tf.constant([0, 1, 2, 0]), 3)  # right for examples 0-3 (labels 0, 1, 2, 0)
        return tf.where(tf.constant([[False], [True], [False], [False]]), np.nan, logits)

    correct, finite = attacks.attack_batches(model_fn, x, y, lambda f, x, y, s: x, batch_size=4)
    assert correct.tolist() == [True, False, True, True] and finite.tolist() == [True, False, True, True]


def test_the_trainer_uses_the_attacks_random_start():
    from tfrobust import trainer

    assert trainer.start_point is attacks.random_start


def test_gaussian_unclipped_start_leaves_the_box_and_gaussian_does_not():
    x = tf.constant(np.tile([0.0, 1.0], 50).reshape(1, 10, 10, 1).astype("float32"))
    seed = tf.constant([3, 4])
    unclipped = attacks.random_start(x, 0.1, "linf", "gaussian_unclipped", seed).numpy()
    clipped = attacks.random_start(x, 0.1, "linf", "gaussian", seed).numpy()
    assert unclipped.min() < 0.0 and unclipped.max() > 1.0
    np.testing.assert_array_equal(clipped, np.clip(unclipped, 0.0, 1.0))
    # 0.001 N(0, 1): 100 draws stay within 5 standard deviations
    assert np.abs(unclipped - x.numpy()).max() < 0.005


def test_batch_size_and_restarts_must_be_positive_integers():
    x, y = data(4)
    for kwargs, message in (({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                            ({"batch_size": 2, "restarts": 0}, "restarts must be an integer >= 1, got 0")):
        with pytest.raises(UserError, match=message):
            attacks.attack_batches(None, x, y, noise_attack, **kwargs)
