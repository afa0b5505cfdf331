"""Attack names without TensorFlow: ``clean``, ``fgsm``, ``pgd20_ce``, ``standard``, ...

Split from :mod:`tfrobust.evaluation` (which imports TensorFlow) so that the
command line checks ``--attacks`` before TensorFlow is imported.
"""

from __future__ import annotations

import re

from tfrobust.errors import UserError

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20_ce", "pgd20_cw")
# The names of PGD (group 1: steps, group 2: loss) and of the cleverhans attacks.
PGD_NAME = re.compile(r"^pgd(\d+)_(ce|cw)$")
CLEVERHANS_NAME = re.compile(r"^cleverhans_(fgsm|pgd(\d+)|mim(\d+))$")


# The attacks' steps are unrolled when traced (a Python loop): far more would trace for minutes first.
MAX_STEPS = 1000

AUTOATTACK = ("apgd_ce", "apgd_t", "fab_t", "square")
# Further AutoAttack components that can be named alone (tfrobust.autoattack.ALL_ATTACKS).
AUTOATTACK_EXTRA = ("apgd_dlr", "fab", "apgd_ce_eot", "apgd_dlr_eot")
# Order in which named components run as one ensemble (standard's four keep their order).
COMPONENT_ORDER = ("apgd_ce", "apgd_ce_eot", "apgd_dlr", "apgd_dlr_eot", "apgd_t", "fab", "fab_t", "square")
ENSEMBLES = {"standard": AUTOATTACK, "fast": ("apgd_ce", "apgd_t"),
             "plus": ("apgd_ce", "apgd_dlr", "fab", "square", "apgd_t", "fab_t"), "rand": ("apgd_ce", "apgd_dlr")}
# Versions with budgets of their own: run alone, with tfrobust.autoattack.VERSION_ATTACKS.
OWN_BUDGET_VERSIONS = ("plus", "rand")


def attack_names_help() -> str:
    return ("clean, fgsm, pgd<N>_ce, pgd<N>_cw, apgd_ce, apgd_t, fab_t, square, apgd_dlr, fab, apgd_ce_eot, "
            "apgd_dlr_eot, standard, fast, plus, rand, cleverhans_fgsm, cleverhans_pgd<N>, cleverhans_mim<N>")


def parse_attacks(spec) -> list:
    """Parses ``"clean,fgsm,pgd20_ce"`` (or a list) into checked attack names."""
    names = [s.strip().lower().replace("-", "_") for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError(f"no attack given; allowed: {attack_names_help()}")
    for name in names:
        if name not in ("clean", "fgsm") + AUTOATTACK + AUTOATTACK_EXTRA + tuple(ENSEMBLES) and not (
                PGD_NAME.match(name) or CLEVERHANS_NAME.match(name)):
            raise UserError(f"unknown attack {name!r}; allowed: {attack_names_help()}")
        digits = re.findall(r"\d+", name)
        if digits and not 1 <= int(digits[0]) <= MAX_STEPS:
            raise UserError(f"attack {name!r}: the number of steps must be between 1 and {MAX_STEPS}")
    names = list(dict.fromkeys(names))
    own = [n for n in names if n in OWN_BUDGET_VERSIONS]
    others = [n for n in names if n in AUTOATTACK + AUTOATTACK_EXTRA or n in ENSEMBLES and n not in own]
    if own and (len(own) > 1 or others):
        raise UserError(f"AutoAttack version {own[0]!r} runs its own attacks and budgets; name it without other "
                        f"AutoAttack versions or components (got {', '.join(own + others)})")
    return names


__all__ = ["DEFAULT_ATTACKS", "MAX_STEPS", "PGD_NAME", "CLEVERHANS_NAME", "AUTOATTACK", "AUTOATTACK_EXTRA",
           "COMPONENT_ORDER", "ENSEMBLES",
           "OWN_BUDGET_VERSIONS", "attack_names_help", "parse_attacks"]
