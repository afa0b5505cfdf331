"""docs/results.md and its figures, from the per-method JSON files of benchmarks/study.py.

    PYTHONPATH=. .venv/bin/python benchmarks/study.py --report-only
"""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
FIGURES = os.path.join(DOCS, "figures")
RESULTS_MD = os.path.join(DOCS, "results.md")

AWP_PAIRS = (("at", "at+awp"), ("trades", "trades+awp"), ("mart", "mart+awp"))
# Pairs whose training runs overlapped in the study's order, so that their times compare.
TIMED_PAIRS = AWP_PAIRS + (("trades", "trades+rat"),)


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _signed(v, digits=3):
    return "–" if v is None else f"{v:+.{digits}f}"


def _get(entry, *keys):
    for k in keys:
        if not isinstance(entry, dict) or k not in entry:
            return None
        entry = entry[k]
    return entry


def test_acc(entry, which, key):
    return _get(entry, "test", which, "accuracy", key)


def autoattack(entry, which):
    """Standard AutoAttack accuracy (on the first examples) if it ran, else the full-set version."""
    last_is_best = which == "last" and _get(entry, "test", "last", "same_as_best")
    source = "best" if last_is_best else which
    value = _get(entry, "test", source, "standard", "accuracy", "autoattack_standard")
    if value is None:
        for k in ("autoattack_standard", "autoattack_fast", "autoattack_plus"):
            value = test_acc(entry, source, k)
            if value is not None:
                break
    return value


def train_pgd(entry, which="last"):
    return _get(entry, "train_eval", which, "accuracy", "pgd20_ce")


def pgd_gap(entry):
    """Test PGD-20 accuracy of the best minus the last network (positive: robust overfitting)."""
    b, l = test_acc(entry, "best", "pgd20_ce"), test_acc(entry, "last", "pgd20_ce")
    return None if b is None or l is None else b - l


def generalisation_gap(entry, which="last"):
    """PGD-20 accuracy on the training examples minus on the test examples."""
    tr, te = train_pgd(entry, which), test_acc(entry, which, "pgd20_ce")
    return None if tr is None or te is None else tr - te


