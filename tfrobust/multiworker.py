"""Training on several machines with ``tf.distribute.MultiWorkerMirroredStrategy``.

Its one job: what only a cluster needs, around the same step and the same
callbacks as on one machine: ``TF_CONFIG`` (:func:`parse_tf_config`), the
strategy (:func:`multi_worker_strategy`), each worker's part of the global
batches (:func:`replica_batches`, :func:`check_batches`), agreement between
workers (:func:`any_worker`, :func:`all_equal`), the non-chief's temporary run
directory (:func:`scratch_dir`), and the loop that replaces ``fit``, which
does not run under this strategy (:func:`fit_distributed`).

Use: start the same command on every worker, each with its own ``TF_CONFIG``,
with ``--set runtime.strategy=multi_worker`` and one ``--workdir`` on a
filesystem every worker shares; :func:`tfrobust.experiment.train` must run
first thing in a fresh process. How the loop, the batches, the files and
resuming work: docs/architecture.md, "Training on several machines".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tfrobust.errors import UserError

TF_CONFIG = "TF_CONFIG"
JOBS = ("chief", "worker")


class WorkerLost(RuntimeError):
    """Another worker of the cluster stopped (killed, machine lost); restart every worker to resume."""


@dataclasses.dataclass(frozen=True)
class ClusterTask:
    """This process's place in the cluster described by ``TF_CONFIG``."""

    cluster: dict  # job name -> list of "host:port"
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        """Number of tasks taking part in training (the chief and the workers)."""
        return sum(len(self.cluster.get(job, ())) for job in JOBS)

    @property
    def id_in_cluster(self) -> int:
        """The chief is 0, worker i is i (+1 when there is a chief), as tf.distribute numbers them."""
        if self.task_type == "chief":
            return 0
        return self.task_index + len(self.cluster.get("chief", ()))

    @property
    def is_chief(self) -> bool:
        return self.id_in_cluster == 0


def parse_tf_config(value) -> ClusterTask:
    """Checks a ``TF_CONFIG`` value; raises UserError with a one-line message if it is unusable."""
    if value is None or not str(value).strip():
        raise UserError(
            "multi-worker training needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}); '
            "it is not set"
        )
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(spec, dict):
        raise UserError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = spec.get("cluster"), spec.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise UserError("TF_CONFIG has no 'cluster' mapping of job names to lists of host:port addresses")
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise UserError(f"TF_CONFIG cluster has a {job!r} job; multi-worker training uses only: {', '.join(JOBS)}")
        if not isinstance(addresses, list) or not addresses:
            raise UserError(f"TF_CONFIG cluster job {job!r} must be a non-empty list of host:port addresses")
        for address in addresses:
            host, _, port = str(address).rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdigit():
                raise UserError(f"TF_CONFIG cluster job {job!r} has {address!r}, not a host:port address")
    if len(cluster.get("chief", ())) > 1:
        raise UserError("TF_CONFIG cluster has more than one chief")
    if "worker" not in cluster and "chief" not in cluster:
        raise UserError("TF_CONFIG cluster has no 'worker' job")
    if not isinstance(task, dict):
        raise UserError("TF_CONFIG has no 'task' mapping with 'type' and 'index'")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise UserError(f"TF_CONFIG task type {task_type!r} is not a job of its cluster ({', '.join(cluster)})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise UserError(
            f"TF_CONFIG task index {index!r} is not one of 0..{len(cluster[task_type]) - 1} for job {task_type!r}"
        )
    return ClusterTask({job: list(a) for job, a in cluster.items()}, task_type, index)


def is_chief() -> bool:
    """Whether this process is the chief of the cluster in ``TF_CONFIG`` (the one that writes the run)."""
    return parse_tf_config(os.environ.get(TF_CONFIG)).is_chief


_STRATEGY = {}


