"""Robust overfitting, flatness and cost of every defense on one small setting.

Trains AT, AT+AWP, TRADES, TRADES+AWP, AT+S2O, TRADES+RAT, MART and MART+AWP
with the same network, data, attack, epochs and seed; evaluates the best
(validation PGD) and last networks on the test subset with clean, PGD-20 and
AutoAttack accuracy; measures the average- and worst-case robust flatness of
Stutz et al. (ICCV 2021) of the last network; and writes
``docs/results.md`` with figures under ``docs/figures/``.

Results are kept in ``docs/figures/study/<method>.json`` after every step of
every method (training, each evaluation, flatness), so a run that is cut off
still leaves a usable document, and a rerun of the same command skips what is
done (an unfinished training run resumes). ``--jobs 2`` trains two methods
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
RESULTS_MD = os.path.join(DOCS, "results.md")

METHODS = ("at", "at+awp", "trades", "trades+awp", "at+s2o", "trades+rat", "mart", "mart+awp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated defenses, run in this order")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--validation-examples", type=int, default=1000)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--awp-warmup", type=int, default=None, help="AWP warm-up epochs (default: 10%% of the epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flatness-every", type=int, default=5, help="FlatnessMonitor period in epochs (0: off)")
    p.add_argument("--flatness-every-methods", default="all",
                   help="methods that get the FlatnessMonitor: 'all' or a comma-separated list")
    p.add_argument("--autoattack", default="fast", help="AutoAttack version on all test examples ('none': skip)")
    p.add_argument("--autoattack-standard-examples", type=int, default=0,
                   help="also run standard AutoAttack on the first N test examples (0: skip)")
    p.add_argument("--flatness-examples", type=int, default=500)
    p.add_argument("--flatness-samples", type=int, default=5, help="average case: random directions")
    p.add_argument("--worst-attempts", type=int, default=3)
    p.add_argument("--worst-passes", type=int, default=5)
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
    keys = ("val_pgd_accuracy", "val_clean_accuracy", "adv_accuracy", "clean_accuracy", "loss",
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
    if "flatness" not in entry and args.flatness_examples > 0:
        network = keras.saving.load_model(os.path.join(workdir, "model.keras"))
        entry["flatness"] = flatness_of(network, x, y, eps, norm, args)
        print(f"   flatness: {entry['flatness']}", flush=True)
        save_entry(entry, method, args.results)
    keras.backend.clear_session()


# ---------------------------------------------------------------------------
# The document


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _acc(entry, which, key):
    return entry.get("test", {}).get(which, {}).get("accuracy", {}).get(key)


def figures(results) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(FIGURES, exist_ok=True)
    made = []
    methods = [m for m in METHODS if m in results["methods"]] + [m for m in results["methods"] if m not in METHODS]
    if not methods:
        return made
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in methods:
        s = results["methods"][m]["series"]["val_pgd_accuracy"]
        xs = [i + 1 for i, v in enumerate(s) if v is not None]
        ax.plot(xs, [v for v in s if v is not None], label=m, linewidth=2 if m in ("at", "at+awp") else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation PGD-20 accuracy")
    epochs = results["setting"].get("epochs")
    if epochs:
        for frac in (0.5, 0.75):
            ax.axvline(frac * epochs + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"Robust validation accuracy (Fashion-MNIST, {results['setting'].get('train_examples')} "
                 "training examples; dotted: lr x0.1)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "val_pgd_accuracy.png"), dpi=110)
    plt.close(fig)
    made.append("val_pgd_accuracy.png")

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    plotted = False
    for m in ("at", "at+awp"):
        if m not in results["methods"]:
            continue
        s = results["methods"][m]["series"]["val_robust_flatness"]
        pts = [(i + 1, v) for i, v in enumerate(s) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
            plotted = True
    if plotted:
        ax.set_xlabel("epoch")
        ax.set_ylabel("average-case robust flatness (lower is flatter)")
        ax.set_title("Average-case robust flatness on 200 validation examples")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, "robust_flatness.png"), dpi=110)
        made.append("robust_flatness.png")
    plt.close(fig)
    return made


def table(results) -> list:
    rows = [
        "| method | clean best | clean last | PGD-20 best | PGD-20 last | AA best | AA last | "
        "PGD-20 gap (best − last) | best epoch | flatness avg | flatness worst | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in [m for m in METHODS if m in results["methods"]] + [m for m in results["methods"] if m not in METHODS]:
        e = results["methods"][m]
        aa = "autoattack_" + results["setting"].get("autoattack", "fast")
        pb, pl = _acc(e, "best", "pgd20_ce"), _acc(e, "last", "pgd20_ce")
        gap = None if pb is None or pl is None else pb - pl
        fl = e.get("flatness", {})
        ts = e.get("train_seconds")
        rows.append(
            f"| {m} | {_fmt(_acc(e, 'best', 'clean'))} | {_fmt(_acc(e, 'last', 'clean'))} | {_fmt(pb)} | {_fmt(pl)} "
            f"| {_fmt(_acc(e, 'best', aa))} | {_fmt(_acc(e, 'last', aa))} | {_fmt(gap, 3) if gap is not None else '–'} "
            f"| {e.get('best_epoch', -1) + 1}/{e.get('epochs')} | {_fmt(fl.get('average'), 4)} | {_fmt(fl.get('worst'), 4)} "
            f"| {'–' if ts is None else f'{ts / 60:.1f} min'} |"
        )
    return rows


def write_document(results, analysis_path=None) -> None:
    s = results.get("setting", {})
    made = figures(results)
    done = [m for m in METHODS if m in results["methods"]]
    missing = [m for m in METHODS if m not in results["methods"]]
    std_methods, std_examples = [], None
    for m in done:
        for which in ("best", "last"):
            st = results["methods"][m].get("test", {}).get(which, {}).get("standard")
            if st:
                std_methods.append(f"{m} ({which})")
                std_examples = st["examples"]
    lines = [
        "# Results: robust overfitting, flatness and cost of the defenses at CPU scale",
        "",
        "Every number here is regenerated by",
        "",
        "```bash",
        s.get("command", "PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/study.py"),
        "```",
        "",
        "which writes `docs/figures/study/<method>.json` after every step of every method and rebuilds this page from it "
        "(`--report-only` rebuilds the page alone). A rerun skips every step already recorded there and resumes "
        "unfinished training runs in `--workroot` (default `/tmp/tfrobust-study`); delete `docs/figures/study/` to "
        "start from scratch.",
        "",
        "## Setting",
        "",
        f"- Data: Fashion-MNIST, {s.get('train_examples')} training examples, {s.get('validation_examples')} "
        f"validation examples held out from the training split (model selection only), the first "
        f"{s.get('test_examples')} test examples for every test number.",
        "- Model: `small_cnn` (Conv(32,3)-ReLU-MaxPool-Conv(64,3)-ReLU-MaxPool-Dense(128)-ReLU-Dense(10), no BatchNorm).",
        "- Threat model: L-inf, eps 0.1. Training attack PGD-10 with step 0.025; validation and test PGD-20 "
        "with step 0.025 (eps/4), cross-entropy.",
        f"- Training: {s.get('epochs')} epochs, batch 128, SGD momentum 0.9, weight decay 5e-4, lr 0.05 "
        f"multiplied by 0.1 at 50% and 75% of the epochs; seed {s.get('seed')} for every method. "
        f"AWP: the papers' gamma (0.01 for AT and MART, 0.005 for TRADES) after a warm-up of "
        f"{s.get('awp_warmup')} epochs (the CNN has no BatchNorm); S2O and RAT, TRADES/MART beta: the papers' defaults.",
        f"- Best checkpoint: the epoch with the highest validation PGD-20 accuracy (`best.keras`); last: "
        f"`model.keras` after epoch {s.get('epochs')}.",
        f"- AutoAttack: version `{s.get('autoattack')}` (APGD-CE then APGD-T, 9 target classes, 100 iterations) "
        f"on all {s.get('test_examples')} test examples"
        + (f"; `standard` (APGD-CE, APGD-T, FAB-T, Square) on the first {std_examples} test examples only, for "
           f"{', '.join(std_methods)} (table below)." if std_methods else
           "; the `standard` version was not run (about 1 example/s on this CPU)."),
        f"- Flatness (Stutz et al., ICCV 2021) of the last network on the first {s.get('flatness_examples')} test "
        f"examples, robust loss under PGD-20 (step 0.0223, the flatness module's default of 0.007/(8/255) times eps): average case xi 0.5 with {s.get('flatness_samples')} random directions; "
        f"worst case xi 0.00075 with {s.get('worst_attempts')} attempts of {s.get('worst_passes')} passes (the paper: "
        "10 attempts of 20 passes on 1000 examples). Both are RLoss(w + nu) − RLoss(w); lower is flatter. "
        f"During training, the average case (3 directions, 200 validation examples) every {s.get('flatness_every')} epochs.",
        f"- Machine: {s.get('machine', '2 CPU cores, no GPU')}, shared with other work (load average 3 to 14 "
        f"during the runs), with several methods trained at the same time (`--jobs {s.get('jobs', 1)}`), so times "
        "are indicative: compare ratios of methods that ran side by side, not seconds."
        + (f" Wall-clock time of the whole study: {s['wall_seconds'] / 60:.0f} min." if s.get("wall_seconds") else ""),
        f"- One seed. Differences of a point or two of accuracy are within what another seed could change.",
        "",
    ]
    if missing:
        lines += [f"Not run in this budget: {', '.join(missing)}.", ""]
    lines += ["## Test accuracy, gap, flatness and cost", ""]
    lines += table(results)
    lines += [
        "",
        "Accuracies are fractions of the test subset; AA is AutoAttack "
        f"(`{s.get('autoattack')}`). Gap: PGD-20 accuracy of the best minus the last network (positive: robust "
        "overfitting). Best epoch: the one chosen on validation PGD-20. Train time: `history[\"train_seconds\"]`, "
        "including the per-epoch validation PGD-20 and the flatness measurements during training.",
        "",
    ]
    std_rows = []
    for m in done:
        for which in ("best", "last"):
            st = results["methods"][m].get("test", {}).get(which, {}).get("standard")
            if st:
                std_rows.append(f"| {m} | {which} | {st['examples']} | {_fmt(st['accuracy'].get('clean'))} "
                                f"| {_fmt(st['accuracy'].get('autoattack_standard'))} |")
    if std_rows:
        lines += ["Standard AutoAttack on the first test examples (a network whose best epoch is the last appears "
                  "once, as best):", "",
                  "| method | network | examples | clean | AutoAttack standard |", "|---|---|---|---|---|", *std_rows, ""]
    if done:
        lines += [f"Validation PGD-20 accuracy ({s.get('validation_examples')} validation examples) at the best and "
                  "last epoch, training robust accuracy of the last epoch, and the cost of the test evaluation:", "",
                  "| method | val PGD best | val PGD last | val gap | train PGD-10 acc, last epoch | train − val, last epoch "
                  "| test eval time (best + last) | flatness time |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in done:
            e = results["methods"][m]
            vb, vl = e.get("val_pgd_best"), e.get("val_pgd_last")
            tr = [v for v in e["series"].get("adv_accuracy", []) if v is not None]
            tr = tr[-1] if tr else None
            ev = sum(e.get("test", {}).get(w, {}).get("eval_seconds", 0) for w in ("best", "last"))
            ft = e.get("flatness", {}).get("seconds")
            lines.append(f"| {m} | {_fmt(vb)} | {_fmt(vl)} | {_fmt(None if vb is None or vl is None else vb - vl)} "
                         f"| {_fmt(tr)} | {_fmt(None if tr is None or vl is None else tr - vl)} "
                         f"| {ev / 60:.1f} min | {'–' if ft is None else f'{ft / 60:.1f} min'} |")
        lines += ["", "The training robust accuracy is Keras' running mean over the last epoch of the accuracy on the "
                  "PGD-10 examples the step trained on; with AWP it is measured with the perturbed weights, so it "
                  "understates the accuracy of the network itself; with TRADES (and RAT on TRADES) the training "
                  "examples maximise the KL term, not the cross-entropy, so the column compares only within a base. "
                  "When the best epoch is the last, the test evaluation ran once.", ""]
    if "val_pgd_accuracy.png" in made:
        lines += ["## Figures", "", "![validation PGD-20 accuracy per epoch](figures/val_pgd_accuracy.png)", ""]
    if "robust_flatness.png" in made:
        lines += ["![average-case robust flatness per epoch, AT and AT+AWP](figures/robust_flatness.png)", ""]
    lines += automatic_findings(results)
    if analysis_path and os.path.exists(analysis_path):
        with open(analysis_path) as f:
            lines += [f.read().rstrip(), ""]
    with open(RESULTS_MD, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def automatic_findings(results) -> list:
    """Plain statements read off the numbers (the comparisons the papers make)."""
    M = results["methods"]
    out = ["## What matches the papers and what does not", ""]

    def pgd(m, w):
        return _acc(M.get(m, {}), w, "pgd20_ce")

    def aa(m, w):
        return _acc(M.get(m, {}), w, "autoattack_" + results["setting"].get("autoattack", "fast"))

    def gap(m):
        b, l = pgd(m, "best"), pgd(m, "last")
        return None if b is None or l is None else b - l

    if "at" in M and "at+awp" in M:
        ga, gw = gap("at"), gap("at+awp")
        if ga is not None and gw is not None:
            if ga < 0.01:
                verdict = ("AT itself shows no robust overfitting here (a gap under 0.01, the best epoch is "
                           f"{M['at'].get('best_epoch', -1) + 1} of {M['at'].get('epochs')}), so this setting cannot "
                           "test whether AWP reduces it.")
            else:
                verdict = "smaller with AWP, as the paper reports." if gw < ga else "not smaller with AWP here."
            out.append(f"- Robust overfitting (Wu et al.): the best − last PGD-20 gap is {ga:+.3f} for AT and "
                       f"{gw:+.3f} for AT+AWP: " + verdict)
    for base, awp in (("at", "at+awp"), ("trades", "trades+awp"), ("mart", "mart+awp")):
        if base not in M or awp not in M:
            continue
        fa, fw = M[base].get("flatness", {}), M[awp].get("flatness", {})
        for k, name in (("average", "average-case"), ("worst", "worst-case")):
            if fa.get(k) is not None and fw.get(k) is not None:
                rel = (fw[k] - fa[k]) / abs(fa[k]) if fa[k] else 0.0
                if abs(rel) < 0.1:
                    verdict = "about equal (within 10%)."
                elif rel < 0:
                    verdict = f"{awp} is flatter ({rel:+.0%}), as Stutz et al. find for AWP."
                else:
                    verdict = f"{awp} is not flatter ({rel:+.0%})."
                out.append(f"- Flatness: {name} robust flatness of the last network is {fa[k]:.4f} for {base} and "
                           f"{fw[k]:.4f} for {awp}: " + verdict)
    for base, other in (("at", "at+awp"), ("at", "trades"), ("trades", "trades+awp"), ("at", "at+s2o"), ("trades", "trades+rat"),
                        ("mart", "mart+awp")):
        if base in M and other in M:
            out.append(f"- {other} vs {base}: AutoAttack best {_fmt(aa(other, 'best'))} vs {_fmt(aa(base, 'best'))}, "
                       f"last {_fmt(aa(other, 'last'))} vs {_fmt(aa(base, 'last'))}; PGD-20 gap {_fmt(gap(other))} vs "
                       f"{_fmt(gap(base))}; train time {M[other]['train_seconds'] / M[base]['train_seconds']:.2f}x.")
    out += ["", "One seed and 1000 test examples: the standard error of an accuracy near 0.6 is about 0.015, so "
            "differences of 0.02 or less are within noise.", ""]
    return out


def setting_of(args) -> dict:
    return {
        "epochs": args.epochs,
        "train_examples": args.train_examples,
        "validation_examples": args.validation_examples,
        "test_examples": args.test_examples,
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
