"""A weight-space term registered from outside the package trains like the built-in ones.

The toy term below is one class and one ``register_term`` call, written here
only: it has a soft target computed from whole-batch statistics (the batch's
mean clean prediction ``q = mean_n softmax(f(x_n))``, summed across replicas),
mixes ``weight * KL(q || p(x'_n))`` into the primary term, reports that term
and a scalar statistic. The step it makes is checked against the same
objective written out by hand with a GradientTape.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import attacks
from tfrobust.config import load_config
from tfrobust.defense_names import Hyperparameter, check_defense_name, register_term, unregister_term
from tfrobust.defenses import Defense, WeightSpaceTerm
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel


class MeanPredictionTerm(WeightSpaceTerm):
    """``weight * KL(q || p(x'))`` with ``q`` the batch's mean clean prediction (no gradient)."""

    NEEDS_CLEAN_LOGITS = True
    TERMS = ("toy_kl",)
    STATISTICS = ("toy_entropy",)

    def statistics(self, network, logits_clean, logits_adv, y, recorded, tape):
        p = tf.nn.softmax(tf.stop_gradient(logits_clean))
        return [tf.reduce_sum(p, axis=0), tf.cast(tf.shape(p)[0], tf.float32)]

    def soft_targets(self, statistics, y):
        total, count = statistics
        q = total / count
        entropy = -tf.reduce_sum(q * tf.math.log(q))
        return tf.tile(q[None, :], [tf.shape(y)[0], 1]), {"toy_entropy": entropy}

    def mix(self, primary, logits_clean, logits_adv, targets):
        kl = attacks.kl_from_probabilities(targets, logits_adv)
        return primary + self.setting("weight") * kl, {"toy_kl": kl}


@pytest.fixture
def toy():
    register_term(
        "toy", MeanPredictionTerm, bases=("at", "trades"),
        hyperparameters=(Hyperparameter("weight", 0.5, float, lambda w: w >= 0, "must be >= 0"),),
        conflicts=(("rat", "toy and RAT both replace the soft targets"),), defenses=("at+toy",),
    )
    yield
    unregister_term("toy")


def one_step(defense, x, y, strategy=None, lr=0.1):
    """One plain SGD step of RobustModel with an attack of size 0 (x' = x)."""
    with (strategy or tf.distribute.get_strategy()).scope():
        model = RobustModel(tiny_cnn(seed=4), defense, eps=0.0, step_size=0.0, steps=0, seed=1)
        model.compile(optimizer=keras.optimizers.SGD(lr))
    logs = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)), epochs=1, verbose=0, shuffle=False).history
    return model, {k: v[0] for k, v in logs.items()}


def by_hand(x, y, weight, lr=0.1):
    """The same step written out: CE + weight * KL(q || p(x)), q the batch's mean softmax."""
    network = tiny_cnn(seed=4)
    with tf.GradientTape() as tape:
        logits = network(x, training=True)
        q = tf.reduce_mean(tf.nn.softmax(tf.stop_gradient(logits)), axis=0)
        log_p = tf.nn.log_softmax(logits)
        kl = tf.reduce_sum(q * (tf.math.log(q) - log_p), axis=1)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        loss = tf.reduce_mean(ce + weight * kl)
    grads = tape.gradient(loss, network.trainable_variables)
    new = [w.numpy() - lr * g.numpy() for w, g in zip(network.trainable_variables, grads)]
    return new, float(loss), float(tf.reduce_mean(kl)), float(-tf.reduce_sum(q * tf.math.log(q)))


# One SGD step (lr 0.1) from weights of size ~0.1: the two float32 computations
# sum in different orders, which moves a gradient entry by ~1e-7 of its size
# and a weight by ~1e-8; the toy term itself moves the weights by ~1e-3
# (asserted below), so 1e-6 separates the two by three orders of magnitude.
TOL = 1e-6


def largest_difference(model, expected):
    return max(float(np.abs(w.numpy() - e).max()) for w, e in zip(model.network.trainable_variables, expected))


