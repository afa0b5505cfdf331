"""Training runs: build everything from a config, fit, export, evaluate.

:func:`train` is the one training path for every strategy. The config enters
parsed and checked (its defense parsed once, by the caller or at the entry of
:func:`train`), :func:`build` makes the data, the strategy and the compiled
:class:`~tfrobust.trainer.RobustModel`, and :func:`training_callbacks` makes
the one list of callbacks, restored from the epoch backup: NaN guard,
learning-rate log, flatness monitor, last and best checkpoints, early
stopping, TensorBoard images and scalars, history, epoch backup. Keras'
``fit`` drives them on one device, under ``mirrored`` and on TPUs; under
``multi_worker``, where ``fit`` cannot run, :func:`tfrobust.multiworker.fit_distributed`
drives the same list with the same calls and logs. On a cluster the chief
writes the run directory below (and holds its lock) and every other worker
writes the same files into a temporary directory of its own; every worker
restores from the chief's ``backup/``, so ``workdir`` must be on a filesystem
that every worker shares for a resume (see :mod:`tfrobust.multiworker`).

A run directory holds (every file written under a temporary name and renamed
into place, so a kill or a failed write never tears a good file):

- ``run.lock``: the pid and host of the process that owns the directory,
  while it runs (see :mod:`tfrobust.rundir`);
- ``config.yaml``: the effective configuration, written once the data and
  network are built;
- ``run_summary.txt``: one block per start of the run (fresh, or resumed
  from epoch N): data sizes and split, eps, step and steps, defense and
  warm-up, and any warning (also printed);
- ``tensorboard/``: Keras' TensorBoard logs (every metric and the learning rate);
- ``checkpoints/``: ``last.weights.h5`` every epoch and ``best.weights.h5``,
  chosen on robust accuracy on the validation split (never the test split);
- ``backup/``: the whole training state after the last finished epoch
  (weights, optimizer, best score and epoch, early-stopping counters,
  history, training time) while a run is unfinished; rerun the same command
  to resume. It is removed only after the final networks (and the report)
  are on disk, so a kill in the final phase redoes only the final phase;
- ``history.csv`` and ``history.json``: the metrics of every epoch;
- ``model.keras`` / ``best.keras``: the last and best networks (with
  ``optim.ema``, the averaged ones; the live last network is ``model_live.keras``);
- ``saved_model/`` / ``saved_model_best/``: the same exported as SavedModels
  whose ``serve`` endpoint maps float32 NHWC images in [0, 1] to logits;
- ``report.json``: the final test evaluation;
- ``finished.json``: written last; says the run is complete (train-only or
  evaluated). A finished run is never retrained or overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf
import yaml

from tfrobust import callbacks as callbacks_lib
from tfrobust import data as data_lib
from tfrobust import evaluation
from tfrobust import models
from tfrobust import multiworker
from tfrobust import rundir
from tfrobust import user_code
from tfrobust.config import ExperimentConfig, resolve_attack, to_dict
from tfrobust.defenses import Defense, parse_defense
from tfrobust.errors import UserError
from tfrobust.export import export_network
from tfrobust.trainer import RobustModel, StepSettings

REPORT = rundir.REPORT


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

    A finished run or a non-empty directory that is not a run of ours is
    never overwritten (UserError).
    """
    status = workdir_status(workdir)
    if status == "finished":
        raise UserError(f"workdir {workdir} holds a finished run; choose another --workdir")
    if status == "trained":
        raise UserError(f"workdir {workdir} holds a finished training run (--no-eval); choose another --workdir, "
                        "or run the same command without --no-eval to evaluate it")
    os.makedirs(workdir, exist_ok=True)
    return status == "unfinished"


def workdir_status(workdir: str) -> str:
    """"new" (absent or empty), "unfinished", "trained" (finished train-only run) or "finished" (evaluated).

    Raises UserError for a path that is not a directory or a directory that
    holds something else than a tfrobust run.
    """
    if not workdir:
        raise UserError("--workdir must not be empty")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a directory")
    try:
        entries = set(os.listdir(workdir)) if os.path.isdir(workdir) else set()
    except OSError as e:
        raise UserError(f"workdir {workdir} cannot be read: {e.strerror or e}") from None
    if not entries - {rundir.LOCK}:
        return "new"
    marker = rundir.finished(workdir)
    if marker:
        return "finished" if marker.get("evaluated") else "trained"
    if "config.yaml" not in entries:
        raise UserError(f"workdir {workdir} is not empty and holds no tfrobust run; choose another --workdir")
    return "unfinished"


