"""The AutoAttack ensemble: the attacks of each version with their budgets, and the runner over a data set.

:data:`VERSIONS` names the attacks of "standard", "fast", "plus" and "rand";
:data:`VERSION_ATTACKS` holds each version's budgets (the reference's
``set_version``) and :data:`ALL_ATTACKS` every attack that can be named
alone. :func:`run_autoattack` runs an ensemble in batches on the examples
every earlier attack failed to break, optionally sharded over the replica
devices of a ``tf.distribute`` strategy, and records each decided batch in a
JSON-lines file (``partial_path``) from which an interrupted run resumes.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, Mapping, Sequence, Union

import numpy as np
import tensorflow as tf

from tfrobust.autoattack.apgd import apgd, apgd_targeted
from tfrobust.autoattack.checks import autoattack_flags, check_result, square_check
from tfrobust.autoattack.core import (
    BALL_TOLERANCE, as_inputs, check_ball, check_eps, check_norm, check_positive_int, check_seed, n_classes,
    perturbation_norms, predict_logits, predicted, project_numpy,
)
from tfrobust.autoattack.fab import fab, fab_targeted
from tfrobust.autoattack.square import square
from tfrobust.errors import UserError, unknown_choice


def _standard_apgd_ce(model_fn, x, y, eps, norm, seed):
    return apgd(model_fn, x, y, eps, norm=norm, loss="ce", n_iter=100, n_restarts=1, seed=seed)


def _standard_apgd_t(model_fn, x, y, eps, norm, seed):
    return apgd_targeted(model_fn, x, y, eps, norm=norm, n_iter=100, n_target_classes=9, seed=seed)


def _standard_fab_t(model_fn, x, y, eps, norm, seed):
    return fab_targeted(model_fn, x, y, eps, norm=norm, n_iter=100, n_target_classes=9, n_restarts=1, seed=seed)


def _standard_square(model_fn, x, y, eps, norm, seed):
    return square(model_fn, x, y, eps, norm=norm, n_queries=5000, p_init=0.8, seed=seed)


def _budget(attack, **settings):
    """``fn(model_fn, x, y, eps, norm, seed)`` running ``attack`` with fixed ``settings``."""

    def run(model_fn, x, y, eps, norm, seed):
        return attack(model_fn, x, y, eps, norm=norm, seed=seed, **settings)

    run.settings = dict(settings)
    return run


# name -> fn(model_fn, x, y, eps, norm, seed) -> x_adv, with AutoAttack's "standard" settings
ATTACKS: Dict[str, Callable] = {
    "apgd-ce": _standard_apgd_ce,
    "apgd-t": _standard_apgd_t,
    "fab-t": _standard_fab_t,
    "square": _standard_square,
}

# Forward passes averaged by the EOT attacks (the reference's eot_iter of version "rand").
RAND_EOT_ITER = 20

# Every attack that can be named alone: standard's four with its budgets, then APGD on the DLR
# loss and untargeted FAB with one restart (the reference's set_version("standard") sets both
# objects to one restart, autoattack.py lines 309 and 316), then APGD-CE and APGD-DLR with
# "rand"'s EOT over 20 passes.
ALL_ATTACKS: Dict[str, Callable] = {
    **ATTACKS,
    "apgd-dlr": _budget(apgd, loss="dlr", n_iter=100, n_restarts=1),
    "fab": _budget(fab, n_iter=100, n_restarts=1),
    "apgd-ce-eot": _budget(apgd, loss="ce", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
    "apgd-dlr-eot": _budget(apgd, loss="dlr", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
}

VERSIONS: Dict[str, list] = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "fast": ["apgd-ce", "apgd-t"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}

# The budgets of each version (reference autoattack.py, set_version, lines 302-337, for L-inf
# and L2): "plus" gives APGD and untargeted FAB 5 restarts, "rand" runs APGD with 20 EOT passes.
VERSION_ATTACKS: Dict[str, Dict[str, Callable]] = {
    "standard": {name: ATTACKS[name] for name in VERSIONS["standard"]},
    "fast": {name: ATTACKS[name] for name in VERSIONS["fast"]},
    "plus": {
        "apgd-ce": _budget(apgd, loss="ce", n_iter=100, n_restarts=5),
        "apgd-dlr": _budget(apgd, loss="dlr", n_iter=100, n_restarts=5),
        "fab": _budget(fab, n_iter=100, n_restarts=5),
        "square": _budget(square, n_queries=5000, p_init=0.8, n_restarts=1),
        "apgd-t": _budget(apgd_targeted, n_iter=100, n_target_classes=9, n_restarts=1),
        "fab-t": _budget(fab_targeted, n_iter=100, n_target_classes=9, n_restarts=1),
    },
    "rand": {
        "apgd-ce": _budget(apgd, loss="ce", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
        "apgd-dlr": _budget(apgd, loss="dlr", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
    },
}

# Forward passes whose mean logits decide each verdict (clean and adversarial) of a version.
VERSION_VERDICT_PASSES = {"rand": RAND_EOT_ITER}

# Smallest number of classes each attack supports.
_MIN_CLASSES = {"apgd-ce": 2, "apgd-t": 4, "fab-t": 2, "square": 2, "apgd-dlr": 3, "fab": 2,
                "apgd-ce-eot": 2, "apgd-dlr-eot": 3}

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
    for name in names:
        if name not in ALL_ATTACKS:
            # standard's attacks first, then the others in the order of ALL_ATTACKS
            raise UserError(f"unknown attack {name!r}; allowed: {', '.join(ALL_ATTACKS)}")
    if len(set(names)) != len(names):
        raise UserError(f"attacks lists a name twice: {names}")
    return [(name, ALL_ATTACKS[name]) for name in names]


def _verdict_passes(version, attacks, plan) -> int:
    """Forward passes averaged for each verdict: 20 for "rand" and the named EOT attacks, else 1."""
    if attacks is None:
        return VERSION_VERDICT_PASSES.get(version, 1)
    passes = [getattr(fn, "settings", {}).get("eot_iter", 1) for _, fn in plan]
    return max(passes) if passes else 1


def run_autoattack(model_fn, x, y, eps, norm="linf", version="standard", attacks: AttackSpec = None,
                   batch_size=500, seed=0, verbose=True, individual=False, *, verdict_passes=None,
                   flags=True, partial_path=None, strategy=None) -> dict:
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
      version: a key of :data:`VERSIONS` ("standard": APGD-CE, APGD-T, FAB-T,
        Square; "plus": APGD-CE and APGD-DLR with 5 restarts, FAB with 5
        restarts, Square, APGD-T, FAB-T; "rand": APGD-CE and APGD-DLR with
        EOT over 20 passes; "fast": APGD-CE, APGD-T), each with the budgets of
        :data:`VERSION_ATTACKS`; ignored when ``attacks`` is given.
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
        examples are not stored: ``x_adv`` holds ``x`` for them.
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
    norm = check_norm(norm)
    eps = check_eps(eps)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    plan = _resolve_attacks(version, attacks)
    passes = _verdict_passes(version, attacks, plan) if verdict_passes is None else check_positive_int(
        "verdict_passes", verdict_passes)
    x_t, y_t = as_inputs(x, y)
    x_np = x_t.numpy()
    y_np = y_t.numpy()
    n = len(x_np)
    if n == 0:
        raise UserError("x is empty")

    from tqdm.auto import tqdm

    logits = predict_logits(model_fn, x_t, batch_size, passes=passes)
    classes = n_classes(logits, y_t)
    for name, _ in plan:
        need = _MIN_CLASSES.get(name, 2)
        if attacks is None or not isinstance(attacks, Mapping):
            if classes < need:
                raise UserError(
                    f"attack {name!r} needs at least {need} classes, the model has {classes}; "
                    f"choose attacks from {sorted(a for a, k in _MIN_CLASSES.items() if k <= classes)}"
                )
    flag_list = None
    if flags:
        flag_list = autoattack_flags(model_fn, x_np[:batch_size], y_np[:batch_size], eps, norm=norm,
                                     randomised_expected=passes > 1, seed=seed)
        for flag in flag_list:
            if not flag["passed"]:
                warnings.warn(f"AutoAttack check {flag['name']}: {flag['detail']}", RuntimeWarning, stacklevel=2)
    clean_mask = (predicted(logits).numpy() == y_np)
    robust = clean_mask.copy()
    broken_by = np.where(clean_mask, "", "clean").astype(object)
    pert_norm = np.full(n, np.nan)
    x_adv = x_np.copy()
    clean = float(clean_mask.mean())
    say = tqdm.write if verbose else (lambda *_: None)
    say(f"AutoAttack ({norm}, eps={eps:g}): clean accuracy {clean:.2%} on {n} examples")
    log = _PartialLog(partial_path, _fingerprint(x_np, y_np, eps, norm, [a for a, _ in plan], version if attacks
                                                 is None else None, seed, batch_size, passes, individual))
    replayed = np.zeros(n, bool)
    devices = _replica_devices(strategy)

    def attack_examples(name, fn, idx, bar_desc):
        """Runs ``fn`` on x[idx] in batches; returns (fooled mask over idx, adversarial points, norms)."""
        fooled = np.zeros(len(idx), bool)
        points = x_np[idx].copy()
        norms = np.full(len(idx), np.nan)
        n_batches = max(1, math.ceil(len(idx) / batch_size))
        split = len(devices) > 1 and n_batches < len(devices) and _splits_batches(devices)
        group = len(devices) if len(devices) > 1 and not split else 1

        def finish(b, sl, xb, yb, out):
            out = project_numpy(np.asarray(out, np.float32).reshape(xb.shape), xb, eps, norm)
            pred = predicted(predict_logits(model_fn, tf.constant(out), batch_size, passes=passes)).numpy()
            fooled[sl] = pred != yb
            points[sl] = out
            norms[sl] = np.where(fooled[sl], perturbation_norms(out, xb, norm), np.nan)
            log.record(bar_desc, b, idx[sl], idx[sl][fooled[sl]], norms[sl][fooled[sl]])

        with tqdm(total=len(idx), desc=bar_desc, disable=not verbose, leave=False) as bar:
            pending = []
            for b in range(n_batches):
                sl = slice(b * batch_size, min((b + 1) * batch_size, len(idx)))
                xb, yb = x_np[idx[sl]], y_np[idx[sl]]
                if len(xb) == 0:
                    continue
                done = log.lookup(bar_desc, b, idx[sl])
                if done is not None:
                    fooled_idx, fooled_norms = done
                    where = np.searchsorted(idx[sl], fooled_idx)
                    fooled[sl][where] = True
                    norms[sl][where] = fooled_norms
                    replayed[fooled_idx] = True
                    bar.update(len(xb))
                    continue
                pending.append((b, sl, xb, yb))
                if len(pending) < group and b < n_batches - 1:
                    continue
                if split and len(xb) >= len(devices):
                    outs = [_run_sharded(fn, model_fn, xb, yb, eps, norm, seed, devices)]
                elif len(pending) > 1:
                    outs = _run_on_devices(fn, model_fn, [(xb, yb) for _, _, xb, yb in pending], eps, norm, seed,
                                           devices)
                else:
                    outs = [fn(model_fn, xb, yb, eps, norm=norm, seed=seed)]
                for (b_, sl_, xb_, yb_), out in zip(pending, outs):
                    finish(b_, sl_, xb_, yb_, out)
                    bar.update(len(xb_))
                pending = []
        return fooled, points, norms

    per_attack = {}
    for name, fn in plan:
        idx = np.flatnonzero(robust)
        if idx.size:
            fooled, points, norms = attack_examples(name, fn, idx, name)
            robust[idx[fooled]] = False
            x_adv[idx[fooled]] = points[fooled]
            broken_by[idx[fooled]] = name
            pert_norm[idx[fooled]] = norms[fooled]
        per_attack[name] = float(robust.mean())
        say(f"  robust accuracy after {name.upper()}: {per_attack[name]:.2%} ({time.time() - start:.1f} s)")

    indiv = None
    if individual:
        indiv = {}
        idx = np.flatnonzero(clean_mask)
        for name, fn in plan:
            alone = clean_mask.copy()
            if idx.size:
                fooled, points, _ = attack_examples(name, fn, idx, f"{name} (alone)")
                alone[idx[fooled]] = False
                newly = idx[fooled & robust[idx]]
                x_adv[newly] = points[fooled & robust[idx]]
                robust[idx[fooled]] = False
            indiv[name] = float(alone.mean())
            say(f"  robust accuracy of {name.upper()} alone: {indiv[name]:.2%}")

    if flag_list is not None and "square" not in [a for a, _ in plan]:
        flag_list[-1] = check_result("square_not_better", True, "Square is not in the ensemble", skipped=True)
    elif flag_list is not None:
        flag_list[-1] = square_check(broken_by, n)
        if not flag_list[-1]["passed"]:
            warnings.warn(f"AutoAttack check square_not_better: {flag_list[-1]['detail']}", RuntimeWarning,
                          stacklevel=2)
    fresh = ~replayed
    check_ball(x_adv[fresh], x_np[fresh], eps, norm)
    if np.any(pert_norm[replayed] > eps + BALL_TOLERANCE):
        raise RuntimeError(f"{partial_path} records perturbations outside the {norm} ball of radius {eps}")
    log.close()
    worst = float(robust.mean())
    say(f"  worst case over all attacks: {worst:.2%} ({time.time() - start:.1f} s)")
    return {
        "clean": clean,
        "per_attack": per_attack,
        "individual": indiv,
        "worst_case": worst,
        "robust_mask": robust,
        "clean_mask": clean_mask,
        "broken_by": broken_by.astype(str),
        "perturbation_norm": pert_norm,
        "x_adv": x_adv,
        "flags": flag_list,
        "seconds": time.time() - start,
        "attacks": [name for name, _ in plan],
        "version": version if attacks is None else "custom",
        "verdict_passes": int(passes),
        "resumed": int(replayed.sum()),
        "devices": list(devices) if len(devices) > 1 else [],
        "eps": eps,
        "norm": norm,
        "n_examples": n,
    }


def _replica_devices(strategy) -> list:
    """The local replica devices of ``strategy`` (empty for None or the default strategy)."""
    if strategy is None:
        return []
    try:
        return list(strategy.extended.worker_devices)
    except (AttributeError, NotImplementedError):
        return []


def _splits_batches(devices) -> bool:
    """Whether a batch is worth splitting across ``devices``: only across accelerators.

    Logical devices of one CPU share its cores, so a split batch only adds
    per-call overhead (measured 20-30% slower on two logical CPUs,
    benchmarks/bench_autoattack_sharding.py).
    """
    return any((tf.DeviceSpec.from_string(str(d)).device_type or "CPU").upper() != "CPU" for d in devices)


def _run_on_devices(fn, model_fn, batches, eps, norm, seed, devices):
    """``fn`` on whole batches, batch k on device k, concurrently; each batch exactly as on one device."""
    from concurrent.futures import ThreadPoolExecutor

    def run(device, batch):
        xb, yb = batch
        with tf.device(device):
            return np.asarray(fn(model_fn, xb, yb, eps, norm=norm, seed=seed), np.float32)

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(run, devices[:len(batches)], batches))


def _run_sharded(fn, model_fn, xb, yb, eps, norm, seed, devices):
    """``fn`` on one shard of the batch per device, concurrently; the points in the batch's order."""
    shards = [s for s in np.array_split(np.arange(len(xb)), len(devices)) if len(s)]
    parts = _run_on_devices(fn, model_fn, [(xb[s], yb[s]) for s in shards], eps, norm, seed, devices)
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------
# Per-example results on disk (resumable evaluation)
# --------------------------------------------------------------------------