def test_registered_term_trains_a_step_equal_to_the_objective_written_out(toy, fashion_subset):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    model, logs = one_step(Defense("at+toy", toy_weight=2.0), x, y)
    expected, loss, kl, entropy = by_hand(x, y, weight=2.0)
    assert largest_difference(model, expected) < TOL
    np.testing.assert_allclose([logs["loss"], logs["toy_kl"], logs["toy_entropy"]], [loss, kl, entropy], rtol=1e-5)
    # The check can fail: without the term (weight 0) the step lands far from it.
    without, *_ = by_hand(x, y, weight=0.0)
    assert largest_difference(model, without) > 1000 * TOL


def test_registered_term_statistics_are_summed_across_replicas(toy, fashion_subset):
    from tfrobust.config import RuntimeConfig
    from tfrobust.experiment import build_strategy

    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    mirrored = build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))
    model, _ = one_step(Defense("at+toy"), x, y, strategy=mirrored)
    expected, *_ = by_hand(x, y, weight=0.5)  # the registered default
    for w, e in zip(model.network.trainable_variables, expected):
        for replica in w.value.values:  # both replicas applied the update of the whole batch
            np.testing.assert_allclose(replica.numpy(), e, atol=TOL)


def test_registration_declares_name_rules_and_hyperparameters(toy):
    d = Defense("at+toy")
    assert (d.name, d.toy, d.awp, d.toy_weight) == ("at+toy", True, False, 0.5)
    assert Defense(**d.hyperparameters()) == d
    assert check_defense_name("trades+awp+toy") == "trades+awp+toy"
    with pytest.raises(UserError, match="TOY builds on AT or TRADES"):
        Defense("mart+toy")
    with pytest.raises(UserError, match="toy and RAT both replace the soft targets"):
        Defense("trades+toy+rat")
    with pytest.raises(UserError, match="defense.toy.weight must be >= 0"):
        Defense("at+toy", toy_weight=-1.0)


def test_built_in_terms_keep_their_config_keys_and_defaults():
    cfg = load_config(overrides={"defense.name": "trades+awp+s2o", "defense.awp.gamma": "0.02", "defense.s2o.a": "0.2"})
    from tfrobust.defenses import parse_defense

    d = parse_defense(cfg.defense.name, cfg.defense)
    assert (d.awp_gamma, d.awp_warmup_epochs, d.s2o_a, d.rat_alpha, d.beta) == (0.02, 10, 0.2, 0.2, 6.0)
    assert Defense("trades+awp+s2o", awp_gamma=0.02, s2o_a=0.2) == d
    with pytest.raises(UserError, match="defense.awp.gamma must be >= 0"):
        load_config(overrides={"defense.name": "at+awp", "defense.awp.gamma": "-1"})


PLUGIN = '''
"""A plug-in module: one weight-space term, registered when the module is imported."""
import tensorflow as tf

from tfrobust.defense_names import Hyperparameter, register_term
from tfrobust.defenses import WeightSpaceTerm


class FlatPrediction(WeightSpaceTerm):
    """weight * KL(uniform || p(x')) added to the primary term."""

    TERMS = ("planted_kl",)

    def mix(self, primary, logits_clean, logits_adv, targets):
        log_p = tf.nn.log_softmax(logits_adv)
        k = tf.cast(tf.shape(log_p)[-1], tf.float32)
        kl = -tf.math.log(k) - tf.reduce_mean(log_p, axis=-1)
        return primary + self.setting("weight") * kl, {"planted_kl": kl}


register_term("planted", FlatPrediction, bases=("at", "trades"),
              hyperparameters=(Hyperparameter("weight", 0.5, float, lambda w: w >= 0, "must be >= 0"),))
'''


@pytest.fixture
def plugin_file(tmp_path):
    import sys

    path = tmp_path / "planted_term.py"
    path.write_text(PLUGIN)
    yield str(path)
    unregister_term("planted")
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(path)]:
        del sys.modules[name]


