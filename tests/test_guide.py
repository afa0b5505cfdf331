"""docs/guide.md runs: every python block, in order, in one namespace, in a fresh directory."""

import os
import re

import numpy as np
import pytest

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "guide.md")


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_guide_has_the_promised_examples():
    text = open(GUIDE).read()
    blocks = python_blocks(text)
    assert len(blocks) >= 7
    code = "\n".join(blocks)
    for needle in ("keras.Sequential", "keras.Model(inputs", "class SubclassedNet", "BatchNormalization",
                   "tf.data.Dataset", "@tf.function", "tf.saved_model.load", "run_autoattack",
                   "average_case_flatness", "worst_case_flatness", "landscape_1d", "restored.export(", "served.serve(",
                   "tr.zoo.export_model", "tr.zoo.import_model"):
        assert needle in code, needle


@pytest.mark.slow
def test_guide_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "guide"}
    for i, block in enumerate(python_blocks(open(GUIDE).read())):
        try:
            exec(compile(block, f"docs/guide.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/guide.md block {i + 1} failed: {type(e).__name__}: {e}") from e
    out = capsys.readouterr().out
    # The examples did real work: trained (history printed), evaluated and measured.
    assert "SubclassedNet" in out and "average-case" in out and "clean" in out
    assert namespace["restored"].defense.name == "trades+awp"
    result = namespace["result"]
    assert 0 <= result["worst_case"] <= min(result["per_attack"].values()) <= result["clean"] <= 1
    assert set(namespace["report"]["accuracy"]) == {"clean", "fgsm", "pgd5_ce"}
    assert namespace["datasets"].info.image_shape == (28, 28, 1)  # taken from the .npz
    # The exported and re-imported network computes what the original does (the same layers on this machine).
    probe, imported, swish = namespace["probe"], namespace["imported"], namespace["swish"]
    assert namespace["written"]["arch"] == "dm_wide_resnet-10-1" and (tmp_path / "imported.keras").exists()
    np.testing.assert_allclose(imported(probe), swish(probe), rtol=0, atol=1e-6)
    assert (tmp_path / "landscape.png").exists() and (tmp_path / "runs" / "mydata" / "model.keras").exists()
