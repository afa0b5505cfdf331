"""Where a training run lives: one process, or a cluster of workers (``runtime.strategy=multi_worker``).

A :class:`Placement` answers the questions on which the two differ, so that
:mod:`tfrobust.experiment` says a run once:

- who owns the run directory and checks that it can take the run
  (:meth:`Placement.claim`): the process itself, or the cluster's chief, whose
  refusal stops every worker;
- where this process writes (the ``run_dir`` that ``claim`` yields): the run
  directory, or, on a worker other than the chief, a scratch directory of its
  own (:func:`tfrobust.multiworker.scratch_dir`);
- what every worker must agree on (:meth:`Placement.decide`,
  :meth:`Placement.check_resumed`) and the barrier at the end;
- how to fit: Keras' ``Model.fit``, or :func:`tfrobust.multiworker.fit_distributed`
  where ``fit`` cannot run.

:func:`place` picks the placement of a config.
"""

from __future__ import annotations

import contextlib
import math
import os

import tensorflow as tf

from tfrobust import data as data_lib
from tfrobust import multiworker
from tfrobust import rundir
from tfrobust import runtime
from tfrobust.errors import UserError


class Placement:
    """One process (one device, a MirroredStrategy or a TPU): it owns and writes the run directory."""

    chief = True

    def __init__(self, workdir: str):
        self.workdir = workdir

    def hold(self):
        """The run directory's lock for a whole train-and-evaluate (a cluster takes it per phase)."""
        return rundir.owned(self.workdir)

    @contextlib.contextmanager
    def claim(self, check):
        """Owns the run directory for the block, after ``check()`` (which raises UserError to refuse it);
        yields the directory this process writes."""
        with rundir.owned(self.workdir):
            check()
            yield self.workdir

    def barrier(self) -> None:
        """Waits for every process of the run (one process waits for none)."""

    def decide(self, check) -> bool:
        """``check()``, the answer of the process that owns the run directory, on every process."""
        return check()

    def datasets(self, config, datasets):
        """The run's data: ``datasets`` as given (loaded by ``experiment.build`` when None)."""
        return datasets

    def prepare(self, model, strategy) -> None:
        """Readies the built model for a restore (nothing in one process)."""

    def check_resumed(self, strategy, epoch: int) -> None:
        """Refuses a start where the processes restored different epochs (one process agrees with itself)."""

    def fit(self, model, strategy, config, datasets, initial_epoch: int, callbacks) -> None:
        """Trains from ``initial_epoch`` to ``optim.epochs`` with the callbacks, validating after each epoch."""
        epochs = config.optim.epochs
        model.fit(
            datasets.train_epochs(initial_epoch, epochs), epochs=epochs, initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch(config, datasets),
            validation_data=datasets.validation if datasets.validation_size > 0 else None,
            callbacks=callbacks, verbose=config.runtime.verbose,
        )


class ClusterPlacement(Placement):
    """A worker of a MultiWorkerMirroredStrategy cluster: the chief owns and writes the run directory, every
    other worker writes the same files into a scratch directory, and all train together."""

    def __init__(self, config, workdir: str):
        super().__init__(workdir)
        self.task = multiworker.parse_tf_config(os.environ.get(multiworker.TF_CONFIG))
        self.strategy = runtime.build_strategy(config.runtime)  # before any other TensorFlow operation
        self.chief = self.task.is_chief

    def hold(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def claim(self, check):
        with contextlib.ExitStack() as stack:
            refusal = None
            if self.chief:
                try:
                    stack.enter_context(rundir.owned(self.workdir))
                    check()
                except UserError as e:
                    refusal = str(e)
            if multiworker.any_worker(self.strategy, refusal is not None):
                raise UserError(refusal or f"the chief refused workdir {self.workdir}; see the chief's output")
            write_dir = self.workdir if self.chief else stack.enter_context(multiworker.scratch_dir(self.task))
            try:
                yield write_dir
                self.barrier()
            except tf.errors.UnavailableError:
                raise multiworker.WorkerLost(
                    "a worker of the cluster stopped; start every worker again with the same command "
                    "to resume from the last finished epoch"
                ) from None

    def barrier(self) -> None:
        """A last collective: no worker leaves (and stops answering the cluster's health checks) while
        another is still saving."""
        multiworker.any_worker(self.strategy, False)

    def decide(self, check) -> bool:
        """The chief's ``check()`` on every worker; a refusal counts as False (the training's claim reports it)."""
        answer = False
        if self.chief:
            with contextlib.suppress(UserError):
                answer = check()
        return multiworker.any_worker(self.strategy, answer)

    def datasets(self, config, datasets):
        # Checked before the network is built: every worker refuses alike, none waits in a collective.
        datasets = data_lib.load_datasets(config.data, seed=config.runtime.seed)
        replicas = self.strategy.num_replicas_in_sync
        multiworker.check_batches(datasets.train_size, config.data.batch_size, replicas, "training")
        multiworker.check_batches(datasets.validation_size, config.data.eval_batch_size, replicas, "validation")
        return datasets

    def prepare(self, model, strategy) -> None:
        multiworker.build_optimizer(model, strategy)

    def check_resumed(self, strategy, epoch: int) -> None:
        if not multiworker.all_equal(strategy, epoch):
            raise UserError(f"the workers found different backups in {os.path.join(self.workdir, 'backup')}; "
                            "put --workdir on a filesystem that every worker shares")

    def fit(self, model, strategy, config, datasets, initial_epoch: int, callbacks) -> None:
        epochs = config.optim.epochs
        multiworker.fit_distributed(
            model, strategy, datasets.train_epochs(initial_epoch, epochs), epochs=epochs,
            steps_per_epoch=steps_per_epoch(config, datasets), initial_epoch=initial_epoch,
            validation=datasets.validation if datasets.validation_size > 0 else None,
            validation_steps=math.ceil(datasets.validation_size / config.data.eval_batch_size),
            callbacks=callbacks, verbose=config.runtime.verbose if self.chief else 0,
        )


def steps_per_epoch(config, datasets) -> int:
    """Optimizer steps per epoch: the training examples in batches of ``data.batch_size``, the last one partial."""
    return max(1, math.ceil(datasets.train_size / config.data.batch_size))


def place(config, workdir: str, datasets=None) -> Placement:
    """The placement of a run of ``config`` in ``workdir``; on a cluster, creates the strategy first thing.

    ``datasets`` preloaded by the caller are refused on a cluster (every worker loads its own).
    """
    if config.runtime.strategy != "multi_worker":
        return Placement(workdir)
    if datasets is not None:
        raise UserError("runtime.strategy=multi_worker takes no preloaded datasets (every worker loads its own)")
    return ClusterPlacement(config, workdir)


__all__ = ["Placement", "ClusterPlacement", "place", "steps_per_epoch"]
