"""Bitwise fingerprint of the train step: weights and logs after a few deterministic steps of every defense.

A refactor of the step must not change a number. This script trains every
defense of :data:`tfrobust.defenses.DEFENSES`, plus the settings that enter
the objective (L2 attack, BatchNorm in both attack modes, weight decay with
exclusions, label smoothing, weight averaging, ``sample_weight``, kernel
regularizers, an AWP warm-up that ends mid-run, RAT's reference quirk and the
unclipped start, validation with the CW loss, and a mirrored strategy on two
logical CPUs), for a few steps of a tiny CNN on 96 Fashion-MNIST images with
``tf.config.experimental.enable_op_determinism()``, and saves all weights
(network, average, optimizer) and the Keras history per case::

    python benchmarks/step_fingerprint.py before/            # on the old code
    python benchmarks/step_fingerprint.py after/             # on the new code
    python benchmarks/step_fingerprint.py --compare before/ after/

``--compare`` reports every array or log that is not bitwise equal. The
comparison is meaningful on one machine only (another CPU sums in another
order). ``--accumulate N`` trains with ``accumulate_steps=N`` (then the
numbers agree with N=1 only up to rounding).
"""

import argparse
import json
import os
import sys


def tiny_cnn(batch_norm=False, regularizer=None, seed=5):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, activation=None if batch_norm else "relu", kernel_regularizer=regularizer)(inputs)
    if batch_norm:
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dense(32, activation="relu", kernel_regularizer=regularizer)(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


def cases(mirrored):
    from tfrobust.defenses import DEFENSES

    found = [(name.replace("+", "_"), name, {}) for name in DEFENSES]
    found += [
        ("at_awp_l2", "at+awp", dict(norm="l2", eps=1.0, step_size=0.3)),
        ("trades_awp_s2o_bn_train", "trades+awp+s2o", dict(bn=True, bn_mode="train", val=True)),
        ("mart_awp_bn_eval_wdex", "mart+awp", dict(bn=True, weight_decay_exclude="batchnorm")),
        ("at_ls", "at", dict(label_smoothing=0.1)),
        ("trades_awp_ls", "trades+awp", dict(label_smoothing=0.1)),
        ("trades_rat_ema", "trades+rat", dict(ema_decay=0.99, ema_start_step=1, val=True)),
        ("trades_s2o_sw", "trades+s2o", dict(sample_weight=True)),
        ("at_awp_sw", "at+awp", dict(sample_weight=True)),
        ("trades_awp_rat_sw", "trades+awp+rat", dict(sample_weight=True)),
        ("trades_awp_warmup_mid", "trades+awp", dict(warmup=1, epochs=2, spe=2)),
        ("trades_awp_rat_quirk", "trades+awp+rat",
         dict(changes=dict(rat_reference_quirk=True, unclipped_gaussian_start=True))),
        ("trades_rat_quirk", "trades+rat", dict(changes=dict(rat_reference_quirk=True, rat_sigma=1e-3))),
        ("at_awp_reg", "at+awp", dict(regularizer=True)),
        ("mart_s2o_cw", "mart+s2o", dict(eval_loss="cw", val=True)),
        ("mirrored_trades_awp_s2o", "trades+awp+s2o", dict(strategy=mirrored)),
        ("mirrored_trades_awp_rat", "trades+awp+rat", dict(strategy=mirrored, sample_weight=True)),
        ("mirrored_at_awp_bn", "at+awp", dict(strategy=mirrored, bn=True)),
    ]
    return found


def run_case(out, label, name, data, accumulate, *, bn=False, warmup=0, epochs=1, spe=3, sample_weight=False,
             regularizer=False, strategy=None, val=False, changes=None, **settings):
    import dataclasses

    import keras
    import numpy as np
    import tensorflow as tf

    from tfrobust.defenses import parse_defense
    from tfrobust.trainer import RobustModel

    x, y, w = data
    defense = dataclasses.replace(parse_defense(name), awp_warmup_epochs=warmup, **(changes or {}))
    options = dict(eps=0.1, step_size=0.03, steps=2, weight_decay=5e-4, seed=3, steps_per_epoch=spe)
    options.update(settings)
    if accumulate is not None:
        options["accumulate_steps"] = accumulate
    with (strategy or tf.distribute.get_strategy()).scope():
        network = tiny_cnn(bn, keras.regularizers.L2(1e-3) if regularizer else None)
        model = RobustModel(network, defense, **options)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["sparse_categorical_accuracy"])
    n = 16 * spe
    train = (x[:n], y[:n]) + ((w[:n],) if sample_weight else ())
    validation = tf.data.Dataset.from_tensor_slices((x[n:n + 16], y[n:n + 16])).batch(16) if val else None
    history = model.fit(tf.data.Dataset.from_tensor_slices(train).batch(16), epochs=epochs, verbose=0,
                        shuffle=False, validation_data=validation)
    arrays = {f"w{i}": np.asarray(v.numpy()) for i, v in enumerate(model.weights)}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    np.savez(os.path.join(out, label + ".npz"), **arrays)
    with open(os.path.join(out, label + ".json"), "w") as f:
        json.dump({k: [float(v) for v in vs] for k, vs in history.history.items()}, f, indent=1)


def compare(a, b) -> int:
    import numpy as np

    differ = 0
    names = sorted(os.listdir(a))
    for name in names:
        p, q = os.path.join(a, name), os.path.join(b, name)
        if not os.path.exists(q):
            print(f"{name}: missing in {b}")
            differ += 1
        elif name.endswith(".npz"):
            u, v = np.load(p), np.load(q)
            bad = [k for k in u.files if k not in v.files or u[k].shape != v[k].shape or not np.array_equal(u[k], v[k])]
            if bad or sorted(u.files) != sorted(v.files):
                print(f"{name}: {len(bad)} arrays differ (first: {bad[:3]})")
                differ += 1
        else:
            with open(p) as f, open(q) as g:
                if json.load(f) != json.load(g):
                    print(f"{name}: logs differ")
                    differ += 1
    print(f"{len(names)} files compared, {differ} differ")
    return 1 if differ else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="directory for the fingerprint")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprints bitwise")
    p.add_argument("--accumulate", type=int, help="train with accumulate_steps=N")
    p.add_argument("--only", help="run only the cases whose label contains this")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give an output directory or --compare A B")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    import numpy as np

    from tfrobust.data import load_arrays

    x, y = load_arrays("fashion_mnist", "train", limit=96)
    data = (x.astype("float32") / 255.0, y.astype("int32"), np.linspace(0.2, 1.5, len(x)).astype("float32"))
    os.makedirs(args.out, exist_ok=True)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for label, name, settings in cases(mirrored):
        if args.only and args.only not in label:
            continue
        run_case(args.out, label, name, data, args.accumulate, **settings)
        print(label, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
