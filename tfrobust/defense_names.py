"""Defense names without TensorFlow: parsing and checking ``at+awp``-style names.

Split from :mod:`tfrobust.defenses` (whose modules import TensorFlow) so that
the command line refuses a misspelt name before TensorFlow is imported.
"""

from __future__ import annotations

from tfrobust.errors import UserError, unknown_choice

BASE_NAMES = ("at", "trades", "mart")
TERMS = ("awp", "s2o", "rat")
SHORT_NAMES = {"awp": "at+awp", "s2o": "at+s2o", "rat": "trades+rat"}
# The combinations the papers define; the others are refused with a reason.
DEFENSES = (
    "at", "trades", "mart",
    "at+awp", "trades+awp", "mart+awp",
    "at+s2o", "trades+s2o", "mart+s2o", "trades+awp+s2o",
    "trades+rat", "trades+awp+rat",
)


def canonical_name(name: str) -> str:
    """Normalises a defense name: short names expanded, terms in a fixed order."""
    name = str(name).strip().lower().replace(" ", "")
    name = SHORT_NAMES.get(name, name)
    parts = name.split("+")
    if parts[0] not in BASE_NAMES:
        if parts[0] in TERMS:
            raise UserError(
                f"defense {name!r} must start with a base objective (at, trades, mart), e.g. at+{parts[0]}"
            )
        raise unknown_choice("defense", name, DEFENSES + tuple(SHORT_NAMES))
    terms = parts[1:]
    for t in terms:
        if t not in TERMS:
            raise unknown_choice(f"weight-space term in defense {name!r}:", t, TERMS)
    if len(set(terms)) != len(terms):
        raise UserError(f"defense {name!r} names a term twice")
    ordered = [parts[0]] + [t for t in TERMS if t in terms]
    return "+".join(ordered)


def check_defense_name(name: str) -> str:
    """The canonical name of a defense the papers define, or a UserError saying why not."""
    canonical = canonical_name(name)
    parts = canonical.split("+")
    base, terms = parts[0], set(parts[1:])
    if "rat" in terms and base != "trades":
        raise UserError(f"defense {canonical!r} is not defined: RAT builds on TRADES (use trades+rat or trades+awp+rat)")
    if "rat" in terms and "s2o" in terms:
        raise UserError(f"defense {canonical!r} is not defined: RAT and S2O both replace the soft targets; choose one")
    return canonical


__all__ = ["BASE_NAMES", "TERMS", "SHORT_NAMES", "DEFENSES", "canonical_name", "check_defense_name"]
