"""FGSM with a random start, "fast adversarial training" (Wong, Rice and Kolter, ICLR 2020; locuslab/fast_adversarial).

AT's objective ``CE(f(x'), y)`` with ``x' = P(x0 + 1.25 eps sign(grad CE(x0)))``,
``x0 = clip(x + U(-eps, eps), 0, 1)``, ``P`` the projection onto the eps-ball
and then [0, 1] (docs/algorithms.md, section "Single-step adversarial training").
"""

from tfrobust.defenses.at import (  # noqa: F401 - AT's objective and its declarations
    CE_LOGITS, CE_TERM, DEFAULT_BETA, LABEL_FREE_TERM, NEEDS_CLEAN_LOGITS, TERM_NAMES, loss_terms,
)

NAME = "fgsm_rs"
TRAINING_ATTACK = "single_step"  # one signed step (attacks.single_step), not PGD
ATTACK_LOSS = "ce"
ATTACK_START = "uniform"
START_RADIUS = 1.0  # the random start's radius, in units of eps
STEP = 1.25  # alpha = 10/255 at eps 8/255
PROJECT_TO_BALL = True

__all__ = ["NAME", "TRAINING_ATTACK", "ATTACK_LOSS", "ATTACK_START", "START_RADIUS", "STEP", "PROJECT_TO_BALL",
           "NEEDS_CLEAN_LOGITS", "LABEL_FREE_TERM", "DEFAULT_BETA", "TERM_NAMES", "CE_TERM", "CE_LOGITS", "loss_terms"]
