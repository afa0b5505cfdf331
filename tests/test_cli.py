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
    (["--defense", "madry"], "unknown defense 'madry'"),
    (["--defense", "n_fgsm+gradalign"], "GRADALIGN builds on FGSM or FGSM_RS (use fgsm+gradalign)"),
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
    assert "allowed: awp, elle, elle_a, gradalign, rat, s2o" in proc.stderr.strip().splitlines()[-1]


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


def _saved_tiny(tmp_path, name="m.keras"):
    import keras

    from conftest import tiny_cnn

    model = tiny_cnn()
    model(keras.ops.zeros((1, 28, 28, 1)))
    path = str(tmp_path / name)
    model.save(path)
    return path


def test_evaluate_rand_version_summary_and_per_example_file(tmp_path, capsys):
    path = _saved_tiny(tmp_path)
    out = tmp_path / "r.json"
    argv = ["--model", path, "--examples", "16", "--attacks", "clean,rand", "--integrity-examples", "0",
            "--eps", "0.031", "--output", str(out)]
    assert evaluate_main(argv) == 0
    table = capsys.readouterr().out
    assert "FLAGGED eps_not_rounded: eps=0.031 looks like 8/255" in table
    report = json.loads(out.read_text())
    aa = report["autoattack"]
    assert aa["version"] == "rand" and aa["attacks"] == ["apgd_ce", "apgd_dlr"] and aa["verdict_passes"] == 20
    flags = {f["name"]: f for f in report["flags"]}
    assert not flags["eps_not_rounded"]["passed"] and flags["deterministic_forward"]["passed"]
    summary = json.loads((tmp_path / "r.robustbench.json").read_text())
    assert summary["version"] == "rand" and summary["threat_model"] == "Linf" and summary["eps"] == "0.031"
    assert summary["n_examples"] == 16 and summary["number_forward_passes"] == 20
    assert summary["autoattack_acc"] == pytest.approx(100 * report["accuracy"]["autoattack_rand"], abs=0.005)
    assert summary["clean_acc"] == pytest.approx(100 * report["accuracy"]["clean"], abs=0.005)
    assert summary["flags"]["eps_not_rounded"] is False and summary["config"] is None
    # The partial file names, for every broken example, the attack and the perturbation norm.
    lines = [json.loads(line) for line in (tmp_path / "r.json.partial.jsonl").read_text().splitlines()]
    assert lines[0]["version"] == "rand" and lines[0]["n_examples"] == 16
    recorded = {i: (e["attack"], v) for e in lines[1:] for i, v in zip(e["fooled"], e["norms"])}
    broken = {i: b for i, b in enumerate(aa["broken_by"]) if b not in ("", "clean")}
    assert {i: a for i, (a, _) in recorded.items()} == broken
    for i, (_, v) in recorded.items():
        assert v == pytest.approx(aa["perturbation_norm"][i]) and 0 < v <= 0.031 + 1e-6
    # A different command over the same output's partial file is refused, and nothing is overwritten.
    out.unlink()
    before = (tmp_path / "r.json.partial.jsonl").read_text()
    code, err = run_main(evaluate_main, argv[:-3] + ["0.03", "--output", str(out)], capsys)
    assert code == 2 and "was written by an evaluation with different eps" in err and "Traceback" not in err
    assert (tmp_path / "r.json.partial.jsonl").read_text() == before


@pytest.mark.parametrize("attacks,message", [
    ("plus,standard", "AutoAttack version 'plus' runs its own attacks and budgets"),
    ("rand,apgd_ce", "AutoAttack version 'rand' runs its own attacks and budgets"),
    ("apgd_xyz", "unknown attack 'apgd_xyz'"),
])
def test_evaluate_rejects_mixed_versions(tmp_path, capsys, attacks, message):
    path = _saved_tiny(tmp_path)
    code, err = run_main(evaluate_main, ["--model", path, "--examples", "4", "--attacks", attacks], capsys)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigkill_mid_autoattack_then_rerun_gives_the_same_report(tmp_path, trained_tiny):
    """kill -9 during APGD-T; the same command skips the decided batches and ends with the uninterrupted report."""
    import signal
    import time

    model_path = str(tmp_path / "trained.keras")
    trained_tiny.save(model_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def command(output):
        return [sys.executable, "evaluate.py", "--model", model_path, "--examples", "48", "--batch-size", "8",
                "--attacks", "clean,fast", "--eps", "0.02", "--integrity-examples", "0", "--output", output]

    killed = str(tmp_path / "killed.json")
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = killed + ".partial.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(partial):
            with open(partial) as f:
                if any(line.startswith('{"attack": "apgd-t"') for line in f):
                    break
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(killed)
    with open(partial) as f:
        done_before = sum(1 for line in f if line.endswith("\n")) - 1
    assert done_before >= 2
    resumed = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = str(tmp_path / "straight.json")
    done = subprocess.run(command(straight), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = json.loads(open(killed).read()), json.loads(open(straight).read())
    assert a["autoattack"]["resumed"] > 0 and b["autoattack"]["resumed"] == 0
    # Same machine, same process type, same batches and seeds: the verdicts are identical.
    assert a["accuracy"] == b["accuracy"] and a["worst_case"] == b["worst_case"]
    assert a["autoattack"]["broken_by"] == b["autoattack"]["broken_by"]
    assert a["autoattack"]["perturbation_norm"] == b["autoattack"]["perturbation_norm"]
    assert 0 < a["accuracy"]["autoattack_fast"] < a["accuracy"]["clean"]
    # Every batch was decided once: no batch line is repeated in the partial file.
    with open(partial) as f:
        keys = [(e["attack"], e["batch"]) for e in map(json.loads, f.read().splitlines()[1:])]
    assert len(keys) == len(set(keys))


def test_eps_accepts_an_exact_fraction(capsys):
    from tfrobust.cli import evaluate_parser

    assert evaluate_parser().parse_args(["--model", "m", "--eps", "8/255"]).eps == 8 / 255
    assert evaluate_parser().parse_args(["--model", "m", "--eps", "0.1"]).eps == 0.1
    for bad in ("8/0", "eight/255", "x"):
        with pytest.raises(SystemExit) as info:
            evaluate_parser().parse_args(["--model", "m", "--eps", bad])
        assert info.value.code == 2
        assert "not a number or fraction" in capsys.readouterr().err


def test_evaluate_shards_autoattack_under_a_mirrored_strategy(tmp_path):
    """--strategy mirrored hands whole batches to the two logical CPUs of the test session in turn; same verdicts."""
    path = _saved_tiny(tmp_path)
    reports = {}
    for strategy in ("default", "mirrored"):
        out = tmp_path / f"{strategy}.json"
        assert evaluate_main(["--model", path, "--examples", "16", "--attacks", "clean,apgd_ce,apgd_dlr",
                              "--integrity-examples", "0", "--eps", "0.05", "--strategy", strategy,
                              "--batch-size", "4", "--output", str(out)]) == 0
        reports[strategy] = json.loads(out.read_text())
    assert reports["default"]["autoattack"]["devices"] == []
    assert [d.split("device:")[-1] for d in reports["mirrored"]["autoattack"]["devices"]] == ["CPU:0", "CPU:1"]
    # Each batch is attacked as on one device; and an untrained network at eps 0.05 leaves nothing
    # borderline: APGD-CE breaks every clean-correct example on both runs.
    for r in reports.values():
        assert r["accuracy"]["autoattack"] == 0.0
    assert reports["mirrored"]["autoattack"]["broken_by"] == reports["default"]["autoattack"]["broken_by"]
