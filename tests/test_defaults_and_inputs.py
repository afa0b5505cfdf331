"""Defaults that must not go silently wrong on a user's own data, and inputs refused at build time.

Each point runs in a fresh interpreter (the command line, or a short script), as a user meets it.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "attack.steps=1", "--set", "eval.pgd_steps=1", "--set", "runtime.verbose=0",
        "--set", "eval.images_every=0", "--set", "eval.integrity_examples=0", "--set", "data.batch_size=60"]


def run(args, cwd=None, env=None):
    """Runs ``python args...`` from the repository root in a fresh interpreter: (status, stdout, stderr)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + (cwd or ""), TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    done = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout, done.stderr


def script(code, cwd=None):
    return run(["-c", textwrap.dedent(code)], cwd=cwd)


def error_line(err):
    """The one ``error: ...`` line of a refused command (and that it is the only thing said)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def write_npz(path, n_train=240, n_test=60, classes=3, shape=(12, 12, 1), **changes):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train,) + shape).astype(np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test,) + shape).astype(np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    arrays.update(changes)
    np.savez(path, **arrays)
    return str(path)


def train_py(*args):
    return run([os.path.join(ROOT, "train.py"), *args])


# -- eps: one rule for training and evaluation; fractions wherever a number is --------------------------


def test_one_eps_rule_for_training_and_evaluation(tmp_path):
    npz = write_npz(tmp_path / "d.npz")
    code, out, err = train_py("--print-config", "--data", "cifar10")
    assert code == 0, err
    attack = yaml.safe_load(out)["attack"]
    assert attack["eps"] == 8 / 255 and attack["step_size"] == 2 / 255
    code, out, err = train_py("--print-config", "--data", npz)
    assert code == 0, err
    assert yaml.safe_load(out)["attack"]["eps"] == 8 / 255
    code, out, err = train_py("--print-config")  # Fashion-MNIST: the numbers trained with so far
    assert code == 0, err
    attack = yaml.safe_load(out)["attack"]
    assert attack["eps"] == 0.1 and attack["step_size"] == 0.025
    # evaluate.py's default for data it is given (no run config) comes from the same rule.
    code, out, err = script(f"""
        from tfrobust.loading import LoadedModel, evaluation_settings
        for data in ("mnist", "fashion_mnist", "cifar10", "svhn_cropped", {npz!r}):
            s = evaluation_settings(LoadedModel("m", None), data=data)
            print(data, repr(s["eps"]), s["eps_source"])
        s = evaluation_settings(LoadedModel("m", None, run_config={{"attack": {{"eps": 0.05}}}}), data="cifar10")
        print("run", repr(s["eps"]), s["eps_source"])
    """)
    assert code == 0, err
    got = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert got == {"mnist": "0.1", "fashion_mnist": "0.1", "cifar10": repr(8 / 255), "svhn_cropped": repr(8 / 255),
                   npz: repr(8 / 255), "run": "0.05"}
    assert "the run's attack.eps" in out.splitlines()[-1]


def test_fractions_are_accepted_wherever_a_number_is(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("attack:\n  step_size: 1/255\n")
    code, out, err = train_py("--print-config", "--config", str(config), "--set", "attack.eps=8/255",
                              "--set", "optim.decay_at=1/2,3/4", "--set", "optim.lr=1e-1")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["attack"]["eps"] == 8 / 255 and cfg["attack"]["step_size"] == 1 / 255
    assert cfg["optim"]["decay_at"] == [0.5, 0.75] and cfg["optim"]["lr"] == 0.1
    for value, message in (("1/0", "needs a number, got '1/0'"), ("8/x", "needs a number, got '8/x'"),
                           ("-8/255", "attack.eps must be >= 0")):
        code, _, err = train_py("--print-config", "--set", f"attack.eps={value}")
        assert code == 2 and message in error_line(err)


# -- validation split, warm-up, start-of-run summary, resume ---------------------------------------------


def test_validation_larger_than_half_the_training_split_is_refused(tmp_path):
    npz = write_npz(tmp_path / "d.npz")  # 240 training images; the default validation_examples is 1000
    workdir = tmp_path / "run"
    for value in ("1000", "121"):
        code, _, err = train_py("--data", npz, "--workdir", str(workdir), "--epochs", "1",
                                "--set", f"data.validation_examples={value}", *TINY)
        line = error_line(err)
        assert code == 2
        assert f"data.validation_examples={value} would hold out more than half of the 240 training examples" in line
        assert not workdir.exists()  # nothing was left behind


DRIVER = """
import sys
import keras
from tfrobust import config as config_lib, experiment

