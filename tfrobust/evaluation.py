"""Robust accuracy of any model that maps images in [0, 1] to logits.

The inputs are images ``(N, H, W, C)`` or feature vectors ``(N, F)`` (tabular
data), with values in [0, 1] (others are refused, with the range found); on
feature vectors every attack but Square runs (Square draws image patches), so
``standard`` and ``plus``, which hold it, are refused there in one line.

``evaluate`` runs a list of named attacks over a test set in batches and
returns accuracies as fractions in [0, 1] under keys that name the attack:

- ``clean``: no attack;
- ``fgsm``: one signed-gradient step of size eps (Goodfellow et al. 2015);
- ``pgd<N>_ce`` / ``pgd<N>_cw``: N-step PGD with a uniform random start on
  cross-entropy / on the Carlini-Wagner margin (Madry et al. 2018; Carlini &
  Wagner 2017), step eps/4 unless given (2/255 at eps 8/255, docs/algorithms.md,
  section 7);
- ``apgd_ce``, ``apgd_t``, ``fab_t``, ``square``: the AutoAttack components
  (Croce & Hein, ICML 2020; :mod:`tfrobust.autoattack`), run in that order as
  one ensemble, each on the examples still correct, and reported
  cumulatively as AutoAttack prints them;
- ``cleverhans_fgsm``, ``cleverhans_pgd<N>``, ``cleverhans_mim<N>``: the same
  threat model through cleverhans 4.0.0 (FGSM, PGD with a uniform start,
  momentum iterative method, Dong et al. 2018), as independent cross-checks
  of tfrobust's own attacks (L-inf and L2);
- ``apgd_dlr`` (APGD on the DLR loss), ``fab`` (untargeted FAB),
  ``apgd_ce_eot`` and ``apgd_dlr_eot`` (APGD with EOT over 20 forward passes,
  for randomised models): further AutoAttack components; named components
  run as one ensemble in the order apgd_ce, apgd_ce_eot, apgd_dlr,
  apgd_dlr_eot, apgd_t, fab, fab_t, square;
- ``standard`` (all four) and ``fast`` (APGD-CE and APGD-T): the ensembles,
  reported as ``autoattack_standard`` / ``autoattack_fast`` (per-example
  worst case) next to their components;
- ``plus`` (APGD-CE and APGD-DLR with 5 restarts, FAB with 5 restarts,
  Square, APGD-T, FAB-T) and ``rand`` (APGD-CE and APGD-DLR with EOT over 20
  passes; every verdict on the mean logits of 20 passes): AutoAttack's other
  versions with the reference's budgets, named alone (without other
  AutoAttack names), reported as ``autoattack_plus`` / ``autoattack_rand``.

An AutoAttack ensemble adds the reference's automatic checks (randomised
forward pass, probability outputs, zero DLR gradients, Square beating the
gradient attacks) and a rounded-eps check under ``flags``, and the
per-example verdicts (``autoattack.broken_by``, ``perturbation_norm``).

``worst_case`` is the per-example worst case over every attack that ran.
With ``integrity_examples`` > 0 the report also carries the integrity checks
of :mod:`tfrobust.integrity`, measured on the first examples.

Before any attack, the arguments are checked (finite eps and step, PGD steps
in 1..1000, positive batch size, as many labels as images) and so is the
model against the data (:func:`check_model_and_data`: it takes the images,
outputs (batch, classes) logits covering every label, and its outputs are
finite on every clean image -- otherwise :class:`ModelIntegrityError`, and no
accuracy). An adversarial image whose outputs are not finite counts as wrong;
``non_finite_outputs`` counts them per attack and a failing ``finite outputs``
integrity check is added.

:func:`evaluate_run` is ``tfrobust evaluate`` as a function: it loads a run
directory, SavedModel or .keras file, takes the data and threat model from
the run, draws the test examples, runs :func:`evaluate`, adds flatness and
loss landscapes on request, and writes the report and its RobustBench-style
summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfrobust import attacks as attack_lib
from tfrobust import network_checks
from tfrobust import rundir
from tfrobust.attack_names import (  # noqa: F401 - re-exported: the names are part of this module's API
    AUTOATTACK, AUTOATTACK_EXTRA, COMPONENT_ORDER, DEFAULT_ATTACKS, ENSEMBLES, MAX_STEPS, OWN_BUDGET_VERSIONS,
    attack_names_help, autoattack_plan, component, is_autoattack, parse_attacks, resolve, runner_attack,
)
from tfrobust.errors import UserError, check_int, check_number
from tfrobust.seeds import EVALUATION, batch_seed


class ModelIntegrityError(UserError):
    """The model's outputs cannot be evaluated (not finite): an integrity failure, never an accuracy."""


