"""Randomized adversarial training, RAT (Jin et al., CVPR 2023, eq. 8-10 and Appendix D).

RAT adds small Gaussian noise ``u ~ N(0, sigma^2)`` to the weights and trains
on a first- and second-order Taylor expansion of the loss under that noise.
The reference (Alexkael/Randomized-Adversarial-Training,
TRADES_first_second/) does this:

1. The TRADES attack runs against randomised weights: the convolution
   kernels plus ``u`` (sigma = 1e-4, absolute). The model's own weights are
   untouched.
2. ``G_nat`` and ``G_adv``: gradients of ``CE(f(x), y)`` and ``CE(f(x'), y)``
   with respect to the last dense kernel (constants). Per class,
   ``t1 = |sum_j G[c, j]|`` and ``t2 = (sum_j G[c, j])^2``.
3. ``reg_gap(v)``: ``u = (v - min v) / sum(v - min v)``; a C x C matrix with
   every row ``u``, zero diagonal, rows rescaled to sum ``c``, diagonal
   ``1 - c`` (``c = 1 - 2/C``).
   ``y1 = reg_gap(t1_nat - t1_adv)[y]``, ``y2 = reg_gap(t1_adv - t1_nat)[y]``,
   ``yy1 = reg_gap(t2_nat - t2_adv)[y]``, ``yy2 = reg_gap(t2_adv - t2_nat)[y]``.
4. ``first = (KL(y1 || p(x')) + KL(y2 || p(x))) / 2``,
   ``second = (KL(yy1 || p(x')) + KL(yy2 || p(x))) / 2``,
   ``L = (1 - alpha) CE(f(x), y) + alpha first + alpha/2 second + beta KL(p(x) || p(x'))``,
   alpha = 0.2, beta = 6.

The reference computes ``yy1`` from ``t2_adv - t2_nat`` (the same matrix as
``yy2``) and handles only 10 or 100 classes; here ``yy1`` follows the paper by
default, and ``reference_quirk=True`` reproduces the reference. With AWP, RAT
uses no weight noise: the loss above is evaluated at the AWP-perturbed weights
(docs/algorithms.md, section 5; section 9, items 4 and 8).
"""

import tensorflow as tf

from tfrobust import weight_space
from tfrobust.weight_space import output_dense_layer
from tfrobust.attacks import cross_entropy, kl_from_probabilities
from tfrobust.defense_names import term_declaration
from tfrobust.defenses.terms import WeightSpaceTerm

NAME = "rat"
DEFAULT_ALPHA, DEFAULT_SIGMA, _ = (h.default for h in term_declaration(NAME).hyperparameters)


def noisy_variables(variables):
    """The variables RAT randomises: convolution kernels (rank >= 3).

    The rule is :func:`tfrobust.weight_space.conv_kernels`.
    """
    return weight_space.conv_kernels(variables)


def weight_noise(variables, sigma, seed):
    """Draws ``u_l ~ N(0, sigma^2)`` for every variable, reproducibly from ``seed``.

    ``seed`` is a shape-[2] integer tensor (stateless sampling); each variable
    gets its own stream derived from it (:func:`tfrobust.weight_space.gaussian_noise`).
    """
    return weight_space.gaussian_noise(variables, sigma, seed)


def class_gradient_sums(kernel_gradient):
    """``sum_j G[c, j]`` per class for a Keras Dense kernel gradient of shape (d, C)."""
    return tf.reduce_sum(tf.cast(kernel_gradient, tf.float32), axis=0)


def reg_gap(values, c=None):
    """The C x C soft-target matrix built from a per-class vector (step 3 above)."""
    values = tf.convert_to_tensor(values, tf.float32)
    num_classes = values.shape[-1]
    if c is None:
        c = 1.0 - 2.0 / float(num_classes)
    u = values - tf.reduce_min(values)
    u = tf.math.divide_no_nan(u, tf.reduce_sum(u))
    off_diagonal = 1.0 - tf.eye(num_classes, dtype=tf.float32)
    t = tf.tile(u[None, :], [num_classes, 1]) * off_diagonal
    t = c * tf.math.divide_no_nan(t, tf.reduce_sum(t, axis=1, keepdims=True))
    return t + (1.0 - c) * tf.eye(num_classes, dtype=tf.float32)


