"""Robustness that agrees with the sensitivity figure: contiguous ranges against own best and overall best."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench.report.stats import robust_range
from bench.report.tables import Reference, robustness, robustness_profile
from bench.report.write import _profile_section


def _summary(curves: dict[str, list[float]], lrs: list[float]) -> pd.DataFrame:
    rows = [
        {"method": m, "family": "tower", "height": h, "tuned": False, "lr": lr, "momentum": math.nan,
         "test_error_mean": e}
        for h, (m, errs) in enumerate(curves.items())
        for lr, e in zip(lrs, errs, strict=True)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_a_flat_tall_tower_scores_more_decades_than_a_peaked_short_one_on_hand_made_curves() -> None:
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    curves = {
        "sgd": [0.90, 0.40, 0.12, 0.10, 0.60, 0.90],  # height 0: one good decade, fails at large steps
        "sgd/sgd": [0.14, 0.13, 0.90, 0.13, 0.13, 0.14],  # flat but for one bad point: ranges must be contiguous
    }
    table = robustness(_summary(curves, lrs), Reference(0.10, "best"), tolerance=0.025)
    short, tall = table.iloc[0], table.iloc[1]
    assert (short["decades_own"], short["own_low"], short["own_high"]) == (pytest.approx(1.0), 1e-2, 1e-1)
    # Not 1e-4..10 (min and max of the qualifying points): the longest contiguous run is 1e-1..10.
    assert (tall["decades_own"], tall["own_low"], tall["own_high"]) == (pytest.approx(2.0), 1e-1, 10.0)
    assert short["worst"] == 0.90 and tall["best"] == 0.13
    # Against the overall best (10%) with 2.5 pt tolerance the tall tower (13%) never qualifies.
    assert (short["decades"], short["n_within"]) == (pytest.approx(1.0), 2)
    assert tall["n_within"] == 0 and math.isnan(tall["decades"])


def test_robust_range_returns_the_bounds_of_the_run_it_measures() -> None:
    assert robust_range([1.0, 0.1, 0.01], [0.5, 0.1, 0.1], reference=0.1, tolerance=0.0) == (
        pytest.approx(1.0), 2, 0.01, 0.1,
    )  # fmt: skip
    decades, n, low, high = robust_range([0.1], [0.9], reference=0.1, tolerance=0.0)
    assert n == 0 and all(math.isnan(v) for v in (decades, low, high))


def test_the_profile_counts_contiguous_decades_at_each_tolerance_on_hand_made_curves() -> None:
    # The shape of a short sensitivity run: every height best at one step size, taller towers flat but higher.
    lrs = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    curves = {
        "sgd": [0.90, 0.90, 0.88, 0.80, 0.36, 0.18, 0.12, 0.28],
        "sgd/sgd/sgd": [0.20, 0.20, 0.90, 0.20, 0.20, 0.18, 0.12, 0.25],  # one bad point breaks the run
    }
    table = robustness_profile(_summary(curves, lrs), absolute=[0.01, 0.10], relative=[2.0])
    short, tall = table.iloc[0], table.iloc[1]
    assert list(table.columns[:3]) == ["method", "height", "momentum"]
    # 1 pt: only each best point itself; the profile does not pretend otherwise.
    assert (short["abs_0.01"], tall["abs_0.01"]) == (0.0, 0.0)
    assert short["abs_0.01_range"] == tall["abs_0.01_range"] == "1-1"
    # 10 pt (<= 22%): height 0 holds 0.1..1; the tall tower 1e-3..1, not 1e-6..1 (1e-4 fails in between).
    assert short["abs_0.1"] == pytest.approx(1.0) and short["abs_0.1_range"] == "0.1-1"
    assert tall["abs_0.1"] == pytest.approx(3.0) and tall["abs_0.1_range"] == "0.001-1"
    # Twice the best (<= 24%): the same runs; 10 (25%) just misses.
    assert (tall["rel_2"], tall["rel_2_range"]) == (pytest.approx(3.0), "0.001-1")
    assert short["rel_2"] == pytest.approx(1.0)
    # The grid mean needs no tolerance: the plain mean of the curve.
    assert short["grid_mean"] == pytest.approx(sum(curves["sgd"]) / len(lrs))
    assert tall["grid_mean"] < short["grid_mean"] and (short["best"], short["worst"]) == (0.12, 0.90)


def test_the_report_defines_and_prints_the_profile() -> None:
    lrs = [1e-2, 1e-1, 1.0]
    profile = robustness_profile(_summary({"sgd": [0.5, 0.2, 0.1]}, lrs), absolute=[0.05], relative=[2.5])
    text = "\n".join(_profile_section(profile))
    assert "| method | ≤ best + 5 pt | ≤ 2.5 x best | best | grid mean | worst |" in text
    assert "| sgd | 0 (1-1) | 1 (0.1-1) | 10.00% | 26.67% | 50.00% |" in text
    assert "drawn log-uniformly from the grid" in text  # every column is defined where it is printed