def build(config: ExperimentConfig, datasets=None, defense: Defense | None = None):
    """Data, network and compiled RobustModel for a config (inside the strategy scope).

    Returns ``(model, datasets, strategy)``. ``defense`` is the config's
    parsed defense (parsed here when not given).
    """
    if defense is None:
        defense = parse_defense(config.defense.name, config.defense)
    resolve_attack(config)
    if datasets is None:
        datasets = data_lib.load_datasets(config.data, seed=config.runtime.seed)
    info = datasets.info
    if datasets.unlabelled_extra:
        from tfrobust import extra_data

        extra_data.check_labels_for(defense, config.data.extra_data, labelled=False)
    steps_per_epoch = max(1, math.ceil(datasets.train_size / config.data.batch_size))
    strategy = build_strategy(config.runtime)
    previous_policy = keras.config.dtype_policy()
    policy = "float32" if config.runtime.mixed_precision == "none" else config.runtime.mixed_precision
    keras.config.set_dtype_policy(policy)
    try:
        with strategy.scope():
            model = _compiled_model(config, defense, info, steps_per_epoch, datasets.unlabelled_extra)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return model, datasets, strategy


def _compiled_model(config, defense, info, steps_per_epoch, unlabelled_extra=False):
    network = models.network_for(config.model, info, seed=config.runtime.seed)
    model = RobustModel(network, defense, StepSettings.from_experiment(config, steps_per_epoch, unlabelled_extra))
    optimizer = keras.optimizers.SGD(
        learning_rate_schedule(config.optim, steps_per_epoch),
        momentum=config.optim.momentum, nesterov=config.optim.nesterov,
    )
    model.compile(optimizer=optimizer, jit_compile=jit_setting(config.runtime))
    model(np.zeros((1,) + tuple(info.image_shape), np.float32))
    return model


def train(config: ExperimentConfig, workdir: str, extra_callbacks=(), datasets=None, keep_backup: bool = False,
          defense: Defense | None = None):
    """Trains per ``config`` into ``workdir`` (resuming an unfinished run there).

    Returns ``(model, datasets, history)`` where history maps metric names to
    per-epoch lists. The run directory is locked for the duration (a second
    process is refused). The run counts as finished once the last and best
    networks and the history are on disk: then the finished marker is written
    and the backup removed (kept when ``keep_backup``: the caller finishes the
    run). ``defense`` is the config's defense, parsed once where the config
    entered (parsed here when not given).

    Every strategy runs the same step and the same callbacks
    (:func:`training_callbacks`): Keras' ``fit`` drives them on one device,
    under MirroredStrategy and on TPUs; with ``runtime.strategy=multi_worker``
    :func:`tfrobust.multiworker.fit_distributed` does (call ``train`` first
    thing in the process on every worker, with the same config and workdir;
    the chief writes ``workdir``, which must be on a filesystem every worker
    reads for a resume, see :mod:`tfrobust.multiworker`).
    """
    if defense is None:
        defense = parse_defense(config.defense.name, config.defense)
    resolve_attack(config)  # the budget written into config.yaml is the one trained with
    if config.runtime.strategy == "multi_worker":
        if datasets is not None:
            raise UserError("runtime.strategy=multi_worker takes no preloaded datasets (every worker loads its own)")
        return _train_on_cluster(config, workdir, extra_callbacks, keep_backup, defense)
    with _owned(workdir):
        _check_start(config, workdir)
        return _train(config, workdir, workdir, extra_callbacks, datasets, keep_backup, defense)


