"""The AutoAttack ensemble: the attacks of each version with their budgets, and the runner over a data set.

:data:`VERSIONS` names the attacks of "standard", "fast", "plus" and "rand";
:data:`VERSION_ATTACKS` holds each version's budgets (the reference's
``set_version``) and :data:`ALL_ATTACKS` every attack that can be named
alone, all built from the rows of :mod:`tfrobust.attack_names`. :func:`run_autoattack` runs an ensemble in batches on the examples
every earlier attack failed to break, optionally sharded over the replica
devices of a ``tf.distribute`` strategy, and records each decided batch in a
JSON-lines file (``partial_path``) from which an interrupted run resumes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from tfrobust import attack_names
from tfrobust.attack_names import RAND_EOT_ITER  # noqa: F401 - a public name of the package
from tfrobust.autoattack.batches import BatchAttacker
from tfrobust.autoattack.checks import autoattack_flags, check_result, square_check
from tfrobust.autoattack.core import (
    BALL_TOLERANCE, as_inputs, check_ball, check_eps, check_norm, check_positive_int, check_seed, n_classes,
    predict_logits, predicted,
)
from tfrobust.autoattack.resume import PartialLog, fingerprint, weights_checksum
from tfrobust.autoattack.sharding import replica_devices
from tfrobust.errors import UserError, unknown_choice


def _budget(attack, **settings):
    """``fn(model_fn, x, y, eps, norm, seed)`` running ``attack`` with fixed ``settings``."""

    def run(model_fn, x, y, eps, norm, seed):
        return attack(model_fn, x, y, eps, norm=norm, seed=seed, **settings)

    run.settings = dict(settings)
    return run


def attack_of(component: attack_names.Component, budget=None) -> Callable:
    """``fn(model_fn, x, y, eps, norm, seed)`` running a row of the attack table with its budget (or ``budget``)."""
    function = attack_names.resolve(component.function)
    return _budget(function, **(component.budget if budget is None else budget))


# Every attack that can be named alone (the rows of tfrobust.attack_names.COMPONENTS), standard's
# four first: name -> fn(model_fn, x, y, eps, norm, seed) -> x_adv.
ALL_ATTACKS: Dict[str, Callable] = {c.name: attack_of(c) for c in attack_names.standard_first()}

# The attacks of "standard", with its budgets.
ATTACKS: Dict[str, Callable] = {name: ALL_ATTACKS[name] for name in attack_names.version("standard").components}

# The attacks of each version, in order (the rows of tfrobust.attack_names.AUTOATTACK_VERSIONS).
VERSIONS: Dict[str, list] = {v.name: list(v.components) for v in attack_names.versions()}

# The budgets of each version: the components' own, or the version's.
VERSION_ATTACKS: Dict[str, Dict[str, Callable]] = {
    v.name: {name: attack_of(attack_names.component(name), v.budgets[name]) if v.own_budgets else ALL_ATTACKS[name]
             for name in v.components} for v in attack_names.versions()}

# Forward passes whose mean logits decide each verdict (clean and adversarial) of a version.
VERSION_VERDICT_PASSES = {v.name: v.verdict_passes for v in attack_names.versions() if v.verdict_passes > 1}

AttackSpec = Union[None, Sequence[str], Mapping[str, Callable]]


def _resolve_attacks(version, attacks):
    if attacks is None:
        if version not in VERSIONS:
            raise unknown_choice("AutoAttack version", version, VERSIONS)
        return [(name, VERSION_ATTACKS[version][name]) for name in VERSIONS[version]]
    if isinstance(attacks, str):
        attacks = [attacks]
    if isinstance(attacks, Mapping):
        items = list(attacks.items())
        for name, fn in items:
            if not callable(fn):
                raise UserError(f"attack {name!r} is not callable")
        if not items:
            raise UserError("attacks is empty")
        return [(str(n), f) for n, f in items]
    names = list(attacks)
    if not names:
        raise UserError("attacks is empty")
    rows = {c.name: c for c in attack_names.components()}
    for name in names:
        if name not in rows:
            allowed = ", ".join(c.name for c in attack_names.standard_first())
            raise UserError(f"unknown attack {name!r}; allowed: {allowed}")
    if len(set(names)) != len(names):
        raise UserError(f"attacks lists a name twice: {names}")
    return [(name, ALL_ATTACKS[name] if name in ALL_ATTACKS else attack_of(rows[name])) for name in names]


def _verdict_passes(version, attacks, plan) -> int:
    """Forward passes averaged for each verdict: 20 for "rand" and the named EOT attacks, else 1."""
    if attacks is None:
        return VERSION_VERDICT_PASSES.get(version, 1)
    passes = [getattr(fn, "settings", {}).get("eot_iter", 1) for _, fn in plan]
    return max(passes) if passes else 1


def run_autoattack(model_fn, x, y, eps, norm="linf", version="standard", attacks: AttackSpec = None,
                   batch_size=500, seed=0, verbose=True, individual=False, *, verdict_passes=None,
                   flags=True, partial_path=None, strategy=None, model_checksum=None) -> dict:
    """Robust accuracy under the AutoAttack ensemble (Croce & Hein, ICML 2020).

    The clean predictions are computed first; then each attack runs in order,
    in batches of ``batch_size``, only on the examples that every earlier
    attack failed to break (as AutoAttack does). Every returned point is
    projected onto the eps-ball and [0, 1] and re-classified; at the end all of
    ``x_adv`` is checked against the ball and [0, 1] (tolerance 1e-6), and a
    RuntimeError is raised if it is violated.

    Args:
      model_fn: callable mapping float32 NHWC images in [0, 1] to logits (a
        keras model is called with ``training=False``).
      x, y: images (N, H, W, C) in [0, 1] and integer labels (N,) (or one-hot).
      eps: radius of the threat model (>= 0).
      norm: "linf" or "l2".
      version: a key of :data:`VERSIONS` (the package's docstring lists their
        attacks), with the budgets of :data:`VERSION_ATTACKS`; ignored when
        ``attacks`` is given.
      attacks: names from :data:`ALL_ATTACKS` to run in this order, or a mapping
        name -> fn for custom attacks or budgets, called as
        ``fn(model_fn, x, y, eps, norm=norm, seed=seed)`` and returning x_adv
        (``functools.partial(apgd, n_iter=20)`` qualifies).
      batch_size: examples per attack call.
      seed: integer seed passed to every attack (each batch uses the same seed).
      verbose: print a summary and show a tqdm progress bar.
      individual: also run each attack alone on all clean-correct examples
        (expensive: about twice the cost of the ensemble).
      verdict_passes: forward passes whose mean logits decide whether an
        example is classified correctly (clean and after each attack). None:
        20 for version "rand" and for the EOT attacks, else 1.
      flags: compute the reference's automatic checks
        (:func:`tfrobust.autoattack.checks.autoattack_flags`) on the first batch and
        warn about each one raised.
      partial_path: a JSON-lines file recording every decided batch (which
        attack broke which example, and the perturbation norm of its
        adversarial point). An existing file written by the same call (same
        data, eps, norm, attacks, seed and batch size) is replayed and only
        the remaining batches run: a killed evaluation resumes where it
        stopped and ends with the same result. Adversarial points of replayed
        examples are not stored: ``x_adv`` holds ``x`` for them. A file of
        another model or with a damaged line is set aside (see PartialLog).
      model_checksum: the model in ``partial_path``'s fingerprint (default:
        the sha256 of a Keras model's weights; pass one for a function).
      strategy: a ``tf.distribute`` strategy (e.g. the ``MirroredStrategy``
        of training). Whole batches go to the local replica devices in turn
        (batch k to device k mod N), attacked concurrently, each exactly as
        on one device, so the verdicts and points equal a single-device run.
        When an attack has fewer batches than devices and the devices are
        accelerators, each batch is split into one shard per device
        instead; the split changes the random draws of an example (they
        depend on its position in the shard), so verdicts then agree with a
        single-device run except on borderline examples. Logical devices of
        one CPU share its cores and never split a batch. Workers of a
        multi-worker strategy are not used (their local devices are).

    Returns:
      A dict with
        "clean": clean accuracy (fraction of all N examples);
        "per_attack": {name: accuracy after the ensemble has run every attack
          up to and including ``name`` in order} -- cumulative, as AutoAttack
          prints, non-increasing, as a fraction of all N examples;
        "individual": {name: accuracy of that attack run alone on the
          clean-correct examples (clean-misclassified examples count as
          wrong)} if ``individual`` else None;
        "worst_case": per-example worst case: the fraction of examples that
          are correctly classified clean and under every attack run (the
          ensemble and, if requested, every individual run); never above any
          entry of "per_attack" or "individual";
        "robust_mask": np.bool_ array (N,), True where the example survived all;
        "clean_mask": np.bool_ array (N,), True where the clean prediction is right;
        "broken_by": array (N,) of str: "clean" where the clean prediction is
          wrong, the name of the ensemble attack that broke the example, or ""
          where it survived the ensemble;
        "perturbation_norm": float64 array (N,): the norm of the adversarial
          point of the ensemble attack that broke the example (NaN elsewhere);
        "x_adv": np.ndarray like x, an adversarial point for every broken
          example (x itself elsewhere);
        "flags": the reference's checks (a list of dicts, see
          :func:`tfrobust.autoattack.checks.autoattack_flags`) or None;
        "version", "verdict_passes", "resumed" (broken examples read back
        from ``partial_path``), "seconds": wall-clock time; plus "attacks", "eps",
        "norm", "n_examples".
    """
    start = time.time()
    norm, eps = check_norm(norm), check_eps(eps)
    batch_size, seed = check_positive_int("batch_size", batch_size), check_seed(seed)
    plan = _resolve_attacks(version, attacks)
    passes = _verdict_passes(version, attacks, plan) if verdict_passes is None else check_positive_int(
        "verdict_passes", verdict_passes)
    if model_checksum is None and partial_path is not None and hasattr(model_fn, "weights"):
        model_checksum = weights_checksum(model_fn.weights)
    run = _Settings(eps, norm, seed, batch_size, passes, version if attacks is None else None, bool(individual),
                    verbose, start, model_checksum)
    return _attack_all(model_fn, x, y, plan, run, check_classes=not isinstance(attacks, Mapping), flags=flags,
                       partial_path=partial_path, strategy=strategy)


@dataclass(frozen=True)
class _Settings:
    """The checked settings of one :func:`run_autoattack` call."""

    eps: float
    norm: str
    seed: int
    batch_size: int
    passes: int
    version: Optional[str]  # None for named or custom attacks
    individual: bool
    verbose: bool
    start: float
    model_checksum: Optional[str] = None


def _attack_all(model_fn, x, y, plan, run: _Settings, *, check_classes, flags, partial_path, strategy) -> dict:
    """The body of :func:`run_autoattack`: clean verdicts, flags, the ensemble, the individual runs, the result."""
    eps, norm, batch_size, passes = run.eps, run.norm, run.batch_size, run.passes
    x_t, y_t = as_inputs(x, y)
    x_np = x_t.numpy()
    y_np = y_t.numpy()
    n = len(x_np)
    if n == 0:
        raise UserError("x is empty")
    logits = predict_logits(model_fn, x_t, batch_size, passes=passes)
    classes = n_classes(logits, y_t)
    if check_classes:
        _check_classes([name for name, _ in plan], classes)
    flag_list = None
    if flags:
        flag_list = autoattack_flags(model_fn, x_np[:batch_size], y_np[:batch_size], eps, norm=norm,
                                     randomised_expected=passes > 1, seed=run.seed)
        _warn_failed(flag_list)
    clean_mask = (predicted(logits).numpy() == y_np)
    verdicts = _Verdicts(x_np, clean_mask)
    say = _printer(run.verbose)
    say(f"AutoAttack ({norm}, eps={eps:g}): clean accuracy {verdicts.clean:.2%} on {n} examples")
    log = PartialLog(partial_path, fingerprint(x_np, y_np, eps, norm, [a for a, _ in plan], run.version, run.seed,
                                               batch_size, passes, run.individual, run.model_checksum))
    devices = replica_devices(strategy)
    runner = BatchAttacker(model_fn, x_np, y_np, eps, norm, run.seed, batch_size, passes, log, devices, run.verbose)
    per_attack = verdicts.run_ensemble(plan, runner, lambda name, acc: say(
        f"  robust accuracy after {name.upper()}: {acc:.2%} ({time.time() - run.start:.1f} s)"))
    indiv = verdicts.run_alone(plan, runner, lambda name, acc: say(
        f"  robust accuracy of {name.upper()} alone: {acc:.2%}")) if run.individual else None
    if flag_list is not None and "square" not in [a for a, _ in plan]:
        flag_list[-1] = check_result("square_not_better", True, "Square is not in the ensemble", skipped=True)
    elif flag_list is not None:
        flag_list[-1] = square_check(verdicts.broken_by, n)
        _warn_failed(flag_list[-1:])
    replayed = runner.replayed
    fresh = ~replayed
    check_ball(verdicts.x_adv[fresh], x_np[fresh], eps, norm)
    if np.any(verdicts.pert_norm[replayed] > eps + BALL_TOLERANCE):
        raise RuntimeError(f"{partial_path} records perturbations outside the {norm} ball of radius {eps}")
    log.close()
    worst = float(verdicts.robust.mean())
    say(f"  worst case over all attacks: {worst:.2%} ({time.time() - run.start:.1f} s)")
    return {
        "clean": verdicts.clean,
        "per_attack": per_attack,
        "individual": indiv,
        "worst_case": worst,
        "robust_mask": verdicts.robust,
        "clean_mask": clean_mask,
        "broken_by": verdicts.broken_by.astype(str),
        "perturbation_norm": verdicts.pert_norm,
        "x_adv": verdicts.x_adv,
        "flags": flag_list,
        "seconds": time.time() - run.start,
        "attacks": [name for name, _ in plan],
        "version": run.version if run.version is not None else "custom",
        "verdict_passes": int(passes),
        "resumed": int(replayed.sum()),
        "devices": list(devices) if len(devices) > 1 else [],
        "eps": eps,
        "norm": norm,
        "n_examples": n,
    }


def _check_classes(names, classes):
    """A UserError if an attack of ``names`` needs more classes than the model's ``classes``."""
    for name in names:
        need = attack_names.component(name).min_classes
        if classes < need:
            raise UserError(
                f"attack {name!r} needs at least {need} classes, the model has {classes}; "
                f"choose attacks from {sorted(c.name for c in attack_names.components() if c.min_classes <= classes)}"
            )


