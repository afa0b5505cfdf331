"""Peak memory and scaling of a training step with batch size and model size.

One comparison is measured in one process: every combination of ``--models``,
``--batch-sizes`` and ``--defenses`` is built as a
:class:`~tfrobust.trainer.RobustModel` (with the helpers of
``bench_train.py``: same seed, PGD training attack, AWP active from the first
step, SGD with momentum and weight decay) on the same synthetic 32x32x3 data.
Each configuration is built and warmed up in turn (one round, whose first step
traces the compiled step); then rounds of training steps are timed,
alternating between the configurations round by round with the order rotated
every round, as in ``bench_train.py``. A round is about the same number of
examples for every configuration of a model family (``--cnn-examples`` for
``small_cnn``, ``--resnet-examples`` for the ResNets, rounded up to whole
batches), so that the batch sizes of one model do the same work per round.

Reported per configuration: parameters, examples per second (wall time of the
median and of the fastest round), examples per second of this process's CPU
time (``time.process_time``, far less sensitive to other processes on a
shared machine), an estimate of the arithmetic rate, the CPU time per example
relative to the first configuration of the same model, and memory, measured
in two ways, each when available:

* the tensor allocator of the device (``GPU:0`` with a GPU, else ``CPU:0``):
  ``tf.config.experimental.reset_memory_stats`` before a stretch and
  ``get_memory_info`` after it. *Tensors held after warm-up* is the memory in
  use after the warm-up round minus before the configuration was built
  (weights, optimizer slots, the cached data); *tensor peak of a step* is the
  largest peak of a timed round above the memory in use just before it: what a
  training step needs on top of everything the process holds (activations
  kept for the backward passes, gradients, temporaries). TensorFlow keeps
  these statistics for the oneDNN CPU allocator (its default on x86 Linux)
  and for GPU allocators.
* the process's peak resident set size on Linux: before a stretch, memory
  freed by earlier work is handed back with ``malloc_trim``, ``VmRSS`` is
  read, and the peak is reset to it by writing ``5`` to
  ``/proc/self/clear_refs``; after it, ``VmHWM`` of ``/proc/self/status`` is
  the peak of the stretch. *RSS extra peak* is that peak above the RSS at the
  start (while building, tracing and warming up; and the largest over the
  timed rounds), *peak RSS* the absolute peak over the timed rounds (it
  includes the configurations built before). The oneDNN CPU allocator keeps
  the memory it has freed for reuse, so with it a configuration's RSS extra
  peak counts only what it needs beyond what earlier ones left in the pool;
  with ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`` in the environment tensors come
  from ``malloc`` instead, freed memory goes back to the system, the RSS
  figures are per configuration, and the allocator keeps no statistics.

The script checks at start that each measurement works (a test allocation
must show in the allocator's peak; resetting the peak RSS must forget a freed
64 MiB block) and leaves out those that do not.

The arithmetic rate is an estimate: the multiply-adds of the convolution and
dense layers of one forward pass (2 FLOP each), times ``2 * attack_steps + 4``
forward-pass equivalents for a PGD-AT step (each attack iteration is a forward
pass and a backward pass to the input, the training pass a forward pass and a
backward pass into inputs and kernels, plus the clean forward pass of the
accuracy metric), ``+ 3`` for AWP's ascent pass.

Examples::

    python benchmarks/bench_scaling.py --models small_cnn,wrn-16-4,preact_resnet18 \\
        --batch-sizes 32 --defenses at,at+awp --rounds 3
    python benchmarks/bench_scaling.py --models small_cnn --batch-sizes 32,64,128,256 --rounds 5
    python benchmarks/bench_scaling.py --models preact_resnet18 --batch-sizes 8,16,32 --rounds 3
    TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 python benchmarks/bench_scaling.py --models small_cnn \
        --batch-sizes 32,64,128,256 --rounds 3

Models: ``small_cnn``, ``preact_resnet18``, and ``wrn-DEPTH-WIDTH`` (a
WideResNet, e.g. ``wrn-16-4``). With ``--output FILE`` the result is written
into a markdown file as a section between HTML comment markers, which a later
run of the same comparison replaces.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import (  # noqa: E402
    StepRunner,
    _fmt_ratio,
    attack_settings,
    build_robust_model,
    canonical_defenses,
    make_logger,
    load_data,
    loadavg,
    machine_description,
    measure,
    paired_ratio,
    write_section,
)

MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# configurations


def parse_model(spec):
    """``(build_model name, build_model keyword arguments)`` of a model spec."""
    if spec in ("small_cnn", "preact_resnet18"):
        return spec, {}
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", spec)
    if m:
        depth, width = int(m.group(1)), int(m.group(2))
        if depth >= 10 and (depth - 4) % 6 == 0 and width >= 1:
            return "wide_resnet", {"depth": depth, "width": width}
    raise ValueError(f"unknown model {spec!r}: use small_cnn, preact_resnet18 or wrn-DEPTH-WIDTH "
                     "(depth 6n+4 >= 10, e.g. wrn-16-4)")


@dataclass(frozen=True)
class Config:
    model: str
    batch_size: int
    defense: str
    steps: int  # training steps per round

    @property
    def label(self):
        return f"{self.model}/b{self.batch_size}/{self.defense}"

    @property
    def examples(self):
        return self.batch_size * self.steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small_cnn",
                   help="comma-separated: small_cnn, preact_resnet18, wrn-DEPTH-WIDTH (e.g. wrn-16-4)")
    p.add_argument("--batch-sizes", default="32", help="comma-separated batch sizes")
    p.add_argument("--defenses", default="at", help="comma-separated defenses (see tfrobust.defenses)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="untimed rounds per configuration before timing (the first traces the step)")
    p.add_argument("--cnn-examples", type=int, default=512,
                   help="examples per round for small_cnn (rounded up to whole batches)")
    p.add_argument("--resnet-examples", type=int, default=32,
                   help="examples per round for the ResNets (rounded up to whole batches)")
    p.add_argument("--loop", choices=("fit", "train_on_batch"), default="fit")
    p.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="markdown file in which to write (or replace) this comparison's section")
    args = p.parse_args(argv)

    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()]

    args.models = list(dict.fromkeys(split(args.models)))
    for spec in args.models:
        try:
            parse_model(spec)
        except ValueError as e:
            p.error(str(e))
    try:
        args.batch_sizes = list(dict.fromkeys(int(b) for b in split(args.batch_sizes)))
    except ValueError:
        p.error("--batch-sizes must be integers")
    args.defenses = canonical_defenses(p, split(args.defenses))
    if not args.models or not args.batch_sizes or not args.defenses:
        p.error("--models, --batch-sizes and --defenses must each name at least one")
    if min(args.batch_sizes) < 1:
        p.error("batch sizes must be >= 1")
    for flag in ("rounds", "warmup_rounds", "cnn_examples", "resnet_examples", "attack_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def configurations(args):
    configs = []
    for model in args.models:
        per_round = args.cnn_examples if model == "small_cnn" else args.resnet_examples
        for batch in args.batch_sizes:
            for defense in args.defenses:
                configs.append(Config(model, batch, defense, max(1, math.ceil(per_round / batch))))
    return configs


def step_forward_passes(defense, attack_steps):
    """Forward-pass equivalents of one training step, for the defenses with an estimate."""
    passes = {"at": 2 * attack_steps + 4, "at+awp": 2 * attack_steps + 7}
    return passes.get(defense)


def forward_flops(network):
    """FLOP (2 per multiply-add) of the convolution and dense layers of one forward pass of one example."""
    import keras

    total = 0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += 2 * h * w * kh * kw * cin * cout
        elif isinstance(layer, keras.layers.Dense):
            cin, cout = layer.kernel.shape
            total += 2 * cin * cout
    return int(total)


# ---------------------------------------------------------------------------
# memory


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class MemoryProbe:
    """Peak memory of a stretch of code, above the memory in use when it began.

    Two measurements, each when available: the tensor allocator of the device
    (``GPU:0`` when there is a GPU, else ``CPU:0``; TensorFlow keeps its
    statistics for the oneDNN CPU allocator and for GPU allocators), and the
    process's peak resident set size on Linux.
    """

    def __init__(self):
        import tensorflow as tf

        self._tf = tf
        self._libc = None
        self.device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
        self.allocator = self._allocator_stats_work()
        self.rss = self._rss_reset_works()
        self._tensor_base = self._rss_base = 0

    def _allocator_stats_work(self):
        tf = self._tf
        try:
            tf.config.experimental.reset_memory_stats(self.device)
            with tf.device(self.device):
                block = tf.ones((1024, 1024))
            peak = tf.config.experimental.get_memory_info(self.device)["peak"]
            del block
        except (ValueError, RuntimeError):
            return False
        return peak >= 4 * MIB

    def _trim(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def _rss_reset_works(self):
        """Allocates and frees 64 MiB, then checks that resetting the peak forgets it."""
        import numpy as np

        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            self._libc = None
        try:
            block = np.ones(64 * MIB, np.uint8)
            del block
            self._trim()
            before_reset = _proc_status_kib("VmHWM") - _proc_status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            after_reset = _proc_status_kib("VmHWM") - _proc_status_kib("VmRSS")
        except (OSError, KeyError, ValueError):
            return False
        return before_reset >= 48 * 1024 and after_reset < 8 * 1024

    def begin(self, collect=False):
        """Starts a measured stretch; ``collect`` runs Python's garbage collector first."""
        if collect:
            gc.collect()
        if self.allocator:
            self._tf.config.experimental.reset_memory_stats(self.device)
            self._tensor_base = self._tf.config.experimental.get_memory_info(self.device)["current"]
        if self.rss:
            self._trim()
            self._rss_base = _proc_status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def end(self, trim=False):
        """Bytes: ``tensor_peak``/``tensor_held`` (allocator peak and in use now, above the start),
        ``rss_extra`` (peak RSS above the RSS at the start), ``rss_peak`` (peak RSS), ``rss_held``
        (RSS now above the start; ``trim`` hands freed memory back first); None when not measured."""
        out = dict.fromkeys(("tensor_peak", "tensor_held", "rss_extra", "rss_peak", "rss_held"))
        if self.allocator:
            info = self._tf.config.experimental.get_memory_info(self.device)
            out["tensor_peak"] = info["peak"] - self._tensor_base
            out["tensor_held"] = info["current"] - self._tensor_base
        if self.rss:
            peak = _proc_status_kib("VmHWM") * 1024
            if trim:
                self._trim()
            out.update(rss_extra=peak - self._rss_base, rss_peak=peak,
                       rss_held=_proc_status_kib("VmRSS") * 1024 - self._rss_base)
        return out

    def description(self):
        parts = []
        if self.allocator:
            parts.append(f"tensor memory from the allocator of {self.device} "
                         "(tf.config.experimental.reset_memory_stats before a stretch, get_memory_info after)")
        else:
            parts.append(f"tensor memory not measured ({self.device}'s allocator keeps no statistics)")
        if self.rss:
            parts.append("peak resident memory (RSS) of this process: malloc_trim, then VmRSS read and the peak "
                         "reset by writing 5 to /proc/self/clear_refs before a stretch, VmHWM read after it")
        else:
            parts.append("RSS not measured (no resettable peak RSS on this system)")
        if allocator_setting():
            parts.append(allocator_setting())
        return "; ".join(parts)


