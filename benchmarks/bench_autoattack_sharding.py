"""AutoAttack on one device against the same run sharded over two logical CPUs (MirroredStrategy).

Trains tfrobust's ``small_cnn`` for one clean epoch on 10,000 Fashion-MNIST
training images, then times ``run_autoattack(version=...)`` on the first
``--examples`` test images with ``strategy=None`` and with a
``MirroredStrategy`` over two logical CPU devices, alternating for
``--rounds`` rounds after one untimed warm-up each, and checks that the
verdicts agree. Prints wall and CPU seconds per round.

Whole batches alternate between the devices; a lone batch is not split on
logical CPUs (they share the cores), so ``--batch-size`` below
``--examples`` is what exercises the sharding.

Usage::

    python benchmarks/bench_autoattack_sharding.py --examples 256 --batch-size 64 --version fast --rounds 3
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--version", default="fast")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=0, help="AutoAttack batch (0: all examples in one batch)")
    args = p.parse_args(argv)

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from tfrobust import autoattack as aa
    from tfrobust.data import load_arrays, load_test_arrays
    from tfrobust.models import build_model

    model = build_model("small_cnn", (28, 28, 1), 10, seed=0)
    x, y = load_arrays("fashion_mnist", "train", limit=10000)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype("float32") / 255, y, epochs=1, batch_size=128, verbose=0)
    xt, yt = load_test_arrays("fashion_mnist", None, args.examples)
    runs = {"one device": None, "two logical CPUs": tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])}
    for strategy in runs.values():
        aa.run_autoattack(model, xt[:4], yt[:4], args.eps, version=args.version, verbose=False, strategy=strategy,
                          batch_size=4)
    times, masks = {k: [] for k in runs}, {}
    for _ in range(args.rounds):
        for name, strategy in runs.items():
            wall, cpu_time = time.time(), time.process_time()
            res = aa.run_autoattack(model, xt, yt, args.eps, version=args.version, verbose=False, strategy=strategy,
                                    batch_size=args.batch_size or len(xt))
            times[name].append((time.time() - wall, time.process_time() - cpu_time))
            masks[name] = res["robust_mask"]
    for name, t in times.items():
        print(f"{name}: wall s {[round(a, 1) for a, _ in t]}, CPU s {[round(b, 1) for _, b in t]}, "
              f"robust accuracy {masks[name].mean():.2%}")
    differ = int((masks["one device"] != masks["two logical CPUs"]).sum())
    print(f"verdicts that differ: {differ}; 1-minute load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
