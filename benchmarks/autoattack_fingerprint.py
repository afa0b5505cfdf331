"""Bitwise fingerprint of AutoAttack and of the evaluation: adversarial points, verdicts and reports.

A refactor of the attacks must not change a number. This script runs
:func:`tfrobust.autoattack.run_autoattack` on a tiny untrained network (16
random 8x8 images labelled with the network's own predictions, so every
example is attacked) for the versions "standard", "fast", "plus" and "rand",
every attack of ``ALL_ATTACKS`` alone, a custom mapping with small budgets
(also L2, with ``individual``), a run resumed from a partial-results file and
a run on two logical CPUs; then :func:`tfrobust.evaluation.evaluate` with PGD,
FGSM, a named AutoAttack component and an ensemble plus the integrity probes,
and :func:`tfrobust.integrity.autoattack_flags`. Everything is saved to one
``.npz`` (arrays and JSON)::

    python benchmarks/autoattack_fingerprint.py before.npz          # on the old code
    python benchmarks/autoattack_fingerprint.py after.npz           # on the new code
    python benchmarks/autoattack_fingerprint.py --compare before.npz after.npz

``--compare`` lists every entry that is not bitwise equal. The comparison is
meaningful on one machine only (another CPU sums in another order).
"""

import argparse
import functools
import json
import os
import sys
import tempfile


def network(classes=10, seed=3):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(32, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(classes)(h))


def data(model, n=16):
    import numpy as np

    x = np.random.default_rng(0).uniform(size=(n, 8, 8, 1)).astype("float32")
    return x, np.argmax(model(x, training=False).numpy(), axis=1).astype("int32")


def flatten(prefix, value, out):
    """Arrays of ``value`` into ``out`` under ``prefix``; everything else as JSON."""
    import numpy as np

    if "seconds" in prefix.split("/"):
        return  # wall-clock times
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, np.ndarray):
        out[prefix] = value
    else:
        out[prefix] = np.array(json.dumps(value, default=str, sort_keys=True))


def run(path):
    import numpy as np
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    tf.config.experimental.enable_op_determinism()
    from tfrobust import autoattack as aa
    from tfrobust.evaluation import evaluate
    from tfrobust.integrity import autoattack_flags

    model = network()
    x, y = data(model)
    out = {}

    def aa_run(key, **kw):
        kw.setdefault("seed", 1)
        result = aa.run_autoattack(model, x, y, kw.pop("eps", 0.1), batch_size=kw.pop("batch_size", 6),
                                   verbose=False, **kw)
        flatten(key, result, out)
        print(key, result["per_attack"], flush=True)

    for version in ("standard", "fast", "plus", "rand"):
        aa_run(version, version=version)
    for name in aa.ALL_ATTACKS:
        aa_run(f"alone/{name}", attacks=[name], eps=0.05)
    small = {"apgd-ce": functools.partial(aa.apgd, n_iter=10), "apgd-t": functools.partial(
        aa.apgd_targeted, n_iter=10, n_target_classes=3), "fab-t": functools.partial(
        aa.fab_targeted, n_iter=10, n_target_classes=3), "square": functools.partial(aa.square, n_queries=100)}
    aa_run("custom_linf", attacks=small, eps=0.03, individual=True)
    aa_run("custom_l2", attacks=small, eps=0.5, norm="l2", individual=True)
    with tempfile.TemporaryDirectory() as tmp:
        partial = os.path.join(tmp, "p.jsonl")
        aa.run_autoattack(model, x[:8], y[:8], 0.03, attacks=small, batch_size=4, seed=1, verbose=False,
                          partial_path=partial)
        with open(partial) as f:
            lines = f.read().split("\n")
        with open(partial, "w") as f:
            f.write("\n".join(lines[:3]) + "\n")
        result = aa.run_autoattack(model, x[:8], y[:8], 0.03, attacks=small, batch_size=4, seed=1, verbose=False,
                                   partial_path=partial)
        flatten("resumed", result, out)
    aa_run("mirrored", version="fast", batch_size=4, strategy=tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
    report = evaluate(model, x, y, 0.05, attacks=["clean", "fgsm", "pgd5_ce", "pgd3_cw", "apgd_dlr", "fast"],
                      batch_size=8, seed=2, verbose=False, integrity_examples=8)
    flatten("evaluate", report, out)
    report = evaluate(model, x, y, 0.05, attacks=["clean", "rand"], batch_size=8, seed=2, verbose=False)
    flatten("evaluate_rand", report, out)
    flatten("flags", autoattack_flags(model, x, y, 0.031), out)
    np.savez(path, **out)
    print(f"{len(out)} entries written to {path}")


def compare(a, b) -> int:
    import numpy as np

    one, two = np.load(a), np.load(b)
    differ = sorted(set(one.files) ^ set(two.files))
    for key in sorted(set(one.files) & set(two.files)):
        u, v = one[key], two[key]
        if u.shape != v.shape or u.dtype != v.dtype or u.tobytes() != v.tobytes():
            differ.append(key)
    for key in differ:
        print("differs:", key)
    print(f"{len(one.files)} entries; {len(differ)} differ")
    return 1 if differ else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", nargs="+", help="output .npz, or two .npz files with --compare")
    p.add_argument("--compare", action="store_true")
    args = p.parse_args(argv)
    if args.compare:
        if len(args.path) != 2:
            p.error("--compare takes two files")
        return compare(*args.path)
    run(args.path[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
