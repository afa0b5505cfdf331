"""Training throughput of every defense, measured in one process.

Every defense of :data:`tfrobust.defenses.DEFENSES` (or those given with
``--defenses``) is built once as a :class:`~tfrobust.trainer.RobustModel` on
the same network architecture, initial weights and data, with the AWP warm-up
set to zero so that the weight perturbation is active from the first step.
After a warm-up that traces the compiled step, rounds of ``--steps`` training
steps are timed, alternating between the defenses round by round (the order is
rotated every round), so that a change of load on the machine falls on every
defense alike. The table reports, per defense:

* examples per second, from the median time of a round and from the fastest
  round, and examples per second of this process's CPU time;
* the time of a step relative to PGD-AT (``at``) with the same attack;
* the time relative to its base, the same defense without its last term
  (``trades+awp`` against ``trades``, ``trades+awp+rat`` against
  ``trades+awp``).

Ratios are medians of the per-round ratios, each taken between two
measurements of the same round. A second table gives the cost of each
weight-space term (AWP, S2O, RAT) against the defense without that term and
whether it meets its target. Every ratio is given twice: of wall time, and of
the CPU time of this process, which is far less sensitive to other processes
competing for the cores. ``--breakdown`` also times the parts of a step on
their own (the training attack, AWP's ascent pass, the clean forward pass) and
the step of each AWP defense with the perturbation switched off (still in its
warm-up), in alternating rounds of their own.

Examples::

    python benchmarks/bench_train.py --model small_cnn --rounds 5 --steps 10
    python benchmarks/bench_train.py --model preact_resnet18 --batch-size 32 \\
        --defenses at,at+awp,at+s2o,trades,trades+rat,trades+awp --steps 2 --rounds 3

With ``--output FILE`` the result is also written into a markdown file, as a
section enclosed in HTML comment markers that a later run with the same model,
data, batch size and ``--breakdown`` setting replaces (any other text of the
file is kept).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np

TARGETS = {"awp": 1.10, "s2o": 1.05, "rat": 1.30}
MODEL_CHOICES = ("small_cnn", "preact_resnet18")


def parse_args(argv=None):
    from tfrobust.data import SUPPORTED
    from tfrobust.defenses import DEFENSES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODEL_CHOICES, default="small_cnn")
    p.add_argument(
        "--data", default="auto", choices=("auto", "synthetic") + tuple(SUPPORTED),
        help="auto: Fashion-MNIST for small_cnn when its files are at hand (else synthetic 28x28x1), "
        "synthetic 32x32x3 for preact_resnet18",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="training steps per round and defense")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps run once per defense before timing")
    p.add_argument("--defenses", default="all", help="comma-separated list (default: all of DEFENSES)")
    p.add_argument("--loop", choices=("fit", "train_on_batch"), default="fit",
                   help="fit: one epoch over a cached dataset of --steps batches per round")
    p.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the training attack, AWP's ascent pass and a clean forward pass alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="markdown file in which to write (or replace) this run's section")
    args = p.parse_args(argv)
    if args.defenses == "all":
        args.defenses = list(DEFENSES)
    else:
        names = canonical_defenses(p, args.defenses.split(","))
        if not names:
            p.error("--defenses names no defense")
        args.defenses = names
    for flag in ("batch_size", "steps", "rounds", "attack_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 1:
        p.error("--warmup-steps must be >= 1 (the first step traces the graph)")
    return args


# ---------------------------------------------------------------------------
# data and models


def canonical_defenses(parser, names):
    """The defenses' canonical names, each once, in order; an unknown name ends the program via ``parser``."""
    from tfrobust.defenses import parse_defense
    from tfrobust.errors import UserError

    out = []
    for name in names:
        if not name.strip():
            continue
        try:
            canonical = parse_defense(name).name
        except UserError as e:
            parser.error(str(e))
        if canonical not in out:
            out.append(canonical)
    return out


