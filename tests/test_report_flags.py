"""The reference's flags (probability outputs, random forward, zero gradients) are in every report."""

import json

import keras

from tfrobust.cli import evaluate_main


def test_a_probability_network_is_flagged_by_the_default_attacks(tmp_path, capsys, trained_tiny):
    """The reference's flags run on every report, not only under AutoAttack."""
    softmax = keras.Sequential([trained_tiny, keras.layers.Softmax()])
    softmax(keras.ops.zeros((1, 28, 28, 1)))
    model = str(tmp_path / "softmax.keras")
    softmax.save(model)
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
    logits = str(tmp_path / "logits.keras")
    trained_tiny.save(logits)
    assert evaluate_main(["--model", logits, "--examples", "32", "--attacks", "clean", "--integrity-examples", "0"]) == 0
    assert "passed  logits_not_probabilities" in capsys.readouterr().out
