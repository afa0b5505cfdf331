"""Training runs: build everything from a config, fit, export, evaluate.

A run directory holds:

- ``config.yaml``: the effective configuration;
- ``tensorboard/``: Keras' TensorBoard logs (every metric and the learning rate);
- ``checkpoints/``: ``last.weights.h5`` every epoch and ``best.weights.h5``,
  chosen on robust accuracy on the validation split (never the test split);
- ``backup/``: Keras' BackupAndRestore state while a run is unfinished; rerun
  the same command to resume;
- ``history.csv`` and ``history.json``: the metrics of every epoch;
- ``model.keras`` / ``best.keras``: the last and best networks (with
  ``optim.ema``, the averaged ones; the live last network is ``model_live.keras``);
- ``saved_model/`` / ``saved_model_best/``: the same exported as SavedModels
  whose ``serve`` endpoint maps float32 NHWC images in [0, 1] to logits;
- ``report.json``: the final test evaluation.
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
import yaml

from tfrobust import callbacks as callbacks_lib
from tfrobust import data as data_lib
from tfrobust import evaluation
from tfrobust import models
from tfrobust.config import ExperimentConfig, to_dict
from tfrobust.defenses import parse_defense
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel

FINISHED = "report.json"


_STRATEGIES = {}


def build_strategy(runtime) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by ``runtime.strategy`` (one per process and devices)."""
    if runtime.strategy == "default":
        return tf.distribute.get_strategy()
    key = (runtime.strategy, tuple(runtime.devices or ()))
    if key not in _STRATEGIES:
        if runtime.strategy == "mirrored":
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(runtime.devices or None)
        elif runtime.strategy == "multi_worker":
            from tfrobust.multiworker import multi_worker_strategy

            _STRATEGIES[key] = multi_worker_strategy()
        else:
            try:
                resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
                tf.config.experimental_connect_to_cluster(resolver)
                tf.tpu.experimental.initialize_tpu_system(resolver)
            except (ValueError, tf.errors.OpError) as e:
                raise UserError(f"runtime.strategy=tpu but no TPU was found ({str(e).splitlines()[0]})") from None
            _STRATEGIES[key] = tf.distribute.TPUStrategy(resolver)
    return _STRATEGIES[key]


def jit_setting(runtime):
    """Keras' jit_compile value: "auto" leaves the choice to Keras (no XLA on CPU)."""
    return {"auto": "auto", "on": True, "off": False}[runtime.jit_compile]


