"""A whole run: config -> data -> fit -> checkpoints, TensorBoard, export -> test report."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfrobust import experiment
from tfrobust.config import load_config
from tfrobust.errors import UserError


def tiny_config(**extra):
    overrides = {
        "data.train_examples": 256, "data.validation_examples": 64, "data.test_examples": 100,
        "data.batch_size": 64, "attack.steps": 2, "eval.pgd_steps": 3, "optim.epochs": 2,
        "runtime.verbose": 0,
    }
    overrides.update(extra)
    return load_config("configs/fashion_mnist.yaml", overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "at")
    report = experiment.train_and_evaluate(tiny_config(), workdir, verbose=False)
    return workdir, report


@pytest.mark.slow
def test_run_directory_contents(finished_run):
    workdir, report = finished_run
    for name in ("config.yaml", "history.csv", "history.json", "model.keras", "best.keras", "report.json",
                 "checkpoints/last.weights.h5", "checkpoints/best.weights.h5",
                 "saved_model/saved_model.pb", "saved_model_best/saved_model.pb"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert not os.path.exists(os.path.join(workdir, "backup")), "a finished run keeps no backup"
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert len(history["loss"]) == 2
    for key in ("ce_adv", "clean_accuracy", "adv_accuracy", "val_pgd_accuracy", "val_clean_accuracy", "learning_rate"):
        assert key in history and len(history[key]) == 2, key
    # Each epoch logs the rate it trained with: 2 epochs of 4 steps, decay x0.1 at half of training
    # (step 4, the second epoch's first step) and at 3/4 (step 6, inside the second epoch).
    np.testing.assert_allclose(history["learning_rate"], [0.05, 0.005], rtol=1e-6)
    for which in ("last", "best"):
        acc = report["models"][which]["accuracy"]
        assert set(acc) == {"clean", "fgsm", "pgd3_ce", "pgd3_cw"}
        assert all(0.0 <= v <= 1.0 for v in acc.values())
        assert acc["pgd3_ce"] <= acc["clean"]


@pytest.mark.slow
def test_tensorboard_has_metrics_and_learning_rate(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = finished_run
    train = EventAccumulator(os.path.join(workdir, "tensorboard", "train")).Reload()
    tags = set(train.Tags()["scalars"]) | set(train.Tags().get("tensors", []))
    for tag in ("epoch_loss", "epoch_ce_adv", "epoch_adv_accuracy", "epoch_learning_rate"):
        assert tag in tags, (tag, tags)
    validation = EventAccumulator(os.path.join(workdir, "tensorboard", "validation")).Reload()
    vtags = set(validation.Tags()["scalars"]) | set(validation.Tags().get("tensors", []))
    assert "epoch_pgd_accuracy" in vtags


@pytest.mark.slow
def test_saved_model_serves_the_same_logits(finished_run):
    import keras

    workdir, _ = finished_run
    network = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    served = tf.saved_model.load(os.path.join(workdir, "saved_model"))
    x = np.random.default_rng(0).random((5, 28, 28, 1)).astype("float32")
    logits = served.serve(tf.constant(x))["logits"]
    np.testing.assert_allclose(logits.numpy(), network(x).numpy(), rtol=1e-5, atol=1e-5)
    assert list(served.signatures["serving_default"].structured_input_signature[1]) == ["images"]


@pytest.mark.slow
def test_best_checkpoint_is_chosen_on_validation(finished_run):
    workdir, _ = finished_run
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    import keras

    from tfrobust.data import load_datasets

    best_epoch = int(np.argmax(history["val_pgd_accuracy"]))
    cfg = tiny_config()
    datasets = load_datasets(cfg.data, seed=cfg.runtime.seed)
    model, _, _ = experiment.build(cfg, datasets)
    model.load_weights(os.path.join(workdir, "checkpoints", "best.weights.h5"))
    result = model.evaluate(datasets.validation, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["pgd_accuracy"], history["val_pgd_accuracy"][best_epoch], atol=1e-6)
    best = keras.saving.load_model(os.path.join(workdir, "best.keras"))
    for a, b in zip(best.weights, model.network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_finished_run_is_never_overwritten(finished_run):
    workdir, _ = finished_run
    before = os.path.getmtime(os.path.join(workdir, "model.keras"))
    with pytest.raises(UserError, match="holds a finished run"):
        experiment.train(tiny_config(), workdir)
    assert os.path.getmtime(os.path.join(workdir, "model.keras")) == before


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no tfrobust run"):
        experiment.train(tiny_config(), str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_cluster_run_takes_no_preloaded_datasets(tmp_path):
    cfg = tiny_config(**{"runtime.strategy": "multi_worker"})
    with pytest.raises(UserError, match="no preloaded datasets"):
        experiment.train(cfg, str(tmp_path / "run"), datasets=object())
    assert not os.path.exists(tmp_path / "run")


def test_learning_rate_schedule_is_piecewise():
    cfg = tiny_config(**{"optim.epochs": 4, "optim.lr": 0.1})
    schedule = experiment.learning_rate_schedule(cfg.optim, steps_per_epoch=10)
    values = [float(schedule(step)) for step in (0, 19, 20, 29, 30, 39)]
    np.testing.assert_allclose(values, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


@pytest.mark.slow
def test_tensorboard_images_and_hparams(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = finished_run
    images = EventAccumulator(os.path.join(workdir, "tensorboard", "images"), size_guidance={"tensors": 0}).Reload()
    tags = images.Tags()
    assert "clean_and_adversarial" in tags.get("tensors", []) + tags.get("images", [])
    events = images.Tensors("clean_and_adversarial") if "clean_and_adversarial" in tags.get("tensors", []) else images.Images("clean_and_adversarial")
    assert [e.step for e in events] == [0, 1]
    hparams = EventAccumulator(os.path.join(workdir, "tensorboard", "hparams")).Reload()
    assert hparams.PluginTagToContent("hparams"), "no hparams summary"