class Stop(Exception):
    pass

class StopAfterFirstEpoch(keras.callbacks.Callback):
    # Stands for a kill after the first epoch's backup: the backup callback runs before this one.
    def on_epoch_end(self, epoch, logs=None):
        raise Stop()

overrides = dict(a.split("=", 1) for a in sys.argv[3:])
cfg = config_lib.load_config(None, overrides)
try:
    experiment.train(cfg, sys.argv[1], extra_callbacks=[StopAfterFirstEpoch()] if sys.argv[2] == "stop" else [])
except Stop:
    print("stopped")
"""


def test_start_summary_warmup_warning_and_resume(tmp_path):
    """A trades+awp run shorter than the AWP warm-up says so; every start is summarised, resumed or fresh."""
    npz = write_npz(tmp_path / "d.npz")
    workdir = str(tmp_path / "run")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    settings = [f"data.name={npz}", "defense.name=trades+awp", "optim.epochs=2", "data.validation_examples=60",
                "data.batch_size=60", "attack.steps=1", "eval.pgd_steps=1", "runtime.verbose=1",
                "eval.images_every=0", "eval.integrity_examples=0"]
    code, out, err = run([str(driver), workdir, "stop", *settings])
    assert code == 0 and "stopped" in out, err
    # The warnings: one line each, at start, naming the key that changes it.
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, err
    assert "AWP warm-up (10 epochs) is as long as the run (2 epochs)" in warnings[0]
    assert "--set defense.awp.warmup_epochs=N" in warnings[0]
    assert "data.validation_examples=60 holds out 25% of the 240 training examples" in warnings[1]
    assert "start: fresh (2 epochs)" in out
    code, out, err = run([str(driver), workdir, "go", *settings])
    assert code == 0, err
    assert "start: resumed from epoch 1 of 2" in out
    blocks = open(os.path.join(workdir, "run_summary.txt")).read().split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith("start: fresh (2 epochs)") and blocks[1].startswith("start: resumed from epoch 1 of 2")
    for block in blocks:  # sizes as split: 240 = 180 + 60; 60 test; the data's default eps and eps / 4
        assert "of its 240 training examples 180 train and 60 validate; 60 test examples" in block
        assert "linf eps=8/255, step 0.00784314, 1 steps" in block
        assert "defense: trades+awp (awp warm-up 10 of 2 epochs)" in block
        assert "optimisation: 3 steps per epoch of batch 60" in block
    with open(os.path.join(workdir, "config.yaml")) as f:
        written = yaml.safe_load(f)["attack"]
    assert written["eps"] == 8 / 255 and written["step_size"] == 2 / 255  # the budget trained with is in the run
    history = json.load(open(os.path.join(workdir, "history.json")))
    assert len(history["loss"]) == 2


# -- --examples: a seeded, stratified random subset -----------------------------------------------------


def test_stratified_subset_properties():
    from tfrobust.data import stratified_subset

    y = np.repeat([0, 1, 2, 3], [50, 30, 15, 5])  # sorted by class, as a class-per-folder test split
    for count in (1, 7, 20, 33, 99):
        chosen = stratified_subset(y, count, seed=4)
        assert len(chosen) == count == len(set(chosen.tolist())) and np.all(np.diff(chosen) > 0)
        per_class = np.bincount(y[chosen], minlength=4)
        quota = count * np.bincount(y) / len(y)
        assert np.all(per_class >= np.floor(quota)) and np.all(per_class <= np.ceil(quota))
        assert np.array_equal(chosen, stratified_subset(y, count, seed=4))  # same seed, same subset
    assert not np.array_equal(stratified_subset(y, 20, seed=0), stratified_subset(y, 20, seed=1))
    assert np.array_equal(stratified_subset(y, 500, seed=0), np.arange(100))


def test_examples_draws_every_class_of_a_sorted_test_split(tmp_path):
    """A network that always answers class 0: right on 1/3 of a class-balanced draw, on all of the first N."""
    x_test = np.zeros((90, 12, 12, 1), np.uint8)
    npz = write_npz(tmp_path / "d.npz", x_test=x_test, y_test=np.repeat([0, 1, 2], 30))
    model = tmp_path / "zero.keras"
    code, _, err = script(f"""
        import keras, numpy as np
        net = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
        net.layers[-1].set_weights([np.zeros((144, 3), "float32"), np.array([1.0, 0.0, 0.0], "float32")])
        net.save({str(model)!r})
    """)
    assert code == 0, err
    out_path = tmp_path / "r.json"
    code, out, err = run([os.path.join(ROOT, "evaluate.py"), "--model", str(model), "--data", npz, "--examples", "30",
                          "--attacks", "clean", "--integrity-examples", "0", "--seed", "5", "--output", str(out_path)])
    assert code == 0, err
    report = json.load(open(out_path))
    assert report["examples"] == 30 and report["accuracy"]["clean"] == pytest.approx(1 / 3)
    assert report["test_examples"] == "30 of 90 test examples, stratified by label, drawn with seed 5"
    assert report["eps"] == 8 / 255 and "the default for" in report["eps_source"]


# -- inputs outside [0, 1], multi-input/multi-output networks, one-hot labels ------------------------------


def test_inputs_outside_unit_range_are_refused(tmp_path):
    wide = np.random.default_rng(1).uniform(0, 255, (240, 12, 12, 1)).astype(np.float32)
    npz = write_npz(tmp_path / "d.npz", x_train=wide)
    code, _, err = train_py("--data", npz, "--workdir", str(tmp_path / "run"), "--epochs", "1", *TINY)
    line = error_line(err)
    assert code == 2 and f"values in [{wide.min():g}, {wide.max():g}], outside [0, 1]" in line
    assert "divide 0..255 images by 255" in line and not (tmp_path / "run").exists()
    code, out, err = script("""
        import keras, numpy as np
        from tfrobust import evaluation
        from tfrobust.errors import UserError
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        x = np.linspace(0, 255, 40, dtype="float32").reshape(10, 4)
        try:
            evaluation.evaluate(net, x, np.zeros(10, "int32"), 0.1, verbose=False)
        except UserError as e:
            print(e)
    """)
    assert code == 0, err
    assert out.strip() == ("x holds values in [0, 255], outside [0, 1], the range the attacks clip to; "
                           "divide images stored as 0..255 by 255")


NETS = """
import keras

