"""``compare_pytorch.py --breakdown``: the PreActResNet-18 step taken apart on both sides.

tfrobust side (in the tfrobust worker): the parts of the step compiled and
timed on their own, one batch each, through the network as the step calls it
(in mixed precision its fused-BatchNorm twin, step/fused_batch_norm.py; then the
train-mode forward and backward pass through Keras' own layers is timed too, for
comparison) (wall and process CPU time, median of ``reps`` calls): the training attack (PGD-10 in inference mode), one attack
iteration (forward and input gradient in inference mode), with ``--xla`` the
attack compiled with XLA (``jit_compile=True``) from the same start, the train-mode
forward pass, forward and backward pass, the optimizer's update, the
inference-mode forward pass ``RobustModel`` runs for its clean-accuracy metric
when the defense has no clean logits of its own (AT), and the full step through
``fit`` and through ``train_on_batch``. The step minus the sum of its parts is
the overhead of ``tf.function``, Python and Keras. Then one ``fit`` epoch runs
under TensorFlow's profiler (``tf.profiler.experimental``) and the time of the
traced TensorFlow ops is summed per op type.

PyTorch side (in the PyTorch worker): the wall time of the step's phases
(attack, AWP proxy, train-mode forward, backward, optimizer) over the timed
rounds, and one step under ``torch.profiler``: self CPU time per operator.

Both sides' op times are grouped the same way: convolutions (forward and both
backward passes), BatchNorm, matrix products, layout conversions and copies
(oneDNN reorders, transposes, contiguous copies), dtype casts, and the rest.
"""

from __future__ import annotations

import glob
import os
import statistics
import tempfile
import time

GROUPS = (
    ("convolution", ("conv",)),
    ("BatchNorm", ("batchnorm", "batch_norm", "fusedbatchnorm")),
    ("matrix product", ("matmul", "addmm", "aten::mm", "linear", "einsum")),
    ("layout / copy", ("reorder", "to_dense", "to_mkldnn", "transpose", "contiguous", "copy_", "clone", "pad",
                       "identity")),
    ("cast", ("cast", "_to_copy", "aten::to")),
)


def group_of(op: str) -> str:
    low = op.lower()
    for name, keys in GROUPS:
        if any(k in low for k in keys):
            return name
    return "other"


def grouped(ops: dict) -> dict:
    out = {}
    for op, ms in ops.items():
        g = group_of(op)
        out[g] = out.get(g, 0.0) + ms
    return out


# ---------------------------------------------------------------------------
# tfrobust side (runs in the tfrobust worker)


def _timed(fn, reps):
    """Median wall and CPU milliseconds of ``fn()`` (its result is fetched each time)."""
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        if hasattr(out, "numpy"):
            out.numpy()
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


KERAS_BATCH_NORM = "train-mode forward + backward through Keras' BatchNorm layers (not the step's)"


def _part_functions(model, xb, yb, xla=False):
    import keras
    import tensorflow as tf

    from tfrobust.step.fused_batch_norm import fused_network

    net = fused_network(model.network)  # as the step calls it: the fused-BatchNorm twin in mixed precision
    variables = model.network.trainable_variables
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x_adv = tf.constant(tf.function(model.adversarial_examples)(xb, yb))

    @tf.function
    def attack():
        return tf.reduce_sum(model.adversarial_examples(xb, yb))

    @tf.function
    def attack_iteration():
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = ce(yb, tf.cast(net(x_adv, training=False), tf.float32))
        return tf.reduce_sum(tape.gradient(loss, x_adv))

    @tf.function
    def train_forward():
        return ce(yb, tf.cast(net(x_adv, training=True), tf.float32))

    def forward_backward(network):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                loss = model.optimizer.scale_loss(ce(yb, tf.cast(network(x_adv, training=True), tf.float32)))
            return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, variables)])
        return run

    train_forward_backward = forward_backward(net)

    grads = [tf.zeros_like(v) for v in variables]

    @tf.function
    def optimizer():
        model.optimizer.apply(grads, variables)
        return tf.reduce_sum(variables[0])

    @tf.function
    def metric_forward():
        return tf.reduce_sum(tf.cast(net(xb, training=False), tf.float32))

    parts = {"attack (PGD, inference mode)": attack, "one attack iteration": attack_iteration,
             "train-mode forward": train_forward, "train-mode forward + backward": train_forward_backward,
             "optimizer update": optimizer}
    if not model.defense.needs_clean_logits:
        parts["clean forward for the metric"] = metric_forward
    if xla:  # the same attack from the same start, compiled with XLA
        x_init = tf.constant(model._attack_start(xb))
        parts["attack with XLA (jit_compile=True)"] = tf.function(
            lambda: tf.reduce_sum(model.adversarial_examples(xb, yb, x_init)), jit_compile=True)
    if net is not model.network:  # the same pass through Keras' own BatchNorm layers, for comparison
        parts[KERAS_BATCH_NORM] = forward_backward(model.network)
    if model.defense.awp:
        @tf.function
        def ascent():
            return tf.add_n([tf.reduce_sum(t) for t in model.weight_perturbation(xb, x_adv, yb)])
        parts["AWP ascent pass"] = ascent
    return parts


