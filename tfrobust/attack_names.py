"""The table of attacks, without TensorFlow: ``clean``, ``fgsm``, ``pgd20_ce``, AutoAttack's components and versions.

The command line checks ``--attacks`` with it before TensorFlow is imported,
:func:`tfrobust.evaluation.evaluate` dispatches on it, and
:mod:`tfrobust.autoattack.ensemble` builds its attacks and versions from it.
An attack that ``attacks.AttackRunner`` runs batch by batch is one
:class:`RunnerAttack` row (the pattern of its names, their spellings in the
help, its function); an AutoAttack component is one :class:`Component` row
(its name, the function that runs it, its budget and the classes it needs); a
version is one :class:`Version` row.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple, Union

from tfrobust.errors import UserError

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20_ce", "pgd20_cw")

# The attacks' steps are unrolled when traced (a Python loop): far more would trace for minutes first.
MAX_STEPS = 1000

# Forward passes averaged by the EOT attacks (the reference's eot_iter of version "rand").
RAND_EOT_ITER = 20


def resolve(function: Union[str, Callable]) -> Callable:
    """The function itself, imported when given as ``"module:function"``."""
    if isinstance(function, str):
        module, _, name = function.partition(":")
        return getattr(importlib.import_module(module), name)
    return function


@dataclass(frozen=True)
class RunnerAttack:
    """An attack that ``attacks.AttackRunner`` runs batch by batch: clean, FGSM, PGD, cleverhans' attacks.

    ``pattern`` is the regular expression its command-line names match in full
    (its groups are the numbers of steps and the loss); ``spellings`` are the
    names in the help ("<N>": a number of steps, at most :data:`MAX_STEPS`).
    ``function`` is ``"module:function"`` (imported when the attack runs) or the
    function itself, called as ``function(match, model_fn, x, y, eps, norm=norm,
    step_size=step_size, seed=seed)`` and returning the adversarial examples.
    """

    pattern: str
    spellings: Tuple[str, ...]
    function: Union[str, Callable]


RUNNER_ATTACKS: Tuple[RunnerAttack, ...] = (
    RunnerAttack("clean", ("clean",), "tfrobust.runner_attacks:clean"),
    RunnerAttack("fgsm", ("fgsm",), "tfrobust.runner_attacks:fgsm"),
    RunnerAttack(r"pgd(\d+)_(ce|cw)", ("pgd<N>_ce", "pgd<N>_cw"), "tfrobust.runner_attacks:pgd"),
    RunnerAttack("cleverhans_fgsm", ("cleverhans_fgsm",), "tfrobust.runner_attacks:cleverhans_fgsm"),
    RunnerAttack(r"cleverhans_pgd(\d+)", ("cleverhans_pgd<N>",), "tfrobust.runner_attacks:cleverhans_pgd"),
    RunnerAttack(r"cleverhans_mim(\d+)", ("cleverhans_mim<N>",), "tfrobust.runner_attacks:cleverhans_mim"),
)


def runner_attack(name: str):
    """``(row, match)`` of the runner attack named ``name``, or None."""
    for row in RUNNER_ATTACKS:
        match = re.fullmatch(row.pattern, name)
        if match:
            return row, match
    return None


@dataclass(frozen=True)
class Component:
    """An AutoAttack component that can be named alone or in an ensemble.

    ``name`` is its name in :func:`tfrobust.autoattack.run_autoattack` ("apgd-ce");
    on the command line and in reports it is :attr:`key` ("apgd_ce").
    ``function`` is ``"module:function"`` (imported when the attack runs) or the
    function itself, called as ``function(model_fn, x, y, eps, norm=norm,
    seed=seed, **budget)``. ``min_classes`` is the smallest number of classes
    it supports.
    """

    name: str
    function: Union[str, Callable]
    budget: Mapping = field(default_factory=dict)
    min_classes: int = 2

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Version:
    """An AutoAttack version: its components in order and, for some, budgets of its own.

    ``budgets`` maps a component's name to the keyword arguments it runs with
    in this version (default: the component's own budget); a version with
    budgets runs alone. ``verdict_passes`` forward passes decide each verdict.
    """

    name: str
    components: Tuple[str, ...]
    budgets: Mapping = field(default_factory=dict)
    verdict_passes: int = 1

    @property
    def own_budgets(self) -> bool:
        return bool(self.budgets)


# The components in the order they run when several are named as one ensemble. The budgets are
# the reference's set_version("standard") (autoattack.py lines 302-337); APGD-DLR and untargeted
# FAB run with one restart there (lines 309 and 316), and the EOT variants with "rand"'s 20 passes.
COMPONENTS: Tuple[Component, ...] = (
    Component("apgd-ce", "tfrobust.autoattack.apgd:apgd", dict(loss="ce", n_iter=100, n_restarts=1)),
    Component("apgd-ce-eot", "tfrobust.autoattack.apgd:apgd",
              dict(loss="ce", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER)),
    Component("apgd-dlr", "tfrobust.autoattack.apgd:apgd", dict(loss="dlr", n_iter=100, n_restarts=1), 3),
    Component("apgd-dlr-eot", "tfrobust.autoattack.apgd:apgd",
              dict(loss="dlr", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER), 3),
    Component("apgd-t", "tfrobust.autoattack.apgd:apgd_targeted", dict(n_iter=100, n_target_classes=9), 4),
    Component("fab", "tfrobust.autoattack.fab:fab", dict(n_iter=100, n_restarts=1)),
    Component("fab-t", "tfrobust.autoattack.fab:fab_targeted", dict(n_iter=100, n_target_classes=9, n_restarts=1)),
    Component("square", "tfrobust.autoattack.square:square", dict(n_queries=5000, p_init=0.8)),
)

# The versions (reference autoattack.py, set_version, lines 302-337, for L-inf and L2): "plus"
# gives APGD and untargeted FAB 5 restarts, "rand" runs APGD with 20 EOT passes.
AUTOATTACK_VERSIONS: Tuple[Version, ...] = (
    Version("standard", ("apgd-ce", "apgd-t", "fab-t", "square")),
    Version("fast", ("apgd-ce", "apgd-t")),
    Version("plus", ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"), {
        "apgd-ce": dict(loss="ce", n_iter=100, n_restarts=5),
        "apgd-dlr": dict(loss="dlr", n_iter=100, n_restarts=5),
        "fab": dict(n_iter=100, n_restarts=5),
        "square": dict(n_queries=5000, p_init=0.8, n_restarts=1),
        "apgd-t": dict(n_iter=100, n_target_classes=9, n_restarts=1),
        "fab-t": dict(n_iter=100, n_target_classes=9, n_restarts=1),
    }),
    Version("rand", ("apgd-ce", "apgd-dlr"), {
        "apgd-ce": dict(loss="ce", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
        "apgd-dlr": dict(loss="dlr", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
    }, verdict_passes=RAND_EOT_ITER),
)

_components = {c.name: c for c in COMPONENTS}
_versions = {v.name: v for v in AUTOATTACK_VERSIONS}


def register_component(component: Component) -> None:
    """Adds an AutoAttack component (after the others when several run as one ensemble)."""
    if not isinstance(component, Component):
        raise UserError(f"register_component expects a Component, got {type(component).__name__}")
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", component.name):
        raise UserError(f"an attack's name is lower-case words joined by '-', got {component.name!r}")
    if component.name in _components or component.key in _versions or is_attack_runner_name(component.key):
        raise UserError(f"attack {component.name!r} exists already")
    _components[component.name] = component


def unregister_component(name: str) -> None:
    """Removes a component added by :func:`register_component`."""
    if any(c.name == name for c in COMPONENTS):
        raise UserError(f"{name!r} is a built-in AutoAttack component")
    _components.pop(name, None)


def components() -> Tuple[Component, ...]:
    """Every AutoAttack component, in the order they run as one ensemble."""
    return tuple(_components.values())


def component(name: str) -> Optional[Component]:
    """The component named ``name`` ("apgd-ce" or "apgd_ce"), or None."""
    return _components.get(str(name).replace("_", "-"))


def versions() -> Tuple[Version, ...]:
    return tuple(_versions.values())


def version(name: str) -> Optional[Version]:
    return _versions.get(name)


def standard_first() -> Tuple[Component, ...]:
    """The components, "standard"'s first in its order, then the others in the table's order."""
    standard = [component(n) for n in _versions["standard"].components]
    return tuple(standard + [c for c in components() if c not in standard])


def is_attack_runner_name(name: str) -> bool:
    """Whether ``name`` is run by ``attacks.AttackRunner``: clean, fgsm, PGD or cleverhans."""
    return runner_attack(name) is not None


def is_autoattack(name: str) -> bool:
    """Whether ``name`` (command-line spelling) is an AutoAttack component or version."""
    return component(name) is not None or name in _versions


def autoattack_plan(names) -> tuple:
    """``(version, ensembles, components)`` for the AutoAttack part of the checked ``names``.

    ``ensembles`` are the versions named; ``components`` the command-line names
    of the components to run, in the order of the version that runs with its own
    budgets (then ``version`` is its name), else in the table's order (``version``
    None).
    """
    ensembles = [n for n in names if n in _versions]
    if ensembles and _versions[ensembles[0]].own_budgets:
        own = _versions[ensembles[0]]
        return own.name, ensembles, [component(c).key for c in own.components]
    wanted = {component(c).name for e in ensembles for c in _versions[e].components}
    wanted |= {component(n).name for n in names if is_autoattack(n) and n not in _versions}
    return None, ensembles, [c.key for c in components() if c.name in wanted]


def attack_names_help() -> str:
    runner = [spelling for row in RUNNER_ATTACKS for spelling in row.spellings]
    plain = [s for s in runner if not s.startswith("cleverhans_")]
    return ", ".join(plain + [c.key for c in standard_first()] + list(_versions)
                     + [s for s in runner if s not in plain])


def parse_attacks(spec) -> list:
    """Parses ``"clean,fgsm,pgd20_ce"`` (or a list) into checked attack names."""
    names = [s.strip().lower().replace("-", "_") for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError(f"no attack given; allowed: {attack_names_help()}")
    for name in names:
        if not (is_attack_runner_name(name) or is_autoattack(name)):
            raise UserError(f"unknown attack {name!r}; allowed: {attack_names_help()}")
        digits = re.findall(r"\d+", name)
        if digits and not 1 <= int(digits[0]) <= MAX_STEPS:
            raise UserError(f"attack {name!r}: the number of steps must be between 1 and {MAX_STEPS}")
    names = list(dict.fromkeys(names))
    own = [n for n in names if n in _versions and _versions[n].own_budgets]
    others = [n for n in names if is_autoattack(n) and n not in own]
    if own and (len(own) > 1 or others):
        raise UserError(f"AutoAttack version {own[0]!r} runs its own attacks and budgets; name it without other "
                        f"AutoAttack versions or components (got {', '.join(own + others)})")
    return names


# The built-in names as tuples of command-line names (the table above is what is read).
AUTOATTACK = tuple(component(n).key for n in _versions["standard"].components)
AUTOATTACK_EXTRA = tuple(c.key for c in standard_first()[len(AUTOATTACK):])
COMPONENT_ORDER = tuple(c.key for c in COMPONENTS)
ENSEMBLES = {v.name: tuple(component(n).key for n in v.components) for v in AUTOATTACK_VERSIONS}
OWN_BUDGET_VERSIONS = tuple(v.name for v in AUTOATTACK_VERSIONS if v.own_budgets)

__all__ = ["DEFAULT_ATTACKS", "MAX_STEPS", "RunnerAttack", "RUNNER_ATTACKS", "runner_attack", "resolve",
           "AUTOATTACK", "AUTOATTACK_EXTRA",
           "COMPONENT_ORDER", "ENSEMBLES", "OWN_BUDGET_VERSIONS", "RAND_EOT_ITER", "Component", "Version",
           "COMPONENTS", "AUTOATTACK_VERSIONS", "register_component", "unregister_component", "components", "component",
           "versions", "version", "is_autoattack", "autoattack_plan", "attack_names_help", "parse_attacks"]
