"""Multi-worker training: two local worker processes with TF_CONFIG on 127.0.0.1.

The two workers split each global batch of 32 into two contiguous halves of
16, worker k taking half k. A single-process run of ``experiment.train`` under
MirroredStrategy over two logical CPUs splits every global batch into the same
two halves, so it performs the same computation step by step: the workers must
end with identical weights equal to it. (That run in turn matches one device
step by step, tests/test_distributed.py. Over several steps the comparison with
one device is not tight: the two-replica and one-device gradients differ in
the last bits, and PGD's sign step turns such a difference into a full step on
a pixel, after which the runs drift apart by about 1e-3.)

The runs mix a pool of extra images into every batch and keep a weight
average (EMA), so that both are checked on the cluster, also across a kill -9.

The workers see no GPU, so that they compute on the CPU as the reference run
does. They train under op determinism, so that a run can be compared exactly
with itself after a kill -9 and a restart of the cluster.
"""

import json
import os
import socket
import subprocess
import tempfile
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrobust import experiment, models
from tfrobust.config import load_config
from tfrobust.errors import UserError
from tfrobust.multiworker import is_chief, parse_tf_config, replica_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist.yaml")
OVERRIDES = {
    "data.train_examples": 128, "data.validation_examples": 64, "data.batch_size": 32,
    "attack.steps": 2, "eval.pgd_steps": 2, "optim.epochs": 2, "runtime.verbose": 0,
    "defense.name": "at+awp", "defense.awp.warmup_epochs": 0,
    "eval.images_every": 1, "eval.flatness_every": 1, "eval.flatness_examples": 32, "eval.flatness_samples": 2,
}
# The cluster's runs are deterministic on one machine (see test_a_cluster_killed_mid_epoch_resumes_...).
CLUSTER_OVERRIDES = dict(OVERRIDES, **{"runtime.deterministic": True})
WORKER_TIMEOUT = 300

WORKER_SCRIPT = """
import json
import os
import sys
import time

import keras
import numpy as np

from tfrobust import experiment
from tfrobust.config import load_config
from tfrobust.errors import UserError
from tfrobust.multiworker import WorkerLost


class PauseAt(keras.callbacks.Callback):
    # Stands still after a given batch of a given epoch (0-based), so that the test can kill -9 the process there.
    def __init__(self, epoch, batch, marker):
        super().__init__()
        self.at, self.marker, self.epoch = (epoch, batch), marker, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            open(self.marker, "w").close()
            time.sleep(3600)


config_path, overrides, workdir, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
overrides["runtime.strategy"] = "multi_worker"
pause = os.environ.get("PAUSE_AT")
callbacks = [PauseAt(*map(int, pause.split(",")), out + ".paused")] if pause else []
try:
    model, _, history = experiment.train(load_config(config_path, overrides), workdir, extra_callbacks=callbacks)
except UserError as e:
    print(f"UserError: {e}", flush=True)
    sys.exit(2)
except WorkerLost as e:
    print(f"WorkerLost: {e}", flush=True)
    sys.exit(1)
np.savez(out, *[v.numpy() for v in model.network.weights])
np.savez(out + ".average.npz", *[v.numpy() for v in model.averaged_network.weights])
with open(out + ".json", "w") as f:
    json.dump(history, f)
"""


