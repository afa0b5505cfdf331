"""The training objective of a step: the base objective, its weighting over the batch, the weight-space terms'
mixing, the network's own losses and weight decay (docs/algorithms.md, sections 1-5, 11, 14).

Every loss here is this replica's share of the mean over the global batch
(divided by the replica count; gradients are summed across replicas), and,
for a micro-batch that is ``fraction`` of the batch, its share of that.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from tfrobust import attacks
from tfrobust.weight_space import restore, snapshot
from tfrobust.step.fused_batch_norm import fused_network


class BatchWeights(NamedTuple):
    """How a step averages its per-example objective over the global batch.

    ``w``: each example's weight; ``total``: the sum of ``w`` over the global
    batch (all replicas), so that ``sum(w * L) / total`` is this replica's
    share of the weighted mean; ``ce_scale``: with unlabelled examples
    (label -1), ``total`` divided by the weight of the labelled examples of
    the global batch, the factor that turns the CE term into a mean over the
    labelled examples only (None when every example has a label).
    """

    w: tf.Tensor
    total: tf.Tensor
    ce_scale: Optional[tf.Tensor] = None


def num_replicas() -> int:
    ctx = tf.distribute.get_replica_context()
    return ctx.num_replicas_in_sync if ctx is not None else 1


def all_reduce_sum(values):
    """The sum across replicas (the values themselves on one replica or outside a replica context)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def ce_scale(weights):
    return None if weights is None else weights.ce_scale


def global_mean(per_example, weights=None, fraction=None):
    """This replica's share of the global mean; ``weights`` (:class:`BatchWeights`) makes it weighted.

    For a micro-batch that is ``fraction`` of this replica's batch, its share of that mean.
    """
    if weights is None:
        mean = tf.reduce_mean(per_example) / num_replicas()
        return mean if fraction is None else mean * fraction
    return tf.math.divide_no_nan(tf.reduce_sum(weights.w * tf.cast(per_example, tf.float32)), weights.total)


def sample_weights(sample_weight, y, allow_unlabelled: bool):
    """The step's :class:`BatchWeights`, or None for a plain mean (no weights, every example labelled)."""
    if sample_weight is None and not allow_unlabelled:
        return None
    if sample_weight is None:
        w = tf.ones(tf.shape(y), tf.float32)
    else:
        w = tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(y))
    if not allow_unlabelled:
        return BatchWeights(w, all_reduce_sum(tf.reduce_sum(w)))
    # One all-reduce for both sums, outside of any conditional.
    total, labelled = all_reduce_sum([tf.reduce_sum(w), tf.reduce_sum(w * tf.cast(y >= 0, tf.float32))])
    return BatchWeights(w, total, tf.math.divide_no_nan(total, labelled))


def metric_weights(y, sample_weight, allow_unlabelled: bool):
    """Labels and sample weights for the accuracy metrics: unlabelled examples count with weight 0."""
    if not allow_unlabelled:
        return y, sample_weight
    labelled = tf.cast(y >= 0, tf.float32)
    if sample_weight is not None:
        labelled = labelled * tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(y))
    return tf.where(y >= 0, y, tf.zeros_like(y)), labelled


def finite_or_zero(grads):
    """The gradients, or zeros if any entry overflowed: a NaN added to the weights could not be undone."""
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    return [tf.where(finite, g, tf.zeros_like(g)) for g in grads]


def _all_layers(layer):
    """Every layer nested in ``layer`` (itself included), depth first."""
    yield layer
    for child in getattr(layer, "layers", None) or []:
        yield from _all_layers(child)


