"""An imported network trains like any tfrobust network: `train --model FILE.keras` fine-tunes it with a
weight-space defense, the BatchNorm mode of the attack does what docs/algorithms.md says, and the
fine-tuned network exports in the published names again."""

import json
import os

import keras
import numpy as np
import pytest

from tfrobust import RobustModel
from tfrobust.cli import train_main
from tfrobust.commands import main
from tfrobust.defenses import Defense
from tfrobust.zoo import checkpoints, convert

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "zoo")
ARCH = "dm_wide_resnet-10-2"
CHECKPOINT = os.path.join(FIXTURES, ARCH + ".safetensors")


def _moving_statistics(network):
    return {v.path: v.numpy() for v in network.non_trainable_variables if "moving" in v.path}


def test_the_training_attack_leaves_every_variable_as_it_was_in_either_batchnorm_mode():
    # docs/algorithms.md, section 1: "eval" attacks with the moving statistics, "train" with the batch's,
    # and in both modes the attack leaves every variable, moving statistics included, exactly as it was.
    network = convert.import_model(CHECKPOINT, ARCH, "cifar10")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
    y = np.arange(8) % 10
    x_init = np.clip(x + 0.001 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)  # TRADES' start
    before = [v.numpy() for v in network.variables]
    adversarial = {}
    for mode in ("eval", "train"):
        model = RobustModel(network, Defense("trades+awp", awp_warmup_epochs=0), eps=8 / 255, step_size=2 / 255, steps=2, bn_mode=mode)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        adversarial[mode] = np.asarray(model.adversarial_examples(x, y, x_init=x_init))
        for variable, value in zip(network.variables, before):
            np.testing.assert_array_equal(variable.numpy(), value, err_msg=f"{mode}: {variable.path}")
        assert np.max(np.abs(adversarial[mode] - x)) <= 8 / 255 + 1e-6  # float32 rounding of the projection
    # The fixture's moving statistics are far from this batch's, so the two modes ascend different losses: about
    # half the pixels differ here; 0.1 only asks that the mode matters, whatever the CPU's rounding.
    assert np.mean(adversarial["eval"] != adversarial["train"]) > 0.1


@pytest.mark.slow
def test_an_imported_network_fine_tunes_with_trades_awp_from_the_command_line_and_exports_again(tmp_path, capsys):
    imported = str(tmp_path / "imported.keras")
    assert main(["import-model", CHECKPOINT, "--arch", ARCH, "--output", imported]) == 0
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    y = np.arange(48) % 10
    data = str(tmp_path / "d.npz")
    np.savez(data, x_train=x[:32], y_train=y[:32], x_test=x[32:], y_test=y[32:])
    workdir = str(tmp_path / "run")
    argv = ["--data", data, "--model", imported, "--defense", "trades+awp", "--epochs", "1", "--workdir", workdir,
            "--no-eval"]
    for item in ("defense.awp.warmup_epochs=0", "data.validation_examples=0", "data.batch_size=32", "attack.steps=1",
                 "attack.bn_mode=train", "eval.pgd_steps=1", "eval.integrity_examples=0", "eval.images_every=0",
                 "runtime.verbose=0"):
        argv += ["--set", item]
    assert train_main(argv) == 0
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert history["awp_relative_norm"][0] > 0 and np.isfinite(history["loss"][0])  # AWP perturbed the weights

    start, tuned = keras.models.load_model(imported), keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert [w.path for w in tuned.weights] == [w.path for w in start.weights]
    assert all(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(tuned.trainable_weights, start.trainable_weights))
    # The update pass runs BatchNorm in training mode, so its moving statistics moved towards this data's.
    moved, kept = _moving_statistics(tuned), _moving_statistics(start)
    assert len(moved) == 2 * 7 and all(not np.array_equal(moved[k], kept[k]) for k in kept)  # 7 BatchNorms
    assert convert.normalisation(tuned) == convert.normalisation(start)  # CIFAR-10's, inside the network

    # The fine-tuned run exports in the checkpoint's names and shapes, and imports back to the same logits.
    exported = str(tmp_path / "tuned.safetensors")
    assert main(["export-model", workdir, "--format", "safetensors", "--output", exported]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {exported}: {ARCH}, ")
    original, written = checkpoints.read_state_dict(CHECKPOINT), checkpoints.read_state_dict(exported)
    # PyTorch's BatchNorm also has num_batches_tracked, which a strict load_state_dict needs and the fixture lacks.
    shapes = {k: v.shape for k, v in written.items() if not k.endswith(".num_batches_tracked")}
    assert shapes == {k: v.shape for k, v in original.items()} and len(written) == len(original) + 7
    back = convert.import_model(exported, ARCH, "cifar10")
    images = x[32:].astype(np.float32) / 255
    np.testing.assert_array_equal(np.asarray(back(images, training=False)), np.asarray(tuned(images, training=False)))