def load_data(args):
    """``(x, y, info, description)``: float32 images in [0, 1] and int32 labels for every step of a round."""
    from tfrobust import data as data_lib
    from tfrobust.errors import UserError

    n = args.batch_size * args.steps
    rng = np.random.default_rng(args.seed)
    name = args.data
    if name == "auto":
        name = "fashion_mnist" if args.model == "small_cnn" else "synthetic"
    if name != "synthetic":
        info = data_lib.dataset_info(name)
        try:
            images, labels = data_lib.load_arrays(name, "train", limit=n)
        except UserError as e:
            if args.data != "auto":
                raise
            print(f"note: {name} could not be loaded ({e}); using synthetic data", file=sys.stderr)
            name = "synthetic"
        else:
            if len(images) < n:
                repeats = -(-n // max(len(images), 1))
                images = np.concatenate([images] * repeats)[:n]
                labels = np.concatenate([labels] * repeats)[:n]
            x = images.astype(np.float32) / 255.0
            y = labels.astype(np.int32)
            return x, y, info, f"{name}, the first {min(n, len(x))} training images"
    info = data_lib.dataset_info("fashion_mnist" if args.model == "small_cnn" else "cifar10")
    x = rng.uniform(0.0, 1.0, size=(n,) + info.image_shape).astype(np.float32)
    y = rng.integers(0, info.num_classes, size=n).astype(np.int32)
    shape = "x".join(str(d) for d in info.image_shape)
    return x, y, info, f"synthetic, uniform random {shape} images in [0, 1], random labels"


def attack_settings(image_shape):
    """(eps, step_size) of the training attack for the image size."""
    if tuple(image_shape[:2]) == (28, 28):
        return 0.1, 0.025
    return 8.0 / 255.0, 2.0 / 255.0


def build_robust_model(name, args, info, awp_active=True, model_options=None, **settings):
    """A compiled RobustModel; with ``awp_active=False`` AWP stays in its warm-up (no perturbation).

    ``model_options``: extra arguments of ``tfrobust.models.build_model`` (e.g. WideResNet depth and width);
    ``settings``: further settings of the step (e.g. ``train_clean_accuracy=False``).
    """
    import keras

    from tfrobust import models
    from tfrobust.config import AWPConfig, DefenseConfig
    from tfrobust.defenses import parse_defense
    from tfrobust.trainer import RobustModel

    warmup = 0 if awp_active else 10**6
    defense = parse_defense(name, DefenseConfig(name=name, awp=AWPConfig(warmup_epochs=warmup)))
    eps, step_size = attack_settings(info.image_shape)
    network = models.build_model(args.model, info.image_shape, info.num_classes, info.mean, info.std, seed=args.seed,
                                 **(model_options or {}))
    model = RobustModel(
        network, defense, eps=eps, step_size=step_size, steps=args.attack_steps,
        steps_per_epoch=args.steps, weight_decay=5e-4, seed=args.seed, **settings,
    )
    jit = {"auto": "auto", "on": True, "off": False}[args.jit_compile]
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit)
    model(np.zeros((1,) + tuple(info.image_shape), np.float32))
    return model


def base_of(name):
    """The defense without its last term, or None for a base objective."""
    parts = name.split("+")
    return "+".join(parts[:-1]) if len(parts) > 1 else None


def without_term(name, term):
    parts = name.split("+")
    return "+".join(p for p in parts if p != term)


# ---------------------------------------------------------------------------
# timed tasks


