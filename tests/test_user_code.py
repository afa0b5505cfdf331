"""imports.json: what a run records of the user's modules, and how a damaged record is refused."""

import json
import pathlib
import sys
import types

import pytest

from tfrobust import user_code
from tfrobust.errors import UserError


def test_a_run_records_its_factory_module_and_plugins_with_where_they_came_from(tmp_path, monkeypatch):
    (tmp_path / "nets_for_record.py").write_text("def build(input_shape, num_classes):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import nets_for_record  # noqa: F401

    config = types.SimpleNamespace(plugins=["extra.py"], model=types.SimpleNamespace(name="nets_for_record:build"))
    written = {}
    user_code.record(config, str(tmp_path / "run"), lambda path, text: written.update({path: text}))
    (path, text), = written.items()
    assert path.endswith("imports.json")
    assert json.loads(text)["imports"] == [{"file": str(pathlib.Path.cwd() / "extra.py")},
                                           {"module": "nets_for_record", "path": str(tmp_path)}]
    sys.modules.pop("nets_for_record", None)
    none = types.SimpleNamespace(plugins=[], model=types.SimpleNamespace(name="small_cnn"))
    user_code.record(none, str(tmp_path / "run"), lambda path, text: written.update({"again": text}))
    assert "again" not in written  # nothing to import: no file


@pytest.mark.parametrize("content", ['{"imports": [{"modu', "[1, 2]", '{"imports": 3}', "\x00\x01"])
def test_a_damaged_imports_json_is_one_line_naming_the_file(tmp_path, content):
    (tmp_path / "imports.json").write_text(content)
    with pytest.raises(UserError, match="imports.json is damaged"):
        user_code.import_recorded(str(tmp_path))


def test_a_recorded_module_that_no_longer_imports_is_named(tmp_path):
    record = {"imports": [{"module": "no_such_module_here", "path": str(tmp_path)}]}
    (tmp_path / "imports.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="the run imports 'no_such_module_here'"):
        user_code.import_recorded(str(tmp_path))
    user_code.import_recorded(str(tmp_path / "elsewhere"))  # no record: nothing to import
