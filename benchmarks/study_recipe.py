"""Today's recipe at CPU scale: weight averaging, extra data, S2O and RAT over several seeds.

On the Fashion-MNIST study setting (500 labelled training examples, 500
validation examples, the first 1000 test examples), with the rest of the
Fashion-MNIST training images as the extra pool (their labels hidden and
replaced by pseudo-labels from the AT network of the same seed), this trains,
for every seed:

- ``at`` and ``at+ema`` (weight averaging);
- ``trades``, ``trades+extra`` (the pool mixed into every batch) and
  ``trades+awp+extra``;
- ``at+s2o`` and ``trades+rat`` (against their bases ``at`` and ``trades``);

and evaluates the network chosen on validation (the averaged one for
``at+ema``) with clean accuracy, PGD-20 on the first 1000 test examples and,
for the headline methods, standard AutoAttack on the same 1000. The same seed
gives every method the same initial weights, the same labelled batches and
the same validation split, so methods are compared by paired differences
(method minus base, seed by seed) with 95% confidence intervals from the
t distribution over seeds.

Everything is kept in ``docs/figures/recipe_study/seed<k>/<method>.json``
after each step (training, pseudo-labels, each evaluation), with the CPU
time of the process that did it; a rerun of the same command skips what is
recorded and resumes unfinished training runs from their epoch backups, and
unfinished AutoAttack evaluations from their last decided batch, in
``--workroot``. The section "Today's recipe at CPU scale" of
``docs/results.md`` is rebuilt from these files (``--report-only`` rebuilds it
alone).

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/study_recipe.py
    PYTHONPATH=. .venv/bin/python benchmarks/study_recipe.py --report-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "docs", "figures", "recipe_study")
DOCUMENT = os.path.join(ROOT, "docs", "results.md")
BEGIN, END = "<!-- recipe-study -->", "<!-- /recipe-study -->"

# method -> (defense, uses the extra pool, weight averaging)
METHODS = {
    "at": ("at", False, False),
    "at+ema": ("at", False, True),
    "trades": ("trades", False, False),
    "trades+extra": ("trades", True, False),
    "trades+awp+extra": ("trades+awp", True, False),
    "at+s2o": ("at+s2o", False, False),
    "trades+rat": ("trades+rat", False, False),
}
HEADLINE = ("at", "at+ema", "trades", "trades+extra", "trades+awp+extra")
# (method, base): the paired differences the study is about.
COMPARISONS = (
    ("at+ema", "at"),
    ("trades+extra", "trades"),
    ("trades+awp+extra", "trades"),
    ("trades+awp+extra", "trades+extra"),
    ("at+s2o", "at"),
    ("trades+rat", "trades"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for intervals)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-examples", type=int, default=500)
    p.add_argument("--validation-examples", type=int, default=500)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--autoattack-examples", type=int, default=1000,
                   help="standard AutoAttack on the first N test examples for the headline methods (0: skip)")
    p.add_argument("--pool-examples", type=int, default=0,
                   help="size of the extra pool (0: every training image that is neither labelled nor validation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cnn-width", type=int, default=2)
    p.add_argument("--val-pgd-steps", type=int, default=10)
    p.add_argument("--workroot", default=os.path.join(ROOT, "runs", "recipe-study"),
                   help="run directories and pools go here")
    p.add_argument("--results", default=RESULTS_DIR)
    p.add_argument("--document", default=DOCUMENT, help="the page whose recipe-study section is rebuilt")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # "<seed>:<method>" or "<seed>:pool"
    return p.parse_args(argv)


def _seeds(args):
    return [int(s) for s in args.seeds.split(",") if s.strip()]


def _methods(args):
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    return methods


def _file(args, seed, name):
    return os.path.join(args.results, f"seed{seed}", name.replace("+", "_") + ".json")


def _read(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write(value, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def overrides(args, seed, method, pool=None):
    defense, extra, ema = METHODS[method]
    out = {
        "defense.name": defense,
        "data.train_examples": args.train_examples,
        "data.validation_examples": args.validation_examples,
        "data.test_examples": args.test_examples,
        "data.batch_size": args.batch_size,
        "model.cnn_width": args.cnn_width,
        "eval.pgd_steps": args.val_pgd_steps,
        "eval.images_every": 0,
        "eval.integrity_examples": 0,
        "optim.epochs": args.epochs,
        "runtime.seed": seed,
        "runtime.verbose": 2,
    }
    if "awp" in defense:
        out["defense.awp.warmup_epochs"] = max(1, round(0.1 * args.epochs))
    if ema:
        out["optim.ema"] = True
    if extra:
        out["data.extra_data"] = pool
    return out


def pool_paths(args, seed):
    base = os.path.join(args.workroot, f"seed{seed}")
    return os.path.join(base, "pool_images.npz"), os.path.join(base, "pool.npz")


def make_pool(args, seed) -> None:
    """The pool of seed ``seed``: the training images outside its labelled and validation examples,
    pseudo-labelled by its AT network; the agreement with the hidden labels is recorded."""
    import numpy as np

    from tfrobust import data as data_lib
    from tfrobust import extra_data, loading

    record_path = _file(args, seed, "pool")
    record = _read(record_path)
    if record.get("done"):
        return
    started = _cpu_seconds()
    images_path, pool_path = pool_paths(args, seed)
    x, y = data_lib.load_arrays("fashion_mnist", "train", None)
    train_idx, val_idx = data_lib.split_indices(len(x), args.validation_examples, seed)
    rest = np.sort(train_idx[args.train_examples:])
    if args.pool_examples:
        rest = rest[: args.pool_examples]
    os.makedirs(os.path.dirname(images_path), exist_ok=True)
    if not os.path.exists(images_path):
        tmp = images_path + ".tmp.npz"
        np.savez(tmp, image=x[rest])
        os.replace(tmp, images_path)
    if os.path.exists(pool_path):
        os.remove(pool_path)  # an earlier attempt died before it was recorded
    loaded = loading.load(os.path.join(args.workroot, f"seed{seed}", "at"), "best")
    count = extra_data.pseudo_label(loaded.model_fn, images_path, pool_path, args.eval_batch_size)
    with np.load(pool_path) as pool:
        agreement = float(np.mean(pool["label"] == y[rest]))
    _write({"done": True, "examples": count, "pseudo_label_agreement": agreement,
            "cpu_seconds": round(_cpu_seconds() - started, 1)}, record_path)
    print(f"   seed {seed}: pool of {count} images, pseudo-labels agree with the hidden labels on "
          f"{agreement:.3f}", flush=True)


def run_method(args, seed, method) -> None:
    import keras

    from tfrobust import data as data_lib
    from tfrobust import evaluation, experiment, rundir
    from tfrobust.config import load_config, to_dict

    path = _file(args, seed, method)
    entry = _read(path)
    workdir = os.path.join(args.workroot, f"seed{seed}", method)
    pool = pool_paths(args, seed)[1]
    config = load_config(os.path.join(ROOT, "configs", "fashion_mnist.yaml"), overrides(args, seed, method, pool))
    if "train" not in entry:
        started = _cpu_seconds()
        print(f"== seed {seed} {method}  ({datetime.datetime.now():%H:%M:%S})", flush=True)
        if rundir.finished(workdir):  # trained before its record was written
            with open(os.path.join(workdir, "history.json")) as f:
                history = json.load(f)
        else:
            _, _, history = experiment.train(config, workdir)
            keras.backend.clear_session()
        val = history.get("val_pgd_accuracy", [])
        entry["config"] = to_dict(config)
        entry["train"] = {
            "train_seconds": history.get("train_seconds"),
            "best_epoch": int(max(range(len(val)), key=lambda e: val[e])) if val else None,
            "val_pgd_best": max(val) if val else None,
            "val_pgd_last": val[-1] if val else None,
            "cpu_seconds": round(_cpu_seconds() - started, 1),
        }
        _write(entry, path)
    x, y = data_lib.load_test_arrays(config.data.name, config.data.data_dir, args.test_examples)
    eps, norm = config.attack.eps, config.attack.norm
    network = None
    wanted = [("pgd", ["clean", "pgd20_ce"], len(x))]
    if method in HEADLINE and args.autoattack_examples:
        wanted.append(("autoattack", ["clean", "standard"], min(args.autoattack_examples, len(x))))
    for key, attacks, n in wanted:
        if key in entry:
            continue
        if network is None:
            network = keras.saving.load_model(os.path.join(workdir, "best.keras"))
        started = _cpu_seconds()
        # AutoAttack records every decided batch, so an interrupted evaluation resumes from the last one.
        partial = os.path.join(workdir, "autoattack.partial.jsonl") if key == "autoattack" else None
        report = evaluation.evaluate(lambda t: network(t, training=False), x[:n], y[:n], eps, norm,  # noqa: B023
                                     attacks=attacks, step_size=eps / 4, seed=seed,
                                     batch_size=args.eval_batch_size, verbose=False, integrity_examples=0,
                                     partial_path=partial)
        entry[key] = {"accuracy": report["accuracy"], "examples": n, "seconds": report["seconds"],
                      "cpu_seconds": round(_cpu_seconds() - started, 1)}
        print(f"   seed {seed} {method} {key}: {report['accuracy']}", flush=True)
        _write(entry, path)
        if partial is not None:
            os.remove(partial)


def run_job(args) -> None:
    seed, what = args.job.split(":", 1)
    if what == "pool":
        make_pool(args, int(seed))
    else:
        run_method(args, int(seed), what)


def plan(args):
    """Jobs in order: per seed, the methods without the pool (AT first: it labels the pool), the pool,
    then the methods with it."""
    methods = _methods(args)
    if any(METHODS[m][1] for m in methods) and "at" not in methods:
        raise SystemExit("error: the extra-data methods need 'at' (its network makes the pseudo-labels)")
    jobs = []
    for seed in _seeds(args):
        plain = [m for m in methods if not METHODS[m][1]]
        extra = [m for m in methods if METHODS[m][1]]
        jobs += [(seed, m) for m in plain]
        if extra:
            jobs += [(seed, "pool")] + [(seed, m) for m in extra]
    return jobs


def _done(args, seed, what) -> bool:
    entry = _read(_file(args, seed, what))
    if what == "pool":
        return bool(entry.get("done"))
    needed = ["train", "pgd"] + (["autoattack"] if what in HEADLINE and args.autoattack_examples else [])
    return all(k in entry for k in needed)


# -- statistics ---------------------------------------------------------------


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(values):
    """``(mean, half-width of the 95% confidence interval)``; half-width None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)