def free_ports(n):
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """Two worker processes running WORKER_SCRIPT; each has its own TMPDIR and log file."""

    def __init__(self, tmp_path, workdir, overrides=CLUSTER_OVERRIDES, workers=2, pause=None):
        """``pause``: {worker index: (epoch, batch)} where that worker stands still (see PauseAt)."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        script = tmp_path / "worker.py"
        script.write_text(WORKER_SCRIPT)
        addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
        self.tmp_path = tmp_path
        self.procs, self.logs = [], []
        for index in range(workers):
            tmpdir = tmp_path / f"tmp{index}"
            tmpdir.mkdir()
            env = dict(
                os.environ,
                TF_CONFIG=json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}),
                PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
                TMPDIR=str(tmpdir),
                CUDA_VISIBLE_DEVICES="",
                TF_CPP_MIN_LOG_LEVEL="2",
            )
            env.pop("PAUSE_AT", None)
            if pause and index in pause:
                env["PAUSE_AT"] = ",".join(map(str, pause[index]))
            log = open(tmp_path / f"worker{index}.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(script), CONFIG, json.dumps(overrides), str(workdir),
                 str(tmp_path / f"worker{index}.npz")],
                env=env, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
            ))

    def wait(self, timeout=WORKER_TIMEOUT):
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"the workers did not finish within {timeout} s:\n{self.output()}")
        return codes

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()

    def output(self, index=None):
        indices = range(len(self.procs)) if index is None else [index]
        return "\n".join(
            f"--- worker {i}:\n" + (self.tmp_path / f"worker{i}.log").read_text()[-4000:] for i in indices
        )

    def weights(self, index, average=False):
        with np.load(self.tmp_path / f"worker{index}.npz{'.average.npz' if average else ''}") as z:
            return [z[f"arr_{k}"] for k in range(len(z.files))]

    def history(self, index):
        with open(self.tmp_path / f"worker{index}.npz.json") as f:
            return json.load(f)


@pytest.fixture(scope="module", autouse=True)
def extra_pool(tmp_path_factory):
    """A labelled pool of extra images (256 Fashion-MNIST test images) mixed into half of every batch."""
    from tfrobust.data import load_arrays

    x, y = load_arrays("fashion_mnist", "test")
    path = str(tmp_path_factory.mktemp("pool") / "pool.npz")
    np.savez(path, image=x[-256:], label=y[-256:])
    recipe = {"data.extra_data": path, "data.extra_fraction": 0.5,
              "optim.ema": True, "optim.ema_decay": 0.9, "optim.ema_start": 0.25}
    OVERRIDES.update(recipe)
    CLUSTER_OVERRIDES.update(recipe)
    yield path
    for key in recipe:
        OVERRIDES.pop(key), CLUSTER_OVERRIDES.pop(key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A finished two-worker run: (its Cluster, its workdir)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    workdir = tmp_path / "run"
    cluster = Cluster(tmp_path, workdir)
    try:
        codes = cluster.wait()
    finally:
        cluster.kill()
    assert codes == [0, 0], cluster.output()
    return cluster, workdir


@pytest.mark.slow
def test_two_workers_match_one_process_on_the_same_replica_batches(tmp_path, uninterrupted):
    cluster, workdir = uninterrupted
    reference_config = load_config(
        CONFIG, dict(OVERRIDES, **{"runtime.strategy": "mirrored", "runtime.devices": "/cpu:0,/cpu:1"})
    )
    reference, _, reference_history = experiment.train(reference_config, str(tmp_path / "reference"))

    first = cluster.weights(0)
    for average in (False, True):  # the live weights and their average
        network = reference.averaged_network if average else reference.network
        expected = [v.numpy() for v in network.weights]
        mine, theirs = cluster.weights(0, average), cluster.weights(1, average)
        assert len(mine) == len(theirs) == len(expected)
        for a, b, c in zip(mine, theirs, expected):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)
    # Training moved the weights: the comparison is not between two initial networks.
    fresh = models.build_model("small_cnn", (28, 28, 1), 10, (0.2860,), (0.3530,), seed=0)
    assert max(np.abs(a - f.numpy()).max() for a, f in zip(first, fresh.weights)) > 1e-3

    # Metrics are reduced over both workers: the same values on both, and those of the reference run.
    histories = [cluster.history(0), cluster.history(1)]
    assert histories[0] == {**histories[1], "train_seconds": histories[0]["train_seconds"]}
    for key in ("loss", "ce_adv", "clean_accuracy", "adv_accuracy", "awp_relative_norm",
                "val_clean_accuracy", "val_pgd_accuracy", "val_pgd_loss", "learning_rate"):
        np.testing.assert_allclose(histories[0][key], reference_history[key], rtol=0, atol=1e-5, err_msg=key)
    assert histories[0]["epoch"] == [0, 1]
    # The custom loop hands the callbacks the logs fit hands them: the same keys in the history.
    assert set(histories[0]) == set(reference_history)

    # Only the chief wrote the run directory; the other worker's temporary directory is gone.
    for name in ("config.yaml", "history.json", "history.csv", "checkpoints/last.weights.h5",
                 "checkpoints/best.weights.h5", "model.keras", "best.keras", "saved_model/saved_model.pb",
                 "saved_model_best/saved_model.pb"):
        assert (workdir / name).exists(), name
    assert list((cluster.tmp_path / "tmp1").iterdir()) == []
    with open(workdir / "history.json") as f:
        assert json.load(f) == histories[0]

    for name, weights in (("model.keras", cluster.weights(0, average=True)), ("model_live.keras", first)):
        saved = keras.saving.load_model(workdir / name)
        for a, v in zip(weights, saved.weights):
            np.testing.assert_array_equal(a, v.numpy())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = EventAccumulator(str(workdir / "tensorboard" / "train")).Reload()
    tags = set(train.Tags()["scalars"]) | set(train.Tags().get("tensors", []))
    assert {"epoch_loss", "epoch_adv_accuracy", "epoch_learning_rate"} <= tags, tags
    validation = EventAccumulator(str(workdir / "tensorboard" / "validation")).Reload()
    vtags = set(validation.Tags()["scalars"]) | set(validation.Tags().get("tensors", []))
    assert "epoch_pgd_accuracy" in vtags, vtags
    # The same callbacks as on one machine: the image grid and the flatness monitor ran on the cluster too.
    images = EventAccumulator(str(workdir / "tensorboard" / "images")).Reload()
    assert set(images.Tags().get("tensors", [])) | set(images.Tags().get("images", [])), images.Tags()
    np.testing.assert_allclose(histories[0]["val_robust_flatness"], reference_history["val_robust_flatness"],
                               rtol=0, atol=1e-4)


def _kill_mid_epoch(tmp_path, workdir, victim, wait_for_survivor):
    """Starts the cluster and kill -9s worker ``victim`` after batch 2 of epoch 2 (of 4 batches).

    The survivor is then blocked in the next step's all-reduce until
    TensorFlow's coordination service misses the victim's heartbeats and
    aborts it. With ``wait_for_survivor`` the test waits for that (the
    survivor must stop with WorkerLost); otherwise it kills the survivor at
    once, as a cluster manager restarting the cluster would.
    """
    cluster = Cluster(tmp_path, workdir, pause={victim: (1, 1)})
    marker = tmp_path / f"worker{victim}.npz.paused"
    survivor = cluster.procs[1 - victim]
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT
        while not marker.exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.procs):
                pytest.fail(f"worker {victim} did not reach the kill point:\n{cluster.output()}")
            time.sleep(0.2)
        cluster.procs[victim].kill()
        cluster.procs[victim].wait()
        if wait_for_survivor:
            assert survivor.wait(timeout=120) == 1, cluster.output()
            assert "WorkerLost: a worker of the cluster stopped" in cluster.output(1 - victim)
        assert survivor.poll() != 0, cluster.output()  # it never finishes the run alone
    finally:
        cluster.kill()
    # The kill came in the middle of the second epoch: the backup holds the first.
    with open(workdir / "backup" / "state.json") as f:
        assert json.load(f)["epoch"] == 1
    assert not (workdir / "finished.json").exists()


@pytest.mark.slow
def test_a_cluster_killed_mid_epoch_resumes_and_ends_as_the_uninterrupted_run(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    workdir = tmp_path / "run"
    _kill_mid_epoch(tmp_path / "worker-killed", workdir, victim=1, wait_for_survivor=True)
    # Restarted with the same command, the cluster loses its chief in the same place.
    _kill_mid_epoch(tmp_path / "chief-killed", workdir, victim=0, wait_for_survivor=False)
    cluster = Cluster(tmp_path / "restarted", workdir)
    try:
        codes = cluster.wait()
    finally:
        cluster.kill()
    assert codes == [0, 0], cluster.output()
    # Exactly equal: the restored weights and optimizer state are the backup's float32 values, the
    # batches and the attack noise depend only on the epoch and step, the ops run under op determinism
    # on the same machine, and a two-worker all-reduce adds two numbers (the same sum in either order).
    for index in (0, 1):
        for average in (False, True):
            for a, b in zip(cluster.weights(index, average), reference.weights(0, average)):
                np.testing.assert_array_equal(a, b)
        history, reference_history = cluster.history(index), reference.history(0)
        assert history == {**reference_history, "train_seconds": history["train_seconds"]}
    assert (workdir / "finished.json").exists() and not (workdir / "backup").exists()
    with open(workdir / "history.csv") as f:
        assert len(f.read().splitlines()) == 3  # a header and one row per epoch, none twice


@pytest.mark.slow
def test_every_worker_stops_when_the_chief_refuses_the_workdir(tmp_path):
    workdir = tmp_path / "finished"
    workdir.mkdir()
    (workdir / "config.yaml").write_text("{}\n")
    (workdir / "report.json").write_text("{}\n")
    cluster = Cluster(tmp_path, workdir)
    try:
        codes = cluster.wait(timeout=180)
    finally:
        cluster.kill()
    assert codes == [2, 2], cluster.output()
    assert "holds a finished run" in cluster.output(0)
    assert "the chief refused workdir" in cluster.output(1)
    assert sorted(p.name for p in workdir.iterdir()) == ["config.yaml", "report.json"]


def test_missing_tf_config_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG") as info:
        experiment.train(load_config(CONFIG, dict(OVERRIDES, **{"runtime.strategy": "multi_worker"})),
                         str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, message", [
    ("", "not set"),
    ("{cluster", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', "'cluster'"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "'ps' job"),
    ('{"cluster": {"worker": ["a:1"]}}', "'task'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "not a job"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "0..1"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}', "task index"),
])
def test_malformed_tf_config_is_a_one_line_user_error(value, message):
    with pytest.raises(UserError, match=message) as info:
        parse_tf_config(value)
    assert "\n" not in str(info.value)


def test_scratch_dir_removes_what_killed_workers_of_its_task_left(tmp_path, monkeypatch):
    from tfrobust import multiworker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    stale = tmp_path / f"tfrobust-worker1-{dead_pid}-abc"
    alive = tmp_path / f"tfrobust-worker1-{os.getpid()}-def"  # a live process's: kept
    other_task = tmp_path / f"tfrobust-worker2-{dead_pid}-ghi"  # another task's: kept (its worker cleans it)
    for d in (stale, alive, other_task):
        d.mkdir()
        (d / "history.csv").write_text("x\n")
    cluster = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 1}}
    task = parse_tf_config(json.dumps(cluster))
    with multiworker.scratch_dir(task) as path:
        assert os.path.basename(path).startswith(f"tfrobust-worker1-{os.getpid()}-")
        assert not stale.exists() and alive.exists() and other_task.exists()
    assert not os.path.exists(path)


def test_chief_and_worker_numbering():
    cluster = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    chief = parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}}))
    worker = parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert (chief.is_chief, chief.id_in_cluster, chief.num_workers) == (True, 0, 3)
    assert (worker.is_chief, worker.id_in_cluster) == (False, 2)
    first = parse_tf_config(json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}))
    assert first.is_chief


def test_is_chief_reads_tf_config(monkeypatch):
    workers = {"worker": ["a:1", "b:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": workers, "task": {"type": "worker", "index": 1}}))
    assert not is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": workers, "task": {"type": "worker", "index": 0}}))
    assert is_chief()


def _batches(sizes):
    data = np.arange(sum(sizes))
    starts = np.cumsum([0] + list(sizes))
    return tf.data.Dataset.from_generator(
        lambda: ((data[a:b], -data[a:b]) for a, b in zip(starts[:-1], starts[1:])),
        output_signature=(tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)),
    )


def test_replica_batches_are_contiguous_chunks_of_each_global_batch():
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    chunks = [(x.numpy().tolist(), y.numpy().tolist()) for x, y in replica_batches(_batches([8, 6]), context)]
    # Pipeline 1 feeds replicas 2 and 3: the third and fourth quarter of each global batch.
    assert chunks == [([4, 5], [-4, -5]), ([6, 7], [-6, -7]), ([11], [-11]), ([12, 13], [-12, -13])]


def test_replica_batches_reach_the_replicas_in_order():
    from tfrobust.config import RuntimeConfig

    strategy = experiment.build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))
    dataset = strategy.distribute_datasets_from_function(lambda ctx: replica_batches(_batches([4, 4]), ctx))

    def tagged(batch):
        return tf.distribute.get_replica_context().replica_id_in_sync_group, batch[0]

    seen = []
    for batch in dataset:
        ids, xs = strategy.run(tagged, args=(batch,))
        seen.append([(int(i), x.numpy().tolist())
                     for i, x in zip(strategy.experimental_local_results(ids), strategy.experimental_local_results(xs))])
    assert seen == [[(0, [0, 1]), (1, [2, 3])], [(0, [4, 5]), (1, [6, 7])]]


class CallRecorder(keras.callbacks.Callback):
    """Records every call it gets: (hook, epoch or batch index, sorted log keys), and the epoch logs.

    With ``stop_at=(epoch, batch)`` it asks training to stop after that batch, as the NaN guard does.
    """

    def __init__(self, stop_at=None):
        super().__init__()
        self.calls, self.epoch_logs = [], []
        self.stop_at, self.epoch = stop_at, None

    def _record(self, hook, index=None, logs=None):
        self.calls.append((hook, index, sorted(logs) if logs is not None else None))
        if hook == "on_epoch_end":
            self.epoch_logs.append(dict(logs))

    def on_train_begin(self, logs=None):
        self._record("on_train_begin", None, logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._record("on_epoch_begin", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._record("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._record("on_train_batch_end", batch, logs)
        if (self.epoch, batch) == self.stop_at:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self._record("on_test_begin", None, logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._record("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self._record("on_test_batch_end", batch, logs)

    def on_test_end(self, logs=None):
        self._record("on_test_end", None, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._record("on_epoch_end", epoch, logs)

    def on_train_end(self, logs=None):
        self._record("on_train_end", None, logs)


@pytest.mark.slow
def test_the_custom_loop_makes_the_calls_and_logs_of_fit(tmp_path):
    """fit_distributed under MirroredStrategy (two logical CPUs) against fit on the same strategy and data.

    Of 3 epochs, a callback stops training after the first batch of the second, as the NaN guard does:
    both loops leave the epoch at once, still validate and end it, and run no third epoch.
    """
    from tfrobust.multiworker import build_optimizer, fit_distributed

    config = load_config(CONFIG, dict(OVERRIDES, **{"runtime.strategy": "mirrored", "runtime.devices": "/cpu:0,/cpu:1",
                                                   "eval.images_every": 0, "eval.flatness_every": 0}))
    runs = {}
    for loop in ("fit", "custom"):
        keras.utils.set_random_seed(config.runtime.seed)
        model, datasets, strategy = experiment.build(config)
        recorder = CallRecorder(stop_at=(1, 0))
        steps = datasets.train_size // config.data.batch_size
        if loop == "fit":
            model.fit(datasets.train_epochs(0, 3), epochs=3, steps_per_epoch=steps, validation_data=datasets.validation,
                      callbacks=[recorder], verbose=0)
        else:
            build_optimizer(model, strategy)
            fit_distributed(model, strategy, datasets.train_epochs(0, 3), epochs=3, steps_per_epoch=steps,
                            validation=datasets.validation,
                            validation_steps=-(-datasets.validation_size // config.data.eval_batch_size),
                            callbacks=[recorder])
        runs[loop] = recorder, [v.numpy() for v in model.weights]
    (fit_recorder, fit_weights), (custom_recorder, custom_weights) = runs["fit"], runs["custom"]
    # The same hooks in the same order with the same indices and log keys.
    assert custom_recorder.calls == fit_recorder.calls
    assert steps > 1 and [c[1] for c in custom_recorder.calls if c[0] == "on_epoch_end"] == [0, 1]
    second = next(i for i, c in enumerate(custom_recorder.calls) if c[:2] == ("on_epoch_begin", 1))
    assert [c[1] for c in custom_recorder.calls[second:] if c[0] == "on_train_batch_end"] == [0]
    assert custom_recorder.calls[-1][0] == "on_train_end"
    # The same computation on the same replica batches, with the logs reduced the same way (a mean over
    # the replicas). The two loops trace different functions around the same step, so the compiled
    # graphs may round differently in the last bits; 1e-5 is far below what a training step moves.
    for a, b in zip(custom_recorder.epoch_logs, fit_recorder.epoch_logs):
        np.testing.assert_allclose([a[k] for k in sorted(a)], [float(b[k]) for k in sorted(a)], rtol=0, atol=1e-5)
    for a, b in zip(custom_weights, fit_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