def taylor_targets(grad_nat, grad_adv, y, reference_quirk=False):
    """The soft targets ``(y1, y2, yy1, yy2)`` from the last-layer gradients."""
    s_nat = class_gradient_sums(grad_nat)
    s_adv = class_gradient_sums(grad_adv)
    t1_nat, t1_adv = tf.abs(s_nat), tf.abs(s_adv)
    t2_nat, t2_adv = tf.square(s_nat), tf.square(s_adv)
    y = tf.cast(y, tf.int32)
    y1 = tf.gather(reg_gap(t1_nat - t1_adv), y)
    y2 = tf.gather(reg_gap(t1_adv - t1_nat), y)
    yy2 = tf.gather(reg_gap(t2_adv - t2_nat), y)
    yy1 = yy2 if reference_quirk else tf.gather(reg_gap(t2_nat - t2_adv), y)
    return tuple(tf.stop_gradient(t) for t in (y1, y2, yy1, yy2))


def taylor_terms(logits_clean, logits_adv, targets):
    """Per-example first- and second-order terms (step 4 above)."""
    y1, y2, yy1, yy2 = targets
    first = 0.5 * (kl_from_probabilities(y1, logits_adv) + kl_from_probabilities(y2, logits_clean))
    second = 0.5 * (kl_from_probabilities(yy1, logits_adv) + kl_from_probabilities(yy2, logits_clean))
    return first, second


def last_dense_kernel(network, classes: int):
    """The kernel ``W`` of the Dense layer that computes the logits (:func:`tfrobust.weight_space.output_dense_layer`)."""
    return output_dense_layer(network, classes, "RAT").kernel


class RandomizedAdversarialTraining(WeightSpaceTerm):
    """RAT in the train step: noisy kernels for the attack (without AWP), Taylor soft targets, the mixture."""

    NEEDS_CLEAN_LOGITS = True
    WATCHES_VARIABLES = True
    TERMS = ("rat_first", "rat_second")

    def attack_weights(self, variables, seed):
        if self.defense.awp:  # with AWP, RAT's loss is taken at the AWP-perturbed weights, without noise
            return [], []
        noisy = noisy_variables(variables)
        return noisy, weight_noise(noisy, self.setting("sigma"), seed)

    def record(self, logits_clean, logits_adv, y, global_mean) -> dict:
        return {"ce_clean": global_mean(cross_entropy(logits_clean, y)), "ce_adv": global_mean(cross_entropy(logits_adv, y))}

    def check_network(self, network, classes):
        last_dense_kernel(network, classes)

    def statistics(self, network, logits_clean, logits_adv, y, recorded, tape):
        kernel = last_dense_kernel(network, int(logits_clean.shape[-1]))
        return [tape.gradient(recorded["ce_clean"], kernel), tape.gradient(recorded["ce_adv"], kernel)]

    def soft_targets(self, statistics, y):
        g_nat, g_adv = statistics
        return taylor_targets(g_nat, g_adv, y, self.setting("reference_quirk")), {}

    def mix(self, primary, logits_clean, logits_adv, targets):
        alpha = self.setting("alpha")
        first, second = taylor_terms(logits_clean, logits_adv, targets)
        return (1.0 - alpha) * primary + alpha * first + 0.5 * alpha * second, {"rat_first": first, "rat_second": second}


__all__ = [
    "NAME",
    "RandomizedAdversarialTraining",
    "last_dense_kernel",
    "DEFAULT_ALPHA",
    "DEFAULT_SIGMA",
    "noisy_variables",
    "weight_noise",
    "class_gradient_sums",
    "reg_gap",
    "taylor_targets",
    "taylor_terms",
]
