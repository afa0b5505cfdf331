"""Flatness of the (robust) loss in weight space.

Implements the scale-invariant flatness measures of Stutz, Hein and Schiele,
"Relating Adversarially Robust Generalization to Flat Minima", ICCV 2021
(arXiv:2104.04448; docs/algorithms.md, section 6). The paper's definitions, as
numbered in this package:

(F1) robust loss
     ``RLoss(w) = 1/N sum_n max_{||delta_n|| <= eps} CE(f(x_n + delta_n; w), y_n)``,
     approximated with PGD and random restarts;
(F2) average-case flatness
     ``E_nu[RLoss(w + nu)] - RLoss(w)``, ``nu`` uniform on the per-layer
     sphere ``||nu_l||_2 = xi * ||w_l||_2``;
(F3) worst-case flatness
     ``max_{nu in B_xi(w)} max_delta L(w + nu, x + delta) - RLoss(w)`` with
     ``B_xi(w) = {nu : ||nu_l||_2 <= xi * ||w_l||_2 for every layer l}``, one
     ``nu`` shared by the whole evaluation set and optimised jointly with the
     per-example ``delta``;

and the clean counterparts of (F2) and (F3) (``delta = 0``).

"Layers" are the individual trainable variables (kernels and biases
separately), excluding those of normalisation layers, as in the paper and its
reference code. Because every perturbation is relative to the norm of the
variable it perturbs, both measures are invariant to rescaling a ReLU layer
by ``k`` and the next one by ``1/k``.

All measures take a Keras model mapping images in [0, 1] to logits and always
call it with ``training=False``, so BatchNormalization uses (and never
updates) its moving statistics. Every variable of the model is saved before a
measurement and restored in a ``finally`` block, so the model is bitwise
unchanged afterwards, also when the measurement raises.

Randomness is stateless: the same ``seed`` gives the same PGD starts and the
same weight perturbations. The PGD start of example batch ``b`` and restart
``r`` depends only on ``(seed, r, b)``, so ``RLoss(w)`` and every
``RLoss(w + nu)`` are computed with common random starts (this lowers the
variance of their difference and leaves its expectation unchanged).

The package, one job per module (every public name is importable from
``tfrobust.flatness``):
  - :mod:`tfrobust.flatness.loss`: ``robust_loss``, the reusable
    ``RobustLossEvaluator``, the reference's attack defaults and input checks;
  - :mod:`tfrobust.flatness.measures`: ``average_case_flatness``,
    ``worst_case_flatness``;
  - :mod:`tfrobust.flatness.settings`: ``FlatnessSettings`` (typed report
    settings with the reference's defaults) and ``REPORT_DEFAULTS``;
  - :mod:`tfrobust.flatness.report`: ``flatness_report``;
  - :mod:`tfrobust.flatness.monitor`: the ``FlatnessMonitor`` callback.

Which variables are perturbed, how perturbations are drawn and projected, and
the exact restore of the weights live in :mod:`tfrobust.weight_space`;
``perturbable_variables``, ``sample_sphere_perturbation``,
``sample_ball_perturbation`` and ``project_perturbation`` are re-exported here.
"""

from tfrobust.flatness.loss import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    DEFAULT_STEP_SIZE,
    DEFAULT_STEPS,
    STEP_FRACTION,
    RobustLossEvaluator,
    batch_bounds,
    check_attack_settings,
    evaluation_data,
    progress_bar,
    resolve_step_size,
    robust_loss,
)
from tfrobust.flatness.measures import average_case_flatness, worst_case_flatness
from tfrobust.flatness.monitor import FlatnessMonitor
from tfrobust.flatness.report import flatness_report
from tfrobust.flatness.settings import (
    REPORT_DEFAULTS,
    AverageCaseCleanSettings,
    AverageCaseSettings,
    FlatnessSettings,
    WorstCaseCleanSettings,
    WorstCaseSettings,
)
from tfrobust.weight_space import (
    perturbable_variables,
    project_perturbation,
    sample_ball_perturbation,
    sample_sphere_perturbation,
)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_STEP_SIZE",
    "DEFAULT_STEPS",
    "DEFAULT_BATCH_SIZE",
    "REPORT_DEFAULTS",
    "STEP_FRACTION",
    "resolve_step_size",
    "check_attack_settings",
    "evaluation_data",
    "batch_bounds",
    "progress_bar",
    "perturbable_variables",
    "sample_sphere_perturbation",
    "sample_ball_perturbation",
    "project_perturbation",
    "RobustLossEvaluator",
    "robust_loss",
    "average_case_flatness",
    "worst_case_flatness",
    "FlatnessSettings",
    "AverageCaseSettings",
    "AverageCaseCleanSettings",
    "WorstCaseSettings",
    "WorstCaseCleanSettings",
    "flatness_report",
    "FlatnessMonitor",
]