def _train_on_cluster(config, workdir, extra_callbacks, keep_backup, defense):
    """The chief checks and locks ``workdir``; the others write to a scratch directory; all train together."""
    task = multiworker.parse_tf_config(os.environ.get(multiworker.TF_CONFIG))
    strategy = build_strategy(config.runtime)  # before any other TensorFlow operation in the process
    with contextlib.ExitStack() as stack:
        refusal = None
        if task.is_chief:
            try:
                stack.enter_context(_owned(workdir))
                _check_start(config, workdir)
            except UserError as e:
                refusal = str(e)
        if multiworker.any_worker(strategy, refusal is not None):
            raise UserError(refusal or f"the chief refused workdir {workdir}; see the chief's output")
        write_dir = workdir if task.is_chief else stack.enter_context(multiworker.scratch_dir(task))
        try:
            result = _train(config, workdir, write_dir, extra_callbacks, None, keep_backup, defense)
            # A last collective as a barrier: no worker leaves (and stops answering
            # the cluster's health checks) while another is still saving.
            multiworker.any_worker(strategy, False)
        except tf.errors.UnavailableError:
            raise multiworker.WorkerLost(
                "a worker of the cluster stopped; start every worker again with the same command "
                "to resume from the last finished epoch"
            ) from None
    return result


@contextlib.contextmanager
def _owned(workdir: str):
    """Creates ``workdir`` if needed and holds its lock; a start refused before anything was written
    removes the directory it created."""
    workdir_status(workdir)  # refuses a foreign directory before anything is created
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    try:
        with rundir.lock(workdir):
            yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)  # only if empty
        raise


def _check_start(config, workdir) -> None:
    """Refuses a workdir that cannot take this run (finished, foreign, or unfinished with another config)."""
    if prepare_workdir(workdir) and callbacks_lib.EpochBackup.read_state(os.path.join(workdir, "backup")):
        if not _same_config(config, workdir):
            raise UserError(f"workdir {workdir} holds an unfinished run with a different config; resume with the same command or choose another --workdir")


def training_callbacks(config: ExperimentConfig, model: RobustModel, datasets, run_dir: str,
                       backup_from: str | None = None, extra_callbacks=()):
    """The callbacks of a training run writing into ``run_dir``, restored from the last epoch backup.

    One list for every strategy: the NaN guard, the learning-rate log, the
    flatness monitor, the last and (with validation) best checkpoints, early
    stopping, TensorBoard images, the history, TensorBoard scalars, the epoch
    backup, then ``extra_callbacks``. The backup is read from ``backup_from``
    (default ``run_dir/backup``; a non-chief worker reads the chief's) into
    the model and every stateful callback, and the checkpoints are rewritten
    from it. Returns ``(callbacks, history_log, backup, resumed)``.
    """
    has_validation = datasets.validation_size > 0
    log_dir = os.path.join(run_dir, "tensorboard")
    ckpt = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    last_path, best_path = os.path.join(ckpt, "last.weights.h5"), os.path.join(ckpt, "best.weights.h5")
    history_log = callbacks_lib.HistoryLog(os.path.join(run_dir, "history.csv"))
    stateful = {"history": history_log}
    callbacks = [
        callbacks_lib.NonFiniteLossGuard(last_path),
        callbacks_lib.LearningRateLogger(),
        *flatness_monitor(config, datasets, run_dir),
        callbacks_lib.AtomicModelCheckpoint(last_path, save_weights_only=True),
    ]
    best_checkpoint = None
    if has_validation:
        best_checkpoint = callbacks_lib.AtomicModelCheckpoint(
            best_path, monitor="val_pgd_accuracy", mode="max", save_best_only=True, save_weights_only=True,
        )
        stateful["best_checkpoint"] = best_checkpoint
        callbacks.append(best_checkpoint)
        if config.optim.early_stopping_patience:
            stopping = callbacks_lib.ResumableEarlyStopping(
                monitor="val_pgd_accuracy", mode="max", patience=config.optim.early_stopping_patience,
            )
            stateful["early_stopping"] = stopping
            callbacks.append(stopping)
        if config.eval.images_every:
            x_show, y_show = next(iter(datasets.validation.unbatch().batch(8)))
            callbacks.append(callbacks_lib.AdversarialExamplesImages(
                x_show, y_show, log_dir, config.attack.eps, model.settings.validation_step_size, config.eval.pgd_steps,
                config.attack.norm, every=config.eval.images_every,
            ))
    # Any other callback with get_state/set_state (e.g. one passed in extra_callbacks) is backed up too.
    for i, cb in enumerate(extra_callbacks):
        if hasattr(cb, "get_state") and hasattr(cb, "set_state"):
            stateful[f"extra-{i}-{type(cb).__name__}"] = cb
    backup_dir = os.path.join(run_dir, "backup")
    resumed = callbacks_lib.EpochBackup.restore(
        model, backup_from or backup_dir, stateful,
        checkpoints={"last": last_path, "best": best_path if has_validation else None},
    )
    backup = callbacks_lib.EpochBackup(backup_dir, stateful, best=best_checkpoint, resumed=resumed)
    callbacks += [
        history_log,
        keras.callbacks.TensorBoard(log_dir),
        backup,
        *extra_callbacks,
    ]
    # What an interrupted attempt logged after the backup's epoch is logged again: drop it first.
    callbacks_lib.drop_events_from(log_dir, resumed.epoch)
    if resumed.epoch == 0:
        callbacks_lib.write_hparams(log_dir, to_dict(config))
    return callbacks, history_log, backup, resumed


