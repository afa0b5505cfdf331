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


BASES = dict(zip(BASE_NAMES, (at, trades, mart)))


# Module constants read in the class body, where the field ``rat`` shadows the module.
_RAT_ALPHA, _RAT_SIGMA = rat.DEFAULT_ALPHA, rat.DEFAULT_SIGMA


@dataclasses.dataclass(frozen=True)
class Defense:
    """A defense: a name such as ``"trades+awp"`` and its hyperparameters.

    Built from a name with keyword overrides; every hyperparameter left as
    None takes the papers' default for the base objective::

        Defense("trades+awp")                     # beta 6, gamma 0.005, 10 warm-up epochs
        Defense("trades+awp", awp_gamma=0.01, awp_warmup_epochs=0)
        Defense("mart", unclipped_gaussian_start=True)

    Fields:
      name: the defense (short names and any order accepted; stored canonical).
      base, awp, s2o, rat: derived from the name (passing them is allowed
        only when they agree with it).
      beta: TRADES/MART regulariser weight (6; unused by AT).
      awp_gamma: AWP's relative perturbation size (0.01 for AT/MART, 0.005 for TRADES).
      awp_warmup_epochs: epochs without weight perturbation (0 for AT/MART, 10 for TRADES);
        a :class:`~tfrobust.trainer.RobustModel` needs ``steps_per_epoch`` to count them.
      s2o_a: S2O's weight ``a`` (0.1 for AT, 0.3 for TRADES/MART).
      rat_alpha, rat_sigma: RAT's Taylor-term weight (0.2) and weight-noise std (1e-4).
      rat_reference_quirk: reproduce the reference's ``yy1`` (docs/algorithms.md, section 9, item 8).
      unclipped_gaussian_start: start the TRADES/MART/RAT attack at
        ``x + 0.001 N(0, 1)`` without clipping to [0, 1], as the reference code
        does; the default clips (docs/algorithms.md, section 9, item 1).
    """

    name: str
    base: Optional[str] = None
    beta: Optional[float] = None
    awp: Optional[bool] = None
    awp_gamma: Optional[float] = None
    awp_warmup_epochs: Optional[int] = None
    s2o: Optional[bool] = None
    s2o_a: Optional[float] = None
    rat: Optional[bool] = None
    rat_alpha: float = _RAT_ALPHA
    rat_sigma: float = _RAT_SIGMA
    rat_reference_quirk: bool = False
    unclipped_gaussian_start: bool = False

    def __post_init__(self):
        canonical = check_defense_name(self.name)
        parts = canonical.split("+")
        base, terms = parts[0], set(parts[1:])
        derived = {"base": base, "awp": "awp" in terms, "s2o": "s2o" in terms, "rat": "rat" in terms}
        for key, value in derived.items():
            given = getattr(self, key)
            if given is not None and given != value:
                raise UserError(f"defense {canonical!r} has {key}={value!r}, not {given!r}; change the name instead")
        module = BASES[base]
        values = dict(
            derived,
            name=canonical,
            beta=self.beta if self.beta is not None else module.DEFAULT_BETA,
            awp_gamma=float(self.awp_gamma if self.awp_gamma is not None else awp.DEFAULT_GAMMA[base]),
            awp_warmup_epochs=self.awp_warmup_epochs if self.awp_warmup_epochs is not None else awp.DEFAULT_WARMUP_EPOCHS[base],
            s2o_a=float(self.s2o_a if self.s2o_a is not None else s2o.DEFAULT_A[base]),
            rat_alpha=float(self.rat_alpha),
            rat_sigma=float(self.rat_sigma),
            rat_reference_quirk=bool(self.rat_reference_quirk),
            unclipped_gaussian_start=bool(self.unclipped_gaussian_start),
        )
        if values["beta"] is not None:
            values["beta"] = float(values["beta"])
            if values["beta"] < 0:
                raise UserError("defense.beta must be >= 0")
        warmup = values["awp_warmup_epochs"]
        if isinstance(warmup, bool) or int(warmup) != warmup:
            raise UserError(f"defense.awp.warmup_epochs must be a whole number of epochs, got {warmup!r}")
        values["awp_warmup_epochs"] = int(warmup)
        if values["awp_gamma"] < 0 or values["awp_warmup_epochs"] < 0 or not 0 <= values["s2o_a"] <= 1:
            raise UserError("defense.awp.gamma and defense.awp.warmup_epochs must be >= 0 and defense.s2o.a in [0, 1]")
        if values["rat_sigma"] < 0 or not 0 <= values["rat_alpha"] <= 1:
            raise UserError("defense.rat.sigma must be >= 0 and defense.rat.alpha in [0, 1]")
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @property
    def objective(self):
        """The module of the base objective (``at``, ``trades`` or ``mart``)."""
        return BASES[self.base]

    @property
    def needs_clean_logits(self) -> bool:
        return self.objective.NEEDS_CLEAN_LOGITS or self.s2o or self.rat

    @property
    def attack_start(self) -> str:
        """The random start of the training attack: ``uniform``, ``gaussian`` or ``gaussian_unclipped``."""
        start = self.objective.ATTACK_START
        if start == "gaussian" and self.unclipped_gaussian_start:
            return "gaussian_unclipped"
        return start

    def hyperparameters(self) -> dict:
        """Every field as a plain dict; ``Defense(**d.hyperparameters()) == d``."""
        return dataclasses.asdict(self)


def parse_defense(name: str, config=None) -> Defense:
    """Resolves a defense name and a :class:`~tfrobust.config.DefenseConfig`.

    Hyperparameters left as None in the config take the papers' default for
    the chosen base (AWP gamma and warm-up, S2O's a, TRADES/MART beta).
    ``parse_defense(name)`` equals ``Defense(name)``.
    """
    from tfrobust.config import DefenseConfig

    config = config or DefenseConfig()
    return Defense(
        name,
        beta=config.beta,
        awp_gamma=config.awp.gamma,
        awp_warmup_epochs=config.awp.warmup_epochs,
        s2o_a=config.s2o.a,
        rat_alpha=config.rat.alpha,
        rat_sigma=config.rat.sigma,
        rat_reference_quirk=config.rat.reference_quirk,
        unclipped_gaussian_start=config.unclipped_gaussian_start,
    )


__all__ = [
    "Defense", "parse_defense", "canonical_name", "DEFENSES", "BASES", "TERMS", "SHORT_NAMES",
    "at", "trades", "mart", "awp", "s2o", "rat",
]
