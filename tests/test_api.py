"""The public API: names exported by ``tfrobust``, ``__all__`` everywhere, the generated reference."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import tfrobust as tr


def public_modules():
    names = ["tfrobust"]
    for info in pkgutil.walk_packages(tr.__path__, "tfrobust."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            names.append(info.name)
    return names


def test_every_exported_name_resolves():
    for name in tr.__all__:
        assert getattr(tr, name) is not None, name
    assert tr.RobustModel.__module__ == "tfrobust.trainer"
    assert tr.Defense is tr.defenses.Defense
    assert callable(tr.evaluate) and callable(tr.run_autoattack) and callable(tr.flatness.average_case_flatness)
    with pytest.raises(AttributeError):
        tr.no_such_name


@pytest.mark.parametrize("module", public_modules())
def test_every_public_module_declares_all(module):
    mod = importlib.import_module(module)
    assert hasattr(mod, "__all__"), f"{module} has no __all__"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it does not define"


def test_defense_from_a_name_with_overrides():
    d = tr.Defense("trades+awp", awp_gamma=0.005)
    assert (d.base, d.awp, d.awp_gamma, d.beta, d.awp_warmup_epochs) == ("trades", True, 0.005, 6.0, 10)
    assert tr.Defense("trades+awp", awp_gamma=0.01) != d
    with pytest.raises(tr.UserError, match="unknown defense"):
        tr.Defense("tradez")


@pytest.mark.slow
def test_import_does_not_load_tensorflow():
    code = "import sys, tfrobust; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_api_reference_generates(tmp_path):
    pdoc = pytest.importorskip("pdoc")
    pdoc.render.configure(docformat="google")
    pdoc.pdoc("tfrobust", output_directory=tmp_path)
    page = (tmp_path / "tfrobust" / "trainer.html").read_text()
    assert "RobustModel" in page and "sample_weight" in page  # the class docstring is rendered
    assert (tmp_path / "tfrobust" / "defenses" / "awp.html").exists()
    assert "Defense" in (tmp_path / "tfrobust.html").read_text()


def test_docstrings_cite_sections_that_exist_in_algorithms_md():
    import pathlib
    import re

    root = pathlib.Path(tr.__file__).parent
    doc = (root.parent / "docs" / "algorithms.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", doc, flags=re.M))
    deviations = doc[doc.index("## 9."):]
    items = set(re.findall(r"^ ?(\d+)\. \*\*", deviations, flags=re.M))
    cited = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "ALGORITHMS.md" not in text, f"{path} cites a file that does not exist"
        for match in re.finditer(r"docs/algorithms\.md,\s+sections?\s+([\d\- and]+)", text):
            numbers = re.findall(r"\d+", match.group(1))
            assert set(numbers) <= sections, f"{path}: section {numbers} not in docs/algorithms.md"
            cited += 1
        for match in re.finditer(r"section\s+9,\s+items?\s+([\d and]+)", text):
            for item in re.findall(r"\d+", match.group(1)):
                assert item in items, f"{path}: deviation item {item} not in docs/algorithms.md"
    assert cited >= 12


def test_the_top_level_keeps_the_main_names_and_finds_moved_ones_with_a_warning():
    import types
    import warnings

    from tfrobust import attacks, flatness, landscape

    main = {"RobustModel", "StepSettings", "Defense", "WeightSpaceTerm", "register_term", "Hyperparameter",
            "register_base", "ExperimentConfig", "load_config", "train", "train_and_evaluate", "build_model",
            "evaluate", "run_autoattack", "flatness_report", "UserError"}
    names = {n for n in tr.__all__ if n != "__version__" and not isinstance(getattr(tr, n), types.ModuleType)}
    assert names == main
    for name, where in (("pgd", attacks), ("average_case_flatness", flatness), ("landscape_1d", landscape)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(tr, name) is getattr(where, name)
        assert [str(w.message) for w in caught] == [
            f"tfrobust.{name} is {where.__name__}.{name}; the top level keeps the main classes and functions"]
