"""TRADES (Zhang et al., ICML 2019, eq. 5; reference yaodongyu/TRADES trades.py).

``L = CE(f(x), y) + beta * KL(p(x) || p(x'))``, beta = 6, with no stop-gradient
on either branch. The inner attack ascends ``KL(p(x) || p(x'))`` from
``x + 0.001 N(0, 1)``, clipped to [0, 1] unless the defense asks for the
reference's unclipped start (docs/algorithms.md, sections 1 and 2; section 9
lists the deviations from the reference code).
"""

from tfrobust.attacks import cross_entropy, kl_divergence

NAME = "trades"
ATTACK_LOSS = "trades_kl"
ATTACK_START = "gaussian"
NEEDS_CLEAN_LOGITS = True
LABEL_FREE_TERM = True  # KL(p(x) || p(x')) needs no label: unlabelled examples (-1) enter it alone
DEFAULT_BETA = 6.0
TERM_NAMES = ("ce_clean", "kl")  # the per-example terms loss_terms() reports
CE_TERM = "ce_clean"  # the cross-entropy term that label smoothing and unlabelled examples change
CE_LOGITS = "clean"  # the logits of that term


def loss_terms(logits_clean, logits_adv, y, beta=DEFAULT_BETA):
    """Per-example ``(primary, regulariser, terms)``: CE on clean inputs and beta * KL."""
    ce = cross_entropy(logits_clean, y)
    kl = kl_divergence(logits_clean, logits_adv)
    return ce, beta * kl, {"ce_clean": ce, "kl": kl}


__all__ = ["NAME", "ATTACK_LOSS", "ATTACK_START", "NEEDS_CLEAN_LOGITS", "LABEL_FREE_TERM", "DEFAULT_BETA", "TERM_NAMES", "CE_TERM", "CE_LOGITS", "loss_terms"]