def learning_rate_schedule(optim, steps_per_epoch: int):
    """The learning rate per optimizer step.

    ``piecewise``: ``lr`` times ``decay_factor`` at each fraction in
    ``decay_at``. ``cosine``: Keras' CosineDecay, rising linearly from 0 to
    ``lr`` over ``warmup_epochs`` and then falling as a half cosine to 0 at
    the last step (docs/algorithms.md, section 12).
    """
    total = optim.epochs * steps_per_epoch
    if getattr(optim, "schedule", "piecewise") == "cosine":
        warmup = int(round(optim.warmup_epochs * steps_per_epoch))
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else optim.lr, max(total - warmup, 1),
            warmup_target=optim.lr if warmup else None, warmup_steps=warmup,
        )
    # PiecewiseConstantDecay keeps value i while step <= boundary i; the decay
    # starts at the first step of the epoch at fraction f of training.
    boundaries = sorted({int(round(f * total)) - 1 for f in optim.decay_at if 0 < f < 1} - {-1})
    if not boundaries:
        return optim.lr
    values = [optim.lr * optim.decay_factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def prepare_workdir(workdir: str) -> bool:
    """Creates ``workdir``; returns True when an unfinished run is there to resume.

    A finished run (one with a report) or a non-empty directory that is not a
    run of ours is never overwritten.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a directory")
    if os.path.isdir(workdir) and os.listdir(workdir):
        if os.path.exists(os.path.join(workdir, FINISHED)):
            raise UserError(f"workdir {workdir} holds a finished run; choose another --workdir")
        if not os.path.exists(os.path.join(workdir, "config.yaml")):
            raise UserError(f"workdir {workdir} is not empty and holds no tfrobust run; choose another --workdir")
        return True
    os.makedirs(workdir, exist_ok=True)
    return False


def build(config: ExperimentConfig, datasets=None):
    """Data, network and compiled RobustModel for a config (inside the strategy scope)."""
    defense = parse_defense(config.defense.name, config.defense)
    if datasets is None:
        datasets = data_lib.load_datasets(config.data, seed=config.runtime.seed)
    info = datasets.info
    steps_per_epoch = max(1, math.ceil(datasets.train_size / config.data.batch_size))
    strategy = build_strategy(config.runtime)
    previous_policy = keras.config.dtype_policy()
    policy = "float32" if config.runtime.mixed_precision == "none" else config.runtime.mixed_precision
    keras.config.set_dtype_policy(policy)
    try:
        with strategy.scope():
            return _build_in_scope(config, datasets, defense, info, steps_per_epoch) + (strategy,)
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _build_in_scope(config, datasets, defense, info, steps_per_epoch):
    network = models.network_for(config.model, info, seed=config.runtime.seed)
    model = RobustModel(
        network, defense,
        eps=config.attack.eps, step_size=config.attack.step_size, steps=config.attack.steps,
        norm=config.attack.norm, bn_mode=config.attack.bn_mode, steps_per_epoch=steps_per_epoch,
        weight_decay=config.optim.weight_decay, eval_steps=config.eval.pgd_steps,
        eval_step_size=config.eval.step_size, seed=config.runtime.seed,
        eval_loss=config.eval.pgd_loss, label_smoothing=config.defense.label_smoothing,
        ema_decay=config.optim.ema_decay if config.optim.ema else None,
        ema_start_step=config.optim.ema_start * config.optim.epochs * steps_per_epoch,
        weight_decay_exclude=config.optim.weight_decay_exclude,
    )
    optimizer = keras.optimizers.SGD(
        learning_rate_schedule(config.optim, steps_per_epoch),
        momentum=config.optim.momentum, nesterov=config.optim.nesterov,
    )
    model.compile(optimizer=optimizer, jit_compile=jit_setting(config.runtime))
    model(np.zeros((1,) + tuple(info.image_shape), np.float32))
    return model, datasets


def train(config: ExperimentConfig, workdir: str, extra_callbacks=(), datasets=None):
    """Trains per ``config`` into ``workdir`` (resuming an unfinished run there).

    Returns ``(model, datasets, history)`` where history maps metric names to
    per-epoch lists. With ``runtime.strategy=multi_worker`` the run goes
    through :func:`tfrobust.multiworker.train_multi_worker`.
    """
    if config.runtime.strategy == "multi_worker":
        if extra_callbacks or datasets is not None:
            raise UserError("runtime.strategy=multi_worker takes no extra callbacks or preloaded datasets")
        from tfrobust.multiworker import train_multi_worker

        return train_multi_worker(config, workdir)
    resuming = prepare_workdir(workdir)
    config_path = os.path.join(workdir, "config.yaml")
    if resuming:
        with open(config_path) as f:
            saved = yaml.safe_load(f)
        if saved != to_dict(config):
            raise UserError(f"workdir {workdir} holds an unfinished run with a different config; resume with the same command or choose another --workdir")
    else:
        with open(config_path, "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
    keras.utils.set_random_seed(config.runtime.seed)
    if config.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    model, datasets, _ = build(config, datasets)
    ckpt = os.path.join(workdir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    backup_dir = os.path.join(workdir, "backup")
    initial_epoch = callbacks_lib.EpochBackup.restore(model, backup_dir)
    epochs = config.optim.epochs
    has_validation = datasets.validation_size > 0
    log_dir = os.path.join(workdir, "tensorboard")
    callbacks = [
        callbacks_lib.NonFiniteLossGuard(os.path.join(ckpt, "last.weights.h5")),
        callbacks_lib.LearningRateLogger(),
        *flatness_monitor(config, datasets, workdir),
        keras.callbacks.ModelCheckpoint(os.path.join(ckpt, "last.weights.h5"), save_weights_only=True),
    ]
    if has_validation:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(ckpt, "best.weights.h5"), monitor="val_pgd_accuracy", mode="max",
            save_best_only=True, save_weights_only=True,
        ))
        if config.optim.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_pgd_accuracy", mode="max", patience=config.optim.early_stopping_patience,
            ))
        if config.eval.images_every:
            x_show, y_show = next(iter(datasets.validation.unbatch().batch(8)))
            callbacks.append(callbacks_lib.AdversarialExamplesImages(
                x_show, y_show, log_dir, config.attack.eps, model.eval_step_size, config.eval.pgd_steps,
                config.attack.norm, every=config.eval.images_every,
            ))
    callbacks += [
        keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir),
        callbacks_lib.EpochBackup(backup_dir),
        *extra_callbacks,
    ]
    if initial_epoch == 0:
        callbacks_lib.write_hparams(log_dir, to_dict(config))
    steps_per_epoch = max(1, math.ceil(datasets.train_size / config.data.batch_size))
    start = time.time()
    if initial_epoch < epochs:
        fit = model.fit(
            datasets.train_epochs(initial_epoch, epochs), epochs=epochs, initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=datasets.validation if has_validation else None,
            callbacks=callbacks, verbose=config.runtime.verbose,
        )
        fit_history = fit.history
    else:
        fit_history = {}
    seconds = time.time() - start
    history = _read_history(workdir, fit_history)
    history["train_seconds"] = seconds
    with open(os.path.join(workdir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    save_networks(model, workdir, has_validation)
    return model, datasets, history


def flatness_monitor(config: ExperimentConfig, datasets, workdir: str) -> list:
    """The optional FlatnessMonitor on a validation subset (``eval.flatness_every`` > 0)."""
    if not config.eval.flatness_every or datasets.validation_size == 0:
        return []
    from tfrobust.flatness import FlatnessMonitor

    xs, ys, n = [], [], 0
    for xb, yb in datasets.validation:
        xs.append(xb.numpy())
        ys.append(yb.numpy())
        n += len(xb)
        if n >= config.eval.flatness_examples:
            break
    x = np.concatenate(xs)[: config.eval.flatness_examples]
    y = np.concatenate(ys)[: config.eval.flatness_examples]
    return [FlatnessMonitor(
        x, y, every=config.eval.flatness_every, eps=config.attack.eps, norm=config.attack.norm,
        samples=config.eval.flatness_samples, steps=config.eval.pgd_steps, seed=config.runtime.seed,
        log_dir=os.path.join(workdir, "tensorboard"),
    )]


def _read_history(workdir, fallback):
    """All epochs of the run, from the CSV log (continuous across resumes)."""
    path = os.path.join(workdir, "history.csv")
    if not os.path.exists(path):
        return {k: [float(v) for v in vals] for k, vals in fallback.items()}
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    # An epoch written twice (a kill between the log and the backup) counts once: the last row wins.
    by_epoch = {}
    for row in rows:
        by_epoch[row.get("epoch")] = row
    rows = list(by_epoch.values())
    keys = rows[0].keys() if rows else []
    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    return {k: [number(r[k]) for r in rows] for k in keys}


def save_networks(model: RobustModel, workdir: str, has_best: bool) -> None:
    """Saves the last (and best) network as .keras and as SavedModel.

    With weight averaging these are the averaged networks; the live (not
    averaged) last network is also saved, as ``model_live.keras``.
    """
    network = model.evaluated_network()
    network.save(os.path.join(workdir, "model.keras"))
    network.export(os.path.join(workdir, "saved_model"), format="tf_saved_model", verbose=False)
    if network is not model.network:
        model.network.save(os.path.join(workdir, "model_live.keras"))
    best = os.path.join(workdir, "checkpoints", "best.weights.h5")
    if has_best and os.path.exists(best):
        last = [v.numpy() for v in model.weights]
        model.load_weights(best)
        network.save(os.path.join(workdir, "best.keras"))
        network.export(os.path.join(workdir, "saved_model_best"), format="tf_saved_model", verbose=False)
        for v, value in zip(model.weights, last):
            v.assign(value)


def train_and_evaluate(config: ExperimentConfig, workdir: str, verbose: bool = True) -> dict:
    """Trains, then evaluates the last and best networks on the test split."""
    model, datasets, history = train(config, workdir)
    if config.runtime.strategy == "multi_worker":
        from tfrobust.multiworker import is_chief

        if not is_chief():
            return {"models": {}, "train_seconds": history["train_seconds"]}
    x_test, y_test = data_lib.load_test_arrays(config.data.name, config.data.data_dir, config.data.test_examples)
    report = {"config": to_dict(config), "train_seconds": history["train_seconds"], "models": {}}
    for which in ("model.keras", "best.keras"):
        path = os.path.join(workdir, which)
        if not os.path.exists(path):
            continue
        network = keras.saving.load_model(path)
        model_fn = lambda x, net=network: net(x, training=False)  # noqa: E731
        result = evaluation.evaluate(
            model_fn, x_test, y_test, config.attack.eps, config.attack.norm,
            attacks=("clean", "fgsm", f"pgd{config.eval.pgd_steps}_ce", f"pgd{config.eval.pgd_steps}_cw"),
            step_size=config.eval.step_size, batch_size=config.data.eval_batch_size,
            seed=config.runtime.seed, verbose=verbose, integrity_examples=config.eval.integrity_examples,
        )
        result.pop("correct")
        report["models"]["last" if which == "model.keras" else "best"] = result
    with open(os.path.join(workdir, FINISHED), "w") as f:
        json.dump(report, f, indent=2)
    return report


__all__ = [
    "FINISHED",
    "build_strategy",
    "jit_setting",
    "learning_rate_schedule",
    "prepare_workdir",
    "build",
    "train",
    "flatness_monitor",
    "save_networks",
    "train_and_evaluate",
]