def _train(config, workdir, run_dir, extra_callbacks, datasets, keep_backup, defense):
    """Builds, restores and trains; ``run_dir`` is ``workdir`` except on a non-chief worker (its scratch)."""
    keras.utils.set_random_seed(config.runtime.seed)
    if config.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    cluster = config.runtime.strategy == "multi_worker"
    if cluster:
        # Checked before the network is built: every worker refuses alike, none waits in a collective.
        datasets = data_lib.load_datasets(config.data, seed=config.runtime.seed)
        replicas = build_strategy(config.runtime).num_replicas_in_sync
        multiworker.check_batches(datasets.train_size, config.data.batch_size, replicas, "training")
        multiworker.check_batches(datasets.validation_size, config.data.eval_batch_size, replicas, "validation")
    model, datasets, strategy = build(config, datasets, defense)
    if cluster:
        multiworker.build_optimizer(model, strategy)
    # The config is committed only once the data and network are built: a
    # refused start (bad data, bad device) leaves nothing that would refuse
    # the corrected command. Before the first backup a different config
    # simply replaces it.
    callbacks_lib.atomic_write(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(to_dict(config), sort_keys=False))
    user_code.record(config, run_dir, callbacks_lib.atomic_write)
    callbacks, history_log, backup, resumed = training_callbacks(
        config, model, datasets, run_dir, os.path.join(workdir, "backup"), extra_callbacks,
    )
    if cluster and not multiworker.all_equal(strategy, resumed.epoch):
        raise UserError(f"the workers found different backups in {os.path.join(workdir, 'backup')}; "
                        "put --workdir on a filesystem that every worker shares")
    epochs = config.optim.epochs
    has_validation = datasets.validation_size > 0
    steps_per_epoch = max(1, math.ceil(datasets.train_size / config.data.batch_size))
    write_start_summary(run_dir, config, datasets, defense, model, resumed.epoch, loud=run_dir == workdir)
    if resumed.epoch < epochs and not resumed.stopped:
        if cluster:
            multiworker.fit_distributed(
                model, strategy, datasets.train_epochs(resumed.epoch, epochs), epochs=epochs,
                steps_per_epoch=steps_per_epoch, initial_epoch=resumed.epoch,
                validation=datasets.validation if has_validation else None,
                validation_steps=math.ceil(datasets.validation_size / config.data.eval_batch_size),
                callbacks=callbacks, verbose=config.runtime.verbose if run_dir == workdir else 0,
            )
        else:
            model.fit(
                datasets.train_epochs(resumed.epoch, epochs), epochs=epochs, initial_epoch=resumed.epoch,
                steps_per_epoch=steps_per_epoch,
                validation_data=datasets.validation if has_validation else None,
                callbacks=callbacks, verbose=config.runtime.verbose,
            )
    # The final phase: everything below is redone from the backup after a kill.
    history = history_log.history()
    history["train_seconds"] = backup.train_seconds()
    callbacks_lib.atomic_write(os.path.join(run_dir, "history.json"), json.dumps(history, indent=1))
    history_log.write()
    save_networks(model, run_dir, has_validation)
    rundir.mark_finished(run_dir, evaluated=False)
    if not keep_backup:
        callbacks_lib.EpochBackup.discard(os.path.join(run_dir, "backup"))
    return model, datasets, history