def check_model_and_data(model_fn: Callable, x, y, batch_size: int) -> int:
    """Checks that ``model_fn`` takes the images and outputs logits for every label; returns the class count.

    Also runs the model once over all of ``x``: outputs that are NaN or
    infinite raise :class:`ModelIntegrityError` (an argmax over NaN would
    read as class 0 and look like an accuracy).
    """
    probe = tf.convert_to_tensor(x[: min(len(x), 2)], tf.float32)
    try:
        logits = model_fn(probe)
    except Exception as e:  # a mismatched model raises many kinds (ValueError, InvalidArgumentError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"the model cannot take the data's images of shape {tuple(x.shape[1:])}: {first}") from None
    if isinstance(logits, (list, tuple, dict)):
        raise UserError(f"the model returns {len(logits)} outputs; tfrobust supports {network_checks.SUPPORTED_IO}")
    shape = tuple(logits.shape)
    if len(shape) != 2 or shape[0] != probe.shape[0]:
        raise UserError(f"the model outputs shape {shape} for {probe.shape[0]} images; expected (batch, classes) logits")
    classes = int(shape[1])
    if len(y) and int(np.max(y)) >= classes:
        raise UserError(f"the model outputs {classes} classes but the labels go up to {int(np.max(y))}")
    bad = 0
    for i in range(0, len(x), batch_size):
        out = tf.cast(model_fn(tf.convert_to_tensor(x[i : i + batch_size], tf.float32)), tf.float32)
        bad += int(tf.reduce_sum(tf.cast(tf.reduce_any(~tf.math.is_finite(out), axis=-1), tf.int32)))
    if bad:
        raise ModelIntegrityError(
            f"integrity failure: the model's outputs are NaN or infinite on {bad} of {len(x)} test examples; "
            "no accuracy is reported"
        )
    return classes


def _attack(name: str, eps: float, norm: str, step_size):
    """``attack(model_fn, x, y, seed) -> x_adv`` for the named runner attack (its row in ``attack_names``)."""
    row, match = runner_attack(name)
    function = resolve(row.function)

    def attack(model_fn, x, y, seed):
        return function(match, model_fn, x, y, eps, norm=norm, step_size=step_size, seed=seed)

    return attack


