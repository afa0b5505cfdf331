"""FGSM adversarial training (Goodfellow et al., ICLR 2015; the base of GradAlign, Andriushchenko and Flammarion 2020).

AT's objective ``CE(f(x'), y)`` on one signed gradient step of size eps
from ``x`` itself (no random start), projected onto the eps-ball and [0, 1]
(docs/algorithms.md, section "Single-step adversarial training").
"""

from tfrobust.defenses.at import (  # noqa: F401 - AT's objective and its declarations
    CE_LOGITS, CE_TERM, DEFAULT_BETA, LABEL_FREE_TERM, NEEDS_CLEAN_LOGITS, TERM_NAMES, loss_terms,
)

NAME = "fgsm"
TRAINING_ATTACK = "single_step"  # one signed step (attacks.single_step), not PGD
ATTACK_LOSS = "ce"
ATTACK_START = "none"
START_RADIUS = 0.0  # the random start's radius, in units of eps
STEP = 1.0  # the step, in units of eps
PROJECT_TO_BALL = True

__all__ = ["NAME", "TRAINING_ATTACK", "ATTACK_LOSS", "ATTACK_START", "START_RADIUS", "STEP", "PROJECT_TO_BALL",
           "NEEDS_CLEAN_LOGITS", "LABEL_FREE_TERM", "DEFAULT_BETA", "TERM_NAMES", "CE_TERM", "CE_LOGITS", "loss_terms"]
