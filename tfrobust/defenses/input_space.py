"""Input-space regularisers of single-step adversarial training: GradAlign, ELLE and ELLE-A.

They are terms of the objective, not of the weights: each adds a
per-example penalty to the base objective, computed inside the objective's
gradient tape, so that its gradient (a second-order one for GradAlign)
reaches the weights. They are declared like the weight-space terms
(:func:`tfrobust.defense_names.register_term`: names, hyperparameters,
bases) and subclass :class:`InputSpaceTerm`, whose weight-space hooks do
nothing; :class:`~tfrobust.step.objective.Objective` calls :meth:`~InputSpaceTerm.draw`
and :meth:`~InputSpaceTerm.penalty` (docs/algorithms.md, section
"Single-step adversarial training"; docs/architecture.md, "Where things plug in").

* GradAlign (Andriushchenko and Flammarion, NeurIPS 2020):
  ``lambda (1 - cos(grad_x CE(x), grad_x CE(x + eta)))``, ``eta ~ U(-eps, eps)``
  not clipped to [0, 1]; the first gradient is a constant, the second is
  differentiated through (double backpropagation).
* ELLE (Abad Rocamora et al., ICLR 2024): for ``x_a = x + eps u_a``,
  ``x_b = x + eps u_b`` (``u ~ U(-1, 1)``, not clipped) and ``x_c = (1 - a) x_a + a x_b``
  (``a ~ U(0, 1)``), ``lambda (CE(x_c) - (1 - a) CE(x_a) - a CE(x_b))^2``.
* ELLE-A: ELLE with a weight that starts at 0, jumps to ``weight`` when the
  batch's error exceeds the mean of all earlier errors plus ``sensitivity``
  standard deviations (after three of them), and is multiplied by ``decay``
  otherwise. Its state (weight, count, sum and sum of squares of the errors)
  is a set of model variables, saved with the weights and restored on resume.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfrobust import attacks, seeds
from tfrobust.defenses.terms import WeightSpaceTerm


def input_gradient(model_fn, x, y):
    """``grad_x sum_n CE(f(x_n), y_n)`` (differentiable again when an outer tape records)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(attacks.cross_entropy(model_fn(x), y))
    return tape.gradient(loss, x)


def gradient_cosine(g1, g2):
    """Per-example cosine of two gradients; 1 where either is zero (such examples add no penalty)."""
    a = tf.reshape(g1, [tf.shape(g1)[0], -1])
    b = tf.reshape(g2, [tf.shape(g2)[0], -1])
    na, nb = tf.norm(a, axis=1), tf.norm(b, axis=1)
    nonzero = (na > 0) & (nb > 0)
    safe_a, safe_b = tf.where(nonzero, na, 1.0), tf.where(nonzero, nb, 1.0)
    cos = tf.reduce_sum(a / safe_a[:, None] * (b / safe_b[:, None]), axis=1)
    return tf.where(nonzero, cos, tf.ones_like(cos))


def linearity_error(model_fn, x, y, eps, u_a, u_b, alpha):
    """Per-example ``(CE(x_c) - (1 - a) CE(x_a) - a CE(x_b))^2`` on the triplet, in one forward pass."""
    x_a, x_b = x + eps * u_a, x + eps * u_b
    a = attacks.per_example(alpha, x)
    x_c = (1.0 - a) * x_a + a * x_b
    losses = attacks.cross_entropy(model_fn(tf.concat([x_a, x_b, x_c], 0)), tf.tile(y, [3]))
    l_a, l_b, l_c = tf.split(losses, 3)
    return tf.square(l_c - ((1.0 - alpha) * l_a + alpha * l_b))