def evaluate(
    model_fn: Callable,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    step_size=None,
    batch_size: int = 256,
    seed: int = 0,
    verbose: bool = True,
    integrity_examples: int = 0,
    partial_path=None,
    strategy=None,
    model_checksum=None,
) -> dict:
    """Accuracy under each attack, and the per-example worst case.

    Args:
      model_fn: maps float32 NHWC images (or (N, F) feature vectors) in [0, 1] to logits.
      x, y: test images (or feature vectors) in [0, 1] and integer labels (numpy arrays).
      eps, norm: the threat model ("linf" or "l2").
      attacks: names, see the module doc.
      step_size: PGD step; default eps / 4.
      partial_path: a JSON-lines file of the AutoAttack ensemble's decided
        batches; an interrupted evaluation with the same arguments resumes
        from it (see :func:`tfrobust.autoattack.run_autoattack`). The other
        attacks and the integrity probes run again. ``model_checksum``
        identifies the model in that file (default: the sha256 of a Keras
        model's weights); a file of another model is not replayed.
      strategy: a ``tf.distribute`` strategy whose local replica devices
        share each AutoAttack batch (see
        :func:`tfrobust.autoattack.run_autoattack`).
    Returns:
      ``{"accuracy": {name: fraction}, "worst_case": fraction, "examples": n,
      "eps": eps, "norm": norm, "seconds": {name: s}, "correct": {name: bool array}}``,
      ``"flags"`` (the reference AutoAttack's automatic checks,
      :func:`tfrobust.integrity.autoattack_flags`: probabilities instead of
      logits, a random forward pass, zero gradients, a rounded eps; on the
      first batch, whatever attacks ran), and when an AutoAttack ensemble
      ran, ``"autoattack"`` (version, attacks, verdict passes, seconds,
      per-example ``broken_by`` and ``perturbation_norm``).
    """
    eps = check_number("eps", eps)
    if norm not in attack_lib.NORMS:
        raise UserError(f"unknown norm {norm!r}; allowed: l2, linf")
    names = parse_attacks(attacks)
    step = eps / 4.0 if step_size is None else check_number("step_size", step_size)
    check_int("batch_size", batch_size)
    check_int("integrity_examples", integrity_examples, 0)
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if n == 0:
        raise UserError("no test examples to evaluate")
    if len(y) != n:
        raise UserError(f"x has {n} examples but y has {len(y)} labels")
    kind = network_checks.input_kind(x)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        network_checks.check_labels(y)  # names one-hot labels and the fix
        raise UserError(f"y must be integer labels of shape (N,), got {y.dtype} of shape {y.shape}")
    network_checks.check_unit_range(x)
    network_checks.check_attacks_for(kind, names, ENSEMBLES)
    network_checks.check_network_io(model_fn)  # a Keras network; a plain function passes
    check_model_and_data(model_fn, x, y, batch_size)
    report = {"accuracy": {}, "seconds": {}, "correct": {}, "examples": int(n), "eps": float(eps), "norm": norm,
              "non_finite_outputs": {}}
    simple = [a for a in names if not is_autoattack(a)]
    for name in simple:
        start = time.time()
        correct, finite = attack_lib.attack_batches(
            model_fn, x, y, _attack(name, eps, norm, step), batch_size=batch_size,
            seeds=lambda b, _: batch_seed(seed, b, EVALUATION), desc=f"{name:>10}" if verbose else None)
        non_finite = int(np.sum(~finite))
        if non_finite:
            report["non_finite_outputs"][name] = non_finite
        report["correct"][name] = correct
        report["accuracy"][name] = float(correct.mean())
        report["seconds"][name] = round(time.time() - start, 3)
    own_version, ensemble, components = autoattack_plan(names)
    if own_version:
        _run_autoattack(report, model_fn, x, y, eps, norm, components, ensemble, batch_size,
                        seed, verbose, version=own_version, partial_path=partial_path, strategy=strategy,
                        model_checksum=model_checksum)
    elif components:
        _run_autoattack(report, model_fn, x, y, eps, norm, components, ensemble, batch_size, seed, verbose,
                        partial_path=partial_path, strategy=strategy, model_checksum=model_checksum)
    report["worst_case"] = float(np.logical_and.reduce(list(report["correct"].values())).mean())
    if integrity_examples:
        report["integrity"] = integrity(report, model_fn, x[:integrity_examples], y[:integrity_examples],
                                        eps, norm, seed, verbose, images=kind == "images")
    _finite_outputs_check(report)
    if report.get("flags") is None:  # AutoAttack did not run: its flags are computed here, on the first batch
        from tfrobust.integrity import autoattack_flags

        report["flags"] = autoattack_flags(model_fn, x[:batch_size], y[:batch_size], eps, norm=norm, seed=seed)
    return report


def _finite_outputs_check(report) -> None:
    """Adds the failed "finite outputs" integrity check when an attack met NaN or infinite logits."""
    if not report["non_finite_outputs"]:
        return
    counts = ", ".join(f"{k}: {v}" for k, v in report["non_finite_outputs"].items())
    check = {"name": "finite outputs", "passed": False, "skipped": False,
             "detail": f"NaN or infinite logits on adversarial examples (counted as wrong) -- {counts}"}
    if "integrity" in report:
        report["integrity"]["checks"].append(check)
        report["integrity"]["passed"] = False
    else:
        report["integrity"] = {"checks": [check], "probe_examples": 0, "seconds": 0.0, "passed": False}


def _run_autoattack(report, model_fn, x, y, eps, norm, components, ensemble, batch_size, seed, verbose,
                    version=None, partial_path=None, strategy=None, model_checksum=None):
    """Runs the AutoAttack components as one ensemble (or ``version`` with its budgets) into ``report``."""
    from tfrobust import autoattack

    start = time.time()
    attacks = None if version else [component(c).name for c in components]
    result = autoattack.run_autoattack(
        model_fn, x, y, eps, norm=norm, version=version or "standard", attacks=attacks,
        batch_size=batch_size, seed=seed, verbose=verbose, partial_path=partial_path, strategy=strategy,
        model_checksum=model_checksum,
    )
    seconds = round(time.time() - start, 3)
    for name in components:
        report["accuracy"][name] = float(result["per_attack"][component(name).name])
    mask = np.asarray(result["robust_mask"], bool)
    report["correct"]["autoattack"] = mask
    label = "autoattack_" + ensemble[0] if len(ensemble) == 1 else "autoattack"
    report["accuracy"][label] = float(mask.mean())
    report["seconds"][label] = seconds
    report["autoattack"] = {"attacks": components, "seconds": seconds, "version": version or (
        ensemble[0] if len(ensemble) == 1 else "custom"), "verdict_passes": result["verdict_passes"],
        "resumed": result["resumed"], "clean": result["clean"], "devices": result["devices"], "broken_by": result["broken_by"].tolist(),
        "perturbation_norm": [None if np.isnan(v) else float(v) for v in result["perturbation_norm"]]}
    report["flags"] = result["flags"]
    from tfrobust.integrity import from_autoattack

    report["_autoattack_integrity"] = from_autoattack(result)


