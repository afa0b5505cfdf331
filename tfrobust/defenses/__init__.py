"""Defenses as compositions: a base objective plus weight-space terms.

A defense name is a base objective (``at``, ``trades``, ``mart``) followed by
any of the weight-space terms (``awp``, ``s2o``, ``rat``), joined with ``+``:
``trades+awp``, ``mart+s2o``, ``trades+awp+rat``. Short names stand for the
papers' main settings: ``awp`` = ``at+awp``, ``s2o`` = ``at+s2o``, ``rat`` =
``trades+rat``.

Each base objective is a module of pure functions (``at``, ``trades``,
``mart``, and the single-step ``fgsm``, ``fgsm_rs``, ``n_fgsm``, which train
AT's objective on one signed step). The input-space regularisers
``gradalign``, ``elle`` and ``elle_a`` are declared like terms and add a
penalty to the objective (:mod:`tfrobust.defenses.input_space`). Each weight-space term is a module with a
:class:`WeightSpaceTerm` subclass (``awp``, ``s2o``, ``rat``) whose hooks the
train step calls around the attack, before the update, for soft targets and
in the objective (:mod:`tfrobust.defenses.terms`). A new term is one module
and one :func:`register_term` call, which declares its name, its
hyperparameters with their defaults and its composition rules; from that
declaration come the accepted names, :class:`Defense`'s keywords
(``<term>_<hyperparameter>``) and the config's ``defense.<term>.*`` keys.
The built-in terms are registered in :mod:`tfrobust.defense_names`, which
imports no TensorFlow, so the command line checks names first; a term
registered later (``register_term("toy", ToyTerm, ...)``) is accepted by
``Defense("at+toy")`` in Python.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

from tfrobust.defenses import at, awp, mart, rat, s2o, trades
from tfrobust.defenses.terms import WeightSpaceTerm
from tfrobust.defense_names import (
    BASE_NAMES, DEFENSES, SHORT_NAMES, TERMS, Hyperparameter, base_declaration, canonical_name, check_defense_name,
    register_base, register_term, registered_terms, resolve_settings, term_declaration,
)
from tfrobust.errors import UserError, check_number, plugin_code


BASES = dict(zip(BASE_NAMES, (at, trades, mart)))  # the built-in base objectives' modules


def base_module(name: str):
    """The module of a registered base objective (imported on first use)."""
    implementation = base_declaration(name).implementation
    return importlib.import_module(implementation) if isinstance(implementation, str) else implementation


def _keywords():
    """``{keyword: (term, hyperparameter or None)}`` for every registered term's flag and hyperparameters."""
    keywords = {}
    for t in registered_terms():
        keywords[t] = (t, None)
        for h in term_declaration(t).hyperparameters:
            keywords[term_declaration(t).keyword(h.name)] = (t, h.name)
    return keywords


def term_class(name: str):
    """The :class:`WeightSpaceTerm` subclass registered for a term (imported on first use)."""
    implementation = term_declaration(name).implementation
    if isinstance(implementation, str):
        module, _, attribute = implementation.partition(":")
        implementation = getattr(importlib.import_module(module), attribute)
    return implementation


def _check_term_is_there(name: str, base: str, term: str, key: str, value) -> None:
    """Refuses a hyperparameter of a term the defense does not have (it would be ignored), unless it is the
    default (what :meth:`Defense.hyperparameters` gives for every registered term)."""
    if term in name.split("+")[1:] or value is None or value == resolve_settings(base, {})[key]:
        return
    raise UserError(f"defense {name!r} has no {term} term, so {key}={value!r} would be ignored; use "
                    f"Defense('{name}+{term}', {key}={value!r}) or leave {key} out")


