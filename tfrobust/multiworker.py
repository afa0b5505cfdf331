"""Training on several machines with ``tf.distribute.MultiWorkerMirroredStrategy``.

Every worker runs the same program with its own ``TF_CONFIG``, for example on
the first of two machines::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python train.py --config configs/cifar10.yaml --workdir runs/x --set runtime.strategy=multi_worker

and ``"index": 1`` on the second. The workers keep one synchronous copy of the
network: every step all-reduces the gradients (and AWP's, S2O's and RAT's
cross-replica statistics, see :mod:`tfrobust.trainer`) across all replicas of
all workers, so that a step on N workers computes what one device computes on
the same global batch, up to floating-point rounding. (Over many steps the
runs drift apart: PGD's sign step turns a last-bit difference in an input
gradient into a full step on a pixel. Two workers give exactly the weights of
``experiment.train`` under MirroredStrategy with one replica per worker.)

Keras' ``fit`` does not run under this strategy (keras-team/keras#20585), so
the loop here uses only the public ``tf.distribute`` API: a per-worker input
pipeline from ``distribute_datasets_from_function`` and a ``tf.function`` that
calls ``strategy.run(model.train_step, ...)`` (and ``model.test_step`` for
validation).

Order of operations. The strategy must be created before TensorFlow runs
anything else in the process (it configures collective ops and starts the
worker's gRPC server, which TensorFlow only allows at start-up): call
:func:`train_multi_worker` first thing in a fresh process, before loading data
or building a model. In a process that already ran TensorFlow ops it raises
:class:`~tfrobust.errors.UserError`.

Batches. ``data.batch_size`` is the GLOBAL batch, as everywhere in tfrobust.
Every worker builds the same deterministic sequence of global batches
(``Datasets.train_epochs``) and keeps only its replicas' part: the global batch
is cut into ``num_replicas_in_sync`` contiguous chunks and replica r (in the
strategy's numbering: worker ``id_in_cluster`` times local replicas, plus the
local replica) gets chunk r. This is exactly the part the trainer draws its
attack noise for (``trainer._global_slice``), so a step matches the same step
on one device. ``AutoShardPolicy.FILE`` cannot apply (the data is in memory)
and ``AutoShardPolicy.DATA`` leaves the assignment of batch pieces to workers
to tf.data's rewrite, which the trainer cannot rely on, hence the explicit
per-worker function. The global batch (and the last, partial batch of an epoch
and of the validation set) must give every replica at least one example.

Files. Only the chief (the ``chief`` task if the cluster has one, otherwise
worker 0) writes the run directory: ``config.yaml``, ``history.json``,
``history.csv``, ``tensorboard/`` (``train/`` and ``validation/`` scalars named
as Keras' TensorBoard callback names them, plus hparams),
``checkpoints/last.weights.h5`` and ``best.weights.h5``, ``model.keras``,
``best.keras``, ``saved_model/`` and ``saved_model_best/``. The other workers
perform the same saves into a temporary directory of their own, deleted at the
end, as tf.distribute recommends (a save may read values that every worker
must take part in). Pass the same ``workdir`` on every worker; the files end
up on the chief's filesystem. At the end every worker waits for the others,
so that none leaves the cluster while another is still saving.

Each worker uses all of its GPUs (or its CPU when it has none) as local
replicas; ``runtime.devices`` is not used. A worker that fails alone (say,
its data directory is missing) leaves the others waiting until the cluster's
health check notices it is gone.

Not available here (they are Keras callbacks of ``experiment.train``):
resuming an unfinished run, ``eval.flatness_every`` and ``eval.images_every``.
No XLA is used (``runtime.jit_compile`` is ignored), as Keras does not use it
under a distribution strategy either.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time

import keras
import tensorflow as tf
import yaml

from tfrobust import data as data_lib
from tfrobust import experiment
from tfrobust.callbacks import TrainingDiverged, write_hparams
from tfrobust.config import ExperimentConfig, to_dict
from tfrobust.defenses import parse_defense
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel

TF_CONFIG = "TF_CONFIG"
JOBS = ("chief", "worker")


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


def _check_batches(size: int, batch_size: int, replicas: int, what: str) -> None:
    """Every replica must get at least one example of every batch."""
    last = size % batch_size
    for name, n in ((f"{what} batch", min(batch_size, size)), (f"last {what} batch", last)):
        if 0 < n < replicas:
            raise UserError(
                f"the {name} has {n} examples, fewer than the {replicas} replicas of the cluster; "
                "change the batch size or the number of examples so that every replica gets at least one"
            )


def _any_worker(strategy, flag: bool) -> bool:
    """True on every worker when any worker passes ``flag=True`` (a sum over all replicas)."""

    @tf.function
    def total(value):
        per_replica = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return float(total(tf.constant(1.0 if flag else 0.0))) > 0


def _build_model(config: ExperimentConfig, strategy, datasets):
    """experiment.build's model, compiled inside ``strategy``'s scope, with its optimizer built."""
    defense = parse_defense(config.defense.name, config.defense)
    steps_per_epoch = max(1, math.ceil(datasets.train_size / config.data.batch_size))
    previous_policy = keras.config.dtype_policy()
    policy = "float32" if config.runtime.mixed_precision == "none" else config.runtime.mixed_precision
    keras.config.set_dtype_policy(policy)
    try:
        with strategy.scope():
            model, datasets = experiment._build_in_scope(config, datasets, defense, datasets.info, steps_per_epoch)
            # Built here, not lazily inside the first distributed step.
            model.optimizer.build(model.trainable_variables)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return model, steps_per_epoch


def _write_history_csv(path: str, history: dict) -> None:
    keys = ["epoch"] + sorted(k for k in history if k not in ("epoch", "train_seconds"))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for i in range(len(history["epoch"])):
            writer.writerow([history[k][i] for k in keys])


def train_multi_worker(config: ExperimentConfig, workdir: str) -> tuple[RobustModel, data_lib.Datasets, dict]:
    """Trains per ``config`` on the cluster in ``TF_CONFIG``; the chief writes ``workdir``.

    Call it first thing in the process, on every worker with the same config
    and workdir. Returns ``(model, datasets, history)`` like
    :func:`tfrobust.experiment.train`, on every worker; history maps
    ``epoch``, the training metrics, ``val_*`` metrics and ``learning_rate``
    to per-epoch lists, plus ``train_seconds``.

    Raises:
      UserError: ``TF_CONFIG`` is missing or malformed, the process already
        ran TensorFlow, the workdir cannot be used (refused by the chief,
        reported on every worker), or a batch would leave a replica empty.
      TrainingDiverged: the epoch's training loss is not finite (on every
        worker, before anything of that epoch is saved).
    """
    task = parse_tf_config(os.environ.get(TF_CONFIG))
    strategy = multi_worker_strategy()

    refusal = None
    if task.is_chief:
        try:
            if experiment.prepare_workdir(workdir):
                refusal = f"workdir {workdir} holds an unfinished run; multi-worker training does not resume, choose another --workdir"
        except UserError as e:
            refusal = str(e)
    if _any_worker(strategy, refusal is not None):
        raise UserError(refusal or f"the chief refused workdir {workdir}; see the chief's output")
    write_dir = workdir if task.is_chief else tempfile.mkdtemp(prefix=f"tfrobust-{task.task_type}{task.task_index}-")
    try:
        result = _train(config, strategy, task, workdir, write_dir)
    finally:
        if not task.is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    # A last collective as a barrier: no worker leaves (and stops answering
    # the cluster's health checks) while another is still saving.
    _any_worker(strategy, False)
    return result


def _train(config, strategy, task, workdir, write_dir):
    keras.utils.set_random_seed(config.runtime.seed)
    if config.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    datasets = data_lib.load_datasets(config.data, seed=config.runtime.seed)
    replicas = strategy.num_replicas_in_sync
    _check_batches(datasets.train_size, config.data.batch_size, replicas, "training")
    has_validation = datasets.validation_size > 0
    if has_validation:
        _check_batches(datasets.validation_size, config.data.eval_batch_size, replicas, "validation")
    model, steps_per_epoch = _build_model(config, strategy, datasets)
    epochs = config.optim.epochs
    validation_steps = math.ceil(datasets.validation_size / config.data.eval_batch_size)
    if task.is_chief:
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)

    train_data = strategy.distribute_datasets_from_function(
        lambda ctx: replica_batches(datasets.train_epochs(0, epochs), ctx)
    )
    train_iterator = iter(train_data)

    @tf.function
    def train_step(iterator):
        strategy.run(model.train_step, args=(next(iterator),))

    if has_validation:
        validation_data = strategy.distribute_datasets_from_function(
            lambda ctx: replica_batches(datasets.validation, ctx).repeat()
        )
        validation_iterator = iter(validation_data)

        @tf.function
        def test_step(iterator):
            strategy.run(model.test_step, args=(next(iterator),))

    ckpt = os.path.join(write_dir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    log_dir = os.path.join(write_dir, "tensorboard")
    if task.is_chief:
        write_hparams(log_dir, to_dict(config))
    writers = {
        "train": tf.summary.create_file_writer(os.path.join(log_dir, "train")),
        "validation": tf.summary.create_file_writer(os.path.join(log_dir, "validation")),
    }
    history = {}
    best, since_best = -math.inf, 0
    start = time.time()
    try:
        for epoch in range(epochs):
            for metric in model.metrics:
                metric.reset_state()
            # The rate this epoch trains with (at its end the schedule already gives the next epoch's).
            learning_rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            for _ in range(steps_per_epoch):
                train_step(train_iterator)
            # Read in cross-replica context: the sums behind each mean are
            # all-reduced over every replica of every worker.
            logs = {name: float(t.result()) for name, t in model.trackers.items()}
            if not math.isfinite(logs["loss"]):
                raise TrainingDiverged(
                    f"the training loss became {logs['loss']} in epoch {epoch + 1}; "
                    "lower optim.lr or check the data"
                )
            if has_validation:
                for _ in range(validation_steps):
                    test_step(validation_iterator)
                logs.update({f"val_{name}": float(t.result()) for name, t in model.val_trackers.items()})
            logs["learning_rate"] = learning_rate
            history.setdefault("epoch", []).append(epoch)
            for name, value in logs.items():
                history.setdefault(name, []).append(value)
            with writers["train"].as_default():
                for name, value in logs.items():
                    if not name.startswith("val_"):
                        tf.summary.scalar(f"epoch_{name}", value, step=epoch)
            with writers["validation"].as_default():
                for name, value in logs.items():
                    if name.startswith("val_"):
                        tf.summary.scalar(f"epoch_{name[4:]}", value, step=epoch)
            for writer in writers.values():
                writer.flush()
            model.save_weights(os.path.join(ckpt, "last.weights.h5"))
            if task.is_chief and config.runtime.verbose:
                shown = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                print(f"epoch {epoch + 1}/{epochs} - {shown}", flush=True)
            if has_validation:
                if logs["val_pgd_accuracy"] > best:
                    best, since_best = logs["val_pgd_accuracy"], 0
                    model.save_weights(os.path.join(ckpt, "best.weights.h5"))
                else:
                    since_best += 1
                patience = config.optim.early_stopping_patience
                if patience and since_best >= patience:
                    break
    finally:
        for writer in writers.values():
            writer.close()
    history["train_seconds"] = time.time() - start
    with open(os.path.join(write_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    _write_history_csv(os.path.join(write_dir, "history.csv"), history)
    experiment.save_networks(model, write_dir, has_validation)
    return model, datasets, history


__all__ = [
    "TF_CONFIG",
    "JOBS",
    "ClusterTask",
    "parse_tf_config",
    "is_chief",
    "multi_worker_strategy",
    "replica_batches",
    "train_multi_worker",
]
