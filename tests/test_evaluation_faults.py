"""An evaluation's resume log of another model or with a damaged line is not replayed."""

import json
import os
import re

import keras

from tfrobust.cli import evaluate_main



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