def _pct(value, half=None):
    if half is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} ± {100 * half:.1f}"


def collect(args):
    """``{method: {seed: entry}}`` of every recorded entry."""
    out = {}
    for seed in _seeds(args):
        for method in METHODS:
            entry = _read(_file(args, seed, method))
            if entry:
                out.setdefault(method, {})[seed] = entry
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 59.5 else f"{seconds / 60:.0f} min"


def report_lines(args) -> list:
    results = collect(args)
    seeds = _seeds(args)
    setting = _read(os.path.join(args.results, "setting.json"))
    lines = [
        BEGIN,
        "## Today's recipe at CPU scale: weight averaging, extra data, S2O and RAT over seeds",
        "",
        "Regenerated by",
        "",
        "```bash",
        setting.get("command", "PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/study_recipe.py"),
        "```",
        "",
        f"which keeps every step in `{os.path.relpath(args.results, ROOT)}/` and resumes where it stopped.",
        "",
        "Setting:",
        f"- Fashion-MNIST, {args.train_examples} labelled training examples and {args.validation_examples} "
        "validation examples (both drawn by the seed), the first "
        f"{args.test_examples} test examples; `small_cnn` width {args.cnn_width}, batch {args.batch_size}, "
        f"{args.epochs} epochs, the rest as in the study above (eps 0.1, PGD-10 training attack, lr 0.05 "
        "decayed at 50% and 75%, weight decay 5e-4).",
        "- Extra pool: every other Fashion-MNIST training image (labels hidden), pseudo-labelled by the "
        "AT network of the same seed (chosen on validation); 70% of every batch comes from the pool, as in "
        "Wang et al. (2023).",
        "- Weight averaging: decay 0.995 with the references' warm-up, from 2.5% of training; validation, "
        "selection and the report use the averaged network.",
        "- Every number is of the network chosen on validation PGD accuracy. AutoAttack: the standard "
        f"version on the first {args.autoattack_examples} test examples, for "
        + ", ".join(f"`{m}`" for m in HEADLINE) + ".",
        f"- Seeds {', '.join(str(s) for s in seeds)}: the same seed gives every method the same initial "
        "weights, labelled batches and validation split. Means ± the half-width of the 95% confidence "
        "interval (t distribution over seeds).",
    ]
    cpu, autoattack_cpu, wall = 0.0, 0.0, 0.0
    for method in results.values():
        for entry in method.values():
            cpu += sum(entry.get(k, {}).get("cpu_seconds", 0.0) for k in ("train", "pgd", "autoattack"))
            autoattack_cpu += entry.get("autoattack", {}).get("cpu_seconds", 0.0)
            wall += entry.get("train", {}).get("train_seconds") or 0.0
            wall += sum(sum(entry.get(k, {}).get("seconds", {}).values()) for k in ("pgd", "autoattack"))
    for seed in seeds:
        cpu += _read(_file(args, seed, "pool")).get("cpu_seconds", 0.0)
    if setting.get("machine"):
        share = f", {100 * autoattack_cpu / cpu:.0f}% of it AutoAttack" if cpu else ""
        lines.append(f"- Machine: {setting['machine']}. Total CPU time of all steps: {cpu / 3600:.1f} h{share} "
                     "(process user + system time of the attempts that completed each step; "
                     "time lost to an interrupted attempt is not counted); their training and evaluation "
                     f"took {wall / 3600:.1f} h of wall time, on a machine shared with other work at times.")
    pools = [_read(_file(args, s, "pool")) for s in seeds]
    agreement = [p["pseudo_label_agreement"] for p in pools if p.get("done")]
    if agreement:
        spread = _pct(min(agreement)) + ("" if min(agreement) == max(agreement) else f"% to {_pct(max(agreement))}")
        lines.append(f"- Pseudo-labels agree with the hidden labels on {spread}% of the pool "
                     f"({pools[0].get('examples')} images).")
    lines += _rationale(args, results, pools)
    jobs = plan(args)
    remaining = [f"{what} (seed {seed})" for seed, what in jobs if not _done(args, seed, what)]
    if remaining:
        lines.append(f"- In progress: {len(jobs) - len(remaining)} of {len(jobs)} steps done; next "
                     f"{remaining[0]}. The same command continues the study; the intervals need every seed.")
    lines += ["", "| method | seeds | clean | PGD-20 | AutoAttack | CPU time per run: training, evaluation |",
              "|---|---|---|---|---|---|"]
    for method in METHODS:
        # Only seeds whose step is complete, so that every column of a row covers the same seeds.
        runs = {s: e for s, e in results.get(method, {}).items() if _done(args, s, method)}
        cells = []
        for key, metric in (("pgd", "clean"), ("pgd", "pgd20_ce"), ("autoattack", "autoattack_standard")):
            values = [e[key]["accuracy"][metric] for e in runs.values() if key in e]
            cells.append(_pct(*interval(values)) if values else "–")
        train = [e["train"]["cpu_seconds"] for e in runs.values() if "cpu_seconds" in e.get("train", {})]
        attacks = [sum(e.get(k, {}).get("cpu_seconds", 0.0) for k in ("pgd", "autoattack"))
                   for e in runs.values() if "pgd" in e]
        minutes = (f"{_duration(sum(train) / len(train))}, {_duration(sum(attacks) / len(attacks))}"
                   if train and attacks else "–")
        done = sum(1 for e in runs.values() if "pgd" in e)
        lines.append(f"| {method} | {done} | " + " | ".join(cells) + f" | {minutes} |")
    lines += ["", "Accuracies in percent of the test examples.", "",
              "Paired differences (method minus base, seed by seed), in points:", "",
              "| comparison | measure | per seed | mean ± 95% CI | verdict |", "|---|---|---|---|---|"]
    for method, base in COMPARISONS:
        for key, metric, label in (("pgd", "pgd20_ce", "PGD-20"), ("autoattack", "autoattack_standard", "AutoAttack"),
                                   ("pgd", "clean", "clean")):
            both = sorted(set(results.get(method, {})) & set(results.get(base, {})))
            diffs = [results[method][s][key]["accuracy"][metric] - results[base][s][key]["accuracy"][metric]
                     for s in both if key in results[method][s] and key in results[base][s]]
            if not diffs:
                continue
            mean, half = interval(diffs)
            if half is None:
                verdict = "one seed: no interval"
            elif half == 0 and mean == 0:
                verdict = "equal on every seed"
            elif mean - half > 0:
                verdict = "better (the interval excludes 0)"
            elif mean + half < 0:
                verdict = "worse (the interval excludes 0)"
            else:
                verdict = f"not resolved: differences below ±{100 * half:.1f} points cannot be told apart here"
            if half is not None and len(diffs) < len(seeds):
                verdict = f"so far ({len(diffs)} of {len(seeds)} seeds): {verdict}"
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
            lines.append(f"| {method} − {base} | {label} | {per_seed} | {100 * mean:+.1f}"
                         + (f" ± {100 * half:.1f}" if half is not None else "") + f" | {verdict} |")
    lines += ["", END]
    return lines