class Objective:
    """The defense's objective with the step's settings (label smoothing, weight decay and its exclusions)."""

    def __init__(self, defense, terms, settings):
        self.defense, self.terms, self.settings = defense, tuple(terms), settings

    def term_names(self) -> list:
        """The names of the per-example terms the objective reports: the base's, then each term's."""
        return list(self.defense.objective.TERM_NAMES) + [n for term in self.terms for n in term.TERMS]

    def loss_terms(self, logits_clean, logits_adv, y, scale=None):
        """The base objective's ``(primary, regulariser, terms)``, its CE term label-smoothed when asked.

        With ``scale`` (:attr:`BatchWeights.ce_scale`), examples labelled -1
        get no CE term and the labelled ones' is multiplied by ``scale``, so
        that its batch mean is the mean over the labelled examples.
        """
        d, smoothing = self.defense, self.settings.label_smoothing
        base = d.objective
        if scale is not None:
            labelled = y >= 0
            y = tf.where(labelled, y, tf.zeros_like(y))
        primary, regulariser, terms = base.loss_terms(logits_clean, logits_adv, y, d.beta)
        if smoothing:
            logits = logits_adv if base.CE_LOGITS == "adversarial" else logits_clean
            primary = attacks.smoothed_cross_entropy(logits, y, smoothing)
            terms = dict(terms, **{base.CE_TERM: primary})
        if scale is not None:
            primary = primary * tf.cast(labelled, primary.dtype) * scale
            terms = dict(terms, **{base.CE_TERM: primary})
        return primary, regulariser, terms

    def objective_terms(self, y, logits_clean, logits_adv, targets, scale=None):
        """Per-example objective (the base, its primary term mixed by each weight-space term) and its named terms.

        ``targets`` holds each term's soft targets (computed without gradient), in term order.
        """
        primary, regulariser, terms = self.loss_terms(logits_clean, logits_adv, y, scale)
        for term, target in zip(self.terms, targets):
            primary, reported = term.mix(primary, logits_clean, logits_adv, target)
            terms = dict(terms, **reported)
        return primary + regulariser, terms

    # -- input-space regularisers (GradAlign, ELLE; tfrobust/defenses/input_space.py) -----------

    @property
    def input_terms(self) -> list:
        """The defense's input-space terms, in canonical order."""
        return [t for t in self.terms if getattr(t, "INPUT_SPACE", False)]

    def state_variables(self) -> list:
        """The input-space terms' variables kept across steps (ELLE-A's weight and error moments)."""
        return [v for t in self.input_terms for v in t.state_variables()]

    def input_draws(self, x, seed_of) -> list:
        """Every input-space term's noise for the batch ``x``, in term order."""
        return [d for t in self.input_terms for d in t.draw(x, seed_of)]

    def input_penalty(self, network, x, y, draws):
        """``(per_example, terms)``: the input-space terms' penalties summed, on the live network in training
        mode; BatchNorm's moving statistics are left as they were (the objective's forward pass updates them)."""
        state = network.non_trainable_variables
        saved = snapshot(state)
        fused = fused_network(network)
        model_fn = lambda t: tf.cast(fused(t, training=True), tf.float32)  # noqa: E731
        total, reported, i = 0.0, {}, 0
        for term in self.input_terms:
            per_example, terms = term.penalty(model_fn, x, y, self.settings.eps, draws[i:i + term.DRAWS])
            total, i = total + per_example, i + term.DRAWS
            reported.update(terms)
        restore(state, saved)
        return total, reported

    def add_input_penalty(self, network, x, y, draws, per_example, terms):
        """The per-example objective and its named terms with the input-space penalties (``draws`` None: as given)."""
        if draws is None:
            return per_example, terms
        penalty, reported = self.input_penalty(network, x, y, list(draws))
        return per_example + penalty, dict(terms, **reported)

    def after_step(self, values: dict) -> dict:
        """Each input-space term's update from the global-batch means of its per-example terms."""
        extra = {}
        for term in self.input_terms:
            local = [tf.reduce_mean(tf.cast(values[n], tf.float32)) for n in term.TERMS]
            means = [m / num_replicas() for m in all_reduce_sum(local)] if local else []
            extra.update(term.after_step(dict(zip(term.TERMS, means))))
        return extra

    def base_loss(self, network, x, x_adv, y, training=True, weights=None, fraction=None):
        """Mean base objective over the global batch (this replica's share), plus the network's losses."""
        fused = fused_network(network)
        logits_adv = fused(x_adv, training=training)
        logits_clean = fused(x, training=training) if self.defense.objective.NEEDS_CLEAN_LOGITS else None
        primary, regulariser, _ = self.loss_terms(logits_clean, logits_adv, y, ce_scale(weights))
        return self.training_loss(network, primary + regulariser, weights, fraction)

    def training_loss(self, network, per_example, weights=None, fraction=None):
        """The objective's share of this replica (and micro-batch), plus the network's own losses."""
        loss = global_mean(per_example, weights, fraction)
        losses = network.losses
        if not losses:
            return loss
        total = tf.add_n([tf.cast(l, tf.float32) for l in losses]) / num_replicas()
        return loss + (total if fraction is None else total * fraction)

    def decayed_variables(self, network, variables):
        """The variables among ``variables`` that get the L2 penalty (per ``weight_decay_exclude``)."""
        exclude = self.settings.weight_decay_exclude
        if exclude == "none":
            return list(variables)
        excluded = set()
        for layer in _all_layers(network):
            if isinstance(layer, keras.layers.BatchNormalization):
                excluded.update(id(v) for v in layer.trainable_weights)
            elif exclude == "batchnorm_and_bias" and getattr(layer, "bias", None) is not None:
                excluded.add(id(layer.bias))
        return [v for v in variables if id(v) not in excluded]

    def weight_decay_penalty(self, network, variables, fraction=None):
        """``wd/2 ||w||^2`` over the decayed variables (this replica's share, times a micro-batch's fraction)."""
        wd = self.settings.weight_decay
        if not wd:
            return 0.0
        decayed = self.decayed_variables(network, variables)
        penalty = 0.5 * wd * tf.add_n([tf.reduce_sum(tf.square(v.value)) for v in decayed])
        penalty = penalty / num_replicas()
        return penalty if fraction is None else penalty * fraction


__all__ = ["BatchWeights", "num_replicas", "all_reduce_sum", "ce_scale", "global_mean", "sample_weights",
           "metric_weights", "finite_or_zero", "Objective"]
