"""tfrobust against PyTorch on the same adversarial-training step, same machine, same run.

Two long-lived worker processes do the work: one runs tfrobust (this file with
``--tf-worker``, a :class:`~tfrobust.trainer.RobustModel` trained with ``fit``
as ``benchmarks/bench_train.py`` does), the other PyTorch in its own virtual
environment (``benchmarks/compare_pytorch_torch.py`` under ``--torch-python``;
PyTorch is never a dependency of tfrobust). For every case (model, defense,
dtype) both build the same architecture, warm up, and then time rounds of
``--steps`` training steps on the same batches, alternating between the two
frameworks round by round (the one that goes first alternates too), so that a
change of load falls on both alike. Each round reports wall time and the
worker's process CPU time. Both frameworks get ``--threads`` threads
(TensorFlow intra- and inter-op, ``torch.set_num_threads``).

The PyTorch step is the authors' algorithm as their scripts run it (see the
worker's docstring): eval-mode attack, train-mode update; PGD-10 (L-inf, eps
8/255, step 2/255 on 32x32 images; 0.1 and 0.025 on 28x28), SGD (lr 0.05,
momentum 0.9, weight decay 5e-4); TRADES' KL attack and loss (beta 6); AWP
with the reference's proxy-model step (gamma 0.01 for AT, 0.005 for TRADES).
tfrobust runs the same defenses with AWP's warm-up set to 0.

Models: ``small_cnn`` (28x28x1, Fashion-MNIST's normalisation),
``preact_resnet18`` and ``wide_resnet_swish_28_10`` (DeepMind's SiLU
WideResNet-28-10) on 32x32x3; data are uniform random images with random
labels. ``bfloat16`` (tfrobust's ``mixed_bfloat16`` policy, PyTorch's CPU
autocast) runs only where the CPU has AMX or AVX-512 BF16 (``--dtypes``).

Example (a short check)::

    PYTHONPATH=. python benchmarks/compare_pytorch.py --torch-python /work/torchvenv/bin/python \\
        --models small_cnn,preact_resnet18 --rounds 2 --steps 2 --output docs/benchmarks.md

With ``--breakdown`` the PreActResNet-18 step is taken apart on both sides as
well (``benchmarks/compare_pytorch_breakdown.py``). With ``--output`` the run's
markdown section replaces the one of an earlier run with the same title.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
MODELS = ("small_cnn", "preact_resnet18", "wide_resnet_swish_28_10")
DEFENSES = ("at", "trades", "at+awp", "trades+awp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", default="/work/torchvenv/bin/python",
                   help="the Python interpreter of PyTorch's virtual environment")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--dtypes", default="auto", help="float32,bfloat16; auto: bfloat16 only with AMX or AVX-512 BF16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="steps per round (small_cnn: 5x as many)")
    p.add_argument("--wrn-steps", type=int, default=1, help="steps per round on the WideResNet-28-10")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="batch of the ResNets (small_cnn: 128)")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="threads of each framework")
    p.add_argument("--breakdown", action="store_true",
                   help="also take the PreActResNet-18 step apart (with --models '' only that)")
    p.add_argument("--xla", action="store_true", help="--breakdown: also time the attack compiled with XLA")
    p.add_argument("--no-train-clean-accuracy", dest="train_clean_accuracy", action="store_false",
                   help="tfrobust without AT's clean-accuracy pass (eval.train_clean_accuracy=false), as the "
                        "reference scripts train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="markdown file in which to write (or replace) this run's section")
    p.add_argument("--tf-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.defenses = [d for d in args.defenses.split(",") if d]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; allowed: {', '.join(MODELS)}")
    for d in args.defenses:
        if d not in DEFENSES:
            p.error(f"--defenses: unknown defense {d!r}; allowed: {', '.join(DEFENSES)}")
    bf16 = bool(cpu_info()["bf16"])
    args.dtypes = (["float32"] + (["bfloat16"] if bf16 else [])) if args.dtypes == "auto" else args.dtypes.split(",")
    for flag in ("rounds", "steps", "wrn_steps", "warmup_steps", "batch_size", "attack_steps", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------------------
# the machine


def cpu_info():
    """CPU model, the flags that matter for convolutions, and the core count."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "x86_64", ""):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(),
            "bf16": [f for f in ("amx_bf16", "avx512_bf16") if f in flags]}


def loadavg():
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------
# cases and data


def case_settings(model, args):
    """(batch size, steps per round, image shape, eps, step size) of a model."""
    if model == "small_cnn":
        return 128, 5 * args.steps, (28, 28, 1), 0.1, 0.025
    steps = args.wrn_steps if model.startswith("wide_resnet") else args.steps
    return args.batch_size, steps, (32, 32, 3), 8.0 / 255.0, 2.0 / 255.0


