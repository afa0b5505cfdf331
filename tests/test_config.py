"""Typed configs from YAML with dotted overrides, and the errors for bad keys and values."""

import glob

import pytest

from tfrobust.config import load_config, parse_overrides, set_value
from tfrobust.defenses import parse_defense
from tfrobust.errors import UserError


def test_defaults_and_overrides():
    cfg = load_config(None, {"optim.lr": "0.2", "attack.steps": "7", "data.augment": "false",
                             "defense.awp.gamma": "0.02", "optim.decay_at": "[0.3, 0.6]", "data.train_examples": "none"})
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.attack.steps == 7 and isinstance(cfg.attack.steps, int)
    assert cfg.data.augment is False
    assert cfg.defense.awp.gamma == 0.02
    assert cfg.optim.decay_at == [0.3, 0.6]
    assert cfg.data.train_examples is None


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  eps: 0.05\ndefense:\n  name: trades+awp\n  rat:\n    reference_quirk: true\n")
    cfg = load_config(str(path), {"attack.eps": "0.07"})
    assert cfg.attack.eps == 0.07  # the command line wins over the file
    assert cfg.defense.name == "trades+awp"
    assert cfg.defense.rat.reference_quirk is True


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load_and_name_valid_defenses(path):
    cfg = load_config(path)
    parse_defense(cfg.defense.name, cfg.defense)


@pytest.mark.parametrize("overrides,message", [
    ({"optim.lrr": "1"}, "unknown config key 'optim.lrr'"),
    ({"nothing": "1"}, "unknown config key 'nothing'"),
    ({"attack.eps": "-0.1"}, "attack.eps must be >= 0"),
    ({"attack.eps": "big"}, "config key 'attack.eps' needs a number"),
    ({"attack.steps": "2.5"}, "config key 'attack.steps' needs an integer"),
    ({"data.augment": "maybe"}, "needs true or false"),
    ({"attack.norm": "l1"}, "allowed: l2, linf"),
    ({"optim.epochs": "0"}, "optim.epochs must be > 0"),
    ({"model.cnn_width": "0"}, "model.cnn_width must be >= 1"),
    ({"runtime.strategy": "tpu9"}, "unknown runtime.strategy"),
    ({"eval.collapse_drop": "1.5"}, "eval.collapse_drop must be in "),
    ({"eval.collapse_action": "retry"}, "unknown eval.collapse_action 'retry'"),
    ({"eval.collapse_pgd_epochs": "-1"}, "eval.collapse_pgd_epochs must be >= 0"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("attack: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    section = tmp_path / "section.yaml"
    section.write_text("attack: 3\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(str(section))


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "c = x=y"]) == {"a.b": "1", "c": "x=y"}
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["novalue"])


def test_set_value_on_nested_section():
    cfg = load_config()
    set_value(cfg, "defense.s2o.a", "0.25")
    assert cfg.defense.s2o.a == 0.25