def integrity(report, model_fn, x, y, eps, norm, seed, verbose, images=True) -> dict:
    """Integrity checks on the main results and on probes run on the first examples.

    A check fails when it fails on either; the details of both are kept.
    Without ``images`` (feature vectors) the probes run no Square attack.
    """
    from tfrobust.integrity import integrity_checks, run_integrity_probes

    main_inputs = {"n_examples": report["examples"], "accuracy": dict(report["accuracy"])}
    main_inputs["accuracy"]["clean"] = report["accuracy"].get("clean", main_inputs["accuracy"].get("clean"))
    if main_inputs["accuracy"]["clean"] is None:
        main_inputs["accuracy"].pop("clean")
    aa = report.pop("_autoattack_integrity", None)
    if aa and "gradient_free_only" in aa:
        main_inputs["gradient_free_only"] = aa["gradient_free_only"]
    start = time.time()
    probes = run_integrity_probes(model_fn, x, y, eps, norm=norm, seed=seed, verbose=verbose,
                                  **({} if images else {"square_queries": 0}))
    merged = []
    for a, b in zip(integrity_checks(main_inputs), integrity_checks(probes)):
        used = [c for c in (a, b) if not c.get("skipped")]
        merged.append({
            "name": a["name"],
            "passed": all(c["passed"] for c in used),
            "skipped": not used,
            "detail": " | ".join(c["detail"] for c in used) if used else a["detail"],
        })
    return {"checks": merged, "probe_examples": int(len(x)), "seconds": round(time.time() - start, 3),
            "passed": all(c["passed"] for c in merged)}


def evaluate_run(model: str, attacks: Sequence[str] = DEFAULT_ATTACKS, *, which: str = "last", data=None,
                 data_dir=None, eps=None, norm=None, examples=None, seed: int = 0, batch_size: int = 256,
                 integrity_examples: int = 200, strategy=None, output=None, flatness=None, landscape=None,
                 plugins=(), verbose: bool = True) -> dict:
    """Evaluates a run directory, a SavedModel or a .keras file end to end; returns the report.

    ``model`` is loaded (``which``: a run directory's last or best network,
    after importing ``plugins``), the data, eps and norm default to the run's
    (:func:`tfrobust.loading.evaluation_settings`), ``examples`` test
    examples are drawn stratified by label with ``seed`` (default: all), and
    :func:`evaluate` runs ``attacks``; ``strategy`` ("default" or "mirrored";
    default: mirrored for a run trained on several devices) shares the
    AutoAttack batches. ``flatness`` (``{"examples": n, "restarts": r}``) adds
    :func:`tfrobust.flatness.flatness_report`; ``landscape`` (a directory, or
    "" for ``<run>/landscape``) writes the 1-D loss landscapes. With
    ``output`` the report is written there (never over an existing file),
    the RobustBench-style summary next to it, and the AutoAttack verdicts to
    ``<output>.partial.jsonl`` as they are decided (a rerun resumes there).
    With ``verbose`` the tables and the files written are printed. The
    output is locked (``<output>.lock``) while the evaluation runs: a second
    process writing the same output is refused.
    """
    from tfrobust import loading
    from tfrobust.user_code import import_plugins

    say = print if verbose else (lambda *a, **k: None)
    with contextlib.ExitStack() as stack:
        if output is not None:
            stack.enter_context(rundir.output_lock(output))  # a second process on the same output is refused
            rundir.check_new_file(output, "--output")
        import_plugins(plugins or ())
        loaded = loading.load(model, which)
        landscape_dir = _landscape_dir(landscape, model, loaded) if landscape is not None else None
        if (flatness or landscape_dir) and loaded.network is None:
            raise UserError("--flatness and --landscape perturb the weights and need a run directory or a .keras file, not a SavedModel")
        settings = loading.evaluation_settings(loaded, data, eps, norm, data_dir)
        x, y, drawn = _test_examples(settings, examples, seed)
        say(f"{len(x)} test examples of {settings['data']}; {settings['norm']} eps={settings['eps']:.6g} "
            f"({settings['eps_source']})")
        loading.check_compatible(loaded, x, y)
        start = time.time()
        report = evaluate(
            loaded.model_fn, x, y, settings["eps"], settings["norm"], attacks=attacks,
            batch_size=batch_size, seed=seed, integrity_examples=integrity_examples, verbose=verbose,
            partial_path=None if not output else output + ".partial.jsonl",
            strategy=_evaluation_strategy(strategy, loaded), model_checksum=loaded.checksum() if output else None,
        )
        report.update(total_seconds=round(time.time() - start, 3), model=model, data=settings["data"],
                      eps_source=settings["eps_source"], test_examples=drawn)
        if os.path.isfile(model):  # a network imported with tfrobust import-model names its checkpoint
            from tfrobust.zoo.convert import provenance

            if provenance(model):
                report["provenance"] = provenance(model)
        say(format_table(report))
        if flatness:
            from tfrobust.flatness import flatness_report

            report["flatness"] = flatness_report(loaded.network, x, y, eps=settings["eps"], norm=settings["norm"],
                                                 seed=seed, settings=flatness)
            say(format_flatness(report["flatness"]))
        if landscape_dir:
            from tfrobust.landscape import write_landscapes

            report["landscapes"] = write_landscapes(
                loaded.network, x, y, landscape_dir, eps=settings["eps"], norm=settings["norm"],
                kind=("random", "adversarial"), seed=seed,
            )
            say(f"landscapes: {landscape_dir}")
        if output:
            _write_report(output, report, loaded.run_config, say)
        return report


