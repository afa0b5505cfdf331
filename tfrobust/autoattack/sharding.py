"""Which devices AutoAttack's batches run on: whole batches side by side, or one batch split into shards.

:func:`replica_devices` reads the local devices of a ``tf.distribute``
strategy, :func:`batch_plan` decides per attack whether batches are grouped
(one whole batch per device) or split (one shard of a batch per device), and
:func:`run_batches` runs a group accordingly.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def replica_devices(strategy) -> list:
    """The local replica devices of ``strategy`` (empty for None or the default strategy)."""
    if strategy is None:
        return []
    try:
        return list(strategy.extended.worker_devices)
    except (AttributeError, NotImplementedError):
        return []


def splits_batches(devices) -> bool:
    """Whether a batch is worth splitting across ``devices``: only across accelerators.

    Logical devices of one CPU share its cores, so a split batch only adds
    per-call overhead (measured 20-30% slower on two logical CPUs,
    benchmarks/bench_autoattack_sharding.py).
    """
    return any((tf.DeviceSpec.from_string(str(d)).device_type or "CPU").upper() != "CPU" for d in devices)


def run_on_devices(fn, model_fn, batches, eps, norm, seed, devices):
    """``fn`` on whole batches, batch k on device k, concurrently; each batch exactly as on one device."""
    from concurrent.futures import ThreadPoolExecutor

    def run(device, batch):
        xb, yb = batch
        with tf.device(device):
            return np.asarray(fn(model_fn, xb, yb, eps, norm=norm, seed=seed), np.float32)

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(run, devices[:len(batches)], batches))


def run_sharded(fn, model_fn, xb, yb, eps, norm, seed, devices):
    """``fn`` on one shard of the batch per device, concurrently; the points in the batch's order."""
    shards = [s for s in np.array_split(np.arange(len(xb)), len(devices)) if len(s)]
    parts = run_on_devices(fn, model_fn, [(xb[s], yb[s]) for s in shards], eps, norm, seed, devices)
    return np.concatenate(parts, axis=0)


def batch_plan(devices, n_batches) -> tuple:
    """``(split, group)``: whether each batch is split into shards, and how many whole batches run at once."""
    split = len(devices) > 1 and n_batches < len(devices) and splits_batches(devices)
    group = len(devices) if len(devices) > 1 and not split else 1
    return split, group


def run_batches(fn, model_fn, batches, eps, norm, seed, devices, split) -> list:
    """``fn`` on each ``(xb, yb)`` of ``batches``: sharded (one batch, with ``split``), side by side, or here."""
    if split and len(batches[0][0]) >= len(devices):
        xb, yb = batches[0]
        return [run_sharded(fn, model_fn, xb, yb, eps, norm, seed, devices)]
    if len(batches) > 1:
        return run_on_devices(fn, model_fn, batches, eps, norm, seed, devices)
    xb, yb = batches[0]
    return [fn(model_fn, xb, yb, eps, norm=norm, seed=seed)]


__all__ = ["replica_devices", "splits_batches", "run_on_devices", "run_sharded", "batch_plan", "run_batches"]
