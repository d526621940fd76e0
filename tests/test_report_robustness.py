"""Robustness that agrees with the sensitivity figure: contiguous ranges against own best and overall best."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench.report.stats import robust_range
from bench.report.tables import Reference, robustness


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
