"""A full disk: one line naming the directory and the errno, the files intact, and the run resumes."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import TINY
from tfrobust import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB file system (tmpfs), or a skip where this process may not mount one (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(small_disk):
    workdir = small_disk / "run"
    command = [sys.executable, "train.py", *TINY, "--no-eval", "--workdir", str(workdir)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    full = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # One epoch's checkpoints and backup fit (3 weight files of 3.4 MB); the final networks do not.
    assert full.returncode == 2, full.stderr[-2000:]
    lines = [line for line in full.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in full.stderr
    where = re.escape(str(workdir))
    assert re.fullmatch(rf"error: file system: No space left on device: {where}/\S+ needs about [\d.]+ MB, [\d.]+ MB "
                        rf"are free \(ENOSPC\) in {where}\S*; free some space and rerun the same command to resume; "
                        "every file is written under a temporary name first, so the files already there are complete",
                        lines[0]), lines[0]
    # What is there is complete: the backup names readable files, no partial file is left.
    state = json.loads((workdir / "backup" / "state.json").read_text())
    assert state["epoch"] == 1
    assert rundir.sha256_of(str(workdir / "backup" / state["weights"])) == state["sha256"][state["weights"]]
    assert not [n for _, _, names in os.walk(workdir) for n in names if n.startswith("partial-")]
    assert not (workdir / rundir.FINISHED).exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((workdir / rundir.FINISHED).read_text())["trained"] is True
    assert "start: resumed from epoch 1 of 1" in (workdir / "run_summary.txt").read_text()


def test_free_space_is_checked_before_a_weights_file_is_started(tmp_path, monkeypatch):
    """Wherever mounting is impossible too: the check itself, against a disk that reports 1 MB free."""
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    with pytest.raises(OSError) as info:
        rundir.check_free_space(str(tmp_path / "w.weights.h5"), 3_000_000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path)
    assert "needs about 3.0 MB, 1.0 MB are free" in info.value.strerror
    rundir.check_free_space(str(tmp_path / "w.weights.h5"), 999_999)  # enough: no error


def test_a_full_disk_found_by_tensorflow_is_one_line_too(monkeypatch, capsys, tmp_path):
    import tensorflow as tf

    from tfrobust import experiment
    from tfrobust.cli import train_main

    def disk_full(*args, **kwargs):  # what TensorFlow's writers raise (SaveV2, event files)
        raise tf.errors.ResourceExhaustedError(None, None, f"{tmp_path}/w/x.tempstate; No space left on device")

    monkeypatch.setattr(experiment, "train_and_evaluate", disk_full)
    with pytest.raises(SystemExit) as info:
        train_main(["--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: file system: No space left on device (ENOSPC): {tmp_path}/w/x.tempstate; ")
