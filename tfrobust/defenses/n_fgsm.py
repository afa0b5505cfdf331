"""N-FGSM (de Jorge et al., NeurIPS 2022; pdejorge/N-FGSM): noise of 2 eps, one step of eps, no projection.

AT's objective ``CE(f(x'), y)`` with ``x' = clip(x0 + eps sign(grad CE(x0)), 0, 1)``,
``x0 = clip(x + U(-2 eps, 2 eps), 0, 1)``: ``x'`` is not projected onto the
eps-ball and may lie up to 3 eps from ``x`` (docs/algorithms.md, section
"Single-step adversarial training").
"""

from tfrobust.defenses.fgsm import (  # noqa: F401 - AT's objective and the single-step attack's declarations
    ATTACK_LOSS, CE_LOGITS, CE_TERM, DEFAULT_BETA, LABEL_FREE_TERM, NEEDS_CLEAN_LOGITS, TERM_NAMES, TRAINING_ATTACK,
    loss_terms,
)
from tfrobust.defenses.fgsm import __all__  # noqa: F401 - the same names

NAME = "n_fgsm"
ATTACK_START, START_RADIUS = "uniform", 2.0  # the random start and its radius in units of eps
STEP, PROJECT_TO_BALL = 1.0, False  # k = 2: U(-2 eps, 2 eps); alpha = eps
