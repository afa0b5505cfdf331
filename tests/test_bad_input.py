"""Bad input from a hostile user: one line naming the file or value, exit status 2, nothing left behind.

Each case is refused before any training; the run directory it named does
not exist afterwards, so the corrected command starts cleanly.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfrobust import extra_data
from tfrobust.cli import train_main
from tfrobust.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--epochs", "1", "--set", "data.validation_examples=20", "--set", "data.batch_size=50"]


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def run_cli(script, argv, cwd, **kwargs):
    """Runs ``python <script> argv`` in a fresh interpreter; returns (exit status, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command sets its own
    done = subprocess.run([sys.executable, os.path.join(ROOT, script)] + argv, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)
    return done.returncode, done.stderr


def images(n, seed=0, shape=(28, 28)):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def data_npz(path, n_train=150, n_test=50, y_train=None, y_test=None):
    x = images(n_train + n_test)
    y = np.arange(n_train + n_test) % 10
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train] if y_train is None else y_train,
             x_test=x[n_train:], y_test=y[n_train:] if y_test is None else y_test)
    return str(path)


# ---------------------------------------------------------------------------
# Extra-data pools: checked as --data arrays are, cached by content

BAD_POOLS = {
    "float pool in 0..255": (dict(image=images(50).astype(np.float32)),
                             "holds non-uint8 images with values in [0, 255], outside [0, 1]; divide 0..255 images by 255"),
    "all-NaN pool": (dict(image=np.full((50, 28, 28), np.nan, np.float32)), "holds NaN pixels"),
    "empty pool": (dict(image=np.zeros((0, 28, 28), np.uint8), label=np.zeros(0, np.int64)),
                   "image.npy is empty (shape (0, 28, 28)); need at least one image"),
    "mis-shaped pool": (dict(image=np.zeros((5, 28), np.uint8), label=np.zeros(5, np.int64)),
                        "must hold images of shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got (5, 28)"),
    "string labels": (dict(image=images(30), label=np.array(["cat"] * 30)), "has labels of type <U3; need integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_POOLS))
def test_a_bad_pool_is_refused_and_leaves_no_cache(case, tmp_path):
    arrays, message = BAD_POOLS[case]
    path = str(tmp_path / "pool.npz")
    np.savez(path, **arrays)
    with pytest.raises(UserError) as refused:
        extra_data.prepare_pool(path)
    assert str(refused.value).startswith(f"extra data {path}") and message in str(refused.value)
    assert os.listdir(tmp_path) == ["pool.npz"]  # no <pool>.cache to be trusted on the next run


def test_a_replaced_pool_or_new_labels_are_never_read_from_a_stale_cache(tmp_path):
    path = str(tmp_path / "pool.npz")
    np.savez(path, image=images(300, seed=1), label=np.arange(300) % 10)
    cache = extra_data.prepare_pool(path)
    first = extra_data.open_pool(cache, (28, 28, 1), 10)
    assert len(first[0]) == 300
    new_images, new_labels = images(500, seed=2), (np.arange(500) * 7) % 10
    np.savez(path, image=new_images, label=new_labels)  # a new pool at the same path
    images_now, labels_now = extra_data.open_pool(extra_data.prepare_pool(path), (28, 28, 1), 10)
    np.testing.assert_array_equal(images_now, new_images)
    np.testing.assert_array_equal(labels_now, new_labels)
    relabelled = (new_labels + 1) % 10
    np.savez(path, image=new_images, label=relabelled)  # new pseudo-labels, the same images
    np.testing.assert_array_equal(extra_data.open_pool(extra_data.prepare_pool(path), (28, 28, 1), 10)[1], relabelled)
    np.savez(path, image=new_images)  # the labels dropped: the pool is unlabelled now
    assert not extra_data.has_labels(path)
    assert extra_data.open_pool(extra_data.prepare_pool(path), (28, 28, 1), 10)[1] is None
    os.remove(path)  # the .npz gone: its prepared cache is used as it is
    assert extra_data.prepare_pool(path) == cache


def test_pseudo_label_refuses_a_bad_pool_in_one_line(tmp_path):
    from conftest import tiny_cnn

    tiny_cnn().save(str(tmp_path / "m.keras"))
    np.savez(tmp_path / "f255.npz", image=images(40).astype(np.float32))
    code, err = run_cli("pseudo_label.py", ["--model", "m.keras", "--data", "f255.npz", "--output", "out.npz"], tmp_path)
    assert code == 2 and err.splitlines() == [
        "error: f255.npz holds non-uint8 images with values in [0, 255], outside [0, 1]; divide 0..255 images by "
        "255 (or store them as uint8), or scale them to [0, 1]"], err
    assert sorted(os.listdir(tmp_path)) == ["f255.npz", "m.keras"]  # nothing written, no partial output


# ---------------------------------------------------------------------------
# The user's data and network, refused before training

NETS = '''
import keras


def net(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))


def raises(input_shape, num_classes):
    raise RuntimeError("my network is not ready")


def other_names(shape, classes):
    return net(shape, classes)


def two_outputs(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    h = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, [keras.layers.Dense(num_classes)(h), keras.layers.Dense(num_classes)(h)])
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory with a data set d.npz and the user's module nets_<n>.py (a fresh name per test)."""
    name = f"nets_{os.path.basename(tmp_path)}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(NETS)
    (tmp_path / "broken_at_import.py").write_text("1 / 0\n")
    data_npz(tmp_path / "d.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


CASES = [
    (["--model", "{nets}:raises"], "model factory '{nets}:raises' raised RuntimeError: my network is not ready"),
    (["--model", "{nets}:other_names"], "model factory '{nets}:other_names': {nets}.other_names must take the "
     "keyword arguments input_shape= and num_classes= (missing a required argument: 'shape')"),
    (["--model", "{nets}:two_outputs"], "model '{nets}:two_outputs': network 'functional"),
    (["--model", "broken_at_import:net"],
     "model factory 'broken_at_import:net': importing 'broken_at_import' raised ZeroDivisionError: division by zero"),
    (["--set", "data.extra_data=nan_pool.npz"], "extra data nan_pool.npz holds NaN pixels; need uint8 images or "
     "floats in [0, 1]"),
    (["--set", "data.mean=[a]"], "data.mean and data.std need a list of numbers (one per channel), got ['a'] and None"),
    (["--set", "eval.pgd_steps=0"], "eval.pgd_steps must be >= 1"),
    (["--seed", str(2**70)], f"config key 'runtime.seed' is too large: {2**70}"),
    (["--workdir", "w\udcff"], "--workdir b'w\\xff' is not a UTF-8 name; TensorFlow writes only UTF-8 paths, rename it"),
    (["--data", "empty.npz"], "empty.npz is empty (0 bytes)"),
    (["--data", "./images"], "./images/b/9.png is not a readable image; remove it or replace it"),
    (["--model", "random.keras"], "random.keras cannot be loaded as a Keras model: it is not a .keras file (not a "
     "zip archive; damaged, truncated or of another format)"),
    (["--data", "text.npz"], "text.npz is not a .npz file (not a zip archive of .npy arrays; save it with numpy.savez)"),
    (["--data", "no_test.npz"], "data no_test.npz has no test images"),
    (["--data", "words.npz"], "words.npz x_train/y_train has labels of type <U4; need integer class labels 0..K-1"),
    (["--data", "sparse.npz"], "data sparse.npz has labels up to 100000000, more classes than its 200 examples; "
     "number the classes 0..K-1"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[c[1][:40] for c in CASES])
def test_train_refuses_bad_data_and_user_code_before_training(argv, message, user_dir, capsys):
    open("empty.npz", "wb").close()
    with open("text.npz", "w") as f:
        f.write("x_train,y_train\n")
    data_npz("no_test.npz", n_test=0)
    data_npz("words.npz", y_train=np.array(["boot"] * 150), y_test=np.array(["boot"] * 50))
    data_npz("sparse.npz", y_train=np.where(np.arange(150) == 3, 10**8, np.arange(150) % 10))
    np.savez("nan_pool.npz", image=np.full((40, 28, 28), np.nan, np.float32), label=np.zeros(40, np.int64))
    with open("random.keras", "wb") as f:
        f.write(np.random.default_rng(0).bytes(3000))
    for i, name in enumerate(["a/0.png", "a/1.png", "b/2.png", "b/3.png", "b/9.png"]):
        os.makedirs(os.path.dirname(f"images/{name}"), exist_ok=True)
        with open(f"images/{name}", "wb") as f:  # the last one is no image
            f.write(tf.io.encode_png(np.full((8, 8, 1), 40 * i, np.uint8)).numpy() if i < 4 else b"not an image")
    argv = [a.format(nets=user_dir) for a in argv]
    if "--data" not in argv:
        argv += ["--data", "d.npz"]
    if "--workdir" not in argv:
        argv += ["--workdir", "w"]
    code, err = run_main(train_main, SMALL + argv, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message.format(nets=user_dir)}"), err
    if "two_outputs" in argv[1]:  # Keras numbers the network's name (functional_7) within one process
        assert "' has 1 input and 2 outputs; tfrobust supports one input" in err
    assert not os.path.exists("w") and not os.path.exists("nan_pool.npz.cache")


def test_an_internal_error_still_shows_its_traceback(user_dir, monkeypatch):
    from tfrobust import models

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in tfrobust")

    monkeypatch.setattr(models, "check_model_name", bug)
    with pytest.raises(RuntimeError, match="a bug in tfrobust"):  # not turned into a one-line user error
        train_main(SMALL + ["--data", "d.npz", "--workdir", "w"])


# ---------------------------------------------------------------------------
# A damaged run directory: one line, every file left as it was

def _damage(kind, run):
    lock, state = run / "run.lock", run / "backup" / "state.json"
    if kind == "config.yaml not YAML":
        (run / "config.yaml").write_text("optim: [0.1\n")
    elif kind == "config.yaml not UTF-8":
        (run / "config.yaml").write_bytes("optim:\n  lr: 0.1  # r\xe9glage\n".encode("latin-1"))
    elif kind == "config.yaml a list":
        (run / "config.yaml").write_text("- 1\n- 2\n")
    elif kind == "config.yaml deleted":
        (run / "config.yaml").unlink()
    elif kind == "state.json a list":
        state.write_text("[1, 2]")
    elif kind == "state.json of wrong types":
        state.write_text('{"epoch": "x", "weights": 3}')
    elif kind == "lock pid 2**40":
        lock.write_text(f"{2**40} {socket.gethostname()}\n")


RUN_DAMAGE = {
    "config.yaml not YAML": "w/config.yaml is damaged (not valid YAML); it records the run's config: restore it "
                            "(the training command with --print-config prints it)",
    "config.yaml not UTF-8": "w/config.yaml is damaged (not UTF-8 text);",
    "config.yaml a list": "w/config.yaml is damaged (a YAML list, not a mapping of config keys);",
    "config.yaml deleted": "workdir w holds an unfinished run whose config.yaml is missing (its backup is there); to "
                           "resume it write the command's config there (the same command with --print-config > "
                           "w/config.yaml) or choose another --workdir",
    "state.json a list": "the backup w/backup/state.json is damaged (not a state with an epoch number and weight "
                         "file names); move the run directory aside and start again",
    "state.json of wrong types": "the backup w/backup/state.json is damaged",
    "lock pid 2**40": "workdir w has an unreadable lock ",  # then its path: "if no process is using it, remove ..."
}


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("kind", sorted(RUN_DAMAGE))
def test_a_damaged_run_directory_is_refused_in_one_line_and_left_as_it_was(kind, user_dir, capsys):
    argv = SMALL + ["--data", "d.npz", "--workdir", "w"]
    assert train_main(argv + ["--print-config"]) == 0
    config = capsys.readouterr().out
    os.makedirs("w/backup")
    with open("w/config.yaml", "w") as f:
        f.write(config)  # an unfinished run of this very command, one epoch backed up
    with open("w/backup/state.json", "w") as f:
        json.dump({"epoch": 1, "weights": "epoch-00001.weights.h5", "best_weights": None, "callbacks": {}}, f)
    open("w/backup/epoch-00001.weights.h5", "wb").close()
    _damage(kind, Path("w"))
    before = _files("w")
    code, err = run_main(train_main, argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {RUN_DAMAGE[kind]}"), err
    assert _files("w") == before
    if kind == "config.yaml deleted":  # the advice works: the run then resumes (and stops at its first step here)
        assert train_main(argv + ["--print-config"]) == 0
        with open("w/config.yaml", "w") as f:
            f.write(capsys.readouterr().out)
        code, err = run_main(train_main, argv, capsys)
        assert "the backup in w/backup cannot be loaded" in err  # the empty weights file, reached at last


# ---------------------------------------------------------------------------
# Stopping: Ctrl-C and SIGTERM print the command that resumes, as the user typed it

@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
@pytest.mark.parametrize("via", ["tfrobust train", "train.py"])
def test_a_stopped_run_prints_the_command_the_user_ran(how, via, monkeypatch, capsys, tmp_path):
    import shlex
    import signal
    import time

    from tfrobust import commands, experiment

    def stopped(*args, **kwargs):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled as Python handles Ctrl-C
        time.sleep(30)
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(experiment, "train_and_evaluate", stopped)
    flags = ["--epochs", "1", "--workdir", str(tmp_path / "w")]
    monkeypatch.setattr(sys, "argv", ["/opt/tfrobust/train.py"] + flags)
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["train"] + flags) if via == "tfrobust train" else train_main()
    err = capsys.readouterr().err
    what, _, command = err.strip().partition("; resume with: ")
    assert err.count("\n") == 1 and what == ("terminated" if how == "sigterm" else "interrupted"), err
    assert exit_info.value.code == (143 if how == "sigterm" else 130)
    expected = ["tfrobust", "train"] if via == "tfrobust train" else [sys.executable, "/opt/tfrobust/train.py"]
    assert shlex.split(command) == expected + flags
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler lives as long as the command


# ---------------------------------------------------------------------------
# Printing a config runs none of its code

def test_print_config_never_imports_the_configs_plugins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "side_effect.py").write_text("open('imported', 'w').close()\n")
    (tmp_path / "c.yaml").write_text("plugins: [side_effect.py]\noptim:\n  epochs: 3\n")
    assert train_main(["--config", "c.yaml", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "plugins:\n- side_effect.py\n" in printed and "epochs: 3" in printed
    assert not os.path.exists("imported")
    code, err = run_main(train_main, ["--config", "c.yaml", "--defense", "at+toy", "--print-config"], capsys)
    assert code == 2 and err.splitlines() == [
        "error: unknown weight-space term in defense 'at+toy': 'toy'; allowed: awp, elle, elle_a, gradalign, rat, s2o "
        "(a plug-in's term: load its module with --plugin MODULE); --print-config does not import the plug-ins (side_effect.py)"], err
    assert not os.path.exists("imported")


def test_evaluate_refuses_bad_files_and_seeds_in_one_line(tmp_path, capsys):
    from tfrobust.cli import evaluate_main

    random = tmp_path / "random.keras"
    random.write_bytes(np.random.default_rng(0).bytes(3000))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"data: {name: \xff}\n")
    cases = [
        (["--model", str(random)], f"error: {random} cannot be loaded as a Keras model: it is not a .keras file"),
        (["--model", str(run)], f"error: {run}/config.yaml is damaged (not UTF-8 text); it records the run's config"),
        (["--model", str(random), "--seed", str(2**70)], f"error: --seed must be between 0 and 2147483647, got {2**70}"),
    ]
    for argv, message in cases:
        code, err = run_main(evaluate_main, argv + ["--attacks", "clean"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err


def test_a_saved_robust_model_as_model_trains_on_from_its_evaluated_network(tmp_path):
    import keras

    import tfrobust as tr
    from conftest import tiny_cnn
    from tfrobust import models

    robust = tr.RobustModel(tiny_cnn(), "at", eps=0.1, step_size=0.05, steps=1)
    robust.compile(optimizer="sgd")
    robust.save(str(tmp_path / "robust.keras"))
    network = models.user_network(str(tmp_path / "robust.keras"), (28, 28, 1), 10)
    assert not isinstance(network, tr.RobustModel) and isinstance(network, keras.Model)
    for mine, saved in zip(network.get_weights(), robust.evaluated_network().get_weights()):
        np.testing.assert_array_equal(mine, saved)


# ---------------------------------------------------------------------------
# The library refuses what it would otherwise ignore, truncate or clip

def _net():
    import keras

    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))


LIBRARY_CASES = {
    "None network": (lambda tr: tr.RobustModel(None, "at", eps=0.1, step_size=0.02, steps=1),
                     "RobustModel needs a keras.Model (images in [0, 1] -> logits) as its network, got NoneType"),
    "beta nan": (lambda tr: tr.Defense("trades", beta=float("nan")), "defense.beta must be finite, got nan"),
    "awp_gamma without AWP": (lambda tr: tr.Defense("at", awp_gamma=0.02),
                              "defense 'at' has no awp term, so awp_gamma=0.02 would be ignored; use "
                              "Defense('at+awp', awp_gamma=0.02) or leave awp_gamma out"),
    "steps_per_epoch -5": (lambda tr: tr.RobustModel(_net(), "at", eps=0.1, step_size=0.02, steps=1, steps_per_epoch=-5),
                           "steps_per_epoch must be between 1 and 2147483647, got -5"),
}


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_library_calls_refuse_values_that_would_be_ignored_or_changed(case):
    import tfrobust as tr

    call, message = LIBRARY_CASES[case]
    with pytest.raises(UserError) as refused:
        call(tr)
    assert str(refused.value) == message


def test_fit_refuses_float_labels_and_0_255_images():
    import tfrobust as tr

    model = tr.RobustModel(_net(), "at", eps=0.1, step_size=0.02, steps=1)
    model.compile(optimizer="sgd")
    x = np.random.default_rng(0).random((12, 8, 8, 1)).astype(np.float32)
    y = np.arange(12) % 3
    with pytest.raises(UserError, match=r"labels must be integer class indices of shape \(N,\), got float64 values"):
        model.fit(x, y + 0.5, epochs=1, verbose=0)  # would be truncated to y
    with pytest.raises(UserError, match=r"x holds values in \[.*\], outside \[0, 1\].*divide images stored as 0..255 "
                                        "by 255"):
        model.fit(x * 255, y, epochs=1, verbose=0)
    assert tr.Defense(**tr.Defense("at").hyperparameters()) == tr.Defense("at")  # defaults of absent terms pass
    assert model.fit(x, y.astype(np.float32), epochs=1, verbose=0).history["loss"]  # whole-number floats train


BRITTLE = '''
from tfrobust.defense_names import register_term
from tfrobust.defenses import WeightSpaceTerm


class Brittle(WeightSpaceTerm):
    def __init__(self, defense, name):
        raise ValueError("brittle needs a GPU")


register_term("brittle", Brittle, bases=("at",))
'''


def test_a_plugin_term_that_fails_is_one_line_naming_its_class_and_message(user_dir, capsys):
    from tfrobust.defense_names import unregister_term

    with open("brittle_term.py", "w") as f:
        f.write(BRITTLE)
    try:
        code, err = run_main(train_main, SMALL + ["--data", "d.npz", "--plugin", "brittle_term.py", "--defense",
                                                  "at+brittle", "--workdir", "w"], capsys)
    finally:
        unregister_term("brittle")
    assert code == 2 and err.splitlines() == [
        "error: weight-space term 'brittle' (brittle_term.py:Brittle) raised ValueError: brittle needs a GPU"], err
    assert not os.path.exists("w")
