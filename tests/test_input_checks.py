"""Bad input and broken models: one-line errors (exit 2 on the command line), found before time is spent,
and never an accuracy computed from NaN outputs."""

import errno
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import evaluation
from tfrobust.cli import evaluate_main, train_main
from tfrobust.errors import UserError


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.fixture(scope="module")
def data():
    from tfrobust.data import load_test_arrays

    return load_test_arrays("fashion_mnist", limit=40)


@pytest.fixture(scope="module")
def network():
    return tiny_cnn()


def model_fn_of(net):
    return lambda x: net(x, training=False)


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": float("nan")}, "eps must be finite"),
    ({"eps": float("inf")}, "eps must be finite"),
    ({"eps": "0.1"}, "eps must be a number"),
    ({"eps": np.array([0.1, 0.2])}, "eps must be a single number"),
    ({"eps": -0.1}, "eps must be >= 0"),
    ({"eps": 0.1, "step_size": float("nan")}, "step_size must be finite"),
    ({"eps": 0.1, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"eps": 0.1, "integrity_examples": -1}, "integrity_examples must be an integer >= 0"),
    ({"eps": 0.1, "attacks": ["pgd0_ce"]}, "between 1 and 1000"),
    ({"eps": 0.1, "attacks": ["pgd100000_ce"]}, "between 1 and 1000"),
])
def test_evaluate_api_refuses_bad_arguments(kwargs, message, data, network):
    x, y = data
    with pytest.raises(UserError, match=message) as info:
        evaluation.evaluate(model_fn_of(network), x, y, verbose=False, **kwargs)
    assert "\n" not in str(info.value)


def test_evaluate_api_data_and_model_mismatches(data, network):
    x, y = data
    with pytest.raises(UserError, match="x has 40 examples but y has 39 labels"):
        evaluation.evaluate(model_fn_of(network), x, y[:-1], 0.1, verbose=False)
    rgb = tiny_cnn(input_shape=(32, 32, 3))
    with pytest.raises(UserError, match=r"cannot take the data's images of shape \(28, 28, 1\)"):
        evaluation.evaluate(model_fn_of(rgb), x, y, 0.1, verbose=False)
    five = tiny_cnn(num_classes=5)
    with pytest.raises(UserError, match="outputs 5 classes but the labels go up to 9"):
        evaluation.evaluate(model_fn_of(five), x, y, 0.1, verbose=False)
    with pytest.raises(UserError, match=r"outputs shape \(2,\)"):
        evaluation.evaluate(lambda t: tf.reduce_sum(network(t), axis=-1), x, y, 0.1, verbose=False)
    # A tensor eps is a number like any other.
    report = evaluation.evaluate(model_fn_of(network), x, y, tf.constant(0.1), attacks=["clean"], verbose=False)
    assert report["eps"] == pytest.approx(0.1)


def test_nan_outputs_are_an_integrity_failure_never_an_accuracy(data, network):
    x, y = data
    with pytest.raises(evaluation.ModelIntegrityError, match="NaN or infinite on 40 of 40 test examples"):
        evaluation.evaluate(lambda t: network(t) * np.nan, x, y, 0.1, verbose=False)

    # Finite on the clean images (multiples of 1/255), NaN wherever an attack moved a pixel off that grid.
    def off_grid_nan(t):
        off = tf.reduce_max(tf.abs(t * 255.0 - tf.round(t * 255.0)), axis=[1, 2, 3]) > 1e-3
        return tf.where(off[:, None], np.nan, network(t))

    report = evaluation.evaluate(off_grid_nan, x, y, 0.1, attacks=["clean", "fgsm"], verbose=False)
    expected_clean = np.mean(np.argmax(network(x).numpy(), -1) == y)
    assert report["accuracy"]["clean"] == pytest.approx(expected_clean)
    assert report["accuracy"]["fgsm"] == 0.0  # NaN never counts as the right class (argmax would say class 0)
    assert report["non_finite_outputs"]["fgsm"] > 30  # all but images that FGSM left on the grid
    check = report["integrity"]["checks"][-1]
    assert check["name"] == "finite outputs" and not check["passed"] and not report["integrity"]["passed"]
    assert re.search(r"FAILED +finite outputs", evaluation.format_table(report))


