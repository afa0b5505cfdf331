"""Evaluation throughput: PGD-20, APGD-CE and the standard AutoAttack ensemble.

Measures examples per second on a small CNN (Conv(32,3)-Pool-Conv(64,3)-Pool-
Dense(256)-Dense(10), 28x28x1) and on PreActResNet-18 (32x32x3), both with
random weights, under L-inf attacks. Labels are the models' own clean
predictions, so every example is attacked. Each attack first runs once on two
examples so that tracing and compilation are not timed.

The attacks stop early on broken examples (APGD once a batch is all
misclassified, FAB once all are within eps, Square per example), so the cost
depends on how many examples survive. The default radii (0.03 for the CNN,
8/255 for the ResNet) leave most examples of these random-weight models
unbroken, so the attacks run close to their full budget, as on a robust model;
the robust accuracy column shows how many survived.

Usage::

    python benchmarks/bench_eval.py --cnn-examples 256 --resnet-examples 32
    python benchmarks/bench_eval.py --models small_cnn --attacks pgd20,apgd-ce --cnn-examples 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfrobust import autoattack as aa  # noqa: E402

MODELS = {
    # name: (input shape, default L-inf eps)
    "small_cnn": ((28, 28, 1), 0.03),
    "preact_resnet18": ((32, 32, 3), 8 / 255),
}
ATTACK_NAMES = ("pgd20", "apgd-ce", "standard")


def build(name, input_shape, seed=0):
    try:
        from tfrobust.models import build_model
    except ImportError:
        build_model = None
    if build_model is not None:
        return build_model(name, input_shape, 10, seed=seed)
    import keras

    keras.utils.set_random_seed(seed)
    if name != "small_cnn":
        raise SystemExit(f"tfrobust.models is needed for {name}")
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10),
    ])


def pgd20_runner(model, input_shape, eps, seed):
    from tfrobust.attacks import pgd

    model_fn = lambda t: model(t, training=False)  # noqa: E731

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32), tf.TensorSpec([None], tf.int32)])
    def run(x, y):
        x_adv = pgd(model_fn, x, y, eps, eps / 4, 20, norm="linf", loss="ce", seed=seed)
        return tf.equal(tf.argmax(model_fn(x_adv), -1, output_type=tf.int32), y)

    def attack(x, y, batch_size):
        ok = [run(x[i:i + batch_size], y[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
        return float(np.concatenate(ok).mean())

    return attack


def apgd_runner(model, eps, seed):
    def attack(x, y, batch_size):
        res = aa.run_autoattack(model, x, y, eps, attacks=["apgd-ce"], batch_size=batch_size, seed=seed,
                                verbose=False)
        return res["worst_case"]

    return attack


def ensemble_runner(model, eps, seed):
    def attack(x, y, batch_size):
        res = aa.run_autoattack(model, x, y, eps, version="standard", batch_size=batch_size, seed=seed,
                                verbose=False)
        return res["worst_case"]

    return attack


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small_cnn,preact_resnet18",
                        help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES),
                        help="comma-separated: " + ", ".join(ATTACK_NAMES))
    parser.add_argument("--cnn-examples", type=int, default=256, help="examples for the small CNN")
    parser.add_argument("--resnet-examples", type=int, default=32, help="examples for PreActResNet-18")
    parser.add_argument("--cnn-eps", type=float, default=MODELS["small_cnn"][1], help="L-inf radius, small CNN")
    parser.add_argument("--resnet-eps", type=float, default=MODELS["preact_resnet18"][1],
                        help="L-inf radius, PreActResNet-18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; allowed: {', '.join(MODELS)}")
    for a in attacks:
        if a not in ATTACK_NAMES:
            parser.error(f"unknown attack {a!r}; allowed: {', '.join(ATTACK_NAMES)}")

    rows = []
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    for name in models:
        input_shape = MODELS[name][0]
        eps = args.cnn_eps if name == "small_cnn" else args.resnet_eps
        n = args.cnn_examples if name == "small_cnn" else args.resnet_examples
        if n < 1:
            continue
        model = build(name, input_shape, args.seed)
        rng = np.random.default_rng(args.seed)
        x = rng.uniform(0, 1, size=(n, *input_shape)).astype(np.float32)
        y = np.argmax(model.predict(x, batch_size=args.batch_size, verbose=0), axis=1).astype(np.int32)
        for attack_name in attacks:
            if attack_name == "pgd20":
                attack = pgd20_runner(model, input_shape, eps, args.seed)
            elif attack_name == "apgd-ce":
                attack = apgd_runner(model, eps, args.seed)
            else:
                attack = ensemble_runner(model, eps, args.seed)
            attack(x[:2], y[:2], args.batch_size)  # trace and compile
            start = time.perf_counter()
            acc = attack(x, y, args.batch_size)
            seconds = time.perf_counter() - start
            rows.append((name, attack_name, eps, n, seconds, n / seconds, acc))
            print(f"{name} {attack_name}: {n} examples in {seconds:.1f} s", file=sys.stderr)

    print(f"\nEvaluation throughput ({device}, random weights, labels = clean predictions, "
          f"batch size {args.batch_size})\n")
    print("| model | attack | eps (L-inf) | examples | seconds | examples/s | robust accuracy |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, attack_name, eps, n, seconds, rate, acc in rows:
        print(f"| {name} | {attack_name} | {eps:.4g} | {n} | {seconds:.2f} | {rate:.2f} | {acc:.1%} |")


if __name__ == "__main__":
    main()