# ---------------------------------------------------------------------------
# measurement


def build_config(config, args, probe, log):
    """Builds and warms up one configuration; returns its runner and build measurements."""
    import keras

    name, options = parse_model(config.model)
    # Any model name but small_cnn gives load_data's synthetic 32x32x3 images (CIFAR-10's shape).
    data_args = argparse.Namespace(data="synthetic", model="preact_resnet18", batch_size=config.batch_size,
                                   steps=config.steps, seed=args.seed)
    x, y, info, description = load_data(data_args)
    build_args = argparse.Namespace(model=name, attack_steps=args.attack_steps, steps=config.steps,
                                    seed=args.seed, jit_compile=args.jit_compile)
    t0 = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    probe.begin(collect=True)
    model = build_robust_model(config.defense, build_args, info, model_options=options)
    runner = StepRunner(model, x, y, config.batch_size, args.loop)
    runner.run(config.steps * args.warmup_rounds)
    memory = probe.end(trim=True)
    log(f"{config.label}: built and warmed up in {time.perf_counter() - t0:.1f}s")
    return runner, {
        "params": model.network.count_params(),
        "flops": forward_flops(model.network),
        "memory": memory,
        "data": description,
        "info": info,
        "jit": model.jit_compile,
    }


def timed_task(runner, steps, probe, peaks):
    """A task for ``measure``: one round of ``steps`` steps, recording its memory peak."""

    def run(_steps):
        probe.begin()
        runner.run(steps)
        peaks.append(probe.end())

    return run