@dataclasses.dataclass(frozen=True, init=False)
class Defense:
    """A defense: a name such as ``"trades+awp"`` and its hyperparameters.

    Built from a name with keyword overrides; every hyperparameter left as
    None takes the papers' default for the base objective::

        Defense("trades+awp")                     # beta 6, gamma 0.005, 10 warm-up epochs
        Defense("trades+awp", awp_gamma=0.01, awp_warmup_epochs=0)
        Defense("mart", unclipped_gaussian_start=True)

    Fields and keywords:
      name: the defense (short names and any order accepted; stored canonical).
      base: derived from the name (passing it is allowed only when it agrees).
      beta: TRADES/MART regulariser weight (6; unused by AT).
      unclipped_gaussian_start: start the TRADES/MART/RAT attack at
        ``x + 0.001 N(0, 1)`` without clipping to [0, 1], as the reference
        code does; the default clips (docs/algorithms.md, section 9, item 1).
      <term>: for every registered term, whether the name has it (``awp``,
        ``s2o``, ``rat``: attributes; as keywords only when they agree).
      <term>_<hyperparameter>: the terms' hyperparameters, declared with the
        term (:mod:`tfrobust.defense_names`):
        awp_gamma: AWP's relative perturbation size (0.01 for AT/MART, 0.005 for TRADES).
        awp_warmup_epochs: epochs without weight perturbation (0 for AT/MART, 10 for TRADES);
        a :class:`~tfrobust.trainer.RobustModel` needs ``steps_per_epoch`` to count them.
        s2o_a: S2O's weight ``a`` (0.1 for AT, 0.3 for TRADES/MART).
        rat_alpha, rat_sigma: RAT's Taylor-term weight (0.2) and weight-noise std (1e-4).
        rat_reference_quirk: reproduce the reference's ``yy1`` (docs/algorithms.md, section 9, item 8).
        gradalign_weight: GradAlign's lambda (0.2); elle_weight: ELLE's lambda (1000); elle_a_weight,
        elle_a_decay, elle_a_sensitivity: ELLE-A's maximum weight (4000), decay (0.99) and jump threshold
        in standard deviations (2) (docs/algorithms.md, section 18).
      settings: the resolved hyperparameters as ``((keyword, value), ...)``
        (what :func:`dataclasses.replace` carries over).
    """

    name: str
    base: Optional[str]
    beta: Optional[float]
    unclipped_gaussian_start: bool
    settings: tuple

    def __init__(self, name, base=None, beta=None, unclipped_gaussian_start=False, settings=(), **keywords):
        canonical = check_defense_name(name)
        parts = canonical.split("+")
        derived_base, terms = parts[0], parts[1:]
        known = _keywords()
        given = dict(settings)
        for key, value in keywords.items():
            if key not in known:
                raise TypeError(f"Defense got an unexpected keyword {key!r}; allowed: {', '.join(sorted(known))}")
            term, hyperparameter = known[key]
            if hyperparameter is None:
                if value is not None and bool(value) != (term in terms):
                    raise UserError(f"defense {canonical!r} has {term}={term in terms!r}, not {value!r}; change the name instead")
            else:
                # Checked for Defense(name, key=value); replace() and hyperparameters() (a saved model) carry
                # every registered term's settings, with settings= or base=, and are taken as they are.
                if not settings and base is None:
                    _check_term_is_there(canonical, derived_base, term, key, value)
                given[key] = value
        if base is not None and base != derived_base:
            raise UserError(f"defense {canonical!r} has base={derived_base!r}, not {base!r}; change the name instead")
        beta = beta if beta is not None else base_module(derived_base).DEFAULT_BETA
        if beta is not None:
            beta = check_number("defense.beta", beta)
        resolved = resolve_settings(derived_base, given)
        object.__setattr__(self, "name", canonical)
        object.__setattr__(self, "base", derived_base)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "unclipped_gaussian_start", bool(unclipped_gaussian_start))
        object.__setattr__(self, "settings", tuple(resolved.items()))

    def __getattr__(self, key):
        # Only called for names that are not fields: the terms' flags and hyperparameters.
        if key.startswith("__") or "settings" not in self.__dict__:
            raise AttributeError(key)
        if key in registered_terms():
            return key in self.terms
        for k, value in self.settings:
            if k == key:
                return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __repr__(self):
        return f"Defense({', '.join(f'{k}={v!r}' for k, v in self.hyperparameters().items())})"

    @property
    def terms(self) -> tuple:
        """The weight-space terms of the name, in canonical order."""
        return tuple(self.name.split("+")[1:])

    @property
    def objective(self):
        """The module of the base objective (``at``, ``trades``, ``mart`` or a registered one)."""
        return base_module(self.base)

    def weight_space_terms(self) -> list:
        """The :class:`WeightSpaceTerm` objects of the name's terms, in canonical order."""
        terms = []
        for t in self.terms:
            with plugin_code(term_class(t), f"weight-space term {t!r}"):  # a plug-in's term: one line if it fails
                terms.append(term_class(t)(self, t))
        return terms

    @property
    def needs_clean_logits(self) -> bool:
        return self.objective.NEEDS_CLEAN_LOGITS or any(term_class(t).NEEDS_CLEAN_LOGITS for t in self.terms)

    @property
    def accepts_unlabelled(self) -> bool:
        """Whether examples labelled -1 (no label) can train: the base has a term without labels (TRADES's
        KL) and no weight-space term uses the labels itself (AWP does not; S2O's and RAT's soft targets do)."""
        return self.objective.LABEL_FREE_TERM and not any(term_class(t).NEEDS_LABELS for t in self.terms)

    @property
    def attack_start(self) -> str:
        """The random start of the training attack: ``uniform``, ``gaussian`` or ``gaussian_unclipped``."""
        start = self.objective.ATTACK_START
        if start == "gaussian" and self.unclipped_gaussian_start:
            return "gaussian_unclipped"
        return start

    def hyperparameters(self) -> dict:
        """Every setting as a plain dict (flat keywords); ``Defense(**d.hyperparameters()) == d``."""
        result = {"name": self.name, "base": self.base, "beta": self.beta}
        settings = dict(self.settings)
        for t in registered_terms():
            result[t] = t in self.terms
            for h in term_declaration(t).hyperparameters:
                key = term_declaration(t).keyword(h.name)
                if key in settings:
                    result[key] = settings[key]
        result["unclipped_gaussian_start"] = self.unclipped_gaussian_start
        return result


def parse_defense(name: str, config=None) -> Defense:
    """Resolves a defense name and a :class:`~tfrobust.config.DefenseConfig`.

    Hyperparameters left as None in the config take the papers' default for
    the chosen base (AWP gamma and warm-up, S2O's a, TRADES/MART beta).
    ``parse_defense(name)`` equals ``Defense(name)``.
    """
    from tfrobust.config import DefenseConfig, defense_settings

    config = config or DefenseConfig()
    return Defense(
        name, beta=config.beta, unclipped_gaussian_start=config.unclipped_gaussian_start,
        settings=tuple(defense_settings(config).items()),
    )


__all__ = [
    "Defense", "parse_defense", "canonical_name", "DEFENSES", "BASES", "TERMS", "SHORT_NAMES",
    "WeightSpaceTerm", "Hyperparameter", "register_term", "registered_terms", "term_class", "register_base",
    "base_module",
    "at", "trades", "mart", "awp", "s2o", "rat",
]