def _rationale(args, results, pools) -> list:
    """Why the small setting still shows the effects, with the numbers measured so far."""
    at = [e["train"] for e in results.get("at", {}).values() if e.get("train", {}).get("best_epoch") is not None]
    done = [p for p in pools if p.get("done")]
    text = (f"- Why this setting still shows the effects: with {args.train_examples} labelled images the networks "
            "are short of data, the regime in which extra data and weight averaging help (robust generalisation "
            "needs more data than standard generalisation, Schmidt et al. 2018; the references' gains on CIFAR-10 "
            "come from adding data to its 50,000 images)")
    if done:
        ratio = done[0]["examples"] / args.train_examples
        text += (f"; the pool holds {done[0]['examples']} images, {ratio:.0f} times the labelled set "
                 "(Wang et al.: 1M to 20M generated images beside 50,000, 20 to 400 times)")
    if at:
        best = sum(t["best_epoch"] + 1 for t in at) / len(at)
        drop = sum(t["val_pgd_best"] - t["val_pgd_last"] for t in at) / len(at)
        text += (f"; {args.epochs} epochs take AT past its best validation robustness (epoch {best:.0f} of "
                 f"{args.epochs} on average, the last epoch {100 * drop:.1f} points of validation PGD accuracy "
                 "below it), so every run includes the late phase in which averaging and the flatness terms act")
    text += (f"; the small CNN keeps a training run to minutes, so that most of the study's time goes to the "
             f"AutoAttack evaluations of {args.autoattack_examples} test examples that the headline comparisons need.")
    return [text]


