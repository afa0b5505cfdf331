"""The study report's numbers: rank correlation, gaps and the choice of AutoAttack result."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import study_report  # noqa: E402


def _pearson_of_ranks(a, b):
    # Independent: ranks by sorting positions (no ties in these inputs).
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


def test_spearman():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    assert study_report.spearman(a, b) == pytest.approx(_pearson_of_ranks(a, b))
    assert study_report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study_report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take the average rank: ranks (1.5, 1.5, 3) against (1, 2, 3).
    assert study_report.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert study_report.spearman([1, 2], [2, 1]) is None
    assert study_report.spearman([1, 1, 1], [1, 2, 3]) is None


def _entry(best_pgd, last_pgd, train_pgd, standard_best, standard_last=None, same=False):
    test = {"best": {"accuracy": {"clean": 0.8, "pgd20_ce": best_pgd},
                     "standard": {"examples": 200, "accuracy": {"autoattack_standard": standard_best}}}}
    if same:
        test["last"] = dict(test["best"], same_as_best=True)
        del test["last"]["standard"]
    else:
        test["last"] = {"accuracy": {"clean": 0.81, "pgd20_ce": last_pgd},
                        "standard": {"examples": 200, "accuracy": {"autoattack_standard": standard_last}}}
    return {"test": test, "train_eval": {"last": {"accuracy": {"pgd20_ce": train_pgd}}},
            "best_epoch": 21, "epochs": 100, "val_pgd_best": 0.59, "val_pgd_last": 0.56}


def test_gaps_and_autoattack_choice():
    e = _entry(0.585, 0.55, 0.90, 0.57, 0.53)
    assert study_report.pgd_gap(e) == pytest.approx(0.035)
    assert study_report.generalisation_gap(e) == pytest.approx(0.35)
    assert study_report.autoattack(e, "best") == 0.57
    assert study_report.autoattack(e, "last") == 0.53
    # A last network that is the best one takes the best network's AutoAttack result.
    same = _entry(0.6, 0.6, 0.7, 0.58, same=True)
    assert study_report.autoattack(same, "last") == 0.58
    assert study_report.pgd_gap(same) == pytest.approx(0.0)
    # Missing measurements give None, shown as a dash.
    assert study_report.generalisation_gap({"test": {}}) is None
    rows = study_report.accuracy_table({"setting": {}, "methods": {"at": e}}, ("at",))
    assert rows[0].count("AA, first 200") == 2
    assert rows[2] == "| at | 0.800 | 0.810 | 0.585 | 0.550 | 0.570 | 0.530 | +0.035 | 22/100 |"
    assert "| – |" in study_report.generalisation_table({"setting": {}, "methods": {"x": {"series": {}}}}, ())[2]


def test_findings_name_the_overfitting_and_the_awp_effect():
    results = {"setting": {"test_examples": 1000},
               "methods": {"at": _entry(0.585, 0.55, 0.90, 0.57, 0.53), "at+awp": _entry(0.6, 0.598, 0.75, 0.58, 0.58)}}
    text = "\n".join(study_report.findings(results))
    assert "a drop of +0.035" in text and "AT overfits robustly here" in text
    assert "at+awp vs at: best − last PGD-20 drop +0.002 vs +0.035 (smaller with AWP" in text
