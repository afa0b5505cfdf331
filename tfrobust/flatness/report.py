"""All four flatness measures of Stutz et al. (ICCV 2021) in one JSON-serialisable report."""

from __future__ import annotations

import time
from typing import Dict, Mapping, Optional, Union

from tfrobust import weight_space as ws
from tfrobust.attacks import NORMS
from tfrobust.errors import UserError, unknown_choice
from tfrobust.flatness.loss import RobustLossEvaluator, evaluation_data, robust_loss
from tfrobust.flatness.measures import average_case_flatness, worst_case_flatness
from tfrobust.flatness.settings import FlatnessSettings, report_settings

__all__ = ["flatness_report"]


def flatness_report(model, x, y, eps: float, norm: str = "linf",
                    settings: Union[None, Mapping, FlatnessSettings] = None, seed: int = 0,
                    progress: bool = True) -> Dict:
    """All four flatness measures of Stutz et al., ICCV 2021 ((F2) and (F3), robust and clean) with their settings.

    Evaluated on the first ``settings["examples"]`` (default 1000, as in the
    paper) examples of ``(x, y)``. ``settings`` is a
    :class:`~tfrobust.flatness.FlatnessSettings` or a mapping that overrides
    :data:`~tfrobust.flatness.REPORT_DEFAULTS`: top-level ``examples``,
    ``batch_size``, ``step_size`` (None:
    :func:`~tfrobust.flatness.resolve_step_size`), ``steps``, ``restarts``,
    ``measures`` (a subset of ``average``, ``worst``, ``average_clean``,
    ``worst_clean``) and one mapping per measure (e.g. ``{"average": {"xi":
    0.25, "samples": 5}}``). Every setting is checked before anything is
    computed. ``RLoss(w)`` and the clean loss at ``w`` are computed once and
    shared by the measures. The result is JSON-serialisable: ``{"eps",
    "norm", "seed", "examples", "settings", "robust_loss", "clean_loss",
    "seconds", "<measure>": {... as returned by the measure ...}}``.
    """
    if norm not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    resolved = report_settings(settings, eps)
    x, y = evaluation_data(x, y)
    if resolved.examples is not None:
        x, y = x[: int(resolved.examples)], y[: int(resolved.examples)]
    n = int(x.shape[0])
    report = {"eps": float(eps), "norm": norm, "seed": int(seed), "examples": n, "settings": resolved.as_dict(),
              "seconds": {}}
    measures = list(resolved.measures)
    robust_measures = [m for m in measures if not m.endswith("_clean")]
    clean_measures = [m for m in measures if m.endswith("_clean")]

    def attack_key(s):
        return (s.steps, s.step_size, s.restarts, s.batch_size)

    start = time.time()
    rloss = {}
    for m in robust_measures:
        s = getattr(resolved, m)
        if attack_key(s) not in rloss:
            rloss[attack_key(s)] = robust_loss(model, x, y, eps, s.step_size, s.steps, s.restarts, norm,
                                               s.batch_size, seed)
    clean_loss = None
    if clean_measures or not robust_measures:
        ws.ensure_built(model, x)
        with ws.weights_preserved(model):
            clean_loss = RobustLossEvaluator(model, 0.0, 0.0, 0, 1, norm, resolved.batch_size, seed,
                                             False).mean(x, y)
    report["seconds"]["reference_losses"] = time.time() - start
    report["robust_loss"] = next(iter(rloss.values())) if rloss else None
    report["clean_loss"] = clean_loss
    for m in measures:
        s = getattr(resolved, m)
        start = time.time()
        if m == "average":
            res = average_case_flatness(model, x, y, xi=s.xi, samples=s.samples, eps=eps, step_size=s.step_size,
                                        steps=s.steps, restarts=s.restarts, norm=norm, seed=seed,
                                        batch_size=s.batch_size, reference_loss=rloss[attack_key(s)],
                                        progress=progress)
        elif m == "average_clean":
            res = average_case_flatness(model, x, y, xi=s.xi, samples=s.samples, clean=True, norm=norm, seed=seed,
                                        batch_size=s.batch_size, reference_loss=clean_loss, progress=progress)
        elif m == "worst":
            res = worst_case_flatness(model, x, y, xi=s.xi, attempts=s.attempts, passes=s.passes, eps=eps,
                                      step_size=s.step_size, weight_step=s.weight_step, steps=s.steps,
                                      restarts=s.restarts, norm=norm, seed=seed, batch_size=s.batch_size,
                                      reference_loss=rloss[attack_key(s)], progress=progress)
        else:
            res = worst_case_flatness(model, x, y, xi=s.xi, attempts=s.attempts, passes=s.passes,
                                      weight_step=s.weight_step, clean=True, norm=norm, seed=seed,
                                      batch_size=s.batch_size, reference_loss=clean_loss, progress=progress)
        report["seconds"][m] = time.time() - start
        report[m] = res
    return report