def _xplane_ops(logdir):
    """Total milliseconds per TensorFlow op type in the profiler's trace under ``logdir``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    ops = {}
    for path in glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    head, sep, op_type = name.rpartition(":")  # an op's event is "<node name>:<op type>"
                    if (not sep or not head or "::" in name or " " in op_type or "#" in op_type
                            or not op_type.lstrip("_")[:1].isupper()):
                        continue
                    ops[op_type] = ops.get(op_type, 0.0) + event.duration_ps / 1e9
    return ops


def tf_parts(state, cmd):
    """The tfrobust worker's answer to ``profile``: parts of the step and op types of a traced epoch."""
    import tensorflow as tf

    model, runner, reps = state["model"], state["runner"], cmd["reps"]
    batch = state["batch"]
    xb, yb = tf.constant(state["x"][:batch]), tf.constant(state["y"][:batch])
    parts = _part_functions(model, xb, yb, cmd.get("xla", False))
    for fn in parts.values():
        fn()  # traces
    times = {name: _timed(fn, reps) for name, fn in parts.items()}
    steps = runner.steps
    wall, cpu = _timed(lambda: runner.run(steps), max(1, reps // steps))
    times["full step via fit"] = (wall / steps, cpu / steps)
    model.train_on_batch(xb, yb)
    times["full step via train_on_batch"] = _timed(lambda: model.train_on_batch(xb, yb, return_dict=True)["loss"],
                                                   reps)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        runner.run(steps)
        traced = 1000 * (time.perf_counter() - t0) / steps
        tf.profiler.experimental.stop()
        ops = _xplane_ops(logdir)
    return {"times": times, "ops": {k: v / steps for k, v in ops.items()}, "traced_step_ms": traced}


# ---------------------------------------------------------------------------
# the run and its report (in the main process)


def run(workers, args, tmp, log):
    """Sets PreActResNet-18 up on both workers per dtype; returns the markdown of the breakdown and the versions."""
    import compare_pytorch as cp

    model = "preact_resnet18"
    batch, steps, _, eps, step_size = cp.case_settings(model, args)
    data = os.path.join(tmp, model + "_breakdown.npz")
    cp.write_data(data, model, args)
    sections, versions = [], {}
    for dtype in args.dtypes:
        for defense in [d for d in args.defenses if d in ("at", "at+awp")] or ["at"]:
            case = dict(model=model, defense=defense, dtype=dtype, batch=batch, eps=eps, step_size=step_size,
                        attack_steps=args.attack_steps, seed=args.seed, warmup_steps=args.warmup_steps,
                        threads=args.threads, data=data)
            results, info = cp.run_case(workers, case, args.rounds, steps, log)
            versions = {name: answer["version"] for name, answer in info.items()}
            versions["jit_compile"] = info["tfrobust"]["jit_compile"]
            tf_answer = workers["tfrobust"].ask(cmd="profile", reps=max(2, args.rounds), xla=args.xla)
            pt_answer = workers["pytorch"].ask(cmd="profile")
            log(f"breakdown {defense} {dtype}: profiled")
            sections.append(_section(defense, dtype, batch, steps, results, tf_answer, pt_answer))
    return "\n".join(sections), versions


def _section(defense, dtype, batch, steps, results, tf_answer, pt_answer):
    lines = [f"Breakdown, preact_resnet18 {defense}, {dtype}, batch {batch}:", ""]
    lines.append("tfrobust, parts compiled and timed alone (ms per call, wall / CPU):")
    lines.append("")
    lines.append("| part | wall ms | CPU ms |")
    lines.append("|---|---|---|")
    times = tf_answer["times"]
    for name, (w, c) in times.items():
        lines.append(f"| {name} | {w:.0f} | {c:.0f} |")
    alone = ("full step via fit", "full step via train_on_batch", "one attack iteration", "train-mode forward",
             "attack with XLA (jit_compile=True)", KERAS_BATCH_NORM)  # not parts of the step, or inside another part
    summed = [sum(times[k][i] for k in times if k not in alone) for i in (0, 1)]
    fit = times["full step via fit"]
    lines.append(f"| step via fit minus the sum of its parts (overhead) | {fit[0] - summed[0]:.0f} | "
                 f"{fit[1] - summed[1]:.0f} |")
    phases = {}
    for r in results["pytorch"]:
        for k, v in r.get("phases", {}).items():
            phases.setdefault(k, []).append(1000 * v / steps)
    lines += ["", "PyTorch, phases of the timed steps (median ms per step, wall): "
              + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in phases.items()), ""]
    tf_groups, pt_groups = grouped(tf_answer["ops"]), grouped(pt_answer["ops"])
    lines.append(f"Op time per step by kind (tfrobust: wall time of the ops in TensorFlow's profiler trace, one fit "
                 f"epoch, traced step "
                 f"{tf_answer['traced_step_ms']:.0f} ms; PyTorch: torch.profiler self CPU time, one step):")
    lines.append("")
    lines.append("| kind | tfrobust ms | PyTorch ms |")
    lines.append("|---|---|---|")
    for g in [name for name, _ in GROUPS] + ["other"]:
        lines.append(f"| {g} | {tf_groups.get(g, 0.0):.0f} | {pt_groups.get(g, 0.0):.0f} |")
    lines.append(f"| total | {sum(tf_groups.values()):.0f} | {sum(pt_groups.values()):.0f} |")
    for side, ops in (("tfrobust", tf_answer["ops"]), ("PyTorch", pt_answer["ops"])):
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
        lines += ["", f"{side}, the 10 costliest op types (ms per step): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in top)]
    return "\n".join(lines) + "\n"