def _fingerprint(x, y, eps, norm, names, version, seed, batch_size, passes, individual) -> dict:
    """What a partial-results file must match to be replayed: the data and every setting."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    return {"data_sha256": digest.hexdigest(), "n_examples": int(len(x)), "eps": float(eps), "norm": norm,
            "attacks": list(names), "version": version, "seed": int(seed), "batch_size": int(batch_size),
            "verdict_passes": int(passes), "individual": bool(individual)}


class _PartialLog:
    """Append-only JSON-lines record of decided batches; replays a file from an interrupted run.

    Line 1 is the fingerprint of the run; each further line is one batch:
    ``{"attack", "batch", "examples": [...], "fooled": [...], "norms": [...]}``,
    written with one ``write`` call and flushed to disk (fsync) before the next
    batch starts. A torn last line (the process was killed while writing) is
    ignored and its batch runs again.
    """

    def __init__(self, path, fingerprint):
        import json
        import os

        self.path = path
        self.done = {}
        self.file = None
        if path is None:
            return
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().split("\n")
            try:
                header = json.loads(lines[0])
            except ValueError:
                raise UserError(f"{path} is not a partial-results file of this evaluation; remove it or "
                                "choose another output") from None
            if header != fingerprint:
                changed = sorted(k for k in set(header) | set(fingerprint) if header.get(k) != fingerprint.get(k))
                raise UserError(f"{path} was written by an evaluation with different {', '.join(changed)}; "
                                "remove it to start over or rerun the same command")
            complete = []
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # torn last line
                self.done[(entry["attack"], entry["batch"])] = entry
                complete.append(line)
            # rewrite without a torn tail, atomically
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join([lines[0]] + complete) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")
            self._write(fingerprint)

    def _write(self, obj):
        import json
        import os

        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def lookup(self, attack, batch, examples):
        entry = self.done.get((attack, batch))
        if entry is None:
            return None
        if list(entry["examples"]) != [int(i) for i in examples]:
            raise UserError(f"{self.path} does not match this evaluation (batch {batch} of {attack} holds other "
                            "examples); remove it to start over")
        return np.asarray(entry["fooled"], np.int64), np.asarray(entry["norms"], np.float64)

    def record(self, attack, batch, examples, fooled, norms):
        if self.file is not None:
            self._write({"attack": attack, "batch": int(batch), "examples": [int(i) for i in examples],
                         "fooled": [int(i) for i in fooled], "norms": [float(v) for v in norms]})

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


__all__ = ["ATTACKS", "ALL_ATTACKS", "VERSIONS", "VERSION_ATTACKS", "VERSION_VERDICT_PASSES", "RAND_EOT_ITER",
           "run_autoattack"]
