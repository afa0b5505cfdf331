"""evaluate(): named attacks, the worst case, and cleverhans cross-checks."""

import json

import numpy as np
import pytest

from tfrobust import evaluation
from tfrobust.errors import UserError


def test_report_and_worst_case(trained_tiny, fashion_subset):
    x, y = fashion_subset[0][500:600], fashion_subset[1][500:600]
    fn = lambda t: trained_tiny(t, training=False)  # noqa: E731
    report = evaluation.evaluate(fn, x, y, 0.1, attacks="clean,fgsm,pgd10_ce,pgd10_cw", batch_size=64, verbose=False)
    acc = report["accuracy"]
    clean = (trained_tiny(x).numpy().argmax(1) == y).mean()
    assert acc["clean"] == pytest.approx(clean)
    assert acc["pgd10_ce"] <= acc["fgsm"] + 0.02 and acc["pgd10_ce"] < acc["clean"]
    both = np.logical_and.reduce([report["correct"][k] for k in acc])
    assert report["worst_case"] == pytest.approx(both.mean())
    assert report["worst_case"] <= min(acc.values())


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.05, 0.0125), ("l2", 1.0, 0.25)])
def test_cleverhans_agrees_with_our_pgd(trained_tiny, fashion_subset, norm, eps, step):
    x, y = fashion_subset[0][500:600], fashion_subset[1][500:600]
    fn = lambda t: trained_tiny(t, training=False)  # noqa: E731
    report = evaluation.evaluate(fn, x, y, eps, norm=norm, step_size=step, verbose=False,
                                 attacks="clean,pgd10_ce,cleverhans_pgd10,cleverhans_mim10,cleverhans_fgsm,fgsm")
    acc = report["accuracy"]
    assert abs(acc["pgd10_ce"] - acc["cleverhans_pgd10"]) <= 0.05
    assert abs(acc["fgsm"] - acc["cleverhans_fgsm"]) <= 0.02
    assert acc["cleverhans_mim10"] < acc["clean"]


def test_evaluate_run_draws_evaluates_and_writes_without_overwriting(trained_tiny, tmp_path, capsys):
    from tfrobust.data import load_test_arrays, stratified_subset

    path, out = str(tmp_path / "tiny.keras"), tmp_path / "r.json"
    trained_tiny.save(path)
    report = evaluation.evaluate_run(path, ("clean", "fgsm"), examples=40, seed=3, integrity_examples=0,
                                     output=str(out), verbose=False)
    assert capsys.readouterr().out == ""
    x, y = load_test_arrays("fashion_mnist")
    chosen = stratified_subset(y, 40, 3)
    clean = (trained_tiny(x[chosen], training=False).numpy().argmax(1) == y[chosen]).mean()
    assert report["accuracy"]["clean"] == pytest.approx(clean)
    assert report["examples"] == 40 and report["data"] == "fashion_mnist" and report["model"] == path
    written = json.loads(out.read_text())
    assert written["accuracy"] == report["accuracy"] and written["test_examples"] == report["test_examples"]
    summary = json.loads((tmp_path / "r.robustbench.json").read_text())
    assert summary["clean_acc"] == round(100 * report["accuracy"]["clean"], 2)
    with pytest.raises(UserError, match="exists; choose another --output"):
        evaluation.evaluate_run(path, ("clean",), output=str(out), verbose=False)
    assert json.loads(out.read_text()) == written


def test_unknown_attack_names_the_allowed_ones():
    with pytest.raises(UserError, match="allowed: clean, fgsm, pgd<N>_ce"):
        evaluation.parse_attacks("clean,pgd")
    assert evaluation.parse_attacks("APGD-CE, clean, clean") == ["apgd_ce", "clean"]


def test_robustbench_summary():
    report = {"accuracy": {"clean": 0.9, "apgd_ce": 0.5, "autoattack_standard": 0.45}, "worst_case": 0.45,
              "examples": 200, "eps": 8 / 255, "norm": "linf", "data": "cifar10", "model": "runs/x",
              "autoattack": {"version": "standard", "verdict_passes": 1, "clean": 0.9},
              "flags": [{"name": "eps_not_rounded", "passed": True, "skipped": False, "detail": ""},
                        {"name": "square_not_better", "passed": True, "skipped": True, "detail": ""}]}
    config = {"defense": {"name": "trades+awp"}}
    s = evaluation.robustbench_summary(report, config)
    assert s["eps"] == "8/255" and s["threat_model"] == "Linf" and s["version"] == "standard"
    assert s["clean_acc"] == 90.0 and s["autoattack_acc"] == 45.0 and s["n_examples"] == 200
    assert s["per_attack_acc"] == {"clean": 90.0, "apgd_ce": 50.0, "autoattack_standard": 45.0}
    assert s["flags"] == {"eps_not_rounded": True, "square_not_better": None} and s["config"] == config
    report["eps"], report["norm"] = 0.5, "l2"
    del report["accuracy"]["clean"]
    s = evaluation.robustbench_summary(report)
    assert s["eps"] == "0.5" and s["threat_model"] == "L2" and s["clean_acc"] == 90.0 and s["config"] is None
