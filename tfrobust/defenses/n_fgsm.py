"""N-FGSM (de Jorge et al., NeurIPS 2022; pdejorge/N-FGSM): noise of 2 eps, one step of eps, no projection.

AT's objective ``CE(f(x'), y)`` with ``x' = clip(x0 + eps sign(grad CE(x0)), 0, 1)``,
``x0 = clip(x + U(-2 eps, 2 eps), 0, 1)``: ``x'`` is not projected onto the
eps-ball and may lie up to 3 eps from ``x`` (docs/algorithms.md, section
"Single-step adversarial training").
"""

from tfrobust.defenses.at import (  # noqa: F401 - AT's objective and its declarations
    CE_LOGITS, CE_TERM, DEFAULT_BETA, LABEL_FREE_TERM, NEEDS_CLEAN_LOGITS, TERM_NAMES, loss_terms,
)

NAME = "n_fgsm"
TRAINING_ATTACK = "single_step"  # one signed step (attacks.single_step), not PGD
ATTACK_LOSS = "ce"
ATTACK_START = "uniform"
START_RADIUS = 2.0  # k = 2: U(-2 eps, 2 eps)
STEP = 1.0  # alpha = eps
PROJECT_TO_BALL = False

__all__ = ["NAME", "TRAINING_ATTACK", "ATTACK_LOSS", "ATTACK_START", "START_RADIUS", "STEP", "PROJECT_TO_BALL",
           "NEEDS_CLEAN_LOGITS", "LABEL_FREE_TERM", "DEFAULT_BETA", "TERM_NAMES", "CE_TERM", "CE_LOGITS", "loss_terms"]