def write_data(path, model, args):
    import numpy as np

    batch, steps, shape, _, _ = case_settings(model, args)
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(0.0, 1.0, size=(steps, batch) + shape).astype(np.float32)
    y = rng.integers(0, 10, size=(steps, batch)).astype(np.int32)
    np.savez(path, x=x, y=y)


class Worker:
    """A worker process speaking one JSON line per command, answering one ``@@`` line."""

    def __init__(self, argv, env=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                answer = json.loads(line[3:])
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer
        raise RuntimeError(f"worker {self.proc.args[:2]} ended (status {self.proc.wait()})")

    def close(self):
        try:
            self.ask(cmd="quit")
        except (RuntimeError, OSError, ValueError):
            pass
        self.proc.wait(timeout=60)


def start_workers(args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    tf_worker = Worker([sys.executable, os.path.abspath(__file__), "--tf-worker", "--threads", str(args.threads)], env)
    torch_worker = Worker([args.torch_python, os.path.join(HERE, "compare_pytorch_torch.py")], env)
    return {"tfrobust": tf_worker, "pytorch": torch_worker}


def run_case(workers, case, rounds, steps, log):
    """Sets a case up on both workers and alternates timed rounds; returns per-framework lists of rounds."""
    info = {}
    for name, worker in workers.items():
        t0 = time.perf_counter()
        info[name] = worker.ask(cmd="setup", **case)
        log(f"{case['model']} {case['defense']} {case['dtype']}: {name} set up in {time.perf_counter() - t0:.0f}s")
    results = {name: [] for name in workers}
    names = list(workers)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            answer = workers[name].ask(cmd="run", steps=steps)
            answer["load"] = loadavg()
            results[name].append(answer)
        log(f"  round {r + 1}: " + ", ".join(f"{n} {results[n][-1]['wall']:.2f}s/{results[n][-1]['cpu']:.2f}cpu"
                                              for n in names))
    return results, info


# ---------------------------------------------------------------------------
# the tfrobust worker


def tf_worker(args):
    """Serves setup/run/profile commands with a RobustModel trained through ``fit``."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import gc

    import keras
    import numpy as np

    from tfrobust import data as data_lib

    state = {}

    def reply(obj):
        sys.stdout.write("@@ " + json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "setup":
            state.clear()
            keras.backend.clear_session()
            gc.collect()
            keras.config.set_dtype_policy("mixed_bfloat16" if cmd["dtype"] == "bfloat16" else "float32")
            keras.utils.set_random_seed(cmd["seed"])
            data = np.load(cmd["data"])
            x = data["x"].reshape((-1,) + data["x"].shape[2:])
            y = data["y"].reshape(-1)
            model_name, options = cmd["model"], {}
            if model_name == "wide_resnet_swish_28_10":
                model_name, options = "wide_resnet_swish", {"depth": 28, "width": 10}
            info = data_lib.dataset_info("fashion_mnist" if model_name == "small_cnn" else "cifar10")
            ns = argparse.Namespace(model=model_name, seed=cmd["seed"], attack_steps=cmd["attack_steps"],
                                    steps=data["x"].shape[0], jit_compile="auto")
            model = bench_train.build_robust_model(cmd["defense"], ns, info, model_options=options,
                                                   train_clean_accuracy=cmd.get("train_clean_accuracy", True))
            runner = bench_train.StepRunner(model, x, y, cmd["batch"], "fit")
            runner.run(cmd["warmup_steps"])
            state.update(model=model, runner=runner, x=x, y=y, batch=cmd["batch"])
            reply({"ok": True, "version": f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
                   "threads": args.threads, "jit_compile": str(model.jit_compile)})
        elif cmd["cmd"] == "run":
            c0, t0 = time.process_time(), time.perf_counter()
            state["runner"].run(cmd["steps"])
            reply({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                   "loss": state["runner"].last_loss})
        elif cmd["cmd"] == "profile":
            import compare_pytorch_breakdown

            reply(compare_pytorch_breakdown.tf_parts(state, cmd))
        else:
            reply({"ok": True})
            return


# ---------------------------------------------------------------------------
# report


def _rate(examples, seconds):
    return examples / seconds if seconds > 0 else float("nan")


def case_rows(case, results, examples):
    """Table cells of a case: examples/s (median round) of wall and CPU time, and the per-round ratios."""
    tf_r, pt_r = results["tfrobust"], results["pytorch"]
    wall_ratio = [p["wall"] / t["wall"] for t, p in zip(tf_r, pt_r)]
    cpu_ratio = [p["cpu"] / t["cpu"] for t, p in zip(tf_r, pt_r)]

    def rounds(rs, key):
        return " / ".join(f"{_rate(examples, r[key]):.1f}" for r in rs)

    return [
        case["defense"],
        rounds(pt_r, "wall"), rounds(tf_r, "wall"),
        f"{statistics.median(wall_ratio):.2f}x ({min(wall_ratio):.2f}-{max(wall_ratio):.2f})",
        f"{_rate(examples, statistics.median(r['cpu'] for r in pt_r)):.1f}",
        f"{_rate(examples, statistics.median(r['cpu'] for r in tf_r)):.1f}",
        f"{statistics.median(cpu_ratio):.2f}x ({min(cpu_ratio):.2f}-{max(cpu_ratio):.2f})",
    ]


def report(args, meta, tables):
    """The markdown section of a run and its title."""
    what = ", ".join(args.models) or "breakdown only"
    title = f"tfrobust vs PyTorch, {what}, {meta['date'][:10]}"
    lines = [f"#### {title}", ""]
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- date: {meta['date']}; machine: {meta['cpu']['model']}, {meta['cpu']['cores']} cores, flags "
                 f"{' '.join(meta['cpu']['flags'])}; {platform.system()} {platform.machine()}")
    lines.append(f"- versions: {meta['versions']['tfrobust']}; PyTorch {meta['versions']['pytorch']}")
    lines.append(f"- threads: {args.threads} per framework (TensorFlow intra/inter-op, torch.set_num_threads); "
                 f"tfrobust jit_compile: {meta['jit']}; AT's clean training accuracy (one extra forward pass "
                 f"that the reference does not make): {'on' if args.train_clean_accuracy else 'off'}")
    lines.append(f"- method: {args.warmup_steps} warm-up steps per case and framework, then {args.rounds} rounds "
                 "per case alternating between the two worker processes (the first alternates); "
                 "examples/s of each round's wall time; ratio = PyTorch time / tfrobust time per round "
                 "(median, range), > 1 means tfrobust is faster; also examples per CPU-second (median round)")
    lines.append(f"- load average (1, 5, 15 min) at start / end: {meta['load_before']} / {meta['load_after']}"
                 + (" -- **taken under load**: other jobs shared the cores" if meta["under_load"] else ""))
    lines.append(f"- wall time of the run: {meta['wall']:.0f} s")
    for (model, dtype), (rows, batch, steps) in tables.items():
        lines += ["", f"{model}, {dtype}, batch {batch}, {steps} step(s) per round:", ""]
        lines.append("| defense | PyTorch examples/s (rounds) | tfrobust examples/s (rounds) | tfrobust speed vs "
                     "PyTorch (wall) | PyTorch examples/CPU-s | tfrobust examples/CPU-s | tfrobust vs PyTorch (CPU) |")
        lines.append("|---|---|---|---|---|---|---|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if meta.get("breakdown"):
        lines += ["", meta["breakdown"]]
    return "\n".join(lines) + "\n", title


def main(argv=None):
    args = parse_args(argv)
    if args.tf_worker:
        return tf_worker(args)
    log = bench_train.make_logger()
    load_before = loadavg()
    workers = start_workers(args)
    tables, versions, jit, breakdown = {}, {}, "?", None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model in args.models:
                batch, steps, shape, eps, step_size = case_settings(model, args)
                data = os.path.join(tmp, model + ".npz")
                write_data(data, model, args)
                for dtype in args.dtypes:
                    rows = []
                    for defense in args.defenses:
                        case = dict(model=model, defense=defense, dtype=dtype, batch=batch, eps=eps,
                                    step_size=step_size, attack_steps=args.attack_steps, seed=args.seed,
                                    warmup_steps=args.warmup_steps, threads=args.threads, data=data,
                                    train_clean_accuracy=args.train_clean_accuracy)
                        results, info = run_case(workers, case, args.rounds, steps, log)
                        versions = {"tfrobust": info["tfrobust"]["version"], "pytorch": info["pytorch"]["version"]}
                        jit = info["tfrobust"]["jit_compile"]
                        rows.append(case_rows(case, results, batch * steps))
                    tables[(model, dtype)] = (rows, batch, steps)
                    finish(args, argv, log, load_before, tables, versions, jit, None, final=False)
            if args.breakdown:
                import compare_pytorch_breakdown

                breakdown, versions = compare_pytorch_breakdown.run(workers, args, tmp, log)
                jit = versions.pop("jit_compile", jit)
    finally:
        for w in workers.values():
            w.close()
    finish(args, argv, log, load_before, tables, versions, jit, breakdown, final=True)
    return 0


def finish(args, argv, log, load_before, tables, versions, jit, breakdown, final):
    """Prints (when ``final``) and writes the section; called after every table so a long run keeps its results."""
    load_after = loadavg()
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/compare_pytorch.py"]
                                        + list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_info(), "versions": versions, "jit": jit, "load_before": load_before, "load_after": load_after,
        "under_load": max((load_before or (0,))[0], (load_after or (0,))[0]) > args.threads + 0.75,
        "wall": time.perf_counter() - log.start, "breakdown": breakdown,
    }
    text, title = report(args, meta, tables)
    if not final:
        text += "\n(run still in progress: tables so far)\n"
    else:
        print(text)
    if args.output:
        bench_train.write_section(args.output, title, text)
        log(f"written to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
