"""Defenses as compositions: a base objective plus weight-space terms.

A defense name is a base objective (``at``, ``trades``, ``mart``) followed by
any of the weight-space terms (``awp``, ``s2o``, ``rat``), joined with ``+``:
``trades+awp``, ``mart+s2o``, ``trades+awp+rat``. Short names stand for the
papers' main settings: ``awp`` = ``at+awp``, ``s2o`` = ``at+s2o``, ``rat`` =
``trades+rat``. Each method lives in its own module of this package; adding a
method means adding a module, registering it here and its name in
:mod:`tfrobust.defense_names` (which the command line checks before importing
TensorFlow).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tfrobust.defenses import at, awp, mart, rat, s2o, trades
from tfrobust.defense_names import BASE_NAMES, DEFENSES, SHORT_NAMES, TERMS, canonical_name, check_defense_name
from tfrobust.errors import UserError

__all__ = ["BASES", "DEFENSES", "Defense", "SHORT_NAMES", "TERMS", "canonical_name", "parse_defense"]

BASES = dict(zip(BASE_NAMES, (at, trades, mart)))


@dataclasses.dataclass(frozen=True)
class Defense:
    """A resolved defense: which parts are on and their hyperparameters."""

    name: str
    base: str
    beta: Optional[float]
    awp: bool = False
    awp_gamma: float = 0.0
    awp_warmup_epochs: int = 0
    s2o: bool = False
    s2o_a: float = 0.0
    rat: bool = False
    rat_alpha: float = 0.2
    rat_sigma: float = 1e-4
    rat_reference_quirk: bool = False

    @property
    def objective(self):
        """The module of the base objective (``at``, ``trades`` or ``mart``)."""
        return BASES[self.base]

    @property
    def needs_clean_logits(self) -> bool:
        return self.objective.NEEDS_CLEAN_LOGITS or self.s2o or self.rat

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self)


def parse_defense(name: str, config=None) -> Defense:
    """Resolves a defense name and a :class:`~tfrobust.config.DefenseConfig`.

    Hyperparameters left as None in the config take the papers' default for
    the chosen base (AWP gamma and warm-up, S2O's a, TRADES/MART beta).
    """
    from tfrobust.config import DefenseConfig

    config = config or DefenseConfig()
    canonical = check_defense_name(name)
    parts = canonical.split("+")
    base, terms = parts[0], set(parts[1:])
    module = BASES[base]
    beta = config.beta if config.beta is not None else module.DEFAULT_BETA
    if beta is not None and beta < 0:
        raise UserError("defense.beta must be >= 0")
    gamma = config.awp.gamma if config.awp.gamma is not None else awp.DEFAULT_GAMMA[base]
    warmup = config.awp.warmup_epochs if config.awp.warmup_epochs is not None else awp.DEFAULT_WARMUP_EPOCHS[base]
    a = config.s2o.a if config.s2o.a is not None else s2o.DEFAULT_A[base]
    if gamma < 0 or warmup < 0 or not 0 <= a <= 1:
        raise UserError("defense.awp.gamma and defense.awp.warmup_epochs must be >= 0 and defense.s2o.a in [0, 1]")
    if config.rat.sigma < 0 or not 0 <= config.rat.alpha <= 1:
        raise UserError("defense.rat.sigma must be >= 0 and defense.rat.alpha in [0, 1]")
    return Defense(
        name=canonical,
        base=base,
        beta=beta,
        awp="awp" in terms,
        awp_gamma=float(gamma),
        awp_warmup_epochs=int(warmup),
        s2o="s2o" in terms,
        s2o_a=float(a),
        rat="rat" in terms,
        rat_alpha=float(config.rat.alpha),
        rat_sigma=float(config.rat.sigma),
        rat_reference_quirk=bool(config.rat.reference_quirk),
    )
