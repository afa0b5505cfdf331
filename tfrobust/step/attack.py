"""The training attack of a step: PGD for AT, TRADES and MART, one signed step for the single-step bases.

A base module with ``TRAINING_ATTACK = "single_step"`` (``fgsm``, ``fgsm_rs``,
``n_fgsm``) declares its start's radius and its step in units of eps and
whether the step is projected onto the eps-ball (docs/algorithms.md,
section 18); every other base trains on PGD with the step's settings.
"""

from __future__ import annotations

from tfrobust import attacks


def single_step_base(base) -> bool:
    """Whether a base objective's module trains on one signed step (FGSM, FGSM-RS, N-FGSM) rather than PGD."""
    return getattr(base, "TRAINING_ATTACK", "pgd") == "single_step"


def start_radius(base, settings, pgd: bool = False) -> float:
    """The radius of the attack's random start: eps, or the single-step base's multiple of it (unless ``pgd``)."""
    return settings.eps * base.START_RADIUS if single_step_base(base) and not pgd else settings.eps


def training_attack(defense, settings, model_fn, x, y, x_init, gradient_scale, pgd: bool = False):
    """The base objective's training attack from ``x_init`` (:func:`tfrobust.attacks.pgd` or
    :func:`tfrobust.attacks.single_step`); ``pgd``: PGD with the step's settings whatever the base (after a
    rollback from catastrophic overfitting, :mod:`tfrobust.collapse`)."""
    s, base = settings, defense.objective
    if single_step_base(base) and not pgd:
        return attacks.single_step(model_fn, x, y, s.eps, s.eps * base.STEP, x_init, base.PROJECT_TO_BALL,
                                   gradient_scale)
    return attacks.pgd(
        model_fn, x, y, s.eps, s.step_size, s.steps, norm=s.norm, loss=base.ATTACK_LOSS,
        x_init=x_init, gradient_scale=gradient_scale,
        project_start=defense.attack_start != "gaussian_unclipped",
    )


def training_attack_name(base, settings) -> str:
    """The training attack in words: ``PGD-10 (linf) eps 0.0314, step 0.00784`` or the single-step attack."""
    s = settings
    if not single_step_base(base):
        return f"PGD-{s.steps} ({s.norm}) eps {s.eps:.6g}, step {s.step_size:.6g}"
    start = f"uniform start of {base.START_RADIUS:g} eps" if base.ATTACK_START != "none" else "no random start"
    ball = "projected onto the eps-ball" if base.PROJECT_TO_BALL else "not projected onto the eps-ball"
    return f"one step of {base.STEP:g} eps (linf) eps {s.eps:.6g}, {start}, {ball}"


__all__ = ["single_step_base", "start_radius", "training_attack", "training_attack_name"]