def spearman(a, b):
    """Spearman rank correlation of two equally long sequences (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 3 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def ordered(results, known):
    return [m for m in known if m in results["methods"]] + [m for m in results["methods"] if m not in known]


# ---------------------------------------------------------------------------
# Figures


def figures(results, known) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(FIGURES, exist_ok=True)
    s = results["setting"]
    methods = ordered(results, known)
    made = []
    if not methods:
        return made
    with_loss = any(any(v is not None for v in results["methods"][m]["series"].get("val_pgd_loss", []))
                    for m in methods)
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(13, 4.8) if with_loss else (8, 4.8), squeeze=False)
    panels = [("val_pgd_accuracy", "accuracy"), ("val_pgd_loss", "cross-entropy loss")][: 2 if with_loss else 1]
    for ax, (key, what) in zip(axes[0], panels):
        for m in methods:
            v = results["methods"][m]["series"].get(key, [])
            xs = [i + 1 for i, a in enumerate(v) if a is not None]
            ax.plot(xs, [a for a in v if a is not None], label=m, linewidth=2 if m in ("at", "at+awp") else 1.1)
        if s.get("epochs"):
            for frac in (0.5, 0.75):
                ax.axvline(frac * s["epochs"] + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation PGD-{s.get('val_pgd_steps', 20)} {what}")
        ax.set_title(f"Robust validation {what} ({s.get('validation_examples')} examples; dotted: lr x0.1)")
        ax.grid(alpha=0.3)
        ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "val_pgd_accuracy.png"), dpi=110)
    plt.close(fig)
    made.append("val_pgd_accuracy.png")

    monitored = [m for m in ("at", "at+awp") if m in results["methods"]
                 and any(v is not None for v in results["methods"][m]["series"].get("val_robust_flatness", []))]
    if monitored:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        for m in monitored:
            series = results["methods"][m]["series"]
            pts = [(i + 1, v) for i, v in enumerate(series["val_robust_flatness"]) if v is not None]
            ax1.plot(*zip(*pts), marker="o", label=m)
            acc = [(e, series["val_pgd_accuracy"][e - 1]) for e, _ in pts]
            ax2.plot([p[1] for p in pts], [a for _, a in acc], marker="o", label=m)
            for (e, f), (_, a) in zip(pts, acc):
                ax2.annotate(str(e), (f, a), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("average-case robust flatness (lower: flatter)")
        ax1.set_title("Flatness during training")
        ax2.set_xlabel("average-case robust flatness")
        ax2.set_ylabel("validation PGD accuracy")
        ax2.set_title("Flatness against robustness (labels: epoch)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, "robust_flatness.png"), dpi=110)
        plt.close(fig)
        made.append("robust_flatness.png")

    pts = [(m, _get(results["methods"][m], "flatness", "average"), generalisation_gap(results["methods"][m]))
           for m in methods]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if len(pts) >= 3:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter([p[1] for p in pts], [p[2] for p in pts])
        for m, f, g in pts:
            ax.annotate(m, (f, g), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("average-case robust flatness of the last network (lower: flatter)")
        ax.set_ylabel("PGD-20 accuracy, training minus test")
        ax.set_title("Flatness and the robust generalisation gap")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, "flatness_vs_gap.png"), dpi=110)
        plt.close(fig)
        made.append("flatness_vs_gap.png")
    return made


# ---------------------------------------------------------------------------
# Tables


def accuracy_table(results, known) -> list:
    n_std = None
    for m in ordered(results, known):
        n_std = n_std or _get(results["methods"][m], "test", "best", "standard", "examples")
    aa = f"AA, first {n_std}" if n_std else "AA"
    rows = [
        f"| method | clean best | clean last | PGD-20 best | PGD-20 last | {aa} best | {aa} last "
        "| PGD-20 best − last | best epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ordered(results, known):
        e = results["methods"][m]
        rows.append(
            f"| {m} | {_fmt(test_acc(e, 'best', 'clean'))} | {_fmt(test_acc(e, 'last', 'clean'))} "
            f"| {_fmt(test_acc(e, 'best', 'pgd20_ce'))} | {_fmt(test_acc(e, 'last', 'pgd20_ce'))} "
            f"| {_fmt(autoattack(e, 'best'))} | {_fmt(autoattack(e, 'last'))} | {_signed(pgd_gap(e))} "
            f"| {e.get('best_epoch', -1) + 1}/{e.get('epochs')} |"
        )
    return rows


def generalisation_table(results, known) -> list:
    rows = [
        "| method | train PGD-20 last | test PGD-20 last | train − test | val PGD best | val PGD last "
        "| flatness avg | flatness worst | train time | test eval time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ordered(results, known):
        e = results["methods"][m]
        ts = e.get("train_seconds")
        ev = sum((_get(e, "test", w, "eval_seconds") or 0) for w in ("best", "last"))
        rows.append(
            f"| {m} | {_fmt(train_pgd(e))} | {_fmt(test_acc(e, 'last', 'pgd20_ce'))} "
            f"| {_signed(generalisation_gap(e))} | {_fmt(e.get('val_pgd_best'))} | {_fmt(e.get('val_pgd_last'))} "
            f"| {_fmt(_get(e, 'flatness', 'average'), 4)} | {_fmt(_get(e, 'flatness', 'worst'), 4)} "
            f"| {'–' if ts is None else f'{ts / 60:.1f} min'} | {ev / 60:.1f} min |"
        )
    return rows


# ---------------------------------------------------------------------------
# Findings read off the numbers


def findings(results) -> list:
    M = results["methods"]
    s = results["setting"]
    n_test = s.get("test_examples") or 1000
    se = (0.6 * 0.4 / n_test) ** 0.5
    out = ["## What matches the papers and what does not (computed)", ""]
    if "at" in M and pgd_gap(M["at"]) is not None:
        at = M["at"]
        g, gg = pgd_gap(at), generalisation_gap(at)
        shows = g >= 2 * se
        out.append(
            f"- Robust overfitting in plain AT: test PGD-20 {test_acc(at, 'best', 'pgd20_ce'):.3f} at the best epoch "
            f"({at['best_epoch'] + 1}) and {test_acc(at, 'last', 'pgd20_ce'):.3f} at the last, a drop of {g:+.3f} "
            f"(validation: {at['val_pgd_best']:.3f} to {at['val_pgd_last']:.3f}); training PGD-20 accuracy of the "
            f"last network {_fmt(train_pgd(at))}, {_signed(gg)} above test. "
            + ("The drop is larger than two standard errors of a test accuracy "
               f"({2 * se:.3f}): AT overfits robustly here." if shows else
               f"The drop is within two standard errors ({2 * se:.3f}): robust overfitting shows mostly as the "
               "train-test gap."))
    for base, awp in AWP_PAIRS:
        if base in M and awp in M and pgd_gap(M[base]) is not None and pgd_gap(M[awp]) is not None:
            gb, ga = pgd_gap(M[base]), pgd_gap(M[awp])
            tb, ta = generalisation_gap(M[base]), generalisation_gap(M[awp])
            verdict = ("smaller with AWP, as Wu et al. report" if ga < gb - 0.005 else
                       "not smaller with AWP" if ga > gb + 0.005 else "about the same")
            out.append(f"- {awp} vs {base}: best − last PGD-20 drop {ga:+.3f} vs {gb:+.3f} ({verdict}); "
                       f"train − test PGD-20 gap {_signed(ta)} vs {_signed(tb)}; AutoAttack last "
                       f"{_fmt(autoattack(M[awp], 'last'))} vs {_fmt(autoattack(M[base], 'last'))}.")
    for base, awp in AWP_PAIRS:
        if base not in M or awp not in M:
            continue
        fb, fa = M[base].get("flatness", {}), M[awp].get("flatness", {})
        for k, name in (("average", "average-case"), ("worst", "worst-case")):
            if fb.get(k) is None or fa.get(k) is None:
                continue
            rel = (fa[k] - fb[k]) / abs(fb[k]) if fb[k] else 0.0
            verdict = ("about equal (within 10%)" if abs(rel) < 0.1 else
                       f"{awp} is flatter ({rel:+.0%}), as Stutz et al. find for AWP" if rel < 0 else
                       f"{awp} is not flatter ({rel:+.0%})")
            out.append(f"- Flatness, {name}: {fa[k]:.4f} for {awp} and {fb[k]:.4f} for {base}: {verdict}.")
    pts = [(m, _get(M[m], "flatness", "average"), generalisation_gap(M[m])) for m in M]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    rho = spearman([p[1] for p in pts], [p[2] for p in pts]) if len(pts) >= 3 else None
    if rho is not None:
        out.append(f"- Flatness and robust generalisation across the {len(pts)} methods: Spearman correlation "
                   f"{rho:+.2f} between the average-case flatness of the last network and its train − test "
                   "PGD-20 gap (positive: sharper networks generalise worse, as Stutz et al. find).")
    for m in ("at", "at+awp"):
        series = _get(M.get(m, {}), "series") or {}
        pairs = [(f, l) for f, l in zip(series.get("val_robust_flatness", []), series.get("val_pgd_loss", []))
                 if f is not None and l is not None]
        rho = spearman(*zip(*pairs)) if len(pairs) >= 3 else None
        if rho is not None:
            out.append(f"- {m} during training: average-case flatness went from {pairs[0][0]:.3f} to {pairs[-1][0]:.3f} "
                       f"and the validation robust loss from {pairs[0][1]:.3f} to {pairs[-1][1]:.3f} over the "
                       f"{len(pairs)} measurements; Spearman correlation of the two {rho:+.2f}.")
    for base, other in (("at", "at+s2o"), ("trades", "trades+rat"), ("at", "trades"), ("at", "mart")):
        if base in M and other in M:
            out.append(f"- {other} vs {base}: AutoAttack best {_fmt(autoattack(M[other], 'best'))} vs "
                       f"{_fmt(autoattack(M[base], 'best'))}, last {_fmt(autoattack(M[other], 'last'))} vs "
                       f"{_fmt(autoattack(M[base], 'last'))}; clean last {_fmt(test_acc(M[other], 'last', 'clean'))} vs "
                       f"{_fmt(test_acc(M[base], 'last', 'clean'))}.")
    for base, other in TIMED_PAIRS:
        if base in M and other in M and M[base].get("train_seconds") and M[other].get("train_seconds"):
            out.append(f"- Training time {other} / {base} (trained side by side): "
                       f"{M[other]['train_seconds'] / M[base]['train_seconds']:.2f}x.")
    n_std = s.get("autoattack_standard_examples")
    std_note = ""
    if n_std:
        std_note = (f"; AutoAttack ran on the first {n_std} only, where it is about {(0.24 / n_std) ** 0.5:.3f} "
                    f"(differences under about {2 * (0.24 / n_std) ** 0.5:.2f} are within noise)")
    out += ["", f"One seed and {n_test} test examples: the standard error of an accuracy near 0.6 is about "
            f"{se:.3f}, so differences under about {2 * se:.2f} are within noise{std_note}. Comparisons of two "
            "methods on the same examples are less noisy than that, but a second seed would move them too.", ""]
    return out


# ---------------------------------------------------------------------------
# The document


def setting_lines(results, known) -> list:
    s = results["setting"]
    w = s.get("cnn_width", 1)
    std = [f"{m} ({which})" for m in ordered(results, known) for which in ("best", "last")
           if _get(results["methods"][m], "test", which, "standard")]
    n_std = s.get("autoattack_standard_examples")
    full = s.get("autoattack", "none")
    aa = (f"- AutoAttack: the `standard` ensemble (APGD-CE, APGD-T with 9 target classes, FAB-T with 9 target "
          f"classes, Square with 5000 queries) on the first {n_std} test examples, for the best and the last "
          "network of every method (the same network once when the best epoch is the last)")
    aa += (f"; version `{full}` on all {s.get('test_examples')} test examples." if full != "none" else ".")
    return [
        f"- Data: Fashion-MNIST, {s.get('train_examples')} training examples, {s.get('validation_examples')} "
        "validation examples held out from the training split (model selection only), the first "
        f"{s.get('test_examples')} test examples for every test number; no augmentation.",
        f"- Model: `small_cnn` with `model.cnn_width={w}`: Conv({32 * w},3)-ReLU-MaxPool-Conv({64 * w},3)-ReLU-"
        f"MaxPool-Dense({256 * w})-ReLU-Dense(10), no BatchNorm.",
        "- Threat model: L-inf, eps 0.1. Training attack PGD-10 with step 0.025 (uniform start); validation "
        f"after every epoch PGD-{s.get('val_pgd_steps', 20)}, test PGD-20, both with step 0.025, cross-entropy.",
        f"- Training: {s.get('epochs')} epochs, batch {s.get('batch_size', 128)}, SGD momentum 0.9, weight decay "
        "5e-4, lr 0.05 multiplied by 0.1 at 50% and 75% of the epochs; seed "
        f"{s.get('seed')} for every method (same initial weights and batches). AWP: the papers' gamma (0.01 for AT "
        f"and MART, 0.005 for TRADES) after a warm-up of {s.get('awp_warmup')} epochs (the CNN has no "
        "BatchNorm); S2O, RAT and TRADES/MART beta: the papers' defaults.",
        "- Best network: the epoch with the highest validation PGD accuracy (`best.keras`); last: `model.keras` "
        f"after epoch {s.get('epochs')}.",
        aa,
        "- Training-set robustness: clean and PGD-20 accuracy of the best and last networks on their own "
        f"{s.get('train_examples')} training examples (eval mode, unperturbed weights).",
        f"- Flatness (Stutz et al., ICCV 2021) of the last network on the first {s.get('flatness_examples')} test "
        "examples, robust loss under PGD-20 (step 0.0223, the flatness module's 0.007/(8/255) of eps): average case "
        f"xi 0.5 with {s.get('flatness_samples')} random directions; worst case xi 0.00075 with "
        f"{s.get('worst_attempts')} attempts of {s.get('worst_passes')} passes (the paper: 10 attempts of 20 "
        "passes on 1000 examples). Both are RLoss(w + nu) − RLoss(w); lower is flatter. During training (AT and "
        f"AT+AWP): the average case with 3 directions on 200 validation examples every {s.get('flatness_every')} "
        "epochs.",
        f"- Machine: {s.get('machine', '2 CPU cores, no GPU')}; methods trained in separate processes, up to "
        f"{s.get('jobs', 1)} at the same time in the listed order, so a method's training time depends on what ran "
        "beside it: docs/benchmarks.md has the per-step costs measured in one process."
        + (f" Wall-clock time of the whole study: {s['wall_seconds'] / 60:.0f} min." if s.get("wall_seconds") else ""),
        "- One seed.",
    ]


def write_document(results, known, analysis_path=None) -> None:
    s = results.get("setting", {})
    made = figures(results, known)
    missing = [m for m in known if m not in results["methods"]]
    lines = [
        "# Results: robust overfitting, flatness and cost of the defenses at CPU scale",
        "",
        "Every number and figure here is regenerated by",
        "",
        "```bash",
        s.get("command", "PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/study.py"),
        "```",
        "",
        "which writes `docs/figures/study/<method>.json` after every step of every method and rebuilds this page "
        "from them (`--report-only` rebuilds the page alone). A rerun skips every step already recorded and resumes "
        "unfinished training runs in `--workroot`; delete `docs/figures/study/` to start from scratch.",
        "",
        "## Setting",
        "",
        *setting_lines(results, known),
        "",
    ]
    if missing:
        lines += [f"Not run: {', '.join(missing)}.", ""]
    lines += ["## Test accuracy of the best and the last network", "", *accuracy_table(results, known), "",
              "Fractions of the test examples. AA: AutoAttack. PGD-20 best − last: positive when the network chosen "
              "on validation is more robust than the last one (robust overfitting). Best epoch: the one chosen on "
              "validation.", "",
              "## Robust generalisation, flatness and cost", "", *generalisation_table(results, known), "",
              "Train PGD-20: accuracy under PGD-20 on the training examples; train − test: the robust generalisation "
              "gap of the last network. Val PGD: validation accuracy at the best and at the last epoch. Train time: "
              "`history[\"train_seconds\"]`, including the per-epoch validation and, for AT and AT+AWP, the flatness "
              "monitor; test eval time: clean, PGD-20 and standard AutoAttack of the best and last networks.", ""]
    captions = {
        "val_pgd_accuracy.png": "validation PGD accuracy and loss per epoch, every method",
        "robust_flatness.png": "average-case robust flatness during training, AT and AT+AWP",
        "flatness_vs_gap.png": "average-case robust flatness against the train − test PGD-20 gap",
    }
    if made:
        lines += ["## Figures", ""]
        lines += [f"![{captions[f]}](figures/{f})\n" for f in made]
    lines += findings(results)
    if analysis_path and os.path.exists(analysis_path):
        with open(analysis_path) as f:
            lines += [f.read().rstrip(), ""]
    with open(RESULTS_MD, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
