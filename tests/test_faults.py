"""A finished run is identified by the checksums of its networks and never trained again."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, snapshot
from tfrobust import experiment, rundir
from tfrobust.errors import UserError
from tfrobust.integrity import FLAG_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, *extra, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "train.py", *TINY, *extra, "--workdir", str(workdir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_finished_run_with_a_damaged_marker_is_refused_and_untouched(tmp_path):
    workdir = tmp_path / "run"
    done = train(workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    marker = json.loads((workdir / rundir.FINISHED).read_text())
    assert marker["networks"] == {name: rundir.sha256_of(str(workdir / name)) for name in ("model.keras", "best.keras")}
    assert experiment.workdir_status(str(workdir)) == "finished"
    # The final evaluation's report carries the reference's flags, as every evaluation does.
    report = json.loads((workdir / "report.json").read_text())
    assert [f["name"] for f in report["models"]["last"]["flags"]] == list(FLAG_NAMES)

    (workdir / rundir.FINISHED).write_text('{"trained": tr')  # torn
    before = snapshot(workdir)
    done = train(workdir)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: workdir {workdir} holds a finished run whose marker is damaged: finished.json cannot be read "
        f"(JSONDecodeError); nothing was changed. Evaluate its networks with `evaluate.py --model {workdir}`, "
        "or train again in another --workdir")
    assert snapshot(workdir) == before

    # The other damages the library refuses the same way, before anything is written.
    (workdir / rundir.FINISHED).write_text('{"trained": false}')
    with pytest.raises(UserError, match=r'does not say the run is trained \({"trained": false}\)'):
        experiment.prepare_workdir(str(workdir))
    (workdir / rundir.FINISHED).unlink()
    (workdir / "report.json").write_text('{"models": {"la')  # truncated
    with pytest.raises(UserError, match="finished.json is missing but the final networks are there"):
        experiment.prepare_workdir(str(workdir))
    (workdir / rundir.FINISHED).write_text(json.dumps(marker))
    (workdir / "model.keras").write_bytes((workdir / "best.keras").read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match="model.keras differs from the network recorded in finished.json"):
        experiment.prepare_workdir(str(workdir))
    from tfrobust import loading

    with pytest.raises(UserError, match="model.keras differs from the network recorded in finished.json .* to "
                                        "evaluate the file as it is, pass --model"):
        loading.load(str(workdir), "last")
    (workdir / "model.keras").unlink()
    with pytest.raises(UserError, match="model.keras, listed in finished.json, is missing"):
        experiment.prepare_workdir(str(workdir))
    assert not os.path.exists(workdir / rundir.LOCK)


def test_an_unfinished_run_killed_in_its_final_save_is_not_refused(tmp_path):
    """Networks next to a backup are a final phase to redo, not a finished run."""
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "model.keras").write_bytes(b"half")
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "state.json").write_text('{"epoch": 1}')
    assert rundir.marker_problem(str(tmp_path)) is None
    assert experiment.workdir_status(str(tmp_path)) == "unfinished"