def _warn_failed(flag_list):
    for flag in flag_list:
        if not flag["passed"]:
            warnings.warn(f"AutoAttack check {flag['name']}: {flag['detail']}", RuntimeWarning, stacklevel=4)


def _printer(verbose):
    from tqdm.auto import tqdm

    return tqdm.write if verbose else (lambda *_: None)


class _Verdicts:
    """Per-example verdicts of an ensemble: who broke each example, with which point and at what norm."""

    def __init__(self, x, clean_mask):
        self.clean_mask = clean_mask
        self.clean = float(clean_mask.mean())
        self.robust = clean_mask.copy()
        self.broken_by = np.where(clean_mask, "", "clean").astype(object)
        self.pert_norm = np.full(len(x), np.nan)
        self.x_adv = x.copy()

    def run_ensemble(self, plan, runner, report) -> dict:
        """Each attack of ``plan`` in turn on the examples still robust; the accuracy after each."""
        per_attack = {}
        for name, fn in plan:
            idx = np.flatnonzero(self.robust)
            if idx.size:
                fooled, points, norms = runner.attack(fn, idx, name)
                self.robust[idx[fooled]] = False
                self.x_adv[idx[fooled]] = points[fooled]
                self.broken_by[idx[fooled]] = name
                self.pert_norm[idx[fooled]] = norms[fooled]
            per_attack[name] = float(self.robust.mean())
            report(name, per_attack[name])
        return per_attack

    def run_alone(self, plan, runner, report) -> dict:
        """Each attack of ``plan`` alone on every clean-correct example; its accuracy alone."""
        indiv = {}
        idx = np.flatnonzero(self.clean_mask)
        for name, fn in plan:
            alone = self.clean_mask.copy()
            if idx.size:
                fooled, points, _ = runner.attack(fn, idx, f"{name} (alone)")
                alone[idx[fooled]] = False
                newly = idx[fooled & self.robust[idx]]
                self.x_adv[newly] = points[fooled & self.robust[idx]]
                self.robust[idx[fooled]] = False
            indiv[name] = float(alone.mean())
            report(name, indiv[name])
        return indiv


__all__ = ["ATTACKS", "ALL_ATTACKS", "VERSIONS", "VERSION_ATTACKS", "VERSION_VERDICT_PASSES", "RAND_EOT_ITER",
           "run_autoattack"]