def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's MultiWorkerMirroredStrategy for the cluster in ``TF_CONFIG`` (created once).

    Must be called before TensorFlow runs any other operation in the process.
    """
    task = parse_tf_config(os.environ.get(TF_CONFIG))
    key = (json.dumps(task.cluster, sort_keys=True), task.task_type, task.task_index)
    if not _STRATEGY:
        try:
            _STRATEGY[key] = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise UserError(
                "MultiWorkerMirroredStrategy must be created before TensorFlow runs anything else in the "
                f"process; start multi-worker training in a fresh process ({str(e).splitlines()[0]})"
            ) from None
    if key not in _STRATEGY:
        raise UserError("TF_CONFIG changed after this process joined a cluster; start a new process")
    return _STRATEGY[key]


def replica_batches(dataset: tf.data.Dataset, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    """This input pipeline's replicas' contiguous chunks of every global batch of ``dataset``.

    A global batch of ``b`` examples is cut at ``floor(r * b / R)`` for the
    ``R = num_replicas_in_sync`` replicas; the pipeline with id ``p`` yields,
    per global batch, the chunks of its ``L = R / num_input_pipelines`` local
    replicas ``p * L .. p * L + L - 1`` in order (one element per local replica).
    """
    replicas = input_context.num_replicas_in_sync
    local = replicas // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local

    def chunks(*batch):
        size = tf.shape(batch[0], out_type=tf.int64)[0]
        bounds = tf.range(replicas + 1, dtype=tf.int64) * size // replicas
        starts, ends = bounds[first : first + local], bounds[first + 1 : first + local + 1]
        pieces = tf.data.Dataset.from_tensor_slices((starts, ends))
        return pieces.map(lambda start, end: tuple(t[start:end] for t in batch))

    return dataset.flat_map(chunks)


def check_batches(size: int, batch_size: int, replicas: int, what: str) -> None:
    """Refuses (UserError) a ``what`` batch, or the last one, that would leave a replica without examples."""
    last = size % batch_size
    for name, n in ((f"{what} batch", min(batch_size, size)), (f"last {what} batch", last)):
        if 0 < n < replicas:
            raise UserError(
                f"the {name} has {n} examples, fewer than the {replicas} replicas of the cluster; "
                "change the batch size or the number of examples so that every replica gets at least one"
            )


_SUMS = {}


def _sum_over_workers(strategy, value: float) -> float:
    """The sum of ``value`` over every replica of every worker (one all-reduce), on every worker."""
    if id(strategy) not in _SUMS:

        @tf.function
        def total(v):
            per_replica = strategy.run(lambda: tf.identity(v))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        _SUMS[id(strategy)] = (strategy, total)  # the strategy is kept alive: its id stays its own
    return float(_SUMS[id(strategy)][1](tf.constant(float(value), tf.float32)))


def any_worker(strategy, flag: bool) -> bool:
    """True on every worker when any worker passes ``flag=True``; also a barrier (every worker must call it)."""
    return _sum_over_workers(strategy, 1.0 if flag else 0.0) > 0


def all_equal(strategy, value: float) -> bool:
    """Whether every worker passed the same ``value``; the same answer on every worker."""
    replicas = strategy.num_replicas_in_sync
    mismatch = _sum_over_workers(strategy, value) != replicas * float(value)
    return not any_worker(strategy, mismatch)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def scratch_dir(task: ClusterTask):
    """A temporary directory where a non-chief worker writes its run files; removed on exit.

    Its name holds the worker's process id; the directories that killed
    workers of the same task left in the same temporary folder (their process
    is gone) are removed first.
    """
    prefix = f"tfrobust-{task.task_type}{task.task_index}-"
    parent = tempfile.gettempdir()
    for name in os.listdir(parent):
        owner = name[len(prefix):].split("-", 1)[0]
        if name.startswith(prefix) and owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_optimizer(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Creates the optimizer's variables in ``strategy``'s scope (a restore or the first step would, outside it)."""
    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)


def _distributed_step(strategy, step):
    """A function of a distributed iterator: runs ``step`` on every replica's next batch and returns its
    logs, each averaged over all replicas (as ``fit`` reduces them) in one all-reduce, as Python floats."""
    names = []

    def packed(batch):
        logs = step(batch)
        names[:] = list(logs)
        return tf.stack([tf.cast(logs[name], tf.float32) for name in names])

    @tf.function
    def run(iterator):
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(packed, args=(next(iterator),)), axis=None)

    return lambda iterator: dict(zip(names, run(iterator).numpy().tolist()))


def fit_distributed(model: keras.Model, strategy: tf.distribute.Strategy, train: tf.data.Dataset, *,
                    epochs: int, steps_per_epoch: int, initial_epoch: int = 0,
                    validation: tf.data.Dataset | None = None, validation_steps: int = 0,
                    callbacks=(), verbose: int = 0):
    """``model.fit`` for strategies where fit cannot run; the same callbacks see the same calls and logs.

    ``train`` yields the global batches of epochs ``initial_epoch`` to
    ``epochs`` (``steps_per_epoch`` each) and ``validation`` one pass of
    global batches (``validation_steps``); both are cut per replica with
    :func:`replica_batches`. ``model`` must be built and compiled in
    ``strategy``'s scope, with its optimizer built (:func:`build_optimizer`).
    Returns the History, as fit does.
    """
    train_iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: replica_batches(train, ctx)))
    train_functions = {}  # per value of model.train_on_pgd (tfrobust.collapse switches it between epochs)
    if validation is not None:
        validation_iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: replica_batches(validation, ctx).repeat()))
        test_function = _distributed_step(strategy, model.test_step)

    callbacks = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps_per_epoch, model=model,
    )
    model.stop_training = False
    callbacks.on_train_begin()
    epoch_logs = None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        variant = bool(getattr(model, "train_on_pgd", False))
        if variant not in train_functions:
            train_functions[variant] = _distributed_step(strategy, model.train_step)
        train_function = train_functions[variant]
        logs = {}
        for step in range(steps_per_epoch):
            callbacks.on_train_batch_begin(step)
            logs = train_function(train_iterator)
            callbacks.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        epoch_logs = dict(logs)
        if validation is not None:
            model.reset_metrics()
            callbacks.on_test_begin()
            val_logs = {}
            for step in range(validation_steps):
                callbacks.on_test_batch_begin(step)
                val_logs = test_function(validation_iterator)
                callbacks.on_test_batch_end(step, val_logs)
            callbacks.on_test_end(val_logs)
            epoch_logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        # Every worker leaves together (a worker that stopped alone would leave the others in a collective).
        model.stop_training = any_worker(strategy, bool(model.stop_training))
        if model.stop_training:
            break
    if epochs > 0:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=epoch_logs)
    return model.history


__all__ = [
    "TF_CONFIG",
    "JOBS",
    "WorkerLost",
    "ClusterTask",
    "parse_tf_config",
    "is_chief",
    "multi_worker_strategy",
    "replica_batches",
    "check_batches",
    "any_worker",
    "all_equal",
    "scratch_dir",
    "build_optimizer",
    "fit_distributed",
]
