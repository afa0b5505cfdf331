"""MART (Wang et al., ICLR 2020, eq. 9; reference YisenWang/MART mart.py).

With ``k* = argmax_{k != y} p_k(x')``:
``BCE = CE(f(x'), y) - log(1.0001 - p_{k*}(x') + 1e-12)`` and
``L = BCE + beta * mean_n[KL(p(x_n) || p(x'_n)) * (1.0000001 - p_y(x_n))]``,
beta = 6. The inner attack is PGD on CE from ``x + 0.001 N(0, 1)``.
The constants 1.0001, 1e-12 and 1.0000001 are the reference's; its KL from
``log(p(x') + 1e-12)`` is computed exactly from log-softmax here
(docs/algorithms.md, section 2 and section 9, items 1 and 2).
"""

import tensorflow as tf

from tfrobust.attacks import cross_entropy, kl_divergence

NAME = "mart"
ATTACK_LOSS = "ce"
ATTACK_START = "gaussian"
NEEDS_CLEAN_LOGITS = True
LABEL_FREE_TERM = False  # its KL term is weighted by 1 - p_y(x)
DEFAULT_BETA = 6.0
TERM_NAMES = ("bce", "weighted_kl")  # the per-example terms loss_terms() reports
CE_TERM = None  # the cross-entropy term that label smoothing and unlabelled examples change (none)
CE_LOGITS = None  # the logits of that term


def boosted_cross_entropy(logits_adv, y):
    """MART's boosted CE (eq. 7): CE plus a margin term on the most likely wrong class."""
    p_adv = tf.nn.softmax(tf.cast(logits_adv, tf.float32), axis=-1)
    onehot = tf.one_hot(tf.cast(y, tf.int32), tf.shape(p_adv)[-1], dtype=tf.float32)
    # The reference sorts the probabilities and takes the top non-true class.
    p_wrong = tf.reduce_max(p_adv - 2.0 * onehot, axis=-1)
    return cross_entropy(logits_adv, y) - tf.math.log(1.0001 - p_wrong + 1e-12)


def loss_terms(logits_clean, logits_adv, y, beta=DEFAULT_BETA):
    """Per-example ``(primary, regulariser, terms)``: boosted CE and the weighted KL."""
    bce = boosted_cross_entropy(logits_adv, y)
    p_clean = tf.nn.softmax(tf.cast(logits_clean, tf.float32), axis=-1)
    onehot = tf.one_hot(tf.cast(y, tf.int32), tf.shape(p_clean)[-1], dtype=tf.float32)
    p_true = tf.reduce_sum(p_clean * onehot, axis=-1)
    weighted_kl = kl_divergence(logits_clean, logits_adv) * (1.0000001 - p_true)
    return bce, beta * weighted_kl, {"bce": bce, "weighted_kl": weighted_kl}


__all__ = [
    "NAME",
    "ATTACK_LOSS",
    "ATTACK_START",
    "NEEDS_CLEAN_LOGITS",
    "LABEL_FREE_TERM",
    "DEFAULT_BETA",
    "TERM_NAMES",
    "CE_TERM",
    "CE_LOGITS",
    "boosted_cross_entropy",
    "loss_terms",
]
