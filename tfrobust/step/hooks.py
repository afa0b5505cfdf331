"""The weight-space terms' hook points in a step, each term in the defense's canonical order
(:class:`~tfrobust.defenses.terms.WeightSpaceTerm`; docs/algorithms.md, section 16).

1. around the attack: the offsets the attack sees (RAT's noisy kernels), restored exactly after it;
2. before the update: each perturbing term's offsets (AWP's ``v``) from the base objective's gradient,
   summed across replicas outside of any conditional, applied, and restored exactly after the gradient;
3. soft targets: the terms' statistics, summed across replicas off the tape, and their targets;
4. the objective: each term mixes its terms into the primary term (:class:`~tfrobust.step.objective.Objective`).
"""

from __future__ import annotations

import tensorflow as tf

from tfrobust.defenses.terms import WeightSpaceTerm
from tfrobust.step import objective as objective_lib
from tfrobust.weight_space import assign_offset, restore, snapshot


class WeightSpaceHooks:
    """Calls a defense's weight-space terms at the step's hook points."""

    def __init__(self, terms, steps_per_epoch=None):
        self.terms = tuple(terms)
        self.steps_per_epoch = steps_per_epoch

    @property
    def watches_variables(self) -> bool:
        """Whether a term's ``record`` needs gradients with respect to the variables (RAT)."""
        return any(term.WATCHES_VARIABLES for term in self.terms)

    @property
    def has_statistics(self) -> bool:
        """Whether a term computes batch statistics for soft targets (S2O, RAT)."""
        return any(type(t).statistics is not WeightSpaceTerm.statistics for t in self.terms)

    def warmup_term(self):
        """The first term with a warm-up (in epochs), or None."""
        return next((t for t in self.terms if t.warmup_epochs() > 0), None)

    def perturbing_term(self, variables):
        """The first term with ascent variables among ``variables`` (AWP)."""
        for term in self.terms:
            if term.ascent_variables(variables):
                return term
        raise ValueError("the defense has no term that perturbs the weights")

    # -- 1. around the attack -------------------------------------------------

    def offset_for_attack(self, variables, seed):
        """Applies every term's attack offsets to ``variables``; returns what :meth:`restore_after_attack` undoes."""
        offset, saved_weights = [], []
        for term in self.terms:
            chosen, offsets = term.attack_weights(variables, seed)
            saved = snapshot(chosen)
            assign_offset(chosen, saved, offsets)
            offset, saved_weights = offset + list(chosen), saved_weights + saved
        return offset, saved_weights

    @staticmethod
    def restore_after_attack(applied) -> None:
        offset, saved_weights = applied
        restore(offset[::-1], saved_weights[::-1])

    # -- 2. before the update ---------------------------------------------------

    @staticmethod
    def weight_perturbation(term, variables, active, ascent):
        """``term``'s offsets of its ascent variables among ``variables`` (zeros when ``active`` is False).

        ``ascent(kernels)`` gives this replica's base-objective gradient; it is
        all-reduced across replicas outside of any conditional (a cross-replica
        sum cannot sit inside ``tf.cond``), so every replica applies the same
        offsets. A zero gradient gives zero offsets exactly.
        """
        kernels = term.ascent_variables(variables)
        if active is True:
            grads = ascent(kernels)
        else:
            grads = tf.cond(active, lambda: ascent(kernels), lambda: [tf.zeros_like(k.value) for k in kernels])
        grads = objective_lib.all_reduce_sum(grads)
        return term.weight_perturbation([k.value for k in kernels], grads)

    def perturb(self, variables, iterations, ascent):
        """Applies every perturbing term's offsets (after its warm-up); returns what :meth:`restore` undoes."""
        applied = []
        for term in self.terms:
            chosen = term.ascent_variables(variables)
            if not chosen:
                continue
            active = iterations >= term.warmup_epochs() * (self.steps_per_epoch or 1)
            offsets = self.weight_perturbation(term, variables, active, ascent)
            saved = snapshot(chosen)
            assign_offset(chosen, saved, offsets)
            applied.append((term, chosen, saved, offsets))
        return applied

    @staticmethod
    def restore(applied) -> dict:
        """Restores the weights exactly (last perturbation first); returns the terms' perturbation statistics."""
        statistics = {}
        for term, variables, saved, offsets in reversed(applied):
            restore(variables, saved)
            statistics.update(term.perturbation_statistics(saved, offsets))
        return statistics

    # -- 3. soft targets --------------------------------------------------------

    def record(self, logits_clean, logits_adv, y, mean) -> list:
        return [t.record(logits_clean, logits_adv, y, mean) for t in self.terms]

    def soft_targets(self, network, logits_clean, logits_adv, y, recorded, tape):
        """Every term's per-example soft targets from statistics summed across replicas, and their metrics."""
        targets, extra = [], {}
        for term, record in zip(self.terms, recorded):
            statistics = term.statistics(network, logits_clean, logits_adv, y, record, tape)
            if statistics:
                statistics = objective_lib.all_reduce_sum(statistics)
            target, metrics = term.soft_targets(statistics, y)
            targets.append(target)
            extra.update(metrics)
        return targets, extra

    def targets(self, stats, y) -> list:
        """The soft targets from statistics already summed over the batch (one list per term)."""
        return [t.soft_targets(st, y)[0] for t, st in zip(self.terms, stats)]

    def batch_statistics(self, network, forward, batches, x, x_adv, y, mean):
        """The terms' statistics summed over the micro-batches and across replicas, and their metrics.

        ``forward(x, x_adv)`` gives ``(logits_clean, logits_adv)`` in training
        mode; ``mean(per_example, fraction)`` a micro-batch's share of the
        batch mean. BatchNorm state is restored after each micro-batch.
        """
        state = network.non_trainable_variables
        counts = {}

        def statistics(f, xc, ac, yc):
            saved_state = snapshot(state)
            with tf.GradientTape(persistent=True, watch_accessed_variables=self.watches_variables) as tape:
                logits_clean, logits_adv = forward(xc, ac)
                recorded = self.record(logits_clean, logits_adv, yc, lambda v: mean(v, f))
            found = [t.statistics(network, logits_clean, logits_adv, yc, r, tape) for t, r in zip(self.terms, recorded)]
            del tape
            restore(state, saved_state)
            counts["per_term"] = [len(stats) for stats in found]
            return [tf.stop_gradient(s) for stats in found for s in stats], []

        summed = batches.run(statistics, [x, x_adv, y])[0] if self.has_statistics else []
        stats, extra = [], {}
        for term, count in zip(self.terms, counts.get("per_term", [0] * len(self.terms))):
            mine, summed = summed[:count], summed[count:]
            stats.append(objective_lib.all_reduce_sum(mine) if mine else [])
            extra.update(term.soft_targets(stats[-1], y)[1])
        return stats, extra


__all__ = ["WeightSpaceHooks"]