def two_inputs(input_shape, num_classes):
    a, b = keras.Input(input_shape), keras.Input(input_shape)
    joined = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    return keras.Model([a, b], keras.layers.Dense(num_classes)(joined))

def two_outputs(input_shape, num_classes):
    a = keras.Input(input_shape)
    h = keras.layers.Flatten()(a)
    return keras.Model(a, [keras.layers.Dense(num_classes)(h), keras.layers.Dense(num_classes)(h)])
"""


def test_multi_input_multi_output_and_one_hot_are_refused_at_build_time(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    npz = write_npz(tmp_path / "d.npz")
    for name, counts in (("two_inputs", "2 inputs and 1 output"), ("two_outputs", "1 input and 2 outputs")):
        code, _, err = run([os.path.join(ROOT, "train.py"), "--data", npz, "--model", f"nets:{name}",
                            "--workdir", str(tmp_path / "run"), *TINY], cwd=str(tmp_path))
        line = error_line(err)
        assert code == 2 and counts in line and "tfrobust supports one input" in line, err
        assert not (tmp_path / "run").exists()
    one_hot = write_npz(tmp_path / "h.npz", y_train=np.eye(3, dtype=np.float32)[np.arange(240) % 3])
    code, _, err = train_py("--data", one_hot, "--workdir", str(tmp_path / "run"), *TINY)
    assert code == 2 and "one-hot labels of shape (240, 3)" in error_line(err)
    # The library: evaluate and the checks the Keras model calls.
    code, out, err = script("""
        import keras, numpy as np
        import nets
        from tfrobust import evaluation
        from tfrobust.network_checks import check_labels, check_network_io
        from tfrobust.errors import UserError
        x, y = np.zeros((6, 12, 12, 1), "float32"), np.arange(6) % 3
        for attempt in (lambda: evaluation.evaluate(nets.two_outputs((12, 12, 1), 3), x, y, 0.1, verbose=False),
                        lambda: evaluation.evaluate(lambda t: [t, t], x, y, 0.1, verbose=False),
                        lambda: check_network_io(nets.two_inputs((12, 12, 1), 3)),
                        lambda: check_labels(np.eye(3)[y]),
                        lambda: evaluation.evaluate(nets.two_inputs((12, 12, 1), 1), x, np.eye(3)[y], 0.1)):
            try:
                attempt()
                print("accepted")
            except UserError as e:
                print(e)
        print(check_labels(np.array([[2.0], [0.0]])).tolist())
    """, cwd=str(tmp_path))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "has 1 input and 2 outputs; tfrobust supports one input" in lines[0]
    assert lines[1].startswith("the model returns 2 outputs; tfrobust supports one input")
    assert "has 2 inputs and 1 output" in lines[2]
    assert lines[3] == lines[4] == ("labels of shape (6, 3) look one-hot; tfrobust takes integer class labels of "
                                    "shape (N,): pass y.argmax(axis=-1)")
    assert lines[5] == "[2, 0]"


# -- feature vectors (N, F) in evaluate -----------------------------------------------------------------


def test_evaluate_on_feature_vectors(tmp_path):
    """FGSM on a linear model, recomputed in numpy; the attacks that need images are named."""
    code, out, err = script("""
        import json, keras, numpy as np
        from tfrobust import evaluation
        from tfrobust.errors import UserError
        rng = np.random.default_rng(0)
        x = rng.uniform(size=(64, 5)).astype("float32")
        w, b = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=3).astype("float32")
        y = (x @ w + b).argmax(1).astype("int32")
        y[::4] = (y[::4] + 1) % 3  # a quarter misclassified
        net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        net.layers[0].set_weights([w, b])
        r = evaluation.evaluate(net, x, y, 0.05, attacks=["clean", "fgsm", "pgd5_ce", "apgd_ce"], verbose=False,
                                integrity_examples=16)
        print(json.dumps({"accuracy": r["accuracy"], "integrity": r["integrity"]["passed"]}))
        np.savez("lin.npz", x=x, y=y, w=w, b=b)
        for attacks in (["standard"], ["square"]):
            try:
                evaluation.evaluate(net, x, y, 0.05, attacks=attacks, verbose=False)
            except UserError as e:
                print(e)
    """, cwd=str(tmp_path))
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[0])
    data = np.load(tmp_path / "lin.npz")
    x, y, w, b = (data[k].astype(np.float64) for k in ("x", "y", "w", "b"))
    y = y.astype(int)
    logits = x @ w + b
    assert result["accuracy"]["clean"] == pytest.approx(np.mean(logits.argmax(1) == y))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y]) @ w.T  # d CE / d x of a linear model
    x_adv = np.clip(x + 0.05 * np.sign(grad), 0, 1)
    assert result["accuracy"]["fgsm"] == pytest.approx(np.mean((x_adv @ w + b).argmax(1) == y))
    for name in ("pgd5_ce", "apgd_ce"):
        assert result["accuracy"][name] <= result["accuracy"]["clean"]
    assert result["integrity"] is True
    assert lines[1].startswith("square (in standard) needs images (N, H, W, C); on feature vectors (N, F)")
    assert lines[2].startswith("square needs images (N, H, W, C)")
