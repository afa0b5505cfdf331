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
drives the same list with the same calls and logs (:mod:`tfrobust.placement`
decides which, and who writes where). On a cluster the chief
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

import json
import os

import keras
import numpy as np

from tfrobust import callbacks as callbacks_lib
from tfrobust import data as data_lib
from tfrobust import evaluation
from tfrobust import models
from tfrobust import placement
from tfrobust import rundir
from tfrobust import runtime
from tfrobust import user_code
from tfrobust.config import ExperimentConfig, resolve_attack, to_dict
from tfrobust.defenses import Defense, parse_defense
from tfrobust.errors import UserError
from tfrobust.export import save_networks
from tfrobust.rundir import REPORT, prepare_workdir, workdir_status
from tfrobust.runtime import build_strategy, check_devices, jit_setting
from tfrobust.trainer import RobustModel, StepSettings
from tfrobust.step.attack import single_step_base, training_attack_name


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
    steps_per_epoch = placement.steps_per_epoch(config, datasets)
    strategy = build_strategy(config.runtime)
    with runtime.dtype_policy(config.runtime), strategy.scope():
        model = _compiled_model(config, defense, info, steps_per_epoch, datasets.unlabelled_extra)
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
    reads for a resume, see :mod:`tfrobust.multiworker`); :mod:`tfrobust.placement`
    holds what differs.
    """
    if defense is None:
        defense = parse_defense(config.defense.name, config.defense)
    resolve_attack(config)  # the budget written into config.yaml is the one trained with
    place = placement.place(config, workdir, datasets)
    with place.claim(lambda: _check_start(config, workdir)) as run_dir:
        return _train(config, place, run_dir, extra_callbacks, datasets, keep_backup, defense)


def _check_start(config, workdir) -> None:
    """Refuses a workdir that cannot take this run (finished, foreign, or unfinished with another config)."""
    if prepare_workdir(workdir) and callbacks_lib.EpochBackup.read_state(os.path.join(workdir, "backup")):
        if not rundir.holds_config(workdir, to_dict(config)):
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
        *collapse_monitor(config, model, datasets, run_dir, stateful),
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
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations)) if model.optimizer is not None else None
    callbacks_lib.drop_events_from(log_dir, resumed.epoch, iterations)
    if resumed.epoch == 0:
        callbacks_lib.write_hparams(log_dir, to_dict(config))
    return callbacks, history_log, backup, resumed


def _train(config, place, run_dir, extra_callbacks, datasets, keep_backup, defense):
    """Builds, restores and trains; ``run_dir`` is the run directory except on a non-chief worker (its scratch)."""
    runtime.seed_process(config.runtime)
    model, datasets, strategy = build(config, place.datasets(config, datasets), defense)
    place.prepare(model, strategy)
    # The config is committed only once the data and network are built: a
    # refused start (bad data, bad device) leaves nothing that would refuse
    # the corrected command. Before the first backup a different config
    # simply replaces it.
    rundir.write_config(run_dir, to_dict(config))
    user_code.record(config, run_dir, callbacks_lib.atomic_write)
    callbacks, history_log, backup, resumed = training_callbacks(
        config, model, datasets, run_dir, os.path.join(place.workdir, "backup"), extra_callbacks,
    )
    place.check_resumed(strategy, resumed.epoch)
    write_start_summary(run_dir, config, datasets, defense, model, resumed.epoch, loud=place.chief)
    if resumed.epoch < config.optim.epochs and not resumed.stopped:
        place.fit(model, strategy, config, datasets, resumed.epoch, callbacks)
    # The final phase: everything below is redone from the backup after a kill.
    history = history_log.history()
    history["train_seconds"] = backup.train_seconds()
    callbacks_lib.atomic_write(os.path.join(run_dir, "history.json"), json.dumps(history, indent=1))
    history_log.write()
    best = next((cb for cb in callbacks if isinstance(cb, callbacks_lib.AtomicModelCheckpoint) and cb.save_best_only),
                None)
    save_networks(model, run_dir, datasets.validation_size > 0, check_best=None if best is None else (
        lambda path: callbacks_lib.check_file(path, best.sha256, "the best checkpoint")))
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
    steps_per_epoch = placement.steps_per_epoch(config, datasets)
    split = datasets.split_size if datasets.split_size is not None else datasets.train_size + datasets.validation_size
    shape = "x".join(str(d) for d in info.image_shape)
    warmups = [f"{t.name} warm-up {t.warmup_epochs()} of {epochs} epochs" for t in defense.weight_space_terms()
               if t.warmup_epochs()]
    lines = [
        f"start: resumed from epoch {resumed_epoch} of {epochs}" if resumed_epoch else f"start: fresh ({epochs} epochs)",
        f"data: {config.data.name} ({shape}, {info.num_classes} classes); of its {split} training examples "
        f"{datasets.train_size} train and {datasets.validation_size} validate; {datasets.test_size} test examples",
        (f"attack: {config.attack.norm} eps={evaluation.eps_text(config.attack.eps)}, step {config.attack.step_size:.6g}, "
         f"{config.attack.steps} steps" if not single_step_base(defense.objective)
         else f"attack: {training_attack_name(defense.objective, model.settings)}")
        + f"; validation PGD-{config.eval.pgd_steps} step {float(model.settings.validation_step_size):.6g}",
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


def collapse_monitor(config: ExperimentConfig, model: RobustModel, datasets, workdir: str, stateful: dict) -> list:
    """The optional CollapseMonitor on the first ``eval.collapse_examples`` training examples (unaugmented)."""
    n = config.eval.collapse_examples
    if not n:
        return []
    from tfrobust.collapse import CollapseMonitor

    x, y = datasets.train_subset(n)
    monitor = CollapseMonitor(
        x, y, eps=config.attack.eps, step_size=model.settings.validation_step_size, steps=config.eval.pgd_steps,
        norm=config.attack.norm, drop=config.eval.collapse_drop, action=config.eval.collapse_action,
        seed=config.runtime.seed, batch_size=config.data.eval_batch_size, log_dir=os.path.join(workdir, "tensorboard"),
        snapshot_path=os.path.join(workdir, "checkpoints", "last_good.npz"), verbose=config.runtime.verbose > 0,
        pgd_epochs=config.eval.collapse_pgd_epochs,
    )
    stateful["collapse"] = monitor
    return [monitor]


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
    place = placement.place(config, workdir)
    with place.hold():
        # A run killed during its evaluation is not retrained: every worker learns that from the chief.
        trained = place.decide(lambda: _trained_before(config, workdir))
        seconds = None if trained else train(config, workdir, keep_backup=True, defense=defense)[2]["train_seconds"]
        if not place.chief:
            return {"models": {}, "train_seconds": seconds}
        with rundir.owned(workdir):
            if seconds is None:
                seconds = _trained_seconds(workdir)
            return _finish_with_report(config, workdir, seconds, verbose)


def _trained_before(config, workdir) -> bool:
    """Whether ``workdir`` holds this config's finished train-only run; refuses a finished run and a
    train-only run of another config."""
    status = workdir_status(workdir)
    if status == "finished":
        raise UserError(f"workdir {workdir} holds a finished run; choose another --workdir")
    if status == "trained" and not rundir.holds_config(workdir, to_dict(config)):
        raise UserError(f"workdir {workdir} holds a finished training run with a different config; "
                        "evaluate it with the same config or choose another --workdir")
    return status == "trained"


def _trained_seconds(workdir) -> float:
    """The training time of the finished train-only run in ``workdir``."""
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
    "check_devices",
    "jit_setting",
    "learning_rate_schedule",
    "prepare_workdir",
    "workdir_status",
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