SUMMARY = "run_summary.txt"


def warmup_warnings(defense: Defense, epochs: int) -> list:
    """One line per weight-space term whose warm-up covers the whole run (the term would never act)."""
    lines = []
    for term in defense.weight_space_terms():
        warmup = term.warmup_epochs()
        if warmup and warmup >= epochs:
            label = term.name.upper()
            lines.append(f"the {label} warm-up ({warmup} epochs) is as long as the run ({epochs} epochs): no epoch "
                         f"uses {label}, the run is plain {defense.base.upper()}; shorten it with --set "
                         f"defense.{term.name}.warmup_epochs=N (N < {epochs}), e.g. 0")
    return lines


def start_summary(config: ExperimentConfig, datasets, defense: Defense, model, resumed_epoch: int) -> tuple:
    """``(lines, warnings)``: what this start of a run trains on and with, and what looks unintended."""
    info = datasets.info
    epochs = config.optim.epochs
    steps_per_epoch = max(1, math.ceil(datasets.train_size / config.data.batch_size))
    split = datasets.split_size if datasets.split_size is not None else datasets.train_size + datasets.validation_size
    shape = "x".join(str(d) for d in info.image_shape)
    warmups = [f"{t.name} warm-up {t.warmup_epochs()} of {epochs} epochs" for t in defense.weight_space_terms()
               if t.warmup_epochs()]
    lines = [
        f"start: resumed from epoch {resumed_epoch} of {epochs}" if resumed_epoch else f"start: fresh ({epochs} epochs)",
        f"data: {config.data.name} ({shape}, {info.num_classes} classes); of its {split} training examples "
        f"{datasets.train_size} train and {datasets.validation_size} validate; {datasets.test_size} test examples",
        f"attack: {config.attack.norm} eps={evaluation.eps_text(config.attack.eps)}, step {config.attack.step_size:.6g}, "
        f"{config.attack.steps} steps; validation PGD-{config.eval.pgd_steps} step {float(model.settings.validation_step_size):.6g}",
        f"defense: {defense.name}" + (f" ({', '.join(warmups)})" if warmups else ""),
        f"optimisation: {steps_per_epoch} steps per epoch of batch {config.data.batch_size}, lr {config.optim.lr:g} "
        f"{config.optim.schedule}, seed {config.runtime.seed}",
    ]
    warnings = warmup_warnings(defense, epochs)
    note = data_lib.validation_warning(split, datasets.validation_size)
    if note:
        warnings.append(note)
    return lines, warnings


def write_start_summary(run_dir, config, datasets, defense, model, resumed_epoch, loud=True) -> None:
    """Adds this start's summary to ``run_dir/run_summary.txt`` (one block per start) and, when ``loud``,
    prints it (warnings to stderr)."""
    import sys

    lines, warnings = start_summary(config, datasets, defense, model, resumed_epoch)
    block = "\n".join(lines + [f"warning: {w}" for w in warnings]) + "\n"
    path = os.path.join(run_dir, SUMMARY)
    previous = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = f.read() + "\n"
    callbacks_lib.atomic_write(path, previous + block)
    if loud:
        if config.runtime.verbose:
            print("\n".join(lines), flush=True)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)


