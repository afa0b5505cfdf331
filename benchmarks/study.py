"""Robust overfitting, flatness and cost of every defense on one small setting.

Trains AT, AT+AWP, TRADES, TRADES+AWP, AT+S2O, TRADES+RAT, MART and MART+AWP
with the same network, data, attack, epochs and seed; evaluates the best
(validation PGD) and last networks on the test subset with clean and PGD-20
accuracy and standard AutoAttack on its first examples, and on their own
training examples with PGD-20 (the robust generalisation gap); measures the
average- and worst-case robust flatness of Stutz et al. (ICCV 2021) of the
last network; and writes ``docs/results.md`` with figures under
``docs/figures/`` (benchmarks/study_report.py).

Results are kept in ``docs/figures/study/<method>.json`` after every step of
every method (training, each evaluation, flatness), so a run that is cut off
still leaves a usable document, and a rerun of the same command skips what is
done (an unfinished training run resumes). ``--jobs N`` trains N methods
at a time in separate processes, taking them in the listed order.

    PYTHONPATH=. .venv/bin/python benchmarks/study.py              # everything
    PYTHONPATH=. .venv/bin/python benchmarks/study.py --report-only  # document from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
FIGURES = os.path.join(DOCS, "figures")
RESULTS_DIR = os.path.join(FIGURES, "study")

METHODS = ("at", "at+awp", "trades", "trades+awp", "at+s2o", "trades+rat", "mart", "mart+awp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated defenses, run in this order")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--train-examples", type=int, default=500)
    p.add_argument("--validation-examples", type=int, default=500)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cnn-width", type=int, default=2, help="small_cnn width multiplier (2: 64/128/512)")
    p.add_argument("--val-pgd-steps", type=int, default=10,
                   help="PGD steps of the per-epoch validation and of the flatness monitor")
    p.add_argument("--awp-warmup", type=int, default=None, help="AWP warm-up epochs (default: 10%% of the epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flatness-every", type=int, default=10, help="FlatnessMonitor period in epochs (0: off)")
    p.add_argument("--flatness-every-methods", default="all",
                   help="methods that get the FlatnessMonitor: 'all' or a comma-separated list")
    p.add_argument("--autoattack", default="none", help="AutoAttack version on all test examples ('none': skip)")
    p.add_argument("--autoattack-standard-examples", type=int, default=200,
                   help="also run standard AutoAttack on the first N test examples (0: skip)")
    p.add_argument("--flatness-examples", type=int, default=500)
    p.add_argument("--flatness-samples", type=int, default=5, help="average case: random directions")
    p.add_argument("--worst-attempts", type=int, default=3)
    p.add_argument("--worst-passes", type=int, default=20)
    p.add_argument("--workroot", default="/tmp/tfrobust-study", help="run directories go here")
    p.add_argument("--results", default=RESULTS_DIR, help="directory of the per-method JSON files")
    p.add_argument("--jobs", type=int, default=1, help="methods run at the same time, each in its own process")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--report-only", action="store_true", help="only regenerate docs/results.md and the figures")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args, method: str) -> dict:
    warmup = args.awp_warmup if args.awp_warmup is not None else max(1, round(0.1 * args.epochs))
    flat = args.flatness_every_methods == "all" or method in args.flatness_every_methods.split(",")
    return {
        "defense.name": method,
        "defense.awp.warmup_epochs": warmup,
        "data.train_examples": args.train_examples,
        "data.validation_examples": args.validation_examples,
        "data.test_examples": args.test_examples,
        "data.batch_size": args.batch_size,
        "model.cnn_width": args.cnn_width,
        "eval.pgd_steps": args.val_pgd_steps,
        "optim.epochs": args.epochs,
        "optim.lr": 0.05,
        "optim.decay_at": [0.5, 0.75],
        "optim.decay_factor": 0.1,
        "eval.flatness_every": args.flatness_every if flat else 0,
        "eval.flatness_examples": 200,
        "eval.flatness_samples": 3,
        "eval.images_every": 0,
        "eval.integrity_examples": 0,
        "runtime.seed": args.seed,
        "runtime.verbose": 2,
    }


def _name(method: str) -> str:
    return method.replace("+", "_")


def load_results(directory: str) -> dict:
    """``{"setting": ..., "methods": {method: entry}}`` from the per-method files."""
    results = {"setting": {}, "methods": {}}
    path = os.path.join(directory, "setting.json")
    if os.path.exists(path):
        with open(path) as f:
            results["setting"] = json.load(f)
    for method in list(METHODS) + sorted(_extra_methods(directory)):
        path = os.path.join(directory, _name(method) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                results["methods"][method] = json.load(f)
    return results


def _extra_methods(directory):
    known = {_name(m) for m in METHODS} | {"setting"}
    if not os.path.isdir(directory):
        return []
    return [f[:-5].replace("_", "+") for f in os.listdir(directory) if f.endswith(".json") and f[:-5] not in known]


def _write_json(value, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def save_entry(entry: dict, method: str, directory: str) -> None:
    _write_json(entry, os.path.join(directory, _name(method) + ".json"))


def epoch_recorder(path: str):
    """A callback that keeps every epoch's logs (including keys that appear only on some epochs)."""
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rows = {}
            if os.path.exists(path):
                with open(path) as f:
                    rows = {int(r["epoch"]): r for r in json.load(f)}
            row = {"epoch": int(epoch)}
            for k, v in (logs or {}).items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    pass
            rows[int(epoch)] = row
            with open(path, "w") as f:
                json.dump([rows[e] for e in sorted(rows)], f)

    return EpochRecorder()


