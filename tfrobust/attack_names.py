"""Attack names without TensorFlow: ``clean``, ``fgsm``, ``pgd20_ce``, ``standard``, ...

Split from :mod:`tfrobust.evaluation` (which imports TensorFlow) so that the
command line checks ``--attacks`` before TensorFlow is imported.
"""

from __future__ import annotations

import re

from tfrobust.errors import UserError

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20_ce", "pgd20_cw")
_PGD = re.compile(r"^pgd(\d+)_(ce|cw)$")
_CLEVERHANS = re.compile(r"^cleverhans_(fgsm|pgd(\d+)|mim(\d+))$")


# The attacks' steps are unrolled when traced (a Python loop): far more would trace for minutes first.
MAX_STEPS = 1000

AUTOATTACK = ("apgd_ce", "apgd_t", "fab_t", "square")
ENSEMBLES = {"standard": AUTOATTACK, "fast": ("apgd_ce", "apgd_t")}


def attack_names_help() -> str:
    return ("clean, fgsm, pgd<N>_ce, pgd<N>_cw, apgd_ce, apgd_t, fab_t, square, standard, fast, "
            "cleverhans_fgsm, cleverhans_pgd<N>, cleverhans_mim<N>")


def parse_attacks(spec) -> list:
    """Parses ``"clean,fgsm,pgd20_ce"`` (or a list) into checked attack names."""
    names = [s.strip().lower().replace("-", "_") for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError(f"no attack given; allowed: {attack_names_help()}")
    for name in names:
        if name not in ("clean", "fgsm") + AUTOATTACK + tuple(ENSEMBLES) and not (_PGD.match(name) or _CLEVERHANS.match(name)):
            raise UserError(f"unknown attack {name!r}; allowed: {attack_names_help()}")
        digits = re.findall(r"\d+", name)
        if digits and not 1 <= int(digits[0]) <= MAX_STEPS:
            raise UserError(f"attack {name!r}: the number of steps must be between 1 and {MAX_STEPS}")
    return list(dict.fromkeys(names))


__all__ = ["DEFAULT_ATTACKS", "MAX_STEPS", "AUTOATTACK", "ENSEMBLES", "attack_names_help", "parse_attacks"]