class StepRunner:
    """Runs training steps of one model, through ``fit`` or ``train_on_batch``."""

    def __init__(self, model, x, y, batch_size, loop):
        import tensorflow as tf

        self.model = model
        self.loop = loop
        self.steps = len(x) // batch_size
        if loop == "fit":
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True).cache()
            # The data is in memory: nothing to tune. With autotuning on, deleting the
            # iterator at the end of every fit call can wait for up to ~1.3 s.
            options = tf.data.Options()
            options.autotune.enabled = False
            ds = ds.with_options(options)
            for _ in ds:  # fills the cache
                pass
            self.dataset = ds
        else:
            self.batches = [
                (tf.constant(x[i * batch_size : (i + 1) * batch_size]), tf.constant(y[i * batch_size : (i + 1) * batch_size]))
                for i in range(self.steps)
            ]
        self.last_loss = float("nan")

    def run(self, steps):
        """Runs ``steps`` steps (any number for train_on_batch; whole epochs for fit)."""
        if self.loop == "fit":
            epochs = max(1, -(-steps // self.steps))
            history = self.model.fit(self.dataset, epochs=epochs, verbose=0, shuffle=False)
            self.last_loss = float(history.history["loss"][-1])
        else:
            for i in range(steps):
                xb, yb = self.batches[i % self.steps]
                logs = self.model.train_on_batch(xb, yb, return_dict=True)
            self.last_loss = float(logs["loss"])


def make_component(fn, reps):
    """A task calling the compiled ``fn`` ``reps`` times and waiting for the result."""

    def run(_steps):
        for _ in range(reps):
            out = fn()
        float(out.numpy())

    return run


def component_tasks(name, model, x, y, reps):
    """Compiled parts of one defense's step: attack, AWP ascent (if any), clean forward."""
    import tensorflow as tf

    xb = tf.constant(x)
    yb = tf.constant(y)

    @tf.function
    def attack():
        return tf.reduce_sum(model.adversarial_examples(xb, yb))

    x_adv = tf.constant(tf.function(model.adversarial_examples)(xb, yb))

    @tf.function
    def ascent():
        v = model.weight_perturbation(xb, x_adv, yb)
        return tf.add_n([tf.reduce_sum(t) for t in v])

    @tf.function
    def forward():
        return tf.reduce_sum(model.network(xb, training=False))

    tasks = {(name, "attack"): attack}
    if model.defense.awp:
        tasks[(name, "awp_ascent")] = ascent
    tasks[(name, "forward")] = forward
    for fn in tasks.values():
        fn()  # trace
        fn()
    return {key: make_component(fn, reps) for key, fn in tasks.items()}


# ---------------------------------------------------------------------------
# measurement


def measure(tasks, rounds, steps, log):
    """Alternates the tasks round by round.

    Returns ``({key: [wall seconds per round]}, {key: [process CPU seconds per round]})``.
    """
    keys = list(tasks)
    times = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        order = keys[shift:] + keys[:shift]
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            tasks[k](steps)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{_label(k)} {times[k][-1]:.2f}s/{cpu[k][-1]:.2f}cpu" for k in keys))
    return times, cpu


def _label(key):
    return key if isinstance(key, str) else "/".join(key)


def paired_ratio(times, a, b):
    """Median and range over rounds of time(a) / time(b)."""
    ratios = [ta / tb for ta, tb in zip(times[a], times[b])]
    return statistics.median(ratios), min(ratios), max(ratios)


def loadavg():
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------
# report


def _fmt_ratio(r):
    median, lo, hi = r
    return f"{median:.2f}x ({lo:.2f}-{hi:.2f})"


def _ratio_cell(times, a, b):
    return _fmt_ratio(paired_ratio(times, a, b)) if a in times and b in times else "-"


def report(args, meta, times, cpu, parts=None):
    """The markdown section of a run and its title.

    ``parts``, from ``--breakdown``: ``(wall, cpu)`` dicts of the parts of a step
    and of the full steps timed in the same rounds.
    """
    lines = []
    title = f"{args.model}, batch {args.batch_size}, {meta['data_name']}"
    if parts:
        title += ", parts of a step"
    lines.append(f"#### {title}")
    lines.append("")
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- date: {meta['date']}; {meta['machine']}")
    lines.append(f"- data: {meta['data']}; training attack PGD-{args.attack_steps} (single-step bases: their one step) "
                 f"L-inf eps {meta['eps']}, step {meta['step_size']}; AWP warm-up 0; SGD momentum 0.9, weight decay 5e-4")
    lines.append(f"- method: {args.warmup_steps} warm-up step(s) per defense, then {args.rounds} rounds of "
                 f"{args.steps} steps per defense ({args.loop}, jit_compile={meta['jit']}), alternating; "
                 "examples/s from the median round; ratios are medians of the per-round ratios "
                 "(range over rounds in brackets), of wall time and of this process's CPU time")
    lines.append(f"- load average (1 min) before / after: {meta['load_before']} / {meta['load_after']}; "
                 f"CPU cores this process got while timed (median CPU time / wall time): {meta['cores_used']:.2f}; "
                 f"wall time {meta['wall']:.0f} s")
    lines.append("")
    lines.append("| defense | examples/s | best round | examples per CPU-second | time vs at | time vs its base "
                 "| CPU time vs at | CPU time vs its base |")
    lines.append("|---|---|---|---|---|---|---|---|")
    examples = args.batch_size * args.steps
    names = list(times)
    for name in names:
        base = base_of(name)
        cells = [
            name,
            f"{examples / statistics.median(times[name]):.1f}",
            f"{examples / min(times[name]):.1f}",
            f"{examples / statistics.median(cpu[name]):.1f}",
            "1.00x" if name == "at" else _ratio_cell(times, name, "at"),
            "-" if base is None else f"{_ratio_cell(times, name, base)} vs {base}",
            "1.00x" if name == "at" else _ratio_cell(cpu, name, "at"),
            "-" if base is None else _ratio_cell(cpu, name, base),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rows = []
    for name in names:
        for term in name.split("+")[1:]:
            base = without_term(name, term)
            if base in times:
                wall = paired_ratio(times, name, base)
                cpu_ratio = paired_ratio(cpu, name, base)
                target = TARGETS.get(term)  # the input-space regularisers have no target
                met = "-" if target is None else (
                    f"{'yes' if wall[0] <= target else 'no'} / {'yes' if cpu_ratio[0] <= target else 'no'}")
                rows.append(f"| {term} | {name} vs {base} | {_fmt_ratio(wall)} | {_fmt_ratio(cpu_ratio)} | "
                            f"{'-' if target is None else f'<= {target:.2f}x'} | {met} |")
    if rows:
        lines.append("")
        lines.append("| term | comparison | time ratio | CPU-time ratio | target | met (time / CPU time) |")
        lines.append("|---|---|---|---|---|---|")
        lines.extend(rows)
    if parts:
        wall_parts, cpu_parts = parts
        reps = meta["reps"]
        lines.append("")
        lines.append(f"Parts of a step timed alone (each compiled on its own, one batch, {reps} call(s) per round, "
                     f"alternating with {args.steps}-step rounds of full steps over {args.rounds} rounds; "
                     "median ms per call, wall time / CPU time):")
        lines.append("")
        lines.append("| defense | full step | full step, AWP inactive | training attack | AWP ascent "
                     "| clean forward | ascent / step (wall / CPU) |")
        lines.append("|---|---|---|---|---|---|---|")

        def ms(table, key, per):
            return None if key not in table else 1000 * statistics.median(table[key]) / per

        for name in names:
            if (name, "attack") not in wall_parts:
                continue
            step = (ms(wall_parts, name, args.steps), ms(cpu_parts, name, args.steps))
            cells = [name, f"{step[0]:.0f} / {step[1]:.0f}"]
            w, c = ms(wall_parts, (name, "awp_inactive"), args.steps), ms(cpu_parts, (name, "awp_inactive"), args.steps)
            cells.append("-" if w is None else f"{w:.0f} / {c:.0f}")
            for part in ("attack", "awp_ascent", "forward"):
                w, c = ms(wall_parts, (name, part), reps), ms(cpu_parts, (name, part), reps)
                cells.append("-" if w is None else f"{w:.0f} / {c:.0f}")
            w, c = ms(wall_parts, (name, "awp_ascent"), reps), ms(cpu_parts, (name, "awp_ascent"), reps)
            cells.append("-" if w is None else f"{w / step[0]:.3f} / {c / step[1]:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    if meta["notes"]:
        lines.append("")
        lines.extend(f"- note: {n}" for n in meta["notes"])
    return "\n".join(lines) + "\n", title


def write_section(path, key, text):
    begin, end = f"<!-- bench_train: {key} -->", f"<!-- /bench_train: {key} -->"
    block = f"{begin}\n{text}{end}\n"
    content = ""
    if os.path.exists(path):
        with open(path) as f:
            content = f.read()
    i, j = content.find(begin), content.find(end)
    if i >= 0 and j > i:
        rest = content[j + len(end) :].lstrip("\n")
        content = content[:i] + block + ("\n" + rest if rest else "")
    else:
        if content and not content.endswith("\n"):
            content += "\n"
        content += ("\n" if content else "") + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)


def machine_description():
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = f"{len(gpus)} GPU(s)" if gpus else "no GPU"
    return (f"{os.cpu_count()} CPU cores, {device}, {platform.system()} {platform.machine()}, "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}")


def make_logger():
    """A function printing messages to stderr with the seconds since it was made."""
    wall_start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - wall_start:6.0f}s] {message}", file=sys.stderr, flush=True)

    log.start = wall_start
    return log


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    import keras

    log = make_logger()
    load_before = loadavg()
    x, y, info, data_description = load_data(args)
    eps, step_size = attack_settings(info.image_shape)
    keras.utils.set_random_seed(args.seed)

    models, runners, notes = {}, {}, []
    for name in args.defenses:
        t0 = time.perf_counter()
        models[name] = build_robust_model(name, args, info)
        runners[name] = StepRunner(models[name], x, y, args.batch_size, args.loop)
        runners[name].run(args.warmup_steps)
        log(f"{name}: built and warmed up in {time.perf_counter() - t0:.1f}s")

    tasks = {name: runners[name].run for name in args.defenses}
    times, cpu = measure(tasks, args.rounds, args.steps, log)
    for name, r in runners.items():
        if not np.isfinite(r.last_loss):
            notes.append(f"{name} ended with a non-finite loss ({r.last_loss})")

    parts, reps = None, max(1, args.steps // 2)
    if args.breakdown:
        comp_tasks = {}
        xb, yb = x[: args.batch_size], y[: args.batch_size]
        for name in args.defenses:
            comp_tasks.update(component_tasks(name, models[name], xb, yb, reps))
        log("breakdown: parts traced")
        comp_tasks.update({name: runners[name].run for name in args.defenses})
        for name in args.defenses:
            if models[name].defense.awp:
                inactive = StepRunner(build_robust_model(name, args, info, awp_active=False), x, y,
                                      args.batch_size, args.loop)
                inactive.run(args.warmup_steps)
                comp_tasks[(name, "awp_inactive")] = inactive.run
        log("breakdown: steps with AWP inactive warmed up")
        parts = measure(comp_tasks, args.rounds, args.steps, log)

    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_train.py"] + list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "data": data_description,
        "data_name": data_description.split(",")[0],
        "eps": f"{eps:.4g}",
        "step_size": f"{step_size:.4g}",
        "jit": next(iter(models.values())).jit_compile if models else args.jit_compile,
        "load_before": "n/a" if load_before is None else f"{load_before[0]:.2f}",
        "load_after": "n/a" if loadavg() is None else f"{loadavg()[0]:.2f}",
        "wall": time.perf_counter() - log.start,
        "reps": reps,
        "cores_used": statistics.median(c / t for name in times for c, t in zip(cpu[name], times[name])),
        "notes": notes,
    }
    text, title = report(args, meta, times, cpu, parts)
    print(text)
    if args.output:
        write_section(args.output, title, text)
        log(f"written to {args.output}")


if __name__ == "__main__":
    main()
