"""The interface of a weight-space term (AWP, S2O, RAT, or a user's own).

:class:`~tfrobust.trainer.RobustModel`'s train step calls every term of the
defense (in the name's canonical order) at four points, and nothing else in
the step knows which terms there are:

1. **around the attack**: :meth:`WeightSpaceTerm.attack_weights` gives
   offsets that the training attack sees on the weights (RAT's noisy
   kernels); the step restores the weights exactly afterwards.
2. **before the update**: a term with :meth:`~WeightSpaceTerm.ascent_variables`
   receives the gradient of the base objective w.r.t. them, summed over the
   whole (global, effective) batch, and returns an offset
   (:meth:`~WeightSpaceTerm.weight_perturbation`, AWP's ``v``); the step
   evaluates the objective and its gradient at ``w + v`` and restores ``w``
   exactly before the optimizer applies the gradient. Until
   :meth:`~WeightSpaceTerm.warmup_epochs` have passed the offset is zero.
3. **soft targets** (no gradient): :meth:`~WeightSpaceTerm.record` runs
   inside the forward pass (a tape that watches variables when
   ``WATCHES_VARIABLES``), :meth:`~WeightSpaceTerm.statistics` returns
   tensors that the step sums over the whole batch (across replicas and
   micro-batches, outside any ``tf.cond`` and off the gradient tape), and
   :meth:`~WeightSpaceTerm.soft_targets` turns the sums into per-example
   targets (S2O's second moments, RAT's last-layer gradients).
4. **the objective**: :meth:`~WeightSpaceTerm.mix` replaces the base's
   per-example primary term (S2O, RAT: a mixture with their soft-label
   terms); the base's regulariser is added after it.

``TERMS`` names the per-example terms a term reports (batch means) and
``STATISTICS`` its scalar statistics; both become training metrics. A term
is registered with :func:`tfrobust.defense_names.register_term` (name,
hyperparameters with defaults, composition rules); its hyperparameters are
read with :meth:`~WeightSpaceTerm.setting`.
"""

from __future__ import annotations


class WeightSpaceTerm:
    """Base class of weight-space terms; every hook does nothing by default.

    Args:
      defense: the :class:`~tfrobust.defenses.Defense` the term belongs to.
      name: the term's registered name.
    """

    NEEDS_CLEAN_LOGITS = False  # the objective needs f(x) besides f(x')
    WATCHES_VARIABLES = False  # record() needs gradients w.r.t. variables
    NEEDS_LABELS = True  # uses y beyond the base objective (examples labelled -1 are then refused)
    TERMS = ()  # per-example terms returned by mix(), reported as batch means
    STATISTICS = ()  # scalar statistics returned by perturbation_statistics() or soft_targets()

    def __init__(self, defense, name: str):
        self.defense = defense
        self.name = name

    def setting(self, hyperparameter: str):
        """The defense's value of one of this term's hyperparameters."""
        return getattr(self.defense, f"{self.name}_{hyperparameter}")

    def check_network(self, network, classes: int) -> None:
        """Refuses, with a one-line UserError, a network this term cannot train (called when the model is built)."""

    # -- 1. around the attack -----------------------------------------------

    def attack_weights(self, variables, seed):
        """``(variables, offsets)``: the attack runs at ``variable + offset``. ``seed``: the step's weight-noise seed."""
        return [], []

    # -- 2. before the update -----------------------------------------------

    def warmup_epochs(self) -> int:
        """Epochs at the start of training without weight perturbation."""
        return 0

    def ascent_variables(self, variables):
        """The variables (among the trainable ones) whose base-objective gradient the term needs."""
        return []

    def weight_perturbation(self, weights, gradients):
        """The offsets of ``ascent_variables`` from their values and the batch's summed gradient."""
        return []

    def perturbation_statistics(self, weights, offsets) -> dict:
        """Scalar statistics of the perturbation (metrics)."""
        return {}

    # -- 3. soft targets ----------------------------------------------------

    def record(self, logits_clean, logits_adv, y, global_mean) -> dict:
        """Quantities computed inside the forward pass for :meth:`statistics`.

        ``global_mean(per_example)`` is this replica's (and micro-batch's)
        share of the mean over the whole batch.
        """
        return {}

    def statistics(self, network, logits_clean, logits_adv, y, recorded, tape):
        """Tensors to be summed over the whole batch (no gradient); ``tape`` recorded the forward pass."""
        return []

    def soft_targets(self, statistics, y):
        """``(targets, metrics)``: per-example targets from the summed statistics, and scalar statistics."""
        return None, {}

    # -- 4. the objective -----------------------------------------------------

    def mix(self, primary, logits_clean, logits_adv, targets):
        """``(primary, terms)``: the per-example primary term after this term, and the terms to report."""
        return primary, {}


__all__ = ["WeightSpaceTerm"]
