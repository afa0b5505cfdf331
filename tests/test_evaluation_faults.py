"""An evaluation's files under faults: a resume log of another model or with a damaged line is not replayed."""

import json
import os
import re

import keras
import pytest

from tfrobust.cli import evaluate_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(network, path):
    network(keras.ops.zeros((1, 28, 28, 1)))
    network.save(str(path))
    return str(path)


def _command(model, output):
    return ["--model", model, "--examples", "16", "--batch-size", "4", "--attacks", "clean,apgd_ce", "--eps", "0.05",
            "--integrity-examples", "0", "--output", str(output)]


def _evaluate(model, output, capsys):
    """The report and the warning lines on stderr (the progress bars left out); removes the output files after."""
    assert evaluate_main(_command(model, output)) == 0
    err = capsys.readouterr().err
    report = json.loads(output.read_text())
    output.unlink()
    os.remove(str(output).replace(".json", ".robustbench.json"))
    return report, "\n".join(re.findall(r"warning: [^\n]*", err))


def test_a_resume_log_of_another_model_or_with_a_damaged_line_is_not_replayed(tmp_path, capsys, trained_tiny):
    model = _save(trained_tiny, tmp_path / "m.keras")
    out = tmp_path / "r.json"
    partial = tmp_path / "r.json.partial.jsonl"
    first, _ = _evaluate(model, out, capsys)
    lines = partial.read_text().splitlines()
    assert len(lines) >= 1 + 3  # the fingerprint and a line per batch of clean-correct examples
    assert len(json.loads(lines[0])["model_sha256"]) == 64
    # The same model: the log is replayed (the report's "resumed" counts the examples read back).
    again, err = _evaluate(model, out, capsys)
    assert again["autoattack"]["resumed"] == 16 - first["autoattack"]["broken_by"].count("") - \
        first["autoattack"]["broken_by"].count("clean") and "warning" not in err
    assert again["accuracy"] == first["accuracy"]

    # The file replaced by a network of the same architecture whose logits are 3 times larger.
    other = keras.models.clone_model(trained_tiny)
    other.set_weights(trained_tiny.get_weights())
    logits = other.get_layer("logits")
    logits.set_weights([3 * w for w in logits.get_weights()])
    _save(other, model)
    fresh, _ = _evaluate(model, tmp_path / "fresh.json", capsys)
    replaced, err = _evaluate(model, out, capsys)
    assert err.strip() == (f"warning: {partial} not replayed: it was written for another model (the weights' sha256 "
                           f"differs); moved to {partial}.discarded, evaluating from scratch")
    assert replaced["autoattack"]["resumed"] == 0
    assert replaced["accuracy"] == fresh["accuracy"]  # same machine, same batches and seeds
    assert (tmp_path / "r.json.partial.jsonl.discarded").read_text().splitlines() == lines

    # A JSON-valid edit of a line, and a garbled line: the log is discarded, the old one set aside.
    for damage, number in (("edit", 3), ("garble", 2)):
        text = partial.read_text().splitlines()
        entry = json.loads(text[number - 1])
        if damage == "edit":
            entry["fooled"] = []
            text[number - 1] = json.dumps(entry)
        else:
            text[number - 1] = text[number - 1][:20] + "#" + text[number - 1][21:]
        partial.write_text("\n".join(text) + "\n")
        report, err = _evaluate(model, out, capsys)
        assert err.strip() == (f"warning: {partial} not replayed: line {number} fails its checksum (garbled or "
                               f"edited); moved to {partial}.discarded, evaluating from scratch")
        assert report["autoattack"]["resumed"] == 0 and report["accuracy"] == fresh["accuracy"]

    # A line torn by a kill (no newline at the end) is still just dropped and its batch run again.
    partial.write_text(partial.read_text()[:-30])
    report, err = _evaluate(model, out, capsys)
    assert "warning" not in err and report["accuracy"] == fresh["accuracy"]


# Runs evaluate.py's entry point; the evaluation waits, once started, until the file GO exists.
WAITING = r"""
import os, sys, time
from tfrobust import evaluation

evaluate = evaluation.evaluate
def waiting(*a, **k):
    open(os.environ["STARTED"], "w").close()
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.05)
    return evaluate(*a, **k)
evaluation.evaluate = waiting
from tfrobust.cli import evaluate_main
sys.exit(evaluate_main(sys.argv[1:]))
"""


def test_two_evaluations_writing_one_output_cannot_both_succeed(tmp_path):
    import subprocess
    import sys
    import time

    from conftest import tiny_cnn

    model = _save(tiny_cnn(), tmp_path / "m.keras")
    out = tmp_path / "out.json"
    command = ["--model", model, "--examples", "8", "--attacks", "clean,fgsm", "--integrity-examples", "0",
               "--output", str(out)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", STARTED=str(tmp_path / "started"), GO=str(tmp_path / "go"))
    first = subprocess.Popen([sys.executable, "-c", WAITING, *command], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "started").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run([sys.executable, "evaluate.py", *command], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: --output {out} is in use by process {first.pid} (out.json.lock); "
                                         "wait for it to finish or choose another --output")
    finally:
        (tmp_path / "go").touch()
        assert first.wait(timeout=120) == 0, first.stderr.read()
    assert json.loads(out.read_text())["examples"] == 8
    assert sorted(os.listdir(tmp_path)) == ["go", "m.keras", "out.json", "out.robustbench.json", "started"]
    # Once the first is done its output exists: the second is refused for that, and nothing is overwritten.
    before = out.read_text()
    again = subprocess.run([sys.executable, "evaluate.py", *command], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip() == f"error: output file {out} exists; choose another --output"
    assert out.read_text() == before


def test_a_probability_network_is_flagged_by_the_default_attacks(tmp_path, capsys, trained_tiny):
    """The reference's flags run on every report, not only under AutoAttack."""
    softmax = keras.Sequential([trained_tiny, keras.layers.Softmax()])
    model = _save(softmax, tmp_path / "softmax.keras")
    out = tmp_path / "r.json"
    assert evaluate_main(["--model", model, "--examples", "32", "--integrity-examples", "0", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert ("FLAGGED logits_not_probabilities: the model outputs probabilities (rows non-negative, summing to 1): "
            "attack the logits (remove the final softmax)") in table
    flags = {f["name"]: f for f in json.loads(out.read_text())["flags"]}
    assert not flags["logits_not_probabilities"]["passed"]
    assert flags["deterministic_forward"]["passed"] and flags["square_not_better"]["skipped"]
    summary = json.loads((tmp_path / "r.robustbench.json").read_text())
    assert summary["flags"]["logits_not_probabilities"] is False
    # The logits of the same network pass.
    logits = _save(trained_tiny, tmp_path / "logits.keras")
    assert evaluate_main(["--model", logits, "--examples", "32", "--integrity-examples", "0"]) == 0
    assert "passed  logits_not_probabilities" in capsys.readouterr().out
