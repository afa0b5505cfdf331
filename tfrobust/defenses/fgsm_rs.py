"""FGSM with a random start, "fast adversarial training" (Wong, Rice and Kolter, ICLR 2020; locuslab/fast_adversarial).

AT's objective ``CE(f(x'), y)`` with ``x' = P(x0 + 1.25 eps sign(grad CE(x0)))``,
``x0 = clip(x + U(-eps, eps), 0, 1)``, ``P`` the projection onto the eps-ball
and then [0, 1] (docs/algorithms.md, section "Single-step adversarial training").
"""

from tfrobust.defenses.fgsm import (  # noqa: F401 - AT's objective and the single-step attack's declarations
    ATTACK_LOSS, CE_LOGITS, CE_TERM, DEFAULT_BETA, LABEL_FREE_TERM, NEEDS_CLEAN_LOGITS, TERM_NAMES, TRAINING_ATTACK,
    loss_terms,
)
from tfrobust.defenses.fgsm import __all__  # noqa: F401 - the same names

NAME = "fgsm_rs"
ATTACK_START, START_RADIUS = "uniform", 1.0  # the random start and its radius in units of eps
STEP, PROJECT_TO_BALL = 1.25, True  # alpha = 10/255 at eps 8/255
