"""Single-step adversarial training at CPU scale: catastrophic overfitting, robustness and cost against PGD-10 AT.

For every seed and method this trains a run on Fashion-MNIST (``small_cnn``,
``--train-examples`` training and 200 validation examples, eps ``--eps``)
with the catastrophic-overfitting monitor on (``eval.collapse_examples``,
action ``record``), then evaluates the last network with PGD-20 (and, with
``--autoattack-examples``, standard AutoAttack) on the first
``--test-examples`` test images. Each run's numbers go to
``<output>/seed<k>/<method>.json`` as soon as they exist, and a rerun skips
what is recorded. The summary gives, per method, the mean over seeds with a
95% t interval, the paired difference to ``at`` (PGD-10 AT), the training
seconds per epoch measured in the same run and the seeds with a collapse, and
``--plot`` draws the training-subset PGD accuracy per epoch of every method and
seed. The defaults are the setting of docs/results.md ("Single-step methods and
catastrophic overfitting"): eps 0.3, 4000 training examples, 10 epochs, where
FGSM-RS ends far below PGD-10 AT under AutoAttack on every seed. A method may
carry config overrides after ``@`` (``;`` between them), e.g. ELLE with a
smaller weight: ``fgsm_rs+elle@defense.elle.weight=100``. The docs' table::

    PYTHONPATH=. python benchmarks/study_single_step.py --seeds 0,1,2,3,4 --autoattack-examples 500 \
        --plot docs/figures/single_step_study/subset_pgd_accuracy.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("at", "fgsm_rs", "n_fgsm", "fgsm_rs+gradalign", "fgsm_rs+elle", "fgsm_rs+elle@defense.elle.weight=100",
           "fgsm_rs+awp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="defense names, each optionally with config overrides: fgsm_rs+elle@defense.elle.weight=20")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.3, help="L-inf budget (0.3 on Fashion-MNIST: FGSM-RS collapses)")
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--cnn-width", type=int, default=1, help="small_cnn's width multiplier (model.cnn_width)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (optim.lr)")
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--collapse-examples", type=int, default=200)
    p.add_argument("--collapse-drop", type=float, default=0.2, help="eval.collapse_drop: the fall that counts as a collapse")
    p.add_argument("--autoattack-examples", type=int, default=0)
    p.add_argument("--workroot", default=os.path.join(ROOT, "runs", "single_step_study"))
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "figures", "single_step_study"))
    p.add_argument("--plot", help="PNG of the training-subset PGD accuracy per epoch")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def split_method(spec: str):
    """``"fgsm_rs+elle@defense.elle.weight=20"`` -> the defense name and its config overrides."""
    name, _, rest = spec.partition("@")
    overrides = dict(item.split("=", 1) for item in rest.split(";") if item)
    return name, overrides


def file_name(spec: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in spec)


def config_for(args, seed, method):
    from tfrobust.config import load_config

    name, overrides = split_method(method)
    return load_config(os.path.join(ROOT, "configs", "fashion_mnist.yaml"), {
        **overrides, "defense.name": name, "attack.eps": args.eps, "attack.step_size": args.eps / 4, "attack.steps": 10,
        "data.train_examples": args.train_examples, "model.cnn_width": args.cnn_width, "optim.lr": args.lr, "data.validation_examples": 200, "optim.epochs": args.epochs,
        "eval.pgd_steps": 10, "eval.collapse_examples": args.collapse_examples,
        "eval.collapse_drop": args.collapse_drop, "eval.images_every": 0,
        "runtime.seed": seed, "runtime.verbose": 0,
    })


def training_clock():
    """A callback recording the seconds of each epoch's training batches: from its start to its validation."""
    import time

    import keras

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self._start = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def _stop(self):
            if self._start is not None:
                self.seconds.append(time.perf_counter() - self._start)
                self._start = None

        def on_test_begin(self, logs=None):
            self._stop()

        def on_epoch_end(self, epoch, logs=None):
            self._stop()

    return Clock()