def write_document(args) -> None:
    lines = report_lines(args)
    document = args.document
    text = open(document).read() if os.path.exists(document) else ""
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = document + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, document)


def main(argv=None):
    args = parse_args(argv)
    if args.job:
        run_job(args)
        return
    if args.report_only:
        write_document(args)
        return
    jobs = plan(args)
    setting_path = os.path.join(args.results, "setting.json")
    setting = _read(setting_path)
    setting.update({
        "command": "PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/study_recipe.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} CPU cores, no GPU ({platform.machine()})",
    })
    setting.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
    _write(setting, setting_path)
    forwarded = [a for a in (sys.argv[1:] if argv is None else argv)]
    for seed, what in jobs:
        if _done(args, seed, what):
            continue
        print(f"[{datetime.datetime.now():%H:%M:%S}] seed {seed}: {what}", flush=True)
        start = time.time()
        code = subprocess.call([sys.executable, os.path.abspath(__file__), *forwarded, "--job", f"{seed}:{what}"])
        if code != 0:
            raise SystemExit(f"error: seed {seed} {what} exited with {code}; rerun the same command to resume")
        print(f"[{datetime.datetime.now():%H:%M:%S}] seed {seed}: {what} done in {time.time() - start:.0f} s",
              flush=True)
        write_document(args)
    setting["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    _write(setting, setting_path)
    write_document(args)


if __name__ == "__main__":
    main()
