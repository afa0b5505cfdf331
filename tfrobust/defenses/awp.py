"""Adversarial weight perturbation (Wu, Xia, Wang, NeurIPS 2020, eq. 7-9).

AWP adds a layer-wise relative perturbation to the weights before each
update ("double perturbation": inputs by the attack, weights by AWP):

    v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20),   g_l = grad_{w_l} L_base

(one normalised ascent step, reference csdongxian/AWP utils_awp.py), then
the loss and its gradient are evaluated at ``w + v``, the optimizer updates
``w``, and ``w`` is restored. Only convolution and dense kernels (rank >= 2)
are perturbed; biases and normalisation parameters never are.

The reference takes one SGD step on a proxy copy of the model and uses the
difference of the weights; that difference is ``lr * g``, which the
normalisation cancels, so the direct gradient gives the same ``v`` without a
copy of the model. The ascent uses the plain base objective (AT, TRADES or
MART) without S2O or RAT terms, plus the network's own losses
(docs/algorithms.md, section 3; the warm-up count is section 9, item 3).
"""

import tensorflow as tf

from tfrobust import weight_space
from tfrobust.errors import UserError
from tfrobust.defense_names import term_declaration
from tfrobust.defenses.terms import WeightSpaceTerm

NAME = "awp"
# gamma per base objective (reference defaults) and warm-up epochs without
# perturbation, as declared in the term's registration (tfrobust.defense_names).
DEFAULT_GAMMA, DEFAULT_WARMUP_EPOCHS = (h.default for h in term_declaration(NAME).hyperparameters)


def perturbed_variables(variables):
    """The variables AWP perturbs: kernels of convolution and dense layers (rank >= 2).

    The rule is :func:`tfrobust.weight_space.conv_and_dense_kernels`.
    """
    return weight_space.conv_and_dense_kernels(variables)


def adversarial_weight_perturbation(weights, gradients, gamma):
    """Returns ``v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)`` for every layer.

    Args:
      weights: the current kernels ``w_l`` (tensors or variables).
      gradients: ``grad_{w_l}`` of the base objective, already summed across
        replicas under tf.distribute so every replica gets the same ``v``.
      gamma: relative size of the perturbation (``||v_l|| = gamma ||w_l||``).
    """
    result = []
    for w, g in zip(weights, gradients):
        w = tf.convert_to_tensor(w)
        g = tf.cast(g, w.dtype)
        result.append(gamma * tf.norm(w) * g / (tf.norm(g) + 1e-20))
    return result


def relative_size(weights, perturbation):
    """Mean over layers of ``||v_l|| / ||w_l||`` (logged to TensorBoard)."""
    ratios = [tf.norm(v) / (tf.norm(tf.convert_to_tensor(w)) + 1e-20) for w, v in zip(weights, perturbation)]
    return tf.reduce_mean(tf.stack(ratios)) if ratios else tf.constant(0.0)


class AdversarialWeightPerturbation(WeightSpaceTerm):
    """AWP in the train step: ``v`` before the update from the ascent gradient of the base objective."""

    STATISTICS = ("awp_relative_norm",)
    NEEDS_LABELS = False  # ascends the base objective, whatever examples it takes

    def warmup_epochs(self) -> int:
        return self.setting("warmup_epochs")

    def check_network(self, network, classes):
        if not perturbed_variables(network.trainable_variables):
            raise UserError("AWP perturbs the kernels of convolution and dense layers; this network has no trainable one")

    def ascent_variables(self, variables):
        return perturbed_variables(variables)

    def weight_perturbation(self, weights, gradients):
        return adversarial_weight_perturbation(weights, gradients, self.setting("gamma"))

    def perturbation_statistics(self, weights, offsets) -> dict:
        return {"awp_relative_norm": relative_size(weights, offsets)}


__all__ = [
    "NAME",
    "AdversarialWeightPerturbation",
    "DEFAULT_GAMMA",
    "DEFAULT_WARMUP_EPOCHS",
    "perturbed_variables",
    "adversarial_weight_perturbation",
    "relative_size",
]