def run(args, seed, method) -> dict:
    """Trains and evaluates one run, or reads its record."""
    import keras

    from tfrobust import data as data_lib
    from tfrobust import evaluation, experiment
    from tfrobust.callbacks import TrainingDiverged

    path = os.path.join(args.output, f"seed{seed}", f"{file_name(method)}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    config = config_for(args, seed, method)
    workdir = os.path.join(args.workroot, f"seed{seed}", file_name(method))
    clock = training_clock()
    try:
        _, _, history = experiment.train(config, workdir, extra_callbacks=[clock])
    except TrainingDiverged as e:  # recorded as such: a method that diverges here is a result too
        return save(path, {"seed": seed, "method": method, "diverged": str(e).splitlines()[0],
                           "training_seconds_per_epoch": clock.seconds})
    x, y = data_lib.load_test_arrays(config.data.name, config.data.data_dir, args.test_examples)
    network = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    attacks = ["clean", "pgd20_ce"] + (["standard"] if args.autoattack_examples else [])
    n = min(len(x), args.autoattack_examples) if args.autoattack_examples else len(x)
    report = evaluation.evaluate(lambda t: network(t, training=False), x[:n], y[:n], args.eps, "linf",
                                 attacks=attacks, step_size=args.eps / 4, seed=seed, verbose=False,
                                 integrity_examples=0)
    record = {
        "seed": seed, "method": method, "accuracy": report["accuracy"], "examples": n,
        "seconds_per_epoch": history["train_seconds"] / args.epochs,
        "training_seconds_per_epoch": clock.seconds,
        "subset_pgd_accuracy": history["train_subset_pgd_accuracy"], "collapse": history["collapse"],
        "subset_lin_err": history.get("train_subset_lin_err"),
    }
    keras.backend.clear_session()
    return save(path, record)


def save(path, record) -> dict:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def interval(values, digits: int = 3) -> str:
    """Mean and 95% t interval half-width over seeds ("-" for none)."""
    from scipy import stats

    values = np.asarray([v for v in values if np.isfinite(v)], float)
    if len(values) == 0:
        return "-"
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return f"{values.mean():.{digits}f} ± {half:.{digits}f}"


def summary(args, records) -> str:
    """The table: per method, means over seeds with 95% t intervals, paired differences to ``at``, costs."""
    trained = [r for r in records if "diverged" not in r]
    aa = "autoattack_standard" in trained[0]["accuracy"] if trained else False
    lines = [f"Fashion-MNIST, small_cnn (width {args.cnn_width}), {args.train_examples} training examples, eps "
             f"{args.eps:g}, {args.epochs} epochs (learning rate {args.lr:g}), seeds {', '.join(map(str, args.seeds))}; "
             f"last network on the first {trained[0]['examples'] if trained else 0} test images.", "",
             "| method | clean | PGD-20 | AutoAttack | AutoAttack minus at (paired) | training s / epoch | "
             "time vs at (paired) | seeds with a collapse |", "|---|---|---|---|---|---|---|---|"]
    at = {r["seed"]: r for r in trained if r["method"] == "at"}
    robust = "autoattack_standard" if aa else "pgd20_ce"
    for method in args.methods:
        rs = [r for r in records if r["method"] == method]
        ok = [r for r in rs if "diverged" not in r]
        if not rs:
            continue
        epoch_seconds = {r["seed"]: float(np.mean(r["training_seconds_per_epoch"])) for r in ok}
        at_seconds = {k: float(np.mean(r["training_seconds_per_epoch"])) for k, r in at.items()}
        diff = [r["accuracy"][robust] - at[r["seed"]]["accuracy"][robust] for r in ok if r["seed"] in at]
        speed = [epoch_seconds[k] / at_seconds[k] for k in epoch_seconds if k in at_seconds]
        collapsed = sum(1 for r in ok if max(r["collapse"]) > 0)
        cell = lambda key: interval([r["accuracy"][key] for r in ok]) if ok and key in ok[0]["accuracy"] else "-"  # noqa: E731
        diverged = f", {len(rs) - len(ok)} diverged" if len(ok) < len(rs) else ""
        lines.append(f"| {method} | {cell('clean')} | {cell('pgd20_ce')} | {cell('autoattack_standard')} | "
                     f"{interval(diff) if method != 'at' and diff else '-'} | "
                     f"{interval(list(epoch_seconds.values()), 1)} | {interval(speed, 2) + 'x' if speed else '-'} | "
                     f"{collapsed} of {len(ok)}{diverged} |")
    lines += ["", f"Per seed: {robust.replace('_', ' ')} / PGD-20 accuracy / linearity error of the last epoch "
              "(training subset):", "",
              "| method | " + " | ".join(f"seed {k}" for k in args.seeds) + " |",
              "|---|" + "---|" * len(args.seeds)]
    for method in args.methods:
        cells = []
        for k in args.seeds:
            r = next((r for r in records if r["method"] == method and r["seed"] == k), None)
            cells.append("-" if r is None else "diverged" if "diverged" in r else
                         f"{r['accuracy'][robust]:.3f} / {r['accuracy']['pgd20_ce']:.3f} / {r['subset_lin_err'][-1]:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records, path):
    """Per method (columns): the training-subset PGD accuracy (top) and linearity error (bottom) per epoch and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records if "diverged" not in r))
    fig, axes = plt.subplots(2, len(methods), figsize=(2.6 * len(methods), 5), sharey="row", squeeze=False)
    for column, method in enumerate(methods):
        for r in (r for r in records if r["method"] == method and "diverged" not in r):
            epochs = range(1, len(r["subset_pgd_accuracy"]) + 1)
            color = f"C{r['seed'] % 10}"  # one colour per seed in every panel
            axes[0][column].plot(epochs, r["subset_pgd_accuracy"], marker=".", color=color, label=f"seed {r['seed']}")
            axes[1][column].plot(epochs, r["subset_lin_err"], marker=".", color=color)
        axes[0][column].set_title(method.replace("@defense.elle.weight=", " lambda "), fontsize=8)
        axes[1][column].set_xlabel("epoch")
    axes[0][0].set_ylabel("training-subset PGD accuracy")
    axes[1][0].set_ylabel("linearity error")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = parse_args(argv)
    records = [run(args, seed, method) for seed in args.seeds for method in args.methods]
    print(summary(args, records))
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
