"""Command-line behaviour: bad input gives one line, exit code 2, no traceback; nothing is overwritten."""

import json
import os
import subprocess
import sys

import pytest

from tfrobust.cli import evaluate_main, train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.mark.parametrize("argv,message", [
    (["--defense", "fgsm"], "unknown defense 'fgsm'"),
    (["--defense", "at+rat"], "RAT builds on TRADES"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'; allowed: preact_resnet18, small_cnn, wide_resnet"),
    (["--data", "imagenet"], "unknown data set 'imagenet'"),
    (["--set", "optim.momentom=0.5"], "unknown config key 'optim.momentom'"),
    (["--set", "attack.eps=-1"], "attack.eps must be >= 0"),
    (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["--epochs", "0"], "optim.epochs must be > 0"),
    (["--epochs", "two"], "invalid int value"),
])
def test_train_bad_input(argv, message, capsys, tmp_path):
    code, err = run_main(train_main, argv + ["--workdir", str(tmp_path / "w")], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("argv,message", [
    (["--model", "no/such/dir"], "model not found: no/such/dir"),
    (["--model", ".", "--eps", "-0.5"], "--eps must be >= 0"),
    (["--model", ".", "--attacks", "pgd_ce"], "unknown attack 'pgd_ce'"),
    (["--model", ".", "--examples", "0"], "--examples must be > 0"),
    (["--model", "setup.cfg"], "is a file but not a .keras model"),
    (["--model", "."], "neither a tfrobust run directory"),
])
def test_evaluate_bad_input(argv, message, capsys):
    code, err = run_main(evaluate_main, argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_refuses_to_overwrite_output(tmp_path, capsys):
    out = tmp_path / "report.json"
    out.write_text("precious")
    code, err = run_main(evaluate_main, ["--model", ".", "--output", str(out)], capsys)
    assert code == 2 and "exists" in err
    assert out.read_text() == "precious"


@pytest.mark.slow
def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--defense", "trades+sam", "--workdir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "allowed: awp, rat, s2o" in proc.stderr.strip().splitlines()[-1]


def test_evaluate_any_saved_model(tmp_path, capsys):
    """evaluate.py works on a SavedModel that is not ours: a plain Keras model exported."""
    import keras

    from conftest import tiny_cnn

    model = tiny_cnn()
    model(keras.ops.zeros((1, 28, 28, 1)))
    path = str(tmp_path / "foreign")
    model.export(path, format="tf_saved_model", verbose=False)
    out = tmp_path / "r.json"
    assert evaluate_main(["--model", path, "--examples", "40", "--attacks", "clean,fgsm,pgd3_ce", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    acc = report["accuracy"]
    assert set(acc) == {"clean", "fgsm", "pgd3_ce"}
    assert all(0 <= v <= 1 for v in acc.values())
    assert report["eps"] == pytest.approx(0.1) and report["examples"] == 40
    assert report["worst_case"] <= min(acc.values())


def test_evaluate_autoattack_and_integrity_report(tmp_path):
    import keras

    from conftest import tiny_cnn

    model = tiny_cnn()
    model(keras.ops.zeros((1, 28, 28, 1)))
    path = str(tmp_path / "m.keras")
    model.save(path)
    out = tmp_path / "r.json"
    argv = ["--model", path, "--examples", "24", "--attacks", "clean,pgd5_ce,fast", "--integrity-examples", "12",
            "--output", str(out)]
    assert evaluate_main(argv) == 0
    report = json.loads(out.read_text())
    acc = report["accuracy"]
    assert {"clean", "pgd5_ce", "apgd_ce", "apgd_t", "autoattack_fast"} <= set(acc)
    assert acc["apgd_t"] <= acc["apgd_ce"] <= acc["clean"]
    assert report["worst_case"] <= min(acc.values())
    names = [c["name"] for c in report["integrity"]["checks"]]
    assert names == ["robust_le_clean", "eps0_equals_clean", "large_eps_near_zero", "more_steps_not_better",
                     "gradient_free_not_better"]
    assert report["integrity"]["probe_examples"] == 12
    assert report["total_seconds"] > 0