def test_a_plugin_named_in_the_config_gives_a_defense_and_its_config_section(plugin_file):
    from tfrobust.config import to_dict
    from tfrobust.defenses import parse_defense

    with pytest.raises(UserError, match="'planted'; allowed: awp, elle, elle_a, gradalign, rat, s2o .a plug-in's term: load its module with --plugin"):
        load_config(overrides={"defense.name": "at+planted"})
    cfg = load_config(overrides={"plugins": plugin_file, "defense.name": "at+planted",
                                 "defense.planted.weight": "0.25"})
    assert cfg.defense.name == "at+planted" and cfg.defense.planted.weight == 0.25
    assert parse_defense(cfg.defense.name, cfg.defense).planted_weight == 0.25
    saved = to_dict(cfg)
    assert saved["plugins"] == [plugin_file] and saved["defense"]["planted"] == {"weight": 0.25}
    assert "plugins" not in to_dict(load_config())  # config files of runs without plug-ins are unchanged
    # Loading again (a resume) imports nothing twice: the term is registered once.
    assert load_config(overrides={"plugins": plugin_file, "defense.name": "at+planted"}).defense.planted.weight == 0.5
    with pytest.raises(UserError, match="defense.planted.weight must be >= 0"):
        load_config(overrides={"plugins": plugin_file, "defense.name": "at+planted", "defense.planted.weight": "-1"})


def test_plugins_that_cannot_be_imported_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('needs a GPU\\nsecond line')\n")
    with pytest.raises(UserError, match=r"^plugin file not found: nope.py$"):
        load_config(overrides={"plugins": "nope.py"})
    with pytest.raises(UserError, match=r"^plugin 'no_such_module_xyz' could not be imported: ModuleNotFoundError"):
        load_config(overrides={"plugins": "no_such_module_xyz"})
    with pytest.raises(UserError, match=r"could not be imported: RuntimeError: needs a GPU$"):
        load_config(overrides={"plugins": str(broken)})


def test_train_command_loads_a_plugin_term(plugin_file, tmp_path):
    import json

    import yaml

    from tfrobust.cli import train_main

    workdir = tmp_path / "run"
    argv = ["--plugin", plugin_file, "--defense", "at+planted", "--set", "defense.planted.weight=2", "--epochs", "1",
            "--no-eval", "--workdir", str(workdir), "--set", "data.train_examples=64", "--set", "data.batch_size=32",
            "--set", "data.validation_examples=32", "--set", "attack.steps=1", "--set", "eval.pgd_steps=1",
            "--set", "eval.images_every=0", "--set", "runtime.verbose=0"]
    try:
        code = train_main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    with open(workdir / "history.json") as f:
        history = json.load(f)
    assert history["planted_kl"][0] > 0  # the plug-in's term was trained and reported
    with open(workdir / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["plugins"] == [plugin_file] and saved["defense"]["planted"] == {"weight": 2.0}


def test_command_line_plugins_are_added_to_those_of_the_config_file(plugin_file, tmp_path, capsys):
    import sys

    import yaml

    from tfrobust.cli import train_main

    other = tmp_path / "other_plugin.py"
    other.write_text("IMPORTED = True\n")
    config = tmp_path / "with_plugin.yaml"
    config.write_text(yaml.safe_dump({"plugins": [plugin_file], "defense": {"name": "at+planted"}}))
    # The file's plug-in is kept (its term stays a defense); the flag's is added once, after it.
    flags = ["--plugin", str(other), "--plugin", plugin_file, "--plugin", str(other)]
    cfg = load_config(str(config), plugins=[str(other), plugin_file, str(other)])
    assert cfg.plugins == [plugin_file, str(other)] and cfg.defense.name == "at+planted"
    assert any(getattr(m, "__file__", None) == str(other) for m in list(sys.modules.values()))
    for name in [n for n, m in list(sys.modules.items()) if getattr(m, "__file__", None) == str(other)]:
        del sys.modules[name]
    # --print-config imports none of them: the list is printed as it would be imported.
    assert train_main(["--config", str(config), "--defense", "at"] + flags + ["--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["plugins"] == [plugin_file, str(other)] and printed["defense"]["name"] == "at"
    assert not any(getattr(m, "__file__", None) == str(other) for m in list(sys.modules.values()))
    # --set plugins=... replaces the file's list, as any --set does.
    assert load_config(str(config), {"plugins": str(other)}, plugins=[str(other)]).plugins == [str(other)]
    for name in [n for n, m in list(sys.modules.items()) if getattr(m, "__file__", None) == str(other)]:
        del sys.modules[name]
