"""tfrobust.seeds: one scheme for the seeds of stateless random ops, with the layouts of earlier releases."""

import numpy as np
import tensorflow as tf

from tfrobust import seeds


def test_mixed_radix_is_positional_notation_with_an_offset():
    assert seeds.mixed_radix(radix=10) == 0
    assert seeds.mixed_radix(3, 4, 5, radix=10) == 345
    assert seeds.mixed_radix(3, 4, 5, radix=10, offset=1) == 456
    t = seeds.mixed_radix(2, tf.constant(7), radix=100)
    assert isinstance(t, tf.Tensor) and int(t) == 207


def test_attack_seed_codes_attack_target_and_restart():
    # One stream per (attack, target rank, restart): ((a + 1) 1009 + r + 1) 1009 + s + 1, as AutoAttack always drew.
    pair = seeds.attack_seed(42, seeds.APGD_TARGETED, 3, 1).numpy()
    assert pair.dtype == np.int64
    assert pair.tolist() == [42, ((2 + 1) * 1009 + 3 + 1) * 1009 + 1 + 1]
    codes = {int(seeds.attack_seed(0, a, r, s)[1]) for a in (1, 2, 3, 4, 5) for r in range(11) for s in range(6)}
    assert len(codes) == 5 * 11 * 6  # no two streams share a seed
    assert int(seeds.attack_seed(0, *([1008] * 8))[1]) < 2**62  # reduced into the int64 range


def test_batch_seed_keeps_evaluation_and_probe_streams_apart():
    assert seeds.batch_seed(9, 4).numpy().tolist() == [9, 4]  # evaluation: [seed, batch]
    probe = seeds.batch_seed(9, 4, seeds.PROBE_STEPS + 2).numpy()
    assert probe.dtype == np.int32 and probe.tolist() == [9, 12 * 100003 + 4]

    @tf.function
    def traced(b):
        return seeds.batch_seed(9, b, seeds.PROBE_EPS0)

    assert traced(tf.constant(4)).numpy().tolist() == [9, 100003 + 4]


def test_step_seed_is_seed_times_1000_plus_purpose_and_the_step():
    pair = seeds.step_seed(3, seeds.VALIDATION_ATTACK_START, tf.constant(12, tf.int64))
    assert pair.dtype == tf.int32 and pair.numpy().tolist() == [3007, 12]


def test_different_purposes_draw_different_noise_and_equal_seeds_the_same():
    a = tf.random.stateless_uniform([64], seeds.batch_seed(1, 0, seeds.PROBE_EPS0))
    b = tf.random.stateless_uniform([64], seeds.batch_seed(1, 0, seeds.PROBE_LARGE_EPS))
    again = tf.random.stateless_uniform([64], seeds.batch_seed(1, 0, seeds.PROBE_EPS0))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, again)  # the same integer seed: the same Philox stream, bit for bit


def test_data_seeds_number_epochs_rounds_and_batches():
    epoch = tf.constant(3, tf.int64)
    assert seeds.epoch_seed(11, epoch).numpy().tolist() == [11, 3]
    assert seeds.epoch_seed(11, epoch, 2).numpy().tolist() == [11, 2 * 1000003 + 3]
    augment = seeds.augment_seed(11, epoch, tf.constant(4, tf.int64)).numpy()
    extra = seeds.extra_draw_seed(11, epoch, tf.constant(4, tf.int64)).numpy()
    assert augment.dtype == np.int64 and augment.tolist() == [11 * 1000003 + 3, 4]
    assert extra.tolist() == [-(11 * 1000003 + 3) - 1, 4]


def test_flatness_seed_is_a_function_of_its_parts():
    a = seeds.flatness_seed(0, seeds.STREAM_PGD, 0, 0)
    assert a.dtype == tf.int32 and a.shape == (2,)
    np.testing.assert_array_equal(a.numpy(), seeds.flatness_seed(0, seeds.STREAM_PGD, 0, 0).numpy())
    others = [seeds.flatness_seed(*p).numpy().tolist()
              for p in [(0, seeds.STREAM_PGD, 0, 1), (0, seeds.STREAM_AVERAGE, 0, 0), (1, seeds.STREAM_PGD, 0, 0)]]
    assert a.numpy().tolist() not in others and len({tuple(o) for o in others}) == 3
