"""Defense names, their composition rules and the papers' defaults."""

import pytest

from tfrobust.config import DefenseConfig
from tfrobust.defenses import DEFENSES, parse_defense
from tfrobust.errors import UserError


@pytest.mark.parametrize("name", DEFENSES)
def test_every_listed_defense_parses(name):
    d = parse_defense(name)
    assert d.name == name
    assert d.base == name.split("+")[0]


@pytest.mark.parametrize("short,full", [("awp", "at+awp"), ("s2o", "at+s2o"), ("rat", "trades+rat")])
def test_short_names(short, full):
    assert parse_defense(short).name == full


def test_order_of_terms_does_not_matter():
    assert parse_defense("trades+s2o+awp").name == "trades+awp+s2o"


def test_paper_defaults_depend_on_base():
    assert parse_defense("at+awp").awp_gamma == 0.01
    assert parse_defense("mart+awp").awp_gamma == 0.01
    assert parse_defense("trades+awp").awp_gamma == 0.005
    assert parse_defense("trades+awp").awp_warmup_epochs == 10
    assert parse_defense("at+awp").awp_warmup_epochs == 0
    assert parse_defense("at+s2o").s2o_a == 0.1
    assert parse_defense("trades+s2o").s2o_a == 0.3
    assert parse_defense("mart+s2o").s2o_a == 0.3
    assert parse_defense("trades").beta == 6.0
    rat = parse_defense("rat")
    assert (rat.rat_alpha, rat.rat_sigma, rat.rat_reference_quirk) == (0.2, 1e-4, False)


def test_config_overrides_defaults():
    cfg = DefenseConfig()
    cfg.awp.gamma = 0.02
    cfg.awp.warmup_epochs = 3
    cfg.beta = 1.0
    d = parse_defense("trades+awp", cfg)
    assert (d.awp_gamma, d.awp_warmup_epochs, d.beta) == (0.02, 3, 1.0)


@pytest.mark.parametrize("name,message", [
    ("at+rat", "RAT builds on TRADES"),
    ("mart+rat", "RAT builds on TRADES"),
    ("trades+rat+s2o", "choose one"),
    ("awp+at", "must start with a base objective"),
    ("at+awp+awp", "names a term twice"),
    ("at+sam", "allowed: awp, elle, elle_a, gradalign, rat, s2o"),
    ("madry", "unknown defense 'madry'"),
    ("at+gradalign", "not defined: GRADALIGN builds on FGSM or FGSM_RS"),
    ("n_fgsm+gradalign", "GRADALIGN builds on FGSM or FGSM_RS"),
    ("trades+elle", "ELLE builds on FGSM or FGSM_RS or N_FGSM"),
    ("n_fgsm+elle+elle_a", "ELLE and ELLE-A are one regulariser; choose one"),
    ("fgsm_rs+rat", "RAT builds on TRADES"),
])
def test_refused_combinations(name, message):
    with pytest.raises(UserError, match=message):
        parse_defense(name)
