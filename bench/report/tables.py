"""From the run table to the report's tables: per-setting summary, tuning curves, robustness, paper numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bench.report.load import Runs
from bench.report.stats import bootstrap_ci, expected_best_of_n, robust_range, t_interval

__all__ = [
    "SUMMARY_COLUMNS",
    "Reference",
    "fixed_setting",
    "paper_comparison",
    "paper_height_curve_points",
    "reference_error",
    "robustness",
    "robustness_profile",
    "summarize",
    "tuning_curves",
]

SUMMARY_COLUMNS = [
    "method",
    "family",
    "height",
    "tuned",
    "lr",
    "momentum",
    "n_seeds",
    "seeds",
    "n_diverged",
    "test_error_mean",
    "test_error_std",
    "test_error_ci_low",
    "test_error_ci_high",
    "paper_test_error",
    "paper_test_error_std",
    "paper_row",
    "epochs_mean",
    "wall_time_s_mean",
    "tuning_epochs",
    "tuning_wall_time_s",
    "cost_epochs",
    "cost_wall_time_s",
    "compute_mean",
    "tuning_compute",
    "cost_compute",
    "study",
    "optimizer",
    "rerun_of",
]


def _seed_list(seeds: pd.Series) -> str:
    return " ".join(str(s) for s in sorted(seeds.tolist(), key=lambda s: (str(type(s)), s)))


def _tuning_cost(table: pd.DataFrame, study: str, summary: dict[str, Any]) -> tuple[float, float]:
    """Epochs and wall seconds the study's trials cost (pruned and failed ones included).

    From the trials' own metrics.json when every trial is among the inputs, so the seconds mean what they
    mean for every other row (training time of a run); otherwise from the study's totals minus its reruns.
    """
    trials = table[(table["study"] == study) & (table["role"] == "trial")]
    if len(trials) >= int(summary["n_trials"]):
        return float(trials["epochs"].sum()), float(trials["wall_time_s"].sum())
    reruns = table[(table["study"] == study) & (table["role"] == "rerun")]
    return (
        float(summary["total_epochs"]) - float(reruns["epochs"].sum()),
        float(summary["total_wall_time_s"]) - float(reruns["wall_time_s"].sum()),
    )


def summarize(
    runs: Runs, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0, interval: str = "t"
) -> pd.DataFrame:
    """One row per method and initial setting (lr, momentum): seeds, mean, std and CI of the test error, compute.

    The CI of the mean over seeds is a Student-t interval (`interval="t"`) or a percentile bootstrap
    (`interval="bootstrap"`). Re-runs of a tower (bench.rerun) form one row per tower, "<base> re-run of <tower>".

    Trials of a tune study are not rows: its reruns form one row, "<baseline> (tuned)", whose cost adds the
    whole study's tuning compute (every trial, pruned and failed ones included) to one run's compute.
    Diverged runs enter the mean as misses (test error 1.0) and are counted in `n_diverged`.
    """
    table = runs.table
    finals = table[table["role"].isin(["run", "rerun"])].copy()
    finals["tuned"] = finals["role"] == "rerun"
    finals["study_key"] = finals["study"].fillna("")
    rows = []
    keys = ["method", "family", "height", "tuned", "study_key", "lr", "momentum"]
    for key, group in finals.groupby(keys, dropna=False, sort=True):
        method, family, height, tuned, study, lr, momentum = key
        errors = group["test_error"].to_numpy()
        if interval == "bootstrap":
            lo, hi = bootstrap_ci(errors, confidence, n_resamples, seed)
        else:
            lo, hi = t_interval(errors, confidence)
        optimizers = group["optimizer"].unique()
        rerun_of = group["rerun_of"].dropna().unique() if "rerun_of" in group else []
        tuning_epochs = tuning_wall = tuning_compute = 0.0
        if tuned:
            tuning_epochs, tuning_wall = _tuning_cost(table, study, runs.studies[study])
            if "compute" in table:
                trials = table[(table["study"] == study) & (table["role"] == "trial")]
                tuning_compute = float(trials["compute"].sum())
        compute_mean = float(group["compute"].mean()) if "compute" in group else math.nan
        epochs_mean = float(group["epochs"].mean())
        wall_mean = float(group["wall_time_s"].mean())
        rows.append(
            {
                "method": f"{method} (tuned)" if tuned else method,
                "family": family,
                "height": int(height),
                "tuned": bool(tuned),
                "lr": lr,
                "momentum": momentum,
                "n_seeds": len(group),
                "seeds": _seed_list(group["seed"]),
                "n_diverged": int(group["diverged"].sum()),
                "test_error_mean": float(group["test_error"].mean()),
                "test_error_std": float(group["test_error"].std(ddof=1)) if len(group) > 1 else math.nan,
                "test_error_ci_low": lo,
                "test_error_ci_high": hi,
                "epochs_mean": epochs_mean,
                "wall_time_s_mean": wall_mean,
                "tuning_epochs": tuning_epochs,
                "tuning_wall_time_s": tuning_wall,
                "cost_epochs": epochs_mean + tuning_epochs,
                "cost_wall_time_s": wall_mean + tuning_wall,
                "compute_mean": compute_mean,
                "tuning_compute": tuning_compute,
                "cost_compute": compute_mean + tuning_compute,
                "study": study or None,
                "optimizer": str(optimizers[0]) if len(optimizers) == 1 else None,
                "rerun_of": str(rerun_of[0]) if len(rerun_of) == 1 else None,
                "paper_test_error": math.nan,
                "paper_test_error_std": math.nan,
                "paper_row": None,
            }
        )
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    # A height-0 tower and the plain baseline of the same name are different runs: keep their rows apart.
    families = summary[~summary["tuned"]].groupby("method")["family"].nunique()
    shared = summary["method"].isin(families[families > 1].index) & (summary["family"] != "tower")
    summary.loc[shared, "method"] = summary.loc[shared, "method"] + " [" + summary.loc[shared, "family"] + "]"
    # Towers by height, then baselines, tuned ones, tuning-free ones: the order a reader compares them in.
    family_order = {"tower": 0, "baseline": 1, "tuning_free": 2}
    summary["_family"] = summary["family"].map(family_order).fillna(3)
    summary = summary.sort_values(["_family", "tuned", "height", "method", "momentum", "lr"], na_position="first")
    return summary.drop(columns="_family").reset_index(drop=True)


def tuning_curves(runs: Runs) -> pd.DataFrame:
    """Expected best-of-n test error of every tune study, for n = 1 .. number of trials, against its compute.

    The tuner picks the trial with the lowest validation error; a trial that diverged, was pruned before a
    test evaluation or failed counts as a miss. Compute of n trials is n times the mean trial cost.
    """
    rows = []
    trials = runs.table[runs.table["role"] == "trial"]
    for study, group in trials.groupby("study", sort=True):
        test = group["test_error"].to_numpy()
        val = group["val_error"].to_numpy()
        for n in range(1, len(group) + 1):
            rows.append(
                {
                    "study": study,
                    "method": str(group["method"].iloc[0]),
                    "n": n,
                    "expected_test_error": expected_best_of_n(test, n, rank_by=val),
                    "cost_epochs": n * float(group["epochs"].mean()),
                    "cost_wall_time_s": n * float(group["wall_time_s"].mean()),
                    "cost_compute": n * float(group["compute"].mean()) if "compute" in group else math.nan,
                }
            )
    columns = ["study", "method", "n", "expected_test_error", "cost_epochs", "cost_wall_time_s", "cost_compute"]
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class Reference:
    """The error the robustness figure is measured against, and where it comes from."""

    error: float
    label: str


def fixed_setting(summary: pd.DataFrame) -> pd.Series:
    """Rows of methods that were not swept: tuned and tuning-free baselines, and one-setting recipes (such as
    He et al.'s step decay) that a sweep is compared against rather than part of."""
    rows_per_method = summary.groupby("method")["method"].transform("size")
    return (
        summary["tuned"]
        | (summary["family"] == "tuning_free")
        | ((summary["family"] != "tower") & (rows_per_method == 1))
    )


def reference_error(summary: pd.DataFrame) -> Reference | None:
    """What "as good as a tuned baseline" means: the best tuned baseline's mean test error; without one, the best
    one-setting baseline recipe (e.g. a hand-tuned schedule); without that, the best row of any method."""
    summary = summary.dropna(subset=["test_error_mean"])
    recipes = summary[fixed_setting(summary) & (summary["family"] == "baseline")]
    candidates = [
        (summary[summary["tuned"]], "best tuned baseline"),
        (recipes, "best fixed baseline recipe"),
        (summary, "best setting of any method"),
    ]
    pool, what = next((pool, what) for pool, what in candidates if len(pool) or what.endswith("any method"))
    if pool.empty:
        return None
    best = pool.loc[pool["test_error_mean"].idxmin()]
    setting = "" if best["tuned"] or math.isnan(best["lr"]) else f" at lr={best['lr']:g}"
    return Reference(float(best["test_error_mean"]), f"{what}: {best['method']}{setting}")


def robustness(summary: pd.DataFrame, reference: Reference | None, tolerance: float) -> pd.DataFrame:
    """Per untuned method (and initial momentum): how wide a range of initial step sizes still ends well.

    Three measures, each over the longest run of neighbouring grid points (contiguous, in decades =
    log10(largest/smallest step size of the run)):
    - `decades_own`: mean test error within `tolerance` of the method's own best grid point (flatness);
    - `decades` (vs the overall reference): within `tolerance` of `reference` (as good as the best);
    - `worst`: the highest mean test error anywhere on the grid, and `best`: the lowest.
    `lr_low`/`lr_high` bound the contiguous run of `decades`; `own_low`/`own_high` that of `decades_own`.
    """
    columns = [
        "method", "height", "momentum", "decades", "n_within", "n_lr", "lr_low", "lr_high", "decades_own",
        "own_low", "own_high", "best", "worst", "reference", "tolerance",
    ]  # fmt: skip
    rows = []
    swept = summary[~fixed_setting(summary) & summary["lr"].notna()]
    # Only a method started from several step sizes has a range; a table of one setting per method has none.
    n_lrs = swept.groupby(["method", "momentum"], dropna=False)["lr"].transform("nunique")
    swept = swept[n_lrs > 1]
    if reference is None:
        return pd.DataFrame(rows, columns=columns)
    for (method, momentum), group in swept.groupby(["method", "momentum"], dropna=False, sort=False):
        group = group.sort_values("lr")
        lrs = group["lr"].to_numpy()
        errors = group["test_error_mean"].to_numpy()
        decades, n_within, low, high = robust_range(lrs, errors, reference.error, tolerance)
        best = float(np.nanmin(errors))
        own, _, own_low, own_high = robust_range(lrs, errors, best, tolerance)
        rows.append(
            {
                "method": method,
                "height": int(group["height"].iloc[0]),
                "momentum": momentum,
                "decades": decades,
                "n_within": n_within,
                "n_lr": len(group),
                "lr_low": low,
                "lr_high": high,
                "decades_own": own,
                "own_low": own_low,
                "own_high": own_high,
                "best": best,
                "worst": float(np.nanmax(errors)),
                "reference": reference.error,
                "tolerance": tolerance,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def robustness_profile(summary: pd.DataFrame, absolute: Sequence[float], relative: Sequence[float]) -> pd.DataFrame:
    """Per swept method (and initial momentum): decades of initial step size within several tolerances of the
    method's own best grid point, so one arbitrary tolerance does not decide the answer.

    For each `absolute` tolerance t (a fraction: 0.02 is 2 percentage points) a grid point qualifies when its mean
    test error is <= best + t; for each `relative` factor f when it is <= f x best. Each count is the longest run
    of neighbouring qualifying grid points, in decades (log10 of its largest / smallest step size), with its
    bounds: columns `abs_<t>` / `rel_<f>` (decades) and `abs_<t>_range` / `rel_<f>_range` ("low-high").
    `grid_mean` is the mean over the grid's points of their mean test error (the expected final error when the
    initial step size is drawn log-uniformly from the grid): a summary that needs no tolerance at all.

    >>> s = pd.DataFrame({"method": "sgd", "family": "tower", "height": 0, "tuned": False, "momentum": float("nan"),
    ...                   "lr": [1e-3, 1e-2, 1e-1, 1.0], "test_error_mean": [0.5, 0.12, 0.1, 0.3]})
    >>> row = robustness_profile(s, [0.01, 0.05], [2.0]).iloc[0]
    >>> row["abs_0.05_range"], [float(row[c]) for c in ("abs_0.01", "abs_0.05", "rel_2", "grid_mean")]
    ('0.01-0.1', [0.0, 1.0, 1.0, 0.255])
    """
    swept = summary[~fixed_setting(summary) & summary["lr"].notna()]
    n_lrs = swept.groupby(["method", "momentum"], dropna=False)["lr"].transform("nunique")
    swept = swept[n_lrs > 1]
    rows = []
    for (method, momentum), group in swept.groupby(["method", "momentum"], dropna=False, sort=False):
        group = group.sort_values("lr")
        lrs, errors = group["lr"].to_numpy(), group["test_error_mean"].to_numpy(dtype=float)
        best = float(np.nanmin(errors))
        row: dict[str, Any] = {"method": method, "height": int(group["height"].iloc[0]), "momentum": momentum}
        margins = [(f"abs_{t:g}", float(t)) for t in absolute] + [
            (f"rel_{f:g}", (float(f) - 1.0) * best) for f in relative
        ]
        for name, margin in margins:
            decades, _, low, high = robust_range(lrs, errors, best, margin)
            row[name] = float(decades)
            row[f"{name}_range"] = f"{low:g}-{high:g}"
        row["grid_mean"] = float(np.nanmean(errors))
        row["best"], row["worst"] = best, float(np.nanmax(errors))
        rows.append(row)
    return pd.DataFrame(rows)


def load_paper_numbers(path: str | Path) -> dict[str, Any]:
    """The published numbers file: {source, experiments: {preset: {table, note, rows: [...]}}}."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data.get("experiments"), dict):
        raise ValueError(f"`paper_numbers` must map `experiments` to presets, but {path} has none")
    return data


def paper_comparison(summary: pd.DataFrame, paper: dict[str, Any], experiment: str) -> pd.DataFrame | None:
    """The paper's published test errors next to ours, matched by method and initial step size.

    Returns None when `experiment` is not a paper preset. A published row with no run of ours shows NaN on
    our side rather than being left out, so the reader sees what was not reproduced.
    """
    entry = paper["experiments"].get(experiment)
    if entry is None:
        return None
    rows = []
    for height, lr, error in paper_height_curve_points(entry):
        # A figure of test error per tower height and initial step size: matched by height and step size.
        ours = summary[(summary["family"] == "tower") & (summary["height"] == height) & ~summary["tuned"]]
        ours = ours[np.isclose(ours["lr"].astype(float), lr, rtol=1e-6)]
        method = str(ours["method"].iloc[0]) if len(ours) == 1 else f"height {height}"
        rows.append(_comparison_row(method, f"height {height}, initial step {lr:g}", lr, error, None, ours, height))
    for published in entry.get("rows") or []:
        if "spec" in published:  # Table 1 style: matched by spec (towers) or by the tower re-run (re-runs)
            from bench.report.claims import _norm

            if published.get("rerun_of"):
                ours = summary[summary["rerun_of"] == _norm(str(published["rerun_of"]))]
                method = f"re-run of {_norm(str(published['rerun_of']))}"
            else:
                spec = _norm(str(published["spec"]))
                ours = summary[(summary["optimizer"] == spec) & summary["rerun_of"].isna() & ~summary["tuned"]]
                method = spec
            lr = None
        else:
            method = str(published["method"])
            lr = published.get("lr")
            ours = summary[(summary["method"] == method) & ~summary["tuned"]]
            if lr is not None:
                ours = ours[np.isclose(ours["lr"].astype(float), float(lr), rtol=1e-6)]
        rows.append(
            _comparison_row(
                method,
                published.get("paper_row"),
                lr,
                published.get("test_error"),
                published.get("test_error_std"),
                ours,
            )
        )
    return pd.DataFrame(rows)


def _comparison_row(
    method: str,
    paper_row: str | None,
    lr: float | None,
    error: float | None,
    std: float | None,
    ours: pd.DataFrame,
    height: int | None = None,
) -> dict[str, Any]:
    one = len(ours) == 1
    return {
        "method": method,
        "paper_row": paper_row,
        "lr": lr,
        "paper_test_error": error,
        "paper_test_error_std": std,
        "ours_test_error_mean": float(ours["test_error_mean"].iloc[0]) if one else math.nan,
        "ours_test_error_std": float(ours["test_error_std"].iloc[0]) if one else math.nan,
        "ours_ci_low": float(ours["test_error_ci_low"].iloc[0]) if one else math.nan,
        "ours_ci_high": float(ours["test_error_ci_high"].iloc[0]) if one else math.nan,
        "ours_n_seeds": int(ours["n_seeds"].iloc[0]) if one else 0,
        # Set for a row of a height figure: its seeds are our towers of that height and step size (paper_figure).
        "height": height,
    }


def paper_height_curve_points(entry: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(height, initial step size, test error) of a paper figure given as `heights` over `log10_lr`, else []."""
    heights = entry.get("heights") or {}
    lrs = [10.0 ** float(k) for k in entry.get("log10_lr") or []]
    return [(int(h), lr, float(e)) for h, errors in heights.items() for lr, e in zip(lrs, errors, strict=True)]