class InputSpaceTerm(WeightSpaceTerm):
    """A regulariser of the objective in input space; the weight-space hooks do nothing.

    ``DRAWS`` noise tensors are drawn for the whole batch (:meth:`draw`,
    with the step's seeds) so that micro-batches and replicas see the noise
    of the unsplit batch; :meth:`penalty` returns the per-example penalty
    and the per-example terms to report; :meth:`after_step` sees the means of
    those terms over the global batch after the update (ELLE-A's adaptation).
    """

    INPUT_SPACE = True
    NEEDS_LABELS = True
    DRAWS = 0

    def draw(self, x, seed_of) -> list:
        """The noise of one step for the batch ``x``; ``seed_of(purpose)`` is the step's seed of a purpose."""
        return []

    def penalty(self, model_fn, x, y, eps, draws):
        """``(per_example, terms)``: the penalty added to the objective and the terms to report."""
        raise NotImplementedError

    def state_variables(self) -> list:
        """Variables the term keeps across steps (saved with the model)."""
        return []

    def after_step(self, means: dict) -> dict:
        """Updates the term's state from the means of its terms over the (global) batch; returns scalar statistics."""
        return {}

    def strengthen(self) -> str:
        """Makes the regulariser stronger after a rollback from catastrophic overfitting; what it did, or ""."""
        return ""


class GradAlign(InputSpaceTerm):
    """GradAlign's ``lambda (1 - cos)``; reports the cosine (``grad_cosine``)."""

    TERMS = ("grad_cosine",)
    DRAWS = 1

    def draw(self, x, seed_of):
        return [attacks.uniform_noise(tf.shape(x), seed_of(seeds.TRAIN_GRADALIGN))]

    def penalty(self, model_fn, x, y, eps, draws):
        (u,) = draws
        g1 = tf.stop_gradient(input_gradient(model_fn, x, y))
        g2 = input_gradient(model_fn, x + eps * u, y)
        cos = gradient_cosine(g1, g2)
        return self.setting("weight") * (1.0 - cos), {"grad_cosine": cos}


class LocalLinearity(InputSpaceTerm):
    """ELLE's ``lambda`` times the local linearity error; reports the error (``lin_err``)."""

    TERMS = ("lin_err",)
    DRAWS = 3

    def draw(self, x, seed_of):
        shape = tf.shape(x)
        alpha = (attacks.uniform_noise(shape[:1], seed_of(seeds.TRAIN_ELLE_ALPHA)) + 1.0) / 2.0
        return [attacks.uniform_noise(shape, seed_of(seeds.TRAIN_ELLE_A)),
                attacks.uniform_noise(shape, seed_of(seeds.TRAIN_ELLE_B)), tf.reshape(alpha, [-1])]

    def weight(self):
        return self.setting("weight")

    def penalty(self, model_fn, x, y, eps, draws):
        error = linearity_error(model_fn, x, y, eps, *draws)
        return self.weight() * error, {"lin_err": error}


class AdaptiveLocalLinearity(LocalLinearity):
    """ELLE-A: :class:`LocalLinearity` with the adaptive weight; reports it (``elle_weight``)."""

    STATISTICS = ("elle_weight",)

    def __init__(self, defense, name):
        super().__init__(defense, name)
        self._weight = keras.Variable(0.0, dtype="float32", trainable=False, name="elle_weight")
        self._moments = keras.Variable([0.0, 0.0, 0.0], dtype="float64", trainable=False, name="elle_error_moments")

    def state_variables(self):
        return [self._weight, self._moments]

    def weight(self):
        return self._weight.value

    def strengthen(self):
        """The weight jumps to its maximum, as after a jump of the error."""
        self._weight.assign(self.setting("weight"))
        return f"{self.name} weight set to {self.setting('weight'):g}"

    def after_step(self, means):
        """The reference's rule on the batch's mean error."""
        error = tf.cast(means["lin_err"], tf.float64)
        count, total, squares = tf.unstack(self._moments.value)
        mean = tf.math.divide_no_nan(total, count)
        std = tf.sqrt(tf.maximum(tf.math.divide_no_nan(squares, count) - mean * mean, 0.0))
        jump = (count > 2) & (error > mean + self.setting("sensitivity") * std)
        self._weight.assign(tf.where(jump, tf.cast(self.setting("weight"), tf.float32),
                                     self._weight.value * self.setting("decay")))
        self._moments.assign(tf.stack([count + 1.0, total + error, squares + error * error]))
        return {"elle_weight": self._weight.value}


__all__ = ["InputSpaceTerm", "GradAlign", "LocalLinearity", "AdaptiveLocalLinearity", "input_gradient",
           "gradient_cosine", "linearity_error"]