# ---------------------------------------------------------------------------
# report


def _mib(value):
    return "-" if value is None else f"{value / MIB:.0f}"


def comparison_title(args):
    title = (f"scaling: {', '.join(args.models)}; batch {', '.join(str(b) for b in args.batch_sizes)}; "
             f"{', '.join(args.defenses)}")
    return title + (f"; {allocator_setting()}" if allocator_setting() else "")


def allocator_setting():
    """``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=value`` when that variable is set, else an empty string."""
    value = os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR")
    return f"TF_ONEDNN_USE_SYSTEM_ALLOCATOR={shlex.quote(value)}" if value else ""


def report(args, meta, configs, built, times, cpu, peaks):
    lines = [f"#### {meta['title']}", ""]
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- date: {meta['date']}; {meta['machine']}")
    lines.append(f"- data: {meta['data']}; training attack PGD-{args.attack_steps} L-inf eps {meta['eps']}, "
                 f"step {meta['step_size']}; AWP warm-up 0; SGD momentum 0.9, weight decay 5e-4")
    lines.append(f"- method: {args.warmup_rounds} warm-up round(s) per configuration, then {args.rounds} rounds "
                 f"alternating between the configurations ({args.loop}, jit_compile={meta['jit']}); a round is "
                 f"{args.cnn_examples} examples for small_cnn and {args.resnet_examples} for the ResNets, "
                 "rounded up to whole batches (steps per round in the table); examples/s from the median round; "
                 "ratios are medians of per-round ratios (range in brackets)")
    lines.append(f"- memory: {meta['memory']}")
    lines.append(f"- load average (1 min) before / after: {meta['load_before']} / {meta['load_after']}; "
                 f"CPU cores this process got while timed (median CPU time / wall time): {meta['cores_used']:.2f}; "
                 f"wall time {meta['wall']:.0f} s")
    lines.append("")
    lines.append("| model | parameters | batch | defense | steps per round | examples/s | best round "
                 "| examples per CPU-second | GFLOP per CPU-second (est.) | CPU time per example vs "
                 "| tensors held after warm-up (MiB) | tensor peak of a step (MiB) "
                 "| RSS extra peak, build and warm-up (MiB) | RSS extra peak of a step (MiB) | peak RSS (MiB) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    per_example_cpu = {c.label: [t / c.examples for t in cpu[c.label]] for c in configs}
    reference = {}
    for c in configs:
        reference.setdefault(c.model, c)
    for c in configs:
        b = built[c.label]
        ref = reference[c.model]
        passes = step_forward_passes(c.defense, args.attack_steps)
        rate = c.examples / statistics.median(cpu[c.label])
        cells = [
            c.model, f"{b['params'] / 1e6:.2f}M", str(c.batch_size), c.defense, str(c.steps),
            f"{c.examples / statistics.median(times[c.label]):.1f}",
            f"{c.examples / min(times[c.label]):.1f}",
            f"{rate:.1f}",
            "-" if passes is None else f"{rate * passes * b['flops'] / 1e9:.0f}",
            "1.00x" if c == ref else
            f"{_fmt_ratio(paired_ratio(per_example_cpu, c.label, ref.label))} vs b{ref.batch_size}/{ref.defense}",
        ]
        held = built[c.label]["memory"]

        def worst(key, label=c.label):
            values = [p[key] for p in peaks[label] if p[key] is not None]
            return max(values) if values else None

        cells += [_mib(held["tensor_held"]), _mib(worst("tensor_peak")), _mib(held["rss_extra"]),
                  _mib(worst("rss_extra")), _mib(worst("rss_peak"))]
        lines.append("| " + " | ".join(cells) + " |")
    flops = {}
    for c in configs:
        flops.setdefault(c.model, built[c.label]["flops"])
    lines.append("")
    lines.append("Forward pass per example (convolution and dense layers): "
                 + ", ".join(f"{m} {f / 1e9:.3f} GFLOP" for m, f in flops.items())
                 + f"; the estimate counts {2 * args.attack_steps + 4} forward-pass equivalents per example for "
                 f"at, {2 * args.attack_steps + 7} for at+awp.")
    if meta["notes"]:
        lines.append("")
        lines.extend(f"- note: {n}" for n in meta["notes"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    import numpy as np

    log = make_logger()
    load_before = loadavg()
    probe = MemoryProbe()
    log(f"memory: {probe.description()}")
    configs = configurations(args)
    runners, built = {}, {}
    for c in configs:
        runners[c.label], built[c.label] = build_config(c, args, probe, log)

    peaks = {c.label: [] for c in configs}
    tasks = {c.label: timed_task(runners[c.label], c.steps, probe, peaks[c.label]) for c in configs}
    times, cpu = measure(tasks, args.rounds, None, log)
    for c in configs:
        log(f"{c.label}: tensor peak / RSS extra peak per round (MiB): "
            + ", ".join(f"{_mib(p['tensor_peak'])}/{_mib(p['rss_extra'])}" for p in peaks[c.label]))

    notes = [f"{label} ended with a non-finite loss ({r.last_loss})"
             for label, r in runners.items() if not np.isfinite(r.last_loss)]
    first = built[configs[0].label]
    eps, step_size = attack_settings(first["info"].image_shape)
    load_after = loadavg()
    meta = {
        "title": comparison_title(args),
        "command": " ".join([w for w in (allocator_setting(), "python", "benchmarks/bench_scaling.py") if w]
                            + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "data": first["data"],
        "eps": f"{eps:.4g}",
        "step_size": f"{step_size:.4g}",
        "jit": first["jit"],
        "memory": probe.description(),
        "load_before": "n/a" if load_before is None else f"{load_before[0]:.2f}",
        "load_after": "n/a" if load_after is None else f"{load_after[0]:.2f}",
        "wall": time.perf_counter() - log.start,
        "cores_used": statistics.median(c / t for k in times for c, t in zip(cpu[k], times[k])),
        "notes": notes,
    }
    text = report(args, meta, configs, built, times, cpu, peaks)
    print(text)
    if args.output:
        write_section(args.output, meta["title"], text)
        log(f"written to {args.output}")


if __name__ == "__main__":
    main()