def per_epoch(workdir: str, epochs: int, history: dict) -> dict:
    """Per-epoch series of length ``epochs`` (None where a metric was not measured)."""
    path = os.path.join(workdir, "epoch_logs.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    series = {}
    keys = ("val_pgd_accuracy", "val_pgd_loss", "val_clean_accuracy", "adv_accuracy", "clean_accuracy", "loss",
            "val_robust_flatness", "val_robust_flatness_rloss")
    for key in keys:
        values = [None] * epochs
        for r in rows:
            if key in r and 0 <= r["epoch"] < epochs:
                values[r["epoch"]] = r[key]
        if all(v is None for v in values) and key in history:
            hist = list(history[key])
            if len(hist) == epochs:
                values = hist
        series[key] = values
    return series


def evaluate_network(path, x, y, eps, norm, args, verbose=False) -> dict:
    import keras

    from tfrobust import evaluation

    network = keras.saving.load_model(path)
    model_fn = lambda t: network(t, training=False)  # noqa: E731
    attacks = ["clean", "pgd20_ce"]
    if args.autoattack != "none":
        attacks.append(args.autoattack)
    report = evaluation.evaluate(model_fn, x, y, eps, norm, attacks=attacks, step_size=eps / 4, seed=args.seed,
                                 batch_size=args.eval_batch_size, verbose=verbose, integrity_examples=0)
    out = {"accuracy": report["accuracy"], "seconds": report["seconds"], "examples": report["examples"]}
    if args.autoattack_standard_examples:
        out["standard"] = standard_autoattack(network, x, y, eps, norm, args, verbose)
    return out, network


def standard_autoattack(network, x, y, eps, norm, args, verbose=False) -> dict:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the first examples."""
    import keras

    from tfrobust import evaluation

    if isinstance(network, str):
        network = keras.saving.load_model(network)
    n = args.autoattack_standard_examples
    std = evaluation.evaluate(lambda t: network(t, training=False), x[:n], y[:n], eps, norm,
                              attacks=["clean", "standard"], seed=args.seed, batch_size=args.eval_batch_size,
                              verbose=verbose, integrity_examples=0)
    return {"examples": n, "accuracy": std["accuracy"], "seconds": std["seconds"]}


def flatness_of(network, x, y, eps, norm, args) -> dict:
    from tfrobust.flatness import flatness_report

    settings = {
        "examples": args.flatness_examples,
        "measures": ["average", "worst"],
        "average": {"samples": args.flatness_samples},
        "worst": {"attempts": args.worst_attempts, "passes": args.worst_passes},
    }
    start = time.time()
    rep = flatness_report(network, x, y, eps, norm, settings=settings, seed=args.seed, progress=False)
    return {
        "average": rep["average"]["flatness"],
        "worst": rep["worst"]["flatness"],
        "robust_loss": rep["robust_loss"],
        "settings": {"examples": rep["examples"], "average": rep["settings"]["average"],
                     "worst": rep["settings"]["worst"]},
        "seconds": round(time.time() - start, 1),
    }


def train_robustness(entry, config, workdir, best_epoch, args) -> None:
    """Clean and PGD-20 accuracy of the best and last networks on their own training examples
    (unaugmented, eval mode, unperturbed weights): the train side of the robust generalisation gap."""
    import keras

    from tfrobust import data as data_lib
    from tfrobust import evaluation

    done = entry.setdefault("train_eval", {})
    if all(w in done for w in ("best", "last")):
        return
    x, y = data_lib.load_training_arrays(config.data, config.runtime.seed)
    eps, norm = config.attack.eps, config.attack.norm
    for which, filename in (("best", "best.keras"), ("last", "model.keras")):
        path = os.path.join(workdir, filename)
        if which in done or not os.path.exists(path):
            continue
        if which == "last" and "best" in done and best_epoch == config.optim.epochs - 1:
            done["last"] = dict(done["best"], same_as_best=True)
            continue
        network = keras.saving.load_model(path)
        rep = evaluation.evaluate(lambda t: network(t, training=False), x, y, eps, norm,  # noqa: B023
                                  attacks=["clean", "pgd20_ce"], step_size=eps / 4, seed=args.seed,
                                  batch_size=args.eval_batch_size, verbose=False, integrity_examples=0)
        done[which] = {"accuracy": rep["accuracy"], "examples": rep["examples"], "seconds": rep["seconds"]}
        print(f"   {which} on the training examples: {done[which]['accuracy']}", flush=True)


def run_method(method, args):
    import keras

    from tfrobust import data as data_lib
    from tfrobust import experiment
    from tfrobust.config import load_config, to_dict

    config = load_config(os.path.join(ROOT, "configs", "fashion_mnist.yaml"), overrides(args, method))
    workdir = os.path.join(args.workroot, _name(method))
    entry = load_results(args.results)["methods"].get(method, {})
    print(f"== {method}  ({datetime.datetime.now():%H:%M:%S})", flush=True)
    if os.path.exists(os.path.join(workdir, "model.keras")) and os.path.exists(os.path.join(workdir, "history.json")):
        with open(os.path.join(workdir, "history.json")) as f:
            history = json.load(f)
    else:
        _, _, history = experiment.train(config, workdir,
                                         extra_callbacks=[epoch_recorder(os.path.join(workdir, "epoch_logs.json"))])
        keras.backend.clear_session()
    series = per_epoch(workdir, config.optim.epochs, history)
    val = [v for v in series["val_pgd_accuracy"] if v is not None]
    best_epoch = max(range(len(series["val_pgd_accuracy"])),
                     key=lambda e: -1 if series["val_pgd_accuracy"][e] is None else series["val_pgd_accuracy"][e])
    entry.update({
        "config": to_dict(config),
        "train_seconds": history.get("train_seconds"),
        "epochs": config.optim.epochs,
        "series": series,
        "best_epoch": best_epoch,
        "val_pgd_best": max(val) if val else None,
        "val_pgd_last": val[-1] if val else None,
    })
    save_entry(entry, method, args.results)

    x, y = data_lib.load_test_arrays(config.data.name, config.data.data_dir, config.data.test_examples)
    eps, norm = config.attack.eps, config.attack.norm
    for which, filename in (("best", "best.keras"), ("last", "model.keras")):
        if which in entry.get("test", {}):
            done = entry["test"][which]
            if args.autoattack_standard_examples and "standard" not in done and not done.get("same_as_best"):
                done["standard"] = standard_autoattack(os.path.join(workdir, filename), x, y, eps, norm, args)
                print(f"   {which} standard: {done['standard']['accuracy']}", flush=True)
                save_entry(entry, method, args.results)
            continue
        path = os.path.join(workdir, filename)
        if not os.path.exists(path):
            continue
        start = time.time()
        if which == "last" and "best" in entry.get("test", {}) and best_epoch == config.optim.epochs - 1:
            entry.setdefault("test", {})["last"] = dict(entry["test"]["best"], same_as_best=True)
        else:
            entry.setdefault("test", {})[which], _ = evaluate_network(path, x, y, eps, norm, args)
        entry["test"][which]["eval_seconds"] = round(time.time() - start, 1)
        print(f"   {which}: {entry['test'][which]['accuracy']}", flush=True)
        save_entry(entry, method, args.results)
    train_robustness(entry, config, workdir, best_epoch, args)
    save_entry(entry, method, args.results)
    if "flatness" not in entry and args.flatness_examples > 0:
        network = keras.saving.load_model(os.path.join(workdir, "model.keras"))
        entry["flatness"] = flatness_of(network, x, y, eps, norm, args)
        print(f"   flatness: {entry['flatness']}", flush=True)
        save_entry(entry, method, args.results)
    keras.backend.clear_session()


def write_document(results, analysis_path=None) -> None:
    """docs/results.md and its figures (benchmarks/study_report.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import study_report

    study_report.write_document(results, METHODS, analysis_path)


def setting_of(args) -> dict:
    return {
        "epochs": args.epochs,
        "train_examples": args.train_examples,
        "validation_examples": args.validation_examples,
        "test_examples": args.test_examples,
        "batch_size": args.batch_size,
        "cnn_width": args.cnn_width,
        "val_pgd_steps": args.val_pgd_steps,
        "awp_warmup": args.awp_warmup if args.awp_warmup is not None else max(1, round(0.1 * args.epochs)),
        "seed": args.seed,
        "flatness_every": args.flatness_every,
        "autoattack": args.autoattack,
        "autoattack_standard_examples": args.autoattack_standard_examples,
        "flatness_examples": args.flatness_examples,
        "flatness_samples": args.flatness_samples,
        "worst_attempts": args.worst_attempts,
        "worst_passes": args.worst_passes,
        "jobs": args.jobs,
        "machine": f"{os.cpu_count()} CPU cores, no GPU ({platform.processor() or platform.machine()})",
        "command": args.command or "PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/study.py "
                                   + " ".join(sys.argv[1:]),
    }


def main(argv=None):
    args = parse_args(argv)
    analysis = os.path.join(FIGURES, "analysis.md")
    if args.report_only:
        write_document(load_results(args.results), analysis)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.worker:
        for method in methods:
            run_method(method, args)
        return
    setting = setting_of(args)
    previous = load_results(args.results)["setting"]
    setting["started"] = previous.get("started") or datetime.datetime.now().isoformat(timespec="seconds")
    _write_json(setting, os.path.join(args.results, "setting.json"))
    start = time.time()
    pending, running = list(methods), {}
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            method = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", *_forwarded(argv), "--methods", method]
            print(f"[{datetime.datetime.now():%H:%M:%S}] start {method}", flush=True)
            running[method] = subprocess.Popen(cmd)
        time.sleep(5)
        for method, proc in list(running.items()):
            if proc.poll() is not None:
                del running[method]
                print(f"[{datetime.datetime.now():%H:%M:%S}] {method} exited with {proc.returncode}", flush=True)
                write_document(load_results(args.results), analysis)
    setting["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    if previous.get("started") and not previous.get("finished"):
        # An interrupted run continued: count from its start.
        began = datetime.datetime.fromisoformat(previous["started"]).timestamp()
        setting["wall_seconds"] = round(time.time() - began, 1)
    else:
        setting["wall_seconds"] = round(time.time() - start, 1) + previous.get("wall_seconds", 0)
    _write_json(setting, os.path.join(args.results, "setting.json"))
    write_document(load_results(args.results), analysis)


def _forwarded(argv):
    """The command-line options of this run, without --methods/--jobs (a worker gets one method)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--methods", "--jobs"):
            skip = True
            continue
        if a.startswith("--methods=") or a.startswith("--jobs="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
