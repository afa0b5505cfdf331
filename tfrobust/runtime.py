"""The process's runtime for a run: the tf.distribute strategy, its devices, XLA, seeds and the dtype policy.

One strategy object per (strategy, devices) is kept for the life of the
process: TensorFlow allows one MultiWorkerMirroredStrategy per process, and
building a MirroredStrategy again for the same devices would give Keras two
sets of variables to reconcile.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tfrobust import multiworker
from tfrobust.errors import UserError

_STRATEGIES = {}


def build_strategy(runtime) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by ``runtime.strategy`` (one per process and devices)."""
    if runtime.strategy == "default":
        return tf.distribute.get_strategy()
    key = (runtime.strategy, tuple(runtime.devices or ()))
    if key not in _STRATEGIES:
        if runtime.strategy == "mirrored":
            check_devices(runtime.devices or ())
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(runtime.devices or None)
        elif runtime.strategy == "multi_worker":
            _STRATEGIES[key] = multiworker.multi_worker_strategy()
        else:
            try:
                resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
                tf.config.experimental_connect_to_cluster(resolver)
                tf.tpu.experimental.initialize_tpu_system(resolver)
            except (ValueError, tf.errors.OpError) as e:
                raise UserError(f"runtime.strategy=tpu but no TPU was found ({str(e).splitlines()[0]})") from None
            _STRATEGIES[key] = tf.distribute.TPUStrategy(resolver)
    return _STRATEGIES[key]


def check_devices(names) -> None:
    """Refuses a device name that this machine does not have (MirroredStrategy would fail later, obscurely)."""
    logical = tf.config.list_logical_devices()
    available = {(d.device_type.upper(), int(d.name.rsplit(":", 1)[1])) for d in logical}
    listing = ", ".join(d.name.replace("/device:", "") for d in logical)
    for name in names:
        try:
            spec = tf.DeviceSpec.from_string(name if name.startswith("/") else "/device:" + name)
        except (ValueError, TypeError):
            spec = None
        if spec is None or spec.device_type is None or (spec.device_type.upper(), spec.device_index or 0) not in available:
            raise UserError(f"runtime.devices: no device {name!r} on this machine; available: {listing}")


def jit_setting(runtime):
    """Keras' jit_compile value: "auto" leaves the choice to Keras (no XLA on CPU)."""
    return {"auto": "auto", "on": True, "off": False}[runtime.jit_compile]


def seed_process(runtime) -> None:
    """Seeds Python's, NumPy's and Keras' generators with ``runtime.seed``; with ``runtime.deterministic``,
    also makes TensorFlow's ops deterministic."""
    keras.utils.set_random_seed(runtime.seed)
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def dtype_policy(runtime):
    """Keras' global dtype policy set to ``runtime.mixed_precision`` for the block, then restored."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if runtime.mixed_precision == "none" else runtime.mixed_precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


__all__ = ["build_strategy", "check_devices", "jit_setting", "seed_process", "dtype_policy"]