def test_evaluate_cli_checks_before_any_work(tmp_path, capsys, monkeypatch):
    cases = [
        (["--eps", "nan"], "--eps must be finite"),
        (["--flatness-examples", "0"], "--flatness-examples must be > 0"),
        (["--flatness-restarts", "-1"], "--flatness-restarts must be > 0"),
        (["--integrity-examples", "-1"], "--integrity-examples must be >= 0"),
        (["--output", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--output", ""], "--output must not be empty"),
    ]
    for argv, message in cases:
        # --model names nothing usable: the argument errors must come first.
        code, err = run_main(evaluate_main, ["--model", "no/such/model", *argv], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)

    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    code, err = run_main(evaluate_main, ["--model", "no/such/model", "--output", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "cannot write in" in err and "Permission denied" in err


def test_evaluate_cli_nan_model_and_failed_output_write(tmp_path, capsys, monkeypatch, network):
    broken = tiny_cnn()
    for w in broken.weights:
        w.assign(w * np.nan)
    path = str(tmp_path / "nan.keras")
    broken.save(path)
    code, err = run_main(evaluate_main, ["--model", path, "--examples", "20", "--integrity-examples", "0"], capsys)
    assert code == 2 and "integrity failure" in err and len(err.strip().splitlines()) == 1

    good = str(tmp_path / "good.keras")
    network.save(good)
    from tfrobust import rundir

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "atomic_write", disk_full)
    out = tmp_path / "report.json"
    code, err = run_main(evaluate_main, ["--model", good, "--examples", "20", "--attacks", "clean",
                                         "--integrity-examples", "0", "--output", str(out)], capsys)
    last = err.strip().split("\r")[-1]  # after tqdm's progress lines, one error line
    assert code == 2 and last.startswith("error: cannot write --output") and "No space left on device" in last
    assert "\n" not in last
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--set", "optim.weight_decay=-0.0005"], "optim.weight_decay must be >= 0"),
    (["--set", "optim.decay_factor=-0.1"], "optim.decay_factor must be in (0, 1]"),
    (["--set", "optim.decay_at=[0.5,1.5]"], "optim.decay_at values are fractions of training in (0, 1), got 1.5"),
    (["--set", "optim.decay_at=0.5,abc"], "optim.decay_at needs numbers"),
    (["--set", "optim.lr=nan"], "config key 'optim.lr' must be finite, got nan"),
    (["--set", "attack.eps=inf"], "config key 'attack.eps' must be finite, got inf"),
    (["--set", "optim.epochs=100000000000000000000"], "config key 'optim.epochs' is too large"),
    (["--seed", "-3"], "runtime.seed must be >= 0"),
    (["--set", "attack.steps=100000"], "attack.steps must be <= 1000"),
    (["--workdir", ""], "--workdir must not be empty"),
])
def test_train_refuses_bad_values_in_one_line(argv, message, capsys, tmp_path):
    if "--workdir" not in argv:
        argv = argv + ["--workdir", str(tmp_path / "w")]
    code, err = run_main(train_main, argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "w")


def test_decay_at_as_comma_separated_numbers():
    from tfrobust.config import load_config

    cfg = load_config(None, {"optim.decay_at": "0.5,0.75", "runtime.devices": "CPU:0,CPU:1"})
    assert cfg.optim.decay_at == [0.5, 0.75]
    assert cfg.runtime.devices == ["CPU:0", "CPU:1"]


def test_bad_config_files_and_devices(tmp_path, capsys, monkeypatch):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("optim:\n  lr: 0.1  # r\xe9glage\n".encode("latin-1"))
    twice = tmp_path / "twice.yaml"
    twice.write_text("optim:\n  lr: 0.1\n  lr: 0.01\n")
    locked = tmp_path / "locked.yaml"
    locked.write_text("optim:\n  lr: 0.1\n")
    cases = [
        (["--config", str(latin)], "is not UTF-8 text"),
        (["--config", str(twice)], "config key 'lr' is given twice (line 3)"),
        (["--set", "runtime.strategy=mirrored", "--set", "runtime.devices=[GPU:7]"], "no device 'GPU:7' on this machine"),
    ]
    for argv, message in cases:
        code, err = run_main(train_main, argv + ["--workdir", str(tmp_path / "w")], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not os.path.exists(tmp_path / "w"), "a refused start leaves no directory behind"
    import builtins

    real_open = builtins.open

    def unreadable(path, *args, **kwargs):  # root ignores chmod, so the refusal is simulated
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", unreadable)
    code, err = run_main(train_main, ["--config", str(locked), "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and "cannot be read: Permission denied" in err and len(err.strip().splitlines()) == 1


def test_python_api_refuses_a_bad_defense_and_bad_budgets(network):
    from tfrobust.attacks import pgd
    from tfrobust.defenses import parse_defense
    from tfrobust.trainer import RobustModel

    # A name is a defense (tr.Defense("trades")); anything else is refused in one line.
    assert RobustModel(network, "trades", eps=0.1, step_size=0.025, steps=2).defense == parse_defense("trades")
    with pytest.raises(UserError, match="defense must be a Defense or a defense name"):
        RobustModel(network, {"name": "trades"}, eps=0.1, step_size=0.025, steps=2)
    with pytest.raises(UserError, match="unknown defense 'tradse'"):
        RobustModel(network, "tradse", eps=0.1, step_size=0.025, steps=2)
    with pytest.raises(UserError, match="eps must be finite"):
        RobustModel(network, parse_defense("at"), eps=float("nan"), step_size=0.025, steps=2)
    with pytest.raises(UserError, match="steps must be between 0 and 1000"):
        RobustModel(network, parse_defense("at"), eps=0.1, step_size=0.025, steps=-1)
    x = np.zeros((2, 28, 28, 1), "float32")
    with pytest.raises(UserError, match="steps must be between 0 and 1000"):
        pgd(network, x, np.zeros(2, "int32"), 0.1, 0.025, -3)
    with pytest.raises(UserError, match="eps must be finite"):
        pgd(network, x, np.zeros(2, "int32"), float("nan"), 0.025, 3)


def test_file_system_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from tfrobust import experiment

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "report.json"))

    monkeypatch.setattr(experiment, "train_and_evaluate", disk_full)
    code, err = run_main(train_main, ["--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: file system: No space left on device (ENOSPC) in {tmp_path / 'w'}; free some "
                          "space and rerun the same command to resume")


@pytest.mark.slow
def test_names_are_checked_before_tensorflow_is_imported():
    import subprocess
    import sys

    code = ("import sys\nfrom tfrobust.cli import train_main\n"
            "try:\n    train_main(['--defense', 'fgsm_pgd'])\nexcept SystemExit as e:\n    print(e.code, 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.startswith("error: unknown defense 'fgsm_pgd'") and len(done.stderr.strip().splitlines()) == 1
    code = code.replace("train_main(['--defense', 'fgsm_pgd'])", "evaluate_main(['--model', 'm', '--attacks', 'pgd_ce'])")
    code = code.replace("import train_main", "import evaluate_main")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.startswith("error: unknown attack 'pgd_ce'")


def test_corrupt_models_are_one_line_errors(tmp_path, capsys):
    corrupt = tmp_path / "broken.keras"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    code, err = run_main(evaluate_main, ["--model", str(corrupt)], capsys)
    assert code == 2 and "cannot be loaded as a Keras model" in err and len(err.strip().splitlines()) == 1
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"\x00garbage")
    code, err = run_main(evaluate_main, ["--model", str(saved)], capsys)
    assert code == 2 and "cannot be loaded as a SavedModel" in err and len(err.strip().splitlines()) == 1


def test_tfds_without_network_is_refused_at_once(monkeypatch):
    import socket

    tfds = pytest.importorskip("tensorflow_datasets")
    from tfrobust import data

    calls = []

    def not_prepared(name, download=True, **kwargs):
        calls.append(download)
        raise AssertionError(f"Dataset {name}: could not find data")

    def no_route(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tfds, "load", not_prepared)
    monkeypatch.setattr(socket, "create_connection", no_route)
    with pytest.raises(UserError, match="not prepared .* no network .*Network is unreachable") as info:
        data.load_arrays("cifar10", "train")
    assert "\n" not in str(info.value)
    assert calls == [False], "the downloader (minutes of retries) is never started"
    with pytest.raises(UserError, match="'kmnist' is not prepared .* no network .*Network is unreachable"):
        data.source_info("kmnist")  # any tfds name, read as the user's own data
    assert calls == [False, False]