def _same_config(config, workdir) -> bool:
    """Whether ``workdir/config.yaml`` is ``config``."""
    with open(os.path.join(workdir, "config.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f) == to_dict(config)


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


def save_networks(model: RobustModel, workdir: str, has_best: bool) -> None:
    """Saves the last (and best) network as .keras and as SavedModel.

    Each file is written under a temporary name and renamed into place, so a
    failed or killed save leaves the previous complete file (or none). With
    weight averaging these are the averaged networks; the live (not averaged)
    last network is also saved, as ``model_live.keras``.
    """
    network = model.evaluated_network()
    _save_network(network, workdir, "model.keras", "saved_model")
    if network is not model.network:
        with callbacks_lib.atomic_path(os.path.join(workdir, "model_live.keras")) as partial:
            model.network.save(partial)
    best = os.path.join(workdir, "checkpoints", "best.weights.h5")
    if has_best and os.path.exists(best):
        last = [v.numpy() for v in model.weights]
        model.load_weights(best)
        try:
            _save_network(model.evaluated_network(), workdir, "best.keras", "saved_model_best")
        finally:
            for v, value in zip(model.weights, last):
                v.assign(value)


def _save_network(network, workdir, keras_name, export_name):
    with callbacks_lib.atomic_path(os.path.join(workdir, keras_name)) as partial:
        network.save(partial)
    rundir.atomic_replace_dir(
        os.path.join(workdir, export_name),
        lambda path: export_network(network, path),
    )


def train_and_evaluate(config: ExperimentConfig, workdir: str, verbose: bool = True,
                       defense: Defense | None = None) -> dict:
    """Trains, then evaluates the last and best networks on the test split.

    The backup stays until ``report.json`` is on disk; the finished marker is
    written last. A finished train-only run (``--no-eval``) in ``workdir``
    with the same config is not retrained: only its evaluation runs. With
    ``runtime.strategy=multi_worker`` the chief alone evaluates; the other
    workers return a report without models.
    """
    resolve_attack(config)
    if config.runtime.strategy == "multi_worker":
        return _train_and_evaluate_on_cluster(config, workdir, verbose, defense)
    with _owned(workdir):
        status = workdir_status(workdir)
        if status == "finished":
            raise UserError(f"workdir {workdir} holds a finished run; choose another --workdir")
        if status == "trained":
            seconds = _trained_seconds(config, workdir)
        else:
            _, _, history = train(config, workdir, keep_backup=True, defense=defense)
            seconds = history["train_seconds"]
        return _finish_with_report(config, workdir, seconds, verbose)


def _train_and_evaluate_on_cluster(config, workdir, verbose, defense):
    strategy = build_strategy(config.runtime)  # before any other TensorFlow operation in the process
    chief = multiworker.is_chief()
    trained = False
    if chief:
        with contextlib.suppress(UserError):  # a refusal is reported by train()
            trained = workdir_status(workdir) == "trained" and _same_config(config, workdir)
    # A run killed during its evaluation is not retrained: every worker learns that from the chief.
    if multiworker.any_worker(strategy, trained):
        seconds = None
    else:
        seconds = train(config, workdir, keep_backup=True, defense=defense)[2]["train_seconds"]
    if not chief:
        return {"models": {}, "train_seconds": seconds}
    with _owned(workdir):
        return _finish_with_report(config, workdir, _trained_seconds(config, workdir) if seconds is None else seconds,
                                   verbose)


def _trained_seconds(config, workdir) -> float:
    """The training time of the finished train-only run in ``workdir``; refuses another config."""
    if not _same_config(config, workdir):
        raise UserError(f"workdir {workdir} holds a finished training run with a different config; "
                        "evaluate it with the same config or choose another --workdir")
    with open(os.path.join(workdir, "history.json"), encoding="utf-8") as f:
        return json.load(f)["train_seconds"]


def _finish_with_report(config, workdir, train_seconds, verbose):
    report = _evaluate_run(config, workdir, train_seconds, verbose)
    rundir.mark_finished(workdir, evaluated=True)
    callbacks_lib.EpochBackup.discard(os.path.join(workdir, "backup"))
    return report


def _evaluate_run(config, workdir, train_seconds, verbose):
    x_test, y_test = data_lib.load_test_arrays(config.data.name, config.data.data_dir, config.data.test_examples)
    report = {"config": to_dict(config), "train_seconds": train_seconds, "models": {}}
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
    callbacks_lib.atomic_write(os.path.join(workdir, REPORT), evaluation.to_json(report))
    return report


__all__ = [
    "REPORT",
    "build_strategy",
    "jit_setting",
    "learning_rate_schedule",
    "prepare_workdir",
    "build",
    "train",
    "training_callbacks",
    "SUMMARY",
    "warmup_warnings",
    "start_summary",
    "write_start_summary",
    "flatness_monitor",
    "save_networks",
    "train_and_evaluate",
]
