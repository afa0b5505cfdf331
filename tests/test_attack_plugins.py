"""An AutoAttack component added from outside the package runs like the built-in ones.

The toy component below is one function and one ``register_component`` row,
written here only: it brightens every pixel by eps. On a two-class linear
model whose class-1 logit exceeds the class-0 logit by ``sum(x) - t``, the
examples it breaks are known in closed form, so the command-line names, the
evaluation's report and the ensemble's per-example verdicts are checked
against that.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest

from tfrobust import attack_names, evaluation
from tfrobust import autoattack as aa
from tfrobust.attack_names import Component, parse_attacks, register_component, unregister_component
from tfrobust.errors import UserError

SIDE, THRESHOLD = 4, 8.0


def brighten(model_fn, x, y, eps, norm="linf", seed=0, scale=1.0):
    """Every pixel up by ``scale * eps`` (inside the L-inf ball for scale <= 1), clipped to [0, 1]."""
    return np.clip(np.asarray(x) + scale * eps, 0.0, 1.0).astype(np.float32)


@pytest.fixture
def toy():
    register_component(Component("toy-brighten", brighten, dict(scale=1.0)))
    yield
    unregister_component("toy-brighten")


def linear_model():
    """logit_1 - logit_0 = sum(x) - THRESHOLD."""
    inputs = keras.Input((SIDE, SIDE, 1))
    dense = keras.layers.Dense(2)
    outputs = dense(keras.layers.Flatten()(inputs))
    dense.set_weights([np.stack([np.zeros(SIDE * SIDE), np.ones(SIDE * SIDE)], 1).astype("float32"),
                       np.array([THRESHOLD, 0.0], "float32")])
    return keras.Model(inputs, outputs)


def examples(n=24):
    """Images whose pixel sums spread around THRESHOLD, labelled with the linear model's class."""
    rng = np.random.default_rng(0)
    x = np.clip(rng.uniform(0.2, 0.8, (n, SIDE, SIDE, 1)) * np.linspace(0.8, 1.2, n)[:, None, None, None], 0, 1)
    x = x.astype("float32")
    return x, (x.reshape(n, -1).sum(1) > THRESHOLD).astype("int32")


def test_the_command_line_knows_a_registered_component_only_while_it_is_registered(toy):
    assert parse_attacks("clean,toy-brighten,fast") == ["clean", "toy_brighten", "fast"]
    assert "toy_brighten" in attack_names.attack_names_help()
    assert attack_names.autoattack_plan(["clean", "toy_brighten", "fast"]) == (
        None, ["fast"], ["apgd_ce", "apgd_t", "toy_brighten"])
    with pytest.raises(UserError, match="runs its own attacks"):
        parse_attacks("rand,toy_brighten")
    with pytest.raises(UserError, match="exists already"):
        register_component(Component("toy-brighten", brighten))
    with pytest.raises(UserError, match="lower-case words"):
        register_component(Component("toy_other", brighten))
    unregister_component("toy-brighten")
    with pytest.raises(UserError, match="unknown attack 'toy_brighten'"):
        parse_attacks("toy_brighten")


def test_evaluate_runs_a_registered_component_with_its_budget(toy):
    model = linear_model()
    x, y = examples()
    eps = 0.02
    report = evaluation.evaluate(model, x, y, eps, attacks="clean,toy_brighten", batch_size=10, verbose=False)
    sums = x.reshape(len(x), -1).sum(1)
    bright = np.clip(x + eps, 0, 1).reshape(len(x), -1).sum(1)
    survives = (y == 1) | (bright <= THRESHOLD)
    assert 0 < (~survives).sum() < (y == 0).sum()  # the toy breaks some class-0 examples, not all
    assert report["accuracy"]["clean"] == 1.0
    assert report["accuracy"]["toy_brighten"] == pytest.approx(survives.mean())
    broken_by = np.array(report["autoattack"]["broken_by"])
    np.testing.assert_array_equal(broken_by == "toy-brighten", ~survives)
    assert np.all(sums[~survives] <= THRESHOLD)


def test_the_ensemble_reads_the_rows_budget_and_classes(toy):
    model = linear_model()
    x, y = examples()
    half = aa.run_autoattack(model, x, y, 0.02, attacks=["toy-brighten"], batch_size=10, verbose=False,
                             flags=False)
    register_component(Component("toy-half", brighten, dict(scale=0.5), min_classes=3))
    try:
        with pytest.raises(UserError, match="'toy-half' needs at least 3 classes"):
            aa.run_autoattack(model, x, y, 0.04, attacks=["toy-half"], verbose=False)
        unregister_component("toy-half")
        register_component(Component("toy-half", brighten, dict(scale=0.5)))
        scaled = aa.run_autoattack(model, x, y, 0.04, attacks=["toy-half"], batch_size=10, verbose=False,
                                   flags=False)
    finally:
        unregister_component("toy-half")
    # scale 0.5 at eps 0.04 moves every pixel as far as scale 1 at eps 0.02: the same verdicts
    np.testing.assert_array_equal(scaled["robust_mask"], half["robust_mask"])
    assert half["worst_case"] < half["clean"]


def test_the_table_is_read_without_tensorflow():
    code = ("import sys\nfrom tfrobust import attack_names\n"
            "attack_names.autoattack_plan(attack_names.parse_attacks('clean,standard,apgd_dlr'))\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
