"""Second-order statistics optimisation, S2O (Jin et al., CVPR 2022, section 4 and eq. 14).

S2O treats the weights as random variables and penalises the correlation
between the rows of the last layer's weights, which tightens the PAC-Bayesian
robust generalisation bound once the independence assumption is dropped. The
reference code (Alexkael/S2O) realises this as a soft-label term built from
the second moment of the logits ``z = W h`` (``z z^T = W h h^T W^T``):

    M = sum_n z_n z_n^T                          (C x C, no gradient)
    A_ij = max_k |M_ik| - |M_ij|  (i != j),  A_ii = 0
    A_i. <- c A_i. / sum_j A_ij,  A_ii = 1 - c   (c = 1 - 2/C)
    L_S2O(x) = mean_n KL(A[y_n] || p(x_n))

M is built from clean logits for the clean term and from adversarial logits
for the adversarial term, and the total objective is
``(1 - a) * primary + (a / 2) (L_S2O(x) + L_S2O(x')) + regulariser`` with
a = 0.1 for AT and 0.3 for TRADES and MART (docs/algorithms.md, section 4). The
reference hard-codes c = 0.8 (10 classes) or 0.98 (100); ``1 - 2/C`` gives
both and works for any C.
"""

import tensorflow as tf

from tfrobust.attacks import kl_from_probabilities
from tfrobust.defense_names import term_declaration
from tfrobust.defenses.terms import WeightSpaceTerm

NAME = "s2o"
(DEFAULT_A,) = (h.default for h in term_declaration(NAME).hyperparameters)


def second_moment(logits):
    """``M = sum_n z_n z_n^T`` for a batch of logits (no gradient)."""
    z = tf.stop_gradient(tf.cast(logits, tf.float32))
    return tf.matmul(z, z, transpose_a=True)


def soft_target_matrix(moment, c=None):
    """The row-stochastic soft-target matrix A from the second moment M (see module doc)."""
    moment = tf.abs(tf.convert_to_tensor(moment, tf.float32))
    num_classes = moment.shape[-1] if moment.shape[-1] is not None else tf.shape(moment)[-1]
    if c is None:
        c = 1.0 - 2.0 / tf.cast(num_classes, tf.float32)
    off_diagonal = 1.0 - tf.eye(num_classes, dtype=tf.float32)
    a = (tf.reduce_max(moment, axis=1, keepdims=True) - moment) * off_diagonal
    a = c * tf.math.divide_no_nan(a, tf.reduce_sum(a, axis=1, keepdims=True))
    return a + (1.0 - c) * tf.eye(num_classes, dtype=tf.float32)


def soft_targets(moment, y):
    """The soft labels ``q_n = A[y_n]`` (no gradient)."""
    return tf.stop_gradient(tf.gather(soft_target_matrix(moment), tf.cast(y, tf.int32)))


def s2o_loss(logits, y, moment=None):
    """Per-example ``KL(A[y_n] || p(x_n))`` with A from ``moment`` (default: this batch's M)."""
    if moment is None:
        moment = second_moment(logits)
    return kl_from_probabilities(soft_targets(moment, y), logits)


def correlation_statistic(moment):
    """Frobenius norm of the off-diagonal correlation matrix derived from M.

    ``R_ij = M_ij / sqrt(M_ii M_jj)``; the statistic S2O drives down, logged to
    TensorBoard.
    """
    moment = tf.convert_to_tensor(moment, tf.float32)
    d = tf.sqrt(tf.maximum(tf.linalg.diag_part(moment), 1e-12))
    corr = moment / (d[:, None] * d[None, :])
    off = corr * (1.0 - tf.eye(tf.shape(moment)[0], dtype=tf.float32))
    return tf.norm(off)

class SecondOrderStatistics(WeightSpaceTerm):
    """S2O in the train step: soft targets from the batch's second moments, mixed with the primary term."""

    NEEDS_CLEAN_LOGITS = True
    TERMS = ("s2o_clean", "s2o_adv")
    STATISTICS = ("s2o_correlation",)

    def statistics(self, network, logits_clean, logits_adv, y, recorded, tape):
        return [second_moment(logits_clean), second_moment(logits_adv)]

    def soft_targets(self, statistics, y):
        m_clean, m_adv = statistics
        return (soft_targets(m_clean, y), soft_targets(m_adv, y)), {"s2o_correlation": correlation_statistic(m_adv)}

    def mix(self, primary, logits_clean, logits_adv, targets):
        a = self.setting("a")
        q_clean, q_adv = targets
        s_clean = kl_from_probabilities(q_clean, logits_clean)
        s_adv = kl_from_probabilities(q_adv, logits_adv)
        return (1.0 - a) * primary + 0.5 * a * (s_clean + s_adv), {"s2o_clean": s_clean, "s2o_adv": s_adv}


__all__ = [
    "NAME",
    "SecondOrderStatistics",
    "DEFAULT_A",
    "second_moment",
    "soft_target_matrix",
    "soft_targets",
    "s2o_loss",
    "correlation_statistic",
]
