"""Defense names and the registry of weight-space terms, without TensorFlow.

A defense name is a base objective (``at``, ``trades``, ``mart``) and any
registered weight-space terms joined with ``+``. Each term is declared once,
with :func:`register_term`: its name, its hyperparameters with their
defaults (per base objective where the papers differ), the bases it builds
on, the terms it cannot be combined with, the combinations its paper
defines, and its implementation (a :class:`tfrobust.defenses.WeightSpaceTerm`
subclass, or ``"module:Class"`` imported when a model is built). From these
declarations come the names the command line accepts,
:class:`tfrobust.config.DefenseConfig`'s sections (``defense.awp.gamma``)
and :class:`tfrobust.defenses.Defense`'s keywords (``awp_gamma``).

This module imports no TensorFlow, so the command line refuses a misspelt
name or a bad hyperparameter before TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from tfrobust.errors import UserError, unknown_choice

BASE_NAMES = ("at", "trades", "mart")  # the built-in base objectives with their own per-base term defaults


def _valid_name(name) -> bool:
    """Lower-case letters and digits, with single ``_`` inside (``n_fgsm``, ``elle_a``)."""
    return (isinstance(name, str) and name.replace("_", "").isalnum() and name.islower()
            and not name.startswith("_") and not name.endswith("_") and "__" not in name)


@dataclasses.dataclass(frozen=True)
class BaseDeclaration:
    """A registered base objective (see :func:`register_base`)."""

    name: str
    implementation: Any
    like: Optional[str] = None
    title: str = ""

    @property
    def defaults_base(self) -> str:
        """The built-in base whose per-base term defaults and term compatibility this base takes."""
        return self.like or self.name


_BASES: dict = {}


def register_base(name: str, implementation, *, like: Optional[str] = None, title: str = "") -> BaseDeclaration:
    """Registers a base objective: its name and the module of pure functions that implements it.

    Args:
      name: the base's name, the first part of defense names (``<name>+awp``).
      implementation: the module, or its import path (imported on first
        use, so that registering needs no TensorFlow). It defines
        ``loss_terms(logits_clean, logits_adv, y, beta)`` returning
        ``(primary, regulariser, terms)`` per example, ``ATTACK_LOSS``,
        ``ATTACK_START``, ``NEEDS_CLEAN_LOGITS``, ``LABEL_FREE_TERM``,
        ``DEFAULT_BETA``, ``TERM_NAMES``, ``CE_TERM`` and ``CE_LOGITS``
        (``tfrobust/defenses/at.py`` is the smallest example).
      like: for a base that is not built in, the built-in base whose
        per-base term defaults it takes and whose terms it combines with
        (``"at"``); None: it combines with terms declared for it by name.
      title: the base's paper, for documentation.
    """
    if not _valid_name(name) or name in _TERMS:
        raise ValueError(f"a base objective needs a lower-case alphanumeric name other than a term's, got {name!r}")
    if like is not None and like not in BASE_NAMES:
        raise ValueError(f"base {name!r}: like must be a built-in base ({', '.join(BASE_NAMES)}), got {like!r}")
    declaration = BaseDeclaration(name, implementation, like, title)
    _BASES[name] = declaration
    return declaration


def unregister_base(name: str) -> None:
    """Removes a registered base that is not built in (a plug-in's tests clean up after themselves)."""
    if name not in BASE_NAMES:
        _BASES.pop(name, None)


def registered_bases() -> tuple:
    """The names of the registered base objectives, built-in first."""
    return tuple(_BASES)


def base_declaration(name: str) -> BaseDeclaration:
    return _BASES[name]


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One setting of a weight-space term.

    Fields:
      name: the key inside the term's config section (``gamma`` gives
        ``defense.awp.gamma`` and ``Defense(awp_gamma=...)``).
      default: a value, or ``{base: value}`` when the papers' default
        depends on the base objective (the config then holds None for
        "the base's default").
      kind: ``float``, ``int`` or ``bool``.
      check: a predicate on the value, and ``requirement`` the words that
        complete "defense.<term>.<name> ..." when it fails.
      help: one line for the config's documentation.
    """

    name: str
    default: Any
    kind: type = float
    check: Optional[Callable[[Any], bool]] = None
    requirement: str = ""
    help: str = ""

    @property
    def per_base(self) -> bool:
        return isinstance(self.default, dict)

    def default_for(self, base: str):
        if not self.per_base:
            return self.default
        return self.default[base if base in self.default else _BASES[base].defaults_base]

    def resolve(self, value, base: str, key: str):
        """The value for ``base`` (None: the default), converted to ``kind`` and checked."""
        value = self.default_for(base) if value is None else value
        if self.kind is bool:
            value = bool(value)
        elif self.kind is int:
            if isinstance(value, bool) or int(value) != value:
                raise UserError(f"{key} must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.check is not None and not self.check(value):
            raise UserError(f"{key} {self.requirement}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class TermDeclaration:
    """A registered weight-space term (see :func:`register_term`)."""

    name: str
    implementation: Any
    title: str = ""
    hyperparameters: tuple = ()
    bases: tuple = BASE_NAMES
    conflicts: tuple = ()
    short_name: Optional[str] = None
    defenses: tuple = ()

    def keyword(self, hyperparameter: str) -> str:
        """The :class:`~tfrobust.defenses.Defense` keyword of a hyperparameter: ``awp_gamma``."""
        return f"{self.name}_{hyperparameter}"


_TERMS: dict = {}


def register_term(
    name: str,
    implementation,
    *,
    hyperparameters=(),
    bases=BASE_NAMES,
    conflicts=(),
    short_name: Optional[str] = None,
    defenses=(),
    title: str = "",
) -> TermDeclaration:
    """Registers a weight-space term: its name, hyperparameters and implementation.

    Args:
      name: the term's name in defense names (``trades+<name>``); lower case
        letters and digits, not a base objective's name.
      implementation: the :class:`~tfrobust.defenses.WeightSpaceTerm`
        subclass, or its ``"module:Class"`` path (imported on first use, so
        that registering needs no TensorFlow).
      hyperparameters: :class:`Hyperparameter` declarations.
      bases: the base objectives the term builds on (others are refused).
      conflicts: ``(other_term, reason)`` pairs that cannot be combined.
      short_name: the defense that the bare term name stands for (``"at+awp"``).
      defenses: the combinations the term's paper defines (listed in ``DEFENSES``).
      title: the term's paper, for the config's documentation.

    Registering the same name again replaces the declaration (a module
    reloaded in a notebook); it must not shadow a base objective.
    """
    if not _valid_name(name) or name in _BASES:
        raise ValueError(f"a weight-space term needs a lower-case alphanumeric name other than a base's, got {name!r}")
    for h in hyperparameters:
        if h.kind not in (float, int, bool) or (h.per_base and set(h.default) != set(BASE_NAMES)):
            raise ValueError(f"hyperparameter {name}.{h.name}: kind float, int or bool, per-base defaults for every base")
    declaration = TermDeclaration(
        name, implementation, title, tuple(hyperparameters), tuple(bases), tuple(tuple(c) for c in conflicts),
        short_name, tuple(defenses),
    )
    _TERMS[name] = declaration
    return declaration


def unregister_term(name: str) -> None:
    """Removes a registered term (a plug-in's tests clean up after themselves)."""
    _TERMS.pop(name, None)


def registered_terms() -> tuple:
    """The names of the registered terms, in their canonical order (registration order)."""
    return tuple(_TERMS)


def term_declaration(name: str) -> TermDeclaration:
    return _TERMS[name]


def short_names() -> dict:
    return {t.name: t.short_name for t in _TERMS.values() if t.short_name}


def canonical_name(name: str) -> str:
    """Normalises a defense name: short names expanded, terms in a fixed order."""
    name = str(name).strip().lower().replace(" ", "")
    name = short_names().get(name, name)
    parts = name.split("+")
    if parts[0] not in _BASES:
        if parts[0] in _TERMS:
            raise UserError(
                f"defense {name!r} must start with a base objective ({', '.join(_BASES)}), e.g. at+{parts[0]}"
            )
        raise unknown_choice("defense", name, defense_list() + tuple(short_names()))
    terms = parts[1:]
    for t in terms:
        if t not in _TERMS:
            error = unknown_choice(f"weight-space term in defense {name!r}:", t, registered_terms())
            raise UserError(f"{error} (a plug-in's term: load its module with --plugin MODULE)")
    if len(set(terms)) != len(terms):
        raise UserError(f"defense {name!r} names a term twice")
    ordered = [parts[0]] + [t for t in _TERMS if t in terms]
    return "+".join(ordered)


def check_defense_name(name: str) -> str:
    """The canonical name of a defense its terms allow, or a UserError saying why not."""
    canonical = canonical_name(name)
    parts = canonical.split("+")
    base, terms = parts[0], parts[1:]
    for t in terms:
        declaration = _TERMS[t]
        if base not in declaration.bases and _BASES[base].defaults_base not in declaration.bases:
            bases = " or ".join(b.upper() for b in declaration.bases)
            use = f" (use {' or '.join(declaration.defenses)})" if declaration.defenses else ""
            raise UserError(f"defense {canonical!r} is not defined: {t.upper()} builds on {bases}{use}")
        for other, reason in declaration.conflicts:
            if other in terms:
                raise UserError(f"defense {canonical!r} is not defined: {reason}")
    return canonical


def resolve_settings(base: str, given: dict) -> dict:
    """Every registered term's hyperparameters for ``base``, keyed ``<term>_<name>``.

    ``given`` holds values by the same keys (None or absent: the default);
    each is converted to its kind and checked (a UserError names the
    ``defense.<term>.<name>`` key).
    """
    settings = {}
    for t in _TERMS.values():
        for h in t.hyperparameters:
            key = t.keyword(h.name)
            settings[key] = h.resolve(given.get(key), base, f"defense.{t.name}.{h.name}")
    return settings


def defense_list() -> tuple:
    """The bases and the combinations the registered terms' papers define."""
    return registered_bases() + tuple(d for t in _TERMS.values() for d in t.defenses)


def _non_negative(value) -> bool:
    return value >= 0


def _fraction(value) -> bool:
    return 0 <= value <= 1


# The built-in base objectives and terms; their implementations are in tfrobust/defenses/<name>.py.
register_base("at", "tfrobust.defenses.at", title="PGD adversarial training (Madry et al. 2018).")
register_base("trades", "tfrobust.defenses.trades", title="TRADES (Zhang et al. 2019).")
register_base("mart", "tfrobust.defenses.mart", title="MART (Wang et al. 2020).")
# Single-step bases: AT's objective on a one-step attack; they take AT's term defaults.
register_base("fgsm", "tfrobust.defenses.fgsm", like="at", title="FGSM adversarial training (Goodfellow et al. 2015).")
register_base("fgsm_rs", "tfrobust.defenses.fgsm_rs", like="at", title="FGSM with a random start (Wong et al. 2020).")
register_base("n_fgsm", "tfrobust.defenses.n_fgsm", like="at", title="N-FGSM (de Jorge et al. 2022).")

register_term(
    "awp", "tfrobust.defenses.awp:AdversarialWeightPerturbation",
    title="Adversarial weight perturbation (Wu et al. 2020); None means the paper's default for the base.",
    hyperparameters=(
        Hyperparameter("gamma", {"at": 0.01, "trades": 0.005, "mart": 0.01}, float, _non_negative, "must be >= 0",
                       "relative perturbation size: 0.01 for at/mart, 0.005 for trades"),
        Hyperparameter("warmup_epochs", {"at": 0, "trades": 10, "mart": 0}, int, _non_negative, "must be >= 0",
                       "epochs without perturbation: 0 for at/mart, 10 for trades"),
    ),
    short_name="at+awp", defenses=("at+awp", "trades+awp", "mart+awp"),
)
register_term(
    "s2o", "tfrobust.defenses.s2o:SecondOrderStatistics",
    title="Second-order statistics optimisation (Jin et al. 2022).",
    hyperparameters=(
        Hyperparameter("a", {"at": 0.1, "trades": 0.3, "mart": 0.3}, float, _fraction, "must be in [0, 1]",
                       "weight of the soft-label term: 0.1 for at, 0.3 for trades/mart"),
    ),
    short_name="at+s2o", defenses=("at+s2o", "trades+s2o", "mart+s2o", "trades+awp+s2o"),
)
register_term(
    "rat", "tfrobust.defenses.rat:RandomizedAdversarialTraining",
    title="Randomized adversarial training (Jin et al. 2023).",
    hyperparameters=(
        Hyperparameter("alpha", 0.2, float, _fraction, "must be in [0, 1]", "weight of the Taylor terms"),
        Hyperparameter("sigma", 1e-4, float, _non_negative, "must be >= 0", "std of the weight noise of the attack"),
        Hyperparameter("reference_quirk", False, bool, help="reproduce the reference code's yy1 = reg_gap(t2_adv - t2_nat)"),
    ),
    bases=("trades",), conflicts=(("s2o", "RAT and S2O both replace the soft targets; choose one"),),
    short_name="trades+rat", defenses=("trades+rat", "trades+awp+rat"),
)

# Input-space regularisers of the single-step bases (tfrobust/defenses/input_space.py): terms of the objective.
register_term(
    "gradalign", "tfrobust.defenses.input_space:GradAlign",
    title="GradAlign (Andriushchenko and Flammarion 2020): lambda (1 - cos(grad at x, grad at x + eta)).",
    hyperparameters=(
        Hyperparameter("weight", 0.2, float, _non_negative, "must be >= 0", "lambda: 0.2 for eps 8/255"),
    ),
    bases=("fgsm", "fgsm_rs"), defenses=("fgsm+gradalign",),
)
register_term(
    "elle", "tfrobust.defenses.input_space:LocalLinearity",
    title="ELLE (Abad Rocamora et al. 2024): lambda times the local linearity error on random triplets.",
    hyperparameters=(
        Hyperparameter("weight", 1000.0, float, _non_negative, "must be >= 0", "lambda: 1000 for eps 8/255"),
    ),
    bases=("fgsm", "fgsm_rs", "n_fgsm"),
)
register_term(
    "elle_a", "tfrobust.defenses.input_space:AdaptiveLocalLinearity",
    title="ELLE-A: ELLE whose weight jumps to its maximum when the error jumps, then decays.",
    hyperparameters=(
        Hyperparameter("weight", 4000.0, float, _non_negative, "must be >= 0", "the weight after a jump: 4000"),
        Hyperparameter("decay", 0.99, float, _fraction, "must be in [0, 1]", "factor per step without a jump"),
        Hyperparameter("sensitivity", 2.0, float, _non_negative, "must be >= 0",
                       "a jump: error > mean + sensitivity * std of the earlier errors"),
    ),
    bases=("fgsm", "fgsm_rs", "n_fgsm"), conflicts=(("elle", "ELLE and ELLE-A are one regulariser; choose one"),),
    defenses=("n_fgsm+elle_a",),
)

# The built-in terms, their short names and the combinations the papers define.
TERMS = registered_terms()
SHORT_NAMES = short_names()
DEFENSES = defense_list()


__all__ = [
    "BASE_NAMES", "TERMS", "SHORT_NAMES", "DEFENSES", "Hyperparameter", "TermDeclaration", "register_term", "unregister_term",
    "BaseDeclaration", "register_base", "unregister_base", "registered_bases", "base_declaration",
    "registered_terms", "term_declaration", "short_names", "defense_list", "resolve_settings", "canonical_name", "check_defense_name",
]
