import hashlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so that tf.distribute code is tested as on two GPUs.
# This must happen before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def tiny_cnn(input_shape=(28, 28, 1), num_classes=10, batch_norm=False, seed=0):
    """A small network for tests: conv (+BN) - pool - dense - logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(8, 3, activation=None if batch_norm else "relu")(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="session")
def fashion_subset():
    """600 real Fashion-MNIST training images in [0, 1] and their labels."""
    from tfrobust.data import load_arrays

    x, y = load_arrays("fashion_mnist", "train", limit=600)
    return (x.astype("float32") / 255.0), y.astype("int32")


@pytest.fixture(scope="session")
def trained_tiny(fashion_subset):
    """A tiny CNN trained (clean) for a few epochs on the subset."""
    x, y = fashion_subset
    model = tiny_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:500], y[:500], epochs=8, batch_size=50, verbose=0)
    return model


def random_logits(rng, batch=16, classes=10, scale=3.0):
    return (rng.standard_normal((batch, classes)) * scale).astype("float32")


# One epoch on 64 examples, 1-step PGD, 32 test examples: the smallest complete run.
TINY = ["--epochs", "1", "--seed", "3", "--set", "data.train_examples=64", "--set", "data.validation_examples=32",
        "--set", "data.batch_size=32", "--set", "data.test_examples=32", "--set", "attack.steps=1",
        "--set", "eval.pgd_steps=1", "--set", "runtime.verbose=0", "--set", "eval.images_every=0",
        "--set", "eval.integrity_examples=0"]


def snapshot(directory):
    """Every file under ``directory`` with the sha256 of its bytes."""
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return files
