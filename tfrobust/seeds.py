"""Seeds of the stateless random ops: one scheme, (base seed, purpose, counters) -> seed pair.

Every random draw in tfrobust that must be reproducible is a stateless op
(``tf.random.stateless_*``) keyed by a pair of integers ``[first, second]``.
Both words are built by :func:`mixed_radix` from the user's base seed, a
purpose code that keeps the streams of different jobs apart, and counters
(batch, restart, step, target rank, ...)::

    mixed_radix(p1, p2, ..., pk, radix=R, offset=o) = (...((p1 + o) R + p2 + o) R + ...) R + pk + o

The layouts in use (each one reproduces the seeds of earlier releases, so a
run with the same seed gives the same numbers):

================================  ==========================================  =====================
draw                              seed pair                                   function
================================  ==========================================  =====================
AutoAttack (APGD, FAB, Square)    ``[base, mixed_radix(attack, counters,``    :func:`attack_seed`
                                  ``radix=1009, offset=1) mod 2**62]``, int64
attacks run over batches          ``[base, purpose * 100003 + batch]``, int32 :func:`batch_seed`
(evaluation: purpose 0;
integrity probes: purposes below)
training step (trainer)           ``[base * 1000 + purpose, step]``, int32    :func:`step_seed`
order of epoch e (data), round r  ``[base, r * 1000003 + e]``, int64          :func:`epoch_seed`
augmentation of batch b of        ``[base * 1000003 + e, b]``, int64          :func:`augment_seed`
epoch e (data)
extra-data draw of batch b of     ``[-(base * 1000003 + e) - 1, b]``, int64   :func:`extra_draw_seed`
epoch e (data)
flatness measures and landscapes  SeedSequence hash of ``(base, stream,``     :func:`flatness_seed`
                                  ``counters)`` mod 2**31 - 1, int32
================================  ==========================================  =====================

Purpose codes and streams are the constants below. :func:`flatness_seed`
hashes its parts rather than placing them, so that nearby counters give
unrelated streams; its streams (``STREAM_*``) keep apart the robust loss'
random starts, the average-case samples, the worst-case attack's weight and
input starts and the landscapes' directions. ``attacks.random_start`` turns a
Python integer seed ``s`` into ``[s, 0]`` (and ``[s, 1]`` for the L2 radius)
and a seed tensor ``t`` into ``t`` (and ``t + 1``). The shuffled single-pass
training pipeline seeds ``tf.data``'s own ops with ``seed`` and ``seed + 1``
(``tfrobust.data``); augmentation splits its seed ``[s0, s1]`` into
``[s0, 2 s1]`` and ``[s0, 2 s1 + 1]``. Two draws keep a fixed or shifted
seed: the TensorBoard image grid's PGD start is always ``[0, 0]`` (the same
start every epoch, so grids compare across epochs), and a 2-D landscape's
second direction is drawn with ``seed + 1``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# AutoAttack: the first counter of attack_seed (one stream per attack).
APGD = 1
APGD_TARGETED = 2
FAB_TARGETED = 3
SQUARE = 4
FAB = 5

# Attacks over batches: the purpose of batch_seed.
EVALUATION = 0
PROBE_EPS0 = 1
PROBE_LARGE_EPS = 2
PROBE_STEPS = 10  # + the index of the step count (10, 11, 12 for PGD-10, -20, -50)

# Training step: the purpose of step_seed (trainer.RobustModel).
TRAIN_ATTACK_START = 1
TRAIN_RAT_NOISE = 2
TRAIN_GRADALIGN = 3  # GradAlign's random point of the ball
TRAIN_ELLE_A = 4  # ELLE's triplets: the first point,
TRAIN_ELLE_B = 5  # the second point,
TRAIN_ELLE_ALPHA = 6  # and the interpolation weight
VALIDATION_ATTACK_START = 7

# Flatness measures and landscapes: the stream of flatness_seed (tfrobust.flatness, tfrobust.weight_space).
STREAM_PGD = 1  # the robust loss' random starts (restart, batch)
STREAM_AVERAGE = 2  # average-case samples (sample, layer)
STREAM_WORST_NU = 3  # worst-case weight starts (attempt, layer)
STREAM_WORST_DELTA = 4  # worst-case input starts (attempt, batch)
STREAM_DIRECTION = 5  # landscape directions (layer)

ATTACK_RADIX = 1009
BATCH_RADIX = 100003
STEP_RADIX = 1000
EPOCH_RADIX = 1000003


def mixed_radix(*parts, radix: int, offset: int = 0):
    """``(...((p1 + offset) * radix + p2 + offset) * radix + ...) + offset`` of integers or integer tensors.

    With no parts, 0. Python integers give a Python integer (no overflow);
    a tensor among the parts gives a tensor of its dtype.
    """
    code = 0
    for part in parts:
        code = code * radix + part + offset
    return code


def attack_seed(base: int, attack: int, *counters: int) -> tf.Tensor:
    """The int64 seed pair of one AutoAttack stream: attack (:data:`APGD`, ...), then e.g. target rank, restart."""
    code = mixed_radix(int(attack), *(int(c) for c in counters), radix=ATTACK_RADIX, offset=1)
    return tf.constant([base, code % (2**62)], dtype=tf.int64)


def batch_seed(base: int, batch, purpose: int = EVALUATION) -> tf.Tensor:
    """The int32 seed pair ``[base, purpose * 100003 + batch]`` of one batch of an attack run over data.

    ``base`` must fit in int32; ``batch`` may be an integer tensor.
    """
    return tf.stack([tf.constant(base, tf.int32),
                     tf.cast(mixed_radix(purpose, batch, radix=BATCH_RADIX), tf.int32)])


def step_seed(base: int, purpose: int, step) -> tf.Tensor:
    """The int32 seed pair ``[base * 1000 + purpose, step]`` of one draw of a training step."""
    return tf.stack([tf.constant(mixed_radix(base, purpose, radix=STEP_RADIX), tf.int32), tf.cast(step, tf.int32)])


def epoch_seed(base, epoch, round_=0):
    """The int64 seed pair ``[base, round_ * 1000003 + epoch]`` of the order of examples in one epoch.

    ``round_`` > 0 numbers further permutations of the same epoch. ``epoch`` may be an int64 tensor.
    """
    return tf.stack([tf.constant(base, tf.int64), mixed_radix(round_, epoch, radix=EPOCH_RADIX)])


def augment_seed(base, epoch, batch):
    """The int64 seed pair ``[base * 1000003 + epoch, batch]`` of the augmentation of one batch."""
    return tf.stack([mixed_radix(tf.constant(base, tf.int64), epoch, radix=EPOCH_RADIX), batch])


def extra_draw_seed(base, epoch, batch):
    """The int64 seed pair ``[-(base * 1000003 + epoch) - 1, batch]`` of the extra-data examples of one batch.

    Negative first words keep these draws apart from every :func:`augment_seed`.
    """
    return tf.stack([-mixed_radix(tf.constant(base, tf.int64), epoch, radix=EPOCH_RADIX) - 1, batch])


def flatness_seed(base, stream: int, *counters) -> tf.Tensor:
    """The int32 seed pair of one draw of the flatness measures or landscapes: a hash of ``(base, stream, counters)``.

    The integers are taken modulo 2**32 and mixed by NumPy's ``SeedSequence``
    (each word of the result reduced modulo 2**31 - 1), so nearby inputs such
    as ``(seed, stream, 0)`` and ``(seed, stream, 1)`` give unrelated streams.
    """
    words = [int(p) & 0xFFFFFFFF for p in (base, stream) + counters]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return tf.constant((state % np.uint32(2**31 - 1)).astype(np.int32))


__all__ = ["mixed_radix", "attack_seed", "batch_seed", "step_seed", "epoch_seed", "augment_seed",
           "extra_draw_seed", "flatness_seed", "APGD", "APGD_TARGETED", "FAB_TARGETED",
           "SQUARE", "FAB", "EVALUATION", "PROBE_EPS0", "PROBE_LARGE_EPS", "PROBE_STEPS", "TRAIN_ATTACK_START",
           "TRAIN_RAT_NOISE", "TRAIN_GRADALIGN", "TRAIN_ELLE_A", "TRAIN_ELLE_B", "TRAIN_ELLE_ALPHA",
           "VALIDATION_ATTACK_START", "STREAM_PGD", "STREAM_AVERAGE", "STREAM_WORST_NU",
           "STREAM_WORST_DELTA", "STREAM_DIRECTION"]
