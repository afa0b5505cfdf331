"""Records every weight-space number of tfrobust on fixed seeds, to check a refactoring bit for bit.

    python scripts/weight_space_numbers.py record before.pkl    # on the base commit
    python scripts/weight_space_numbers.py record after.pkl     # on the change
    python scripts/weight_space_numbers.py compare before.pkl after.pkl

Recorded, for a tiny CNN with and without BatchNormalization: the perturbable
variables and the AWP and RAT selections, sphere and ball samples, their
projection, RAT's weight noise, the robust loss, average- and worst-case
flatness (robust, clean, custom loss, eager), a flatness report, random and
adversarial landscape directions, 1-D and 2-D landscapes, the weights after
all of them; one epoch (4 steps) of at+awp, trades+rat, trades+awp+rat and
mart+awp (final weights and history); a FlatnessMonitor during two epochs.
``compare`` exits 1 and lists what differs unless everything is identical to
the bit. Compare only records made on one machine: another CPU may sum in
another order.
"""

import dataclasses
import os
import pickle
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def tiny_cnn(batch_norm, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, activation=None if batch_norm else "relu")(inputs)
    if batch_norm:
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dense(32, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


def record(path):
    from tfrobust import flatness as F
    from tfrobust import landscape as L
    from tfrobust.data import load_arrays
    from tfrobust.defenses import awp, parse_defense, rat
    from tfrobust.trainer import RobustModel

    out = {}
    x, y = load_arrays("fashion_mnist", "train", limit=200)
    x, y = x.astype("float32") / 255.0, y.astype("int32")
    xs, ys = x[:48], y[:48]
    small = dict(eps=0.05, steps=3, batch_size=20, progress=False)

    def loss_fn(model, xb, yb):
        return tf.reduce_mean(tf.square(model(xb, training=False)))

    for tag, bn in (("plain", False), ("bn", True)):
        m = tiny_cnn(bn, 3)
        m(xs[:1])
        w = [v.numpy() for v in F.perturbable_variables(m)]
        out[f"{tag}/vars"] = [v.path for v in F.perturbable_variables(m)]
        out[f"{tag}/sphere"] = [t.numpy() for t in F.sample_sphere_perturbation(w, 0.3, 7, 2)]
        out[f"{tag}/ball"] = [t.numpy() for t in F.sample_ball_perturbation(w, 0.3, 7, 1)]
        out[f"{tag}/proj"] = [t.numpy() for t in F.project_perturbation(out[f"{tag}/sphere"], w, 0.1)]
        out[f"{tag}/rloss"] = F.robust_loss(m, xs, ys, restarts=2, eps=0.05, steps=3, batch_size=20)
        out[f"{tag}/avg"] = F.average_case_flatness(m, xs, ys, xi=0.3, samples=3, return_perturbations=True, **small)
        out[f"{tag}/avg_clean"] = F.average_case_flatness(m, xs, ys, xi=0.3, samples=2, clean=True, **small)
        out[f"{tag}/avg_eager"] = F.average_case_flatness(m, xs, ys, xi=0.3, samples=2, jit=False, **small)
        out[f"{tag}/worst"] = F.worst_case_flatness(m, xs, ys, xi=0.01, attempts=2, passes=2,
                                                    return_perturbations=True, **small)
        out[f"{tag}/worst_clean"] = F.worst_case_flatness(m, xs, ys, xi=0.01, attempts=1, passes=2, clean=True,
                                                          **small)
        out[f"{tag}/avg_loss_fn"] = F.average_case_flatness(m, xs, ys, xi=0.3, samples=2, loss_fn=loss_fn,
                                                            batch_size=20, progress=False)
        out[f"{tag}/worst_loss_fn"] = F.worst_case_flatness(m, xs, ys, xi=0.01, attempts=1, passes=2,
                                                            loss_fn=loss_fn, batch_size=20, progress=False)
        report = F.flatness_report(m, xs, ys, eps=0.05, progress=False, seed=5, settings={
            "examples": 40, "batch_size": 16, "steps": 2, "average": {"xi": 0.2, "samples": 2},
            "average_clean": {"samples": 2}, "worst": {"attempts": 1, "passes": 2, "steps": 3},
            "worst_clean": {"attempts": 1, "passes": 1}})
        report.pop("seconds")
        out[f"{tag}/report"] = report
        rd = L.random_direction(m, seed=4)
        ad = L.adversarial_direction(m, xs, ys, eps=0.05, attempts=1, passes=2, batch_size=20, progress=False)
        out[f"{tag}/random_direction"], out[f"{tag}/adversarial_direction"] = rd, ad
        out[f"{tag}/landscape_1d"] = L.landscape_1d(m, xs, ys, rd, points=3, eps=0.05, steps=2, batch_size=20,
                                                    progress=False)
        out[f"{tag}/landscape_2d"] = L.landscape_2d(m, xs, ys, rd, ad, points=2, eps=0.05, steps=2, batch_size=20,
                                                    progress=False)
        out[f"{tag}/weights_after"] = [v.numpy() for v in m.variables]
        out[f"{tag}/awp_variables"] = [v.path for v in awp.perturbed_variables(m.trainable_variables)]
        noisy = rat.noisy_variables(m.trainable_variables)
        out[f"{tag}/rat_variables"] = [v.path for v in noisy]
        out[f"{tag}/rat_noise"] = [t.numpy() for t in rat.weight_noise(noisy, 1e-4, tf.constant([3, 4]))]

    for name in ("at+awp", "trades+rat", "trades+awp+rat", "mart+awp"):
        for bn in (False, True):
            network = tiny_cnn(bn, 1)
            model = RobustModel(network, dataclasses.replace(parse_defense(name), awp_warmup_epochs=0), eps=0.1,
                                step_size=0.025, steps=2, steps_per_epoch=4, seed=1)
            model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
            history = model.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0, shuffle=False)
            out[f"train/{name}/{bn}"] = ([v.numpy() for v in network.variables], history.history)

    network = tiny_cnn(False, 2)
    network.compile(optimizer=keras.optimizers.SGD(0.05),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = F.FlatnessMonitor(xs, ys, eps=0.05, samples=2, steps=2, batch_size=24)
    history = network.fit(x[:96], y[:96], epochs=2, batch_size=32, verbose=0, callbacks=[monitor], shuffle=False)
    out["monitor"] = (history.history, monitor.results)
    with open(path, "wb") as fh:
        pickle.dump(out, fh)
    print(f"recorded {len(out)} entries to {path}")


def differences(a, b, where=""):
    """Every place where ``a`` and ``b`` are not identical (arrays to the bit, other values by == and type)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys differ: {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (p, q) in enumerate(zip(a, b)) for d in differences(p, q, f"{where}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        p, q = np.asarray(a), np.asarray(b)
        same = p.dtype == q.dtype and p.shape == q.shape and p.tobytes() == q.tobytes()
        return [] if same else [f"{where}: arrays differ"]
    if type(a) is not type(b) or not (a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b))):
        return [f"{where}: {a!r} != {b!r}"]
    return []


def compare(path_a, path_b):
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        a, b = pickle.load(fa), pickle.load(fb)
    found = differences(a, b)
    print(f"{len(a)} entries, {len(found)} differences")
    for line in found[:50]:
        print(" ", line)
    return 1 if found else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