def _landscape_dir(landscape: str, model: str, loaded) -> str:
    """``landscape``, or ``<run>/landscape`` (next to a model file) when empty; refuses a non-empty directory."""
    directory = landscape
    if not directory:
        base = model if loaded.run_config is not None else os.path.dirname(os.path.abspath(model))
        directory = os.path.join(base, "landscape")
    if os.path.exists(directory) and os.listdir(directory):
        raise UserError(f"landscape directory {directory} exists and is not empty; pass --landscape DIR")
    return directory


def _test_examples(settings: dict, examples, seed: int):
    """The test images and labels, all or ``examples`` drawn stratified with ``seed``, and how they were drawn."""
    from tfrobust import data as data_lib

    x, y = data_lib.load_test_arrays(settings["data"], settings["data_dir"])
    drawn = f"the whole test set ({len(x)})"
    if examples is not None and examples < len(x):
        chosen = data_lib.stratified_subset(y, examples, seed)
        drawn = f"{len(chosen)} of {len(x)} test examples, stratified by label, drawn with seed {seed}"
        x, y = x[chosen], y[chosen]
    return x, y, drawn


def _evaluation_strategy(name, loaded):
    """The strategy that shares the AutoAttack batches: ``name``, else the run's runtime.strategy."""
    import types

    from tfrobust.runtime import build_strategy

    run_runtime = ((loaded.run_config or {}).get("runtime") or {})
    if name is None:
        name = "mirrored" if run_runtime.get("strategy") in ("mirrored", "multi_worker") else "default"
    if name == "default":
        return None
    devices = run_runtime.get("devices") if run_runtime.get("strategy") == "mirrored" else None
    return build_strategy(types.SimpleNamespace(strategy="mirrored", devices=devices or None))


def _write_report(output: str, report: dict, run_config, say) -> None:
    """Writes the report to ``output`` and the RobustBench-style summary next to it (never over a file)."""
    try:
        rundir.atomic_write(output, to_json(report))
    except OSError as e:
        raise UserError(f"cannot write --output {output} ({e.strerror or e}); "
                        "the table above holds the accuracies") from None
    say(f"report: {output}")
    root, ext = os.path.splitext(output)
    path = (root if ext == ".json" else output) + ".robustbench.json"
    if os.path.exists(path):
        say(f"summary not written: {path} exists", file=sys.stderr)
        return
    rundir.atomic_write(path, json.dumps(robustbench_summary(report, run_config), indent=2, default=str))
    say(f"summary: {path}")


