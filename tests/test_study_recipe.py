"""The recipe study's statistics: 95% t-intervals over seeds, paired differences and their verdicts."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import study_recipe  # noqa: E402

# Student's t, 0.975 quantile, from printed tables (independent of scipy).
T_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_tables(df):
    assert study_recipe.t_quantile_975(df) == pytest.approx(T_975[df], rel=1e-8)


def test_interval_is_the_t_interval_of_the_mean():
    values = [0.55, 0.57, 0.56]
    mean, half = study_recipe.interval(values)
    sd = math.sqrt(((0.55 - 0.56) ** 2 + (0.57 - 0.56) ** 2 + 0.0) / 2)  # = 0.01
    assert mean == pytest.approx(0.56)
    assert half == pytest.approx(T_975[2] * sd / math.sqrt(3))  # 0.0248 = 2.5 points
    assert study_recipe.interval([0.5]) == (0.5, None)


def record(args, seed, method, clean, pgd, autoattack=None):
    entry = {"train": {"cpu_seconds": 60.0, "train_seconds": 30.0},
             "pgd": {"accuracy": {"clean": clean, "pgd20_ce": pgd}, "cpu_seconds": 6.0,
                     "seconds": {"clean": 1.0, "pgd20_ce": 3.0}}}
    if autoattack is not None:
        entry["autoattack"] = {"accuracy": {"autoattack_standard": autoattack}, "cpu_seconds": 54.0,
                               "seconds": {"clean": 1.0, "autoattack_standard": 29.0}}
    study_recipe._write(entry, study_recipe._file(args, seed, method))


def test_report_gives_paired_differences_and_verdicts(tmp_path):
    args = study_recipe.parse_args(["--results", str(tmp_path), "--methods", "at,at+ema,trades,at+s2o",
                                    "--autoattack-examples", "1000"])
    study_recipe._write({"machine": "test machine", "command": "cmd"}, str(tmp_path / "setting.json"))
    # at+ema is 1, 2 and 3 points above at in PGD-20 on seeds 0, 1, 2 (differences 0.01, 0.02, 0.03: the interval
    # 2 +- 2.48 includes 0); AutoAttack is exactly 2 points above on every seed (interval +2 +- 0).
    for seed, (base, step) in enumerate([(0.50, 0.01), (0.52, 0.02), (0.51, 0.03)]):
        record(args, seed, "at", 0.75, base, base - 0.02)
        record(args, seed, "at+ema", 0.75, base + step, base)
        record(args, seed, "at+s2o", 0.70 + 0.01 * seed, base + 0.05)
    lines = "\n".join(study_recipe.report_lines(args))
    assert "| at | 3 | 75.0 ± 0.0 | 51.0 ± 2.5 | 49.0 ± 2.5 | 1 min, 1 min |" in lines
    assert ("| at+ema − at | PGD-20 | +1.0, +2.0, +3.0 | +2.0 ± 2.5 | not resolved: differences below ±2.5 "
            "points cannot be told apart here |") in lines
    assert "| at+ema − at | AutoAttack | +2.0, +2.0, +2.0 | +2.0 ± 0.0 | better (the interval excludes 0) |" in lines
    assert "| at+ema − at | clean | +0.0, +0.0, +0.0 | +0.0 ± 0.0 | equal on every seed |" in lines
    assert "| at+s2o − at | PGD-20 | +5.0, +5.0, +5.0 | +5.0 ± 0.0 | better (the interval excludes 0) |" in lines
    assert "| at+s2o − at | clean | -5.0, -4.0, -3.0 | -4.0 ± 2.5 | worse (the interval excludes 0) |" in lines
    assert "In progress: 9 of 12 steps done; next trades (seed 0)" in lines
    # 6 x (60 + 6 + 54) + 3 x (60 + 6) s = 918 s = 0.255 h, AutoAttack 6 x 54 = 324 s of it (35%); wall time
    # 6 x (30 + 4 + 30) + 3 x (30 + 4) = 486 s = 0.135 h.
    assert "Total CPU time of all steps: 0.3 h, 35% of it AutoAttack" in lines
    assert "took 0.1 h of wall time" in lines
    assert "| at+s2o | 3 | 71.0 ± 2.5 | 56.0 ± 2.5 | – | 1 min, 6 s |" in lines


def test_a_report_in_progress_counts_only_complete_steps(tmp_path):
    args = study_recipe.parse_args(["--results", str(tmp_path), "--methods", "at,at+ema", "--autoattack-examples", "1000"])
    study_recipe._write({"machine": "test machine", "command": "cmd"}, str(tmp_path / "setting.json"))
    for seed in (0, 1):
        record(args, seed, "at", 0.75, 0.50 + 0.01 * seed, 0.48)
        record(args, seed, "at+ema", 0.75, 0.52 + 0.02 * seed, 0.49)
    record(args, 2, "at", 0.60, 0.40)  # trained and PGD-evaluated; AutoAttack still to run
    lines = "\n".join(study_recipe.report_lines(args))
    # Seed 2's at is left out of its row: every column covers seeds 0 and 1.
    assert "| at | 2 | 75.0 ± 0.0 | 50.5 ± 6.4 | 48.0 ± 0.0 | 1 min, 1 min |" in lines
    assert ("| at+ema − at | PGD-20 | +2.0, +3.0 | +2.5 ± 6.4 | so far (2 of 3 seeds): not resolved: differences "
            "below ±6.4 points cannot be told apart here |") in lines
    assert "| at+ema − at | AutoAttack | +1.0, +1.0 | +1.0 ± 0.0 | so far (2 of 3 seeds): better" in lines
