"""Two evaluations writing the same --output cannot both succeed: the output is locked."""

import json
import os
import subprocess
import sys
import time

import keras

from conftest import tiny_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    model = str(tmp_path / "m.keras")
    network = tiny_cnn()
    network(keras.ops.zeros((1, 28, 28, 1)))
    network.save(model)
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