def format_flatness(result: dict) -> str:
    """One line per flatness measure that was computed."""
    lines = [f"flatness on {result['examples']} examples:"]
    for name in ("average", "worst", "average_clean", "worst_clean"):
        if name in result:
            m = result[name]
            lines.append(f"  {name:<14} xi={m['xi']:<8g} flatness={m['flatness']:.4f}")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """A plain-text table of the accuracies in a report."""
    rows = [("attack", "accuracy", "seconds")]
    for name, acc in report["accuracy"].items():
        seconds = report["seconds"].get(name)
        rows.append((name, f"{100 * acc:.2f}%", "" if seconds is None else f"{seconds:.1f}"))
    rows.append(("worst case", f"{100 * report['worst_case']:.2f}%", ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    header = f"{report['examples']} examples, {report['norm']} eps={report['eps']:.4g}"
    if report.get("provenance"):  # a network from tfrobust import-model
        origin = report["provenance"]
        header += f"; {origin['arch']} imported from {origin['source']} (sha256 {origin['sha256'][:16]}...)"
    if report.get("flags"):
        lines.append("automatic checks (AutoAttack's flags):")
        for check in report["flags"]:
            status = "skipped" if check["skipped"] else ("passed" if check["passed"] else "FLAGGED")
            lines.append(f"  {status:<7} {check['name']}: {check['detail']}")
    if "integrity" in report:
        lines.append(f"integrity checks ({report['integrity']['probe_examples']} probe examples):")
        for check in report["integrity"]["checks"]:
            status = "skipped" if check["skipped"] else ("passed" if check["passed"] else "FAILED")
            lines.append(f"  {status:<7} {check['name']}: {check['detail']}")
    return header + "\n" + "\n".join(lines)


def to_json(report: dict) -> str:
    """The report without per-example arrays, as JSON."""
    clean = {k: v for k, v in report.items() if k not in ("correct", "_autoattack_integrity")}
    return json.dumps(clean, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def eps_text(eps: float) -> str:
    """``"8/255"`` when eps is k/255 (to float32 precision), else the number."""
    k = round(eps * 255)
    if 0 < k <= 255 and abs(eps - k / 255) <= 1e-7 * k / 255:
        return f"{k}/255"
    return f"{eps:g}"


def robustbench_summary(report: dict, config=None) -> dict:
    """The headline numbers of a report in the style of RobustBench's model entries.

    Accuracies in percent with two decimals, as RobustBench lists them:
    ``clean_acc``, ``autoattack_acc`` (the per-example worst case over every
    attack run, which is the ensemble's robust accuracy when only an
    ensemble ran), ``per_attack_acc`` (the report's accuracies), the threat
    model (``threat_model`` "Linf"/"L2", ``eps`` as "8/255" where exact),
    the AutoAttack ``version``, ``n_examples``, ``number_forward_passes`` per
    verdict, the automatic ``flags`` (name -> passed) and ``config``: the
    run's configuration when a run directory was evaluated.
    """
    acc = report["accuracy"]
    aa = report.get("autoattack") or {}
    pct = lambda v: round(100.0 * float(v), 2)  # noqa: E731
    return {
        "dataset": report.get("data"),
        "model": report.get("model"),
        "threat_model": {"linf": "Linf", "l2": "L2"}[report["norm"]],
        "eps": eps_text(float(report["eps"])),
        "eps_value": float(report["eps"]),
        "version": aa.get("version"),
        "n_examples": int(report["examples"]),
        "clean_acc": pct(acc["clean"]) if "clean" in acc else (pct(aa["clean"]) if "clean" in aa else None),
        "autoattack_acc": pct(report["worst_case"]),
        "per_attack_acc": {k: pct(v) for k, v in acc.items()},
        "number_forward_passes": int(aa.get("verdict_passes", 1)),
        "flags": {c["name"]: (None if c["skipped"] else bool(c["passed"])) for c in report.get("flags") or []},
        "config": config,
    }


__all__ = [
    "DEFAULT_ATTACKS",
    "AUTOATTACK",
    "ENSEMBLES",
    "AUTOATTACK_EXTRA",
    "COMPONENT_ORDER",
    "OWN_BUDGET_VERSIONS",
    "attack_names_help",
    "parse_attacks",
    "evaluate",
    "evaluate_run",
    "integrity",
    "format_table",
    "format_flatness",
    "to_json",
    "robustbench_summary",
]
