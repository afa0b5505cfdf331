"""PGD adversarial training (Madry et al., ICLR 2018, eq. 2.1).

Outer objective ``L = CE(f(x'), y)``; the inner attack is PGD on the
cross-entropy from a uniform random start (docs/algorithms.md, sections 1 and 2).
"""

from tfrobust.attacks import cross_entropy

NAME = "at"
ATTACK_LOSS = "ce"
ATTACK_START = "uniform"
NEEDS_CLEAN_LOGITS = False
LABEL_FREE_TERM = False  # no term that examples without a label (-1) can enter
DEFAULT_BETA = None
TERM_NAMES = ("ce_adv",)  # the per-example terms loss_terms() reports
CE_TERM = "ce_adv"  # the cross-entropy term that label smoothing and unlabelled examples change
CE_LOGITS = "adversarial"  # the logits of that term


def loss_terms(logits_clean, logits_adv, y, beta=None):
    """Per-example ``(primary, regulariser, terms)`` of PGD-AT.

    ``primary`` is the classification term that S2O rescales by ``1 - a``;
    AT has no regulariser (zeros).
    """
    ce = cross_entropy(logits_adv, y)
    return ce, 0.0 * ce, {"ce_adv": ce}


__all__ = ["NAME", "ATTACK_LOSS", "ATTACK_START", "NEEDS_CLEAN_LOGITS", "LABEL_FREE_TERM", "DEFAULT_BETA", "TERM_NAMES", "CE_TERM", "CE_LOGITS", "loss_terms"]
