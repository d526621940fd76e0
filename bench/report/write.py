"""Writing the report's files atomically: summary.csv, report.md, and a helper the figures use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.io import atomic_write
from bench.report.tables import Reference
from bench.schema import environments_counted

__all__ = ["markdown_table", "render_report", "write_summary_csv", "write_text"]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_summary_csv(summary: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda f: summary.to_csv(f, index=False))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    columns = list(columns or df.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _best_config(study: str, summary: dict[str, Any], runs: pd.DataFrame) -> dict[str, Any]:
    """A tune study's best configuration in full: searched values, the rest of the optimizer, the schedule."""
    reruns = runs[(runs["role"] == "rerun") & (runs["study"] == study)]
    config: dict[str, Any] = {}
    if len(reruns) and isinstance(reruns["start"].iloc[0], dict):
        config.update({k.removeprefix("L1."): v for k, v in reruns["start"].iloc[0].items()})
    config.update(summary.get("best_params") or {})
    schedule = reruns["schedule"].iloc[0] if len(reruns) and "schedule" in reruns else None
    config.setdefault("schedule", schedule if isinstance(schedule, str) else "constant")
    return {
        "study": summary.get("study_name", Path(study).name),
        "baseline": summary.get("baseline"),
        "best configuration": ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(config.items())
        ),
    }


def _g(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:g}"


def _intervals(low: pd.Series, high: pd.Series) -> list[str]:
    return [f"[{_pct(lo)}, {_pct(hi)}]" for lo, hi in zip(low, high, strict=True)]


def _summary_view(summary: pd.DataFrame, confidence: float) -> pd.DataFrame:
    view = pd.DataFrame(
        {
            "method": summary["method"],
            "initial lr": summary["lr"],
            "initial momentum": summary["momentum"],
            "seeds": summary["n_seeds"],
            "diverged": summary["n_diverged"],
            "mean test error": summary["test_error_mean"].map(_pct),
            "std": summary["test_error_std"].map(_pct),
            f"{100 * confidence:g}% CI": _intervals(summary["test_error_ci_low"], summary["test_error_ci_high"]),
            "paper": [
                "–" if pd.isna(m) else f"{_pct(m)} ± {_pct(s)}"
                for m, s in zip(summary["paper_test_error"], summary["paper_test_error_std"], strict=True)
            ],
            "epochs/run": summary["epochs_mean"],
            "wall s/run": summary["wall_time_s_mean"],
            "compute/run": summary["compute_mean"].map(lambda v: "–" if pd.isna(v) else f"{v:.3g}"),
            "compute incl. tuning": summary["cost_compute"].map(lambda v: "–" if pd.isna(v) else f"{v:.3g}"),
            "tuning epochs": summary["tuning_epochs"],
            "wall s incl. tuning": summary["cost_wall_time_s"],
        }
    )
    if view["initial momentum"].isna().all():
        view = view.drop(columns="initial momentum")
    if summary["paper_test_error"].isna().all():
        view = view.drop(columns="paper")
    return view


def _profile_section(profile: pd.DataFrame) -> list[str]:
    """The robustness profile: decades within several tolerances of each method's own best, and the grid mean."""
    names = [c for c in profile.columns if c.startswith(("abs_", "rel_")) and not c.endswith("_range")]

    def header(name: str) -> str:
        kind, value = name.split("_", 1)
        return f"≤ best + {100 * float(value):g} pt" if kind == "abs" else f"≤ {value} x best"

    view = pd.DataFrame({"method": profile["method"]})
    if profile["momentum"].notna().any():
        view["momentum"] = profile["momentum"]
    for name in names:
        ranges = profile[f"{name}_range"]
        view[header(name)] = [f"{d:g} ({r})" for d, r in zip(profile[name], ranges, strict=True)]
    view["best"] = profile["best"].map(_pct)
    view["grid mean"] = profile["grid_mean"].map(_pct)
    view["worst"] = profile["worst"].map(_pct)
    return [
        "### Robustness at several tolerances",
        "",
        "The same count against each method's own best grid point, at several tolerances, so that no single"
        " tolerance decides the answer: a column `≤ best + t pt` counts grid points whose mean test error is at most"
        " the method's best plus t percentage points, `≤ f x best` those at most f times its best. Each cell: the"
        " decades of the longest run of neighbouring qualifying step sizes (0 when only the best point itself"
        " qualifies), with that run's smallest-largest initial step size. **grid mean**: the mean over the grid's"
        " points of their mean test error, i.e. the expected final error when the initial step size is drawn"
        " log-uniformly from the grid (no tolerance involved; lower is more robust).",
        "",
        markdown_table(view),
    ]


def _presets_note(runs: pd.DataFrame, experiment: str | None) -> str:
    """ " (experiment preset `a`, `b`; the paper's `x`)": what ran, and which published experiment it is set beside."""
    presets = sorted(runs["experiment"].dropna().unique()) if "experiment" in runs else []
    parts = [f"experiment preset {', '.join(f'`{p}`' for p in presets)}"] if presets else []
    if experiment and presets != [experiment]:
        parts.append(f"compared with the paper's `{experiment}`")
    return f" ({'; '.join(parts)})" if parts else ""


def environments_note(runs: pd.DataFrame) -> str | None:
    """One paragraph when the runs come from more than one environment (torch version, device, thread count); None
    when they share one. Their numbers then differ by round-off, which training amplifies."""
    if "environment" not in runs or (counted := environments_counted(runs["environment"])) is None:
        return None
    return (
        f"These runs come from {counted[0]} environments: {counted[1]}. Round-off differs between them and training"
        " amplifies it far beyond round-off (the same Adam config on mnist5k, seed 0, 30 epochs: 5.40% val error on"
        " 1 CPU thread, 6.40% on 2), so a difference between runs of different environments may come from the"
        " environment, not the method; for bitwise comparisons run every config with one torch version, device and"
        " `trainer.num_threads`."
    )


def render_report(
    *,
    inputs: Sequence[str],
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    robustness: pd.DataFrame,
    reference: Reference | None,
    tolerance: float,
    confidence: float,
    n_resamples: int,
    curves: pd.DataFrame,
    studies: dict[str, dict[str, Any]],
    figures: Sequence[str],
    paper: pd.DataFrame | None,
    paper_meta: dict[str, Any] | None,
    experiment: str | None,
    answer: str | None = None,
    claims: pd.DataFrame | None = None,
    claims_detail: pd.DataFrame | None = None,
    unusable: Sequence[dict[str, Any]] = (),
    interval: str = "t",
    profile: pd.DataFrame | None = None,
    environments: str | None = None,
) -> str:
    """The report as markdown: what was read, the tables, the figures, and how to read them. ``environments``: the
    note of :func:`environments_note` on ``runs``, when they come from more than one environment."""
    finals = runs[runs["role"].isin(["run", "rerun"])]
    out = ["# Sensitivity and tuning-cost report", ""]
    if answer:
        out += ["## The answer", "", answer, ""]
    if claims is not None and not claims.empty:
        out += [
            "### The paper's claims on these runs",
            "",
            "holds: the difference has the claimed sign and Welch's t-test (two-sided, on per-seed test errors)"
            " rejects equality; fails: the opposite sign, rejected; within noise: not rejected.",
            "",
            markdown_table(claims),
            "",
        ]
        if claims_detail is not None and not claims_detail.empty:
            view = claims_detail.assign(
                a_mean=claims_detail["a_mean"].map(_pct),
                b_mean=claims_detail["b_mean"].map(_pct),
                diff=claims_detail["diff"].map(lambda d: f"{100 * d:+.2f} pt"),
                p=claims_detail["p"].map(lambda p: f"{p:.3g}"),
            )
            out += ["<details><summary>Every comparison behind the claims</summary>", "", markdown_table(view), "",
                    "</details>", ""]  # fmt: skip
    out += [
        f"- Inputs: {', '.join(f'`{i}`' for i in inputs)}",
        f"- Task: model `{runs['model'].iloc[0]}` on dataset `{runs['dataset'].iloc[0]}`"
        + _presets_note(runs, experiment),
        f"- Runs read: {len(runs)} ({len(finals)} final runs, {int((runs['role'] == 'trial').sum())} tuning trials);"
        f" diverged: {int(runs['diverged'].sum())}, counted as misses (test error 100%), never dropped.",
        *([f"- Environments: {environments}"] if environments else []),
        (
            f"- Confidence intervals: {100 * confidence:g}% Student-t interval of the mean over seeds"
            " (mean +- t(n-1) x sd / sqrt(n), n = seeds, printed per row); std is the sample standard deviation"
            " (n-1). One seed gives no std and a zero-width interval. A test error lies in [0%, 100%], so an"
            " interval is clipped to that range: with few seeds and one outlier the symmetric interval reaches"
            " below 0%, and a printed lower end of 0.00% means it did (the true mean is never clipped away)."
            if interval == "t"
            else f"- Confidence intervals: {100 * confidence:g}% percentile bootstrap of the mean over seeds"
            f" ({n_resamples} resamples, seeded). One seed gives a zero-width interval."
        ),
        "",
        "## Summary",
        "",
        *(
            [
                f"Re-runs whose learned values the base optimizer cannot use ({len(unusable)}), recorded by"
                " bench.rerun instead of trained: "
                + "; ".join(f"{u.get('rerun_of')} seed {u.get('seed')}: {u.get('reason')}" for u in unusable),
                "",
            ]
            if unusable
            else []
        ),
        "One row per method and initial setting. Tuned baselines are the study's best configuration re-run on"
        " the test split; their total compute adds every tuning trial.",
        "",
        markdown_table(_summary_view(summary, confidence)),
        "",
        "## Robustness",
        "",
    ]
    if reference is None or robustness.empty:
        out.append("No method was swept over its initial step size, so there is no robustness figure.")
    else:
        out += [
            "Per method, over its grid of initial step sizes (mean test error over seeds at each point), each"
            " range the longest run of neighbouring grid points, in decades = log10(largest / smallest step size"
            " of the run), measured between grid points (a lower bound):",
            "",
            f"- **decades (own best)**: mean error within {100 * tolerance:g} pt of the method's own best grid"
            " point: how flat the method is;",
            f"- **decades (overall best)**: within {100 * tolerance:g} pt of the {reference.label}"
            f" ({_pct(reference.error)}), i.e. at most {_pct(reference.error + tolerance)}: as good as the best;",
            "- **worst**: the highest mean error anywhere on the grid (how badly a bad start ends).",
            "",
            markdown_table(
                robustness.drop(columns=["best", "worst"])
                .assign(
                    own=[
                        f"{d:g} ({_g(lo)}-{_g(hi)})"
                        for d, lo, hi in zip(
                            robustness["decades_own"], robustness["own_low"], robustness["own_high"], strict=True
                        )
                    ],
                    overall=[
                        "none within" if math.isnan(d) else f"{d:g} ({_g(lo)}-{_g(hi)})"
                        for d, lo, hi in zip(
                            robustness["decades"], robustness["lr_low"], robustness["lr_high"], strict=True
                        )
                    ],
                    best_=robustness["best"].map(_pct).to_numpy(),
                    worst_=robustness["worst"].map(_pct).to_numpy(),
                    within=[f"{w} of {n}" for w, n in zip(robustness["n_within"], robustness["n_lr"], strict=True)],
                )
                .rename(
                    columns={
                        "own": "decades (own best)",
                        "overall": "decades (overall best)",
                        "best_": "best",
                        "worst_": "worst",
                        "within": "points within (overall)",
                    }
                ),
                [
                    "method",
                    "momentum",
                    "decades (own best)",
                    "decades (overall best)",
                    "points within (overall)",
                    "best",
                    "worst",
                ]
                if robustness["momentum"].notna().any()
                else [
                    "method",
                    "decades (own best)",
                    "decades (overall best)",
                    "points within (overall)",
                    "best",
                    "worst",
                ],
            ),
        ]
    if profile is not None and not profile.empty:
        out += ["", *_profile_section(profile)]
    out += ["", "## Tuning", ""]
    if not studies:
        out.append("No tune study among the inputs.")
    else:
        rows = []
        for study, s in studies.items():
            curve = curves[curves["study"] == study]
            rows.append(
                {
                    "study": s.get("study_name", Path(study).name),
                    "trials": s.get("n_trials"),
                    "complete": s.get("n_complete"),
                    "pruned": s.get("n_pruned"),
                    "failed": s.get("n_failed"),
                    "best val error": _pct(float(s.get("best_value", math.nan))),
                    "E[best of 1]": _pct(curve["expected_test_error"].iloc[0]) if len(curve) else "–",
                    f"E[best of {len(curve)}]": _pct(curve["expected_test_error"].iloc[-1]) if len(curve) else "–",
                    "total epochs": s.get("total_epochs"),
                    "total wall s": s.get("total_wall_time_s"),
                }
            )
        out += [
            "Expected best-of-n (Dodge et al. 2019, exact from the empirical distribution of the trials): the"
            " expected test error of the trial with the lowest validation error among n drawn at random.",
            "",
            markdown_table(pd.DataFrame(rows)),
            "",
            "Best configuration of each study (every hyperparameter the re-run used: the searched ones from the"
            " best trial, the others as started, and the step-size schedule):",
            "",
            markdown_table(pd.DataFrame([_best_config(study, s, runs) for study, s in studies.items()])),
        ]
    if paper is not None and paper_meta is not None:
        out += ["", "## The paper's published numbers", "", f"Source: {paper_meta.get('source', 'unknown')}."]
        if paper_meta.get("note"):
            out += ["", str(paper_meta["note"]).strip()]
        if paper.empty:
            out += ["", "No published values are recorded for this preset (see `bench/report/paper_numbers.yaml`)."]
        else:
            view = paper.assign(
                paper=paper["paper_test_error"].map(lambda v: _pct(float(v)) if v is not None else "–"),
                paper_std=paper["paper_test_error_std"].map(
                    lambda v: _pct(float(v)) if v is not None and not pd.isna(v) else "–"
                ),
                ours=paper["ours_test_error_mean"].map(_pct),
                ours_std=paper.get("ours_test_error_std", pd.Series(math.nan, index=paper.index)).map(_pct),
                ours_ci=_intervals(paper["ours_ci_low"], paper["ours_ci_high"]),
            )
            if paper["paper_row"].notna().any() if "paper_row" in paper else False:
                columns = ["paper_row", "method", "paper", "paper_std", "ours", "ours_std", "ours_ci", "ours_n_seeds"]
            else:
                columns = ["method", "lr", "paper", "ours", "ours_ci", "ours_n_seeds"]
            out += ["", markdown_table(view, columns)]
    out += ["", "## Figures", ""]
    captions = {
        "sensitivity.png": "Final test error against the initial step size, one curve per tower height"
        " (vector version: sensitivity.svg).",
        "tuning_curve.png": "Expected best-of-n test error of tuned baselines against compute; single runs as points.",
        "paper_vs_ours.png": "The paper's published test error (open diamond, +- its std) beside ours (mean over"
        " seeds with its interval, each seed a dot), one row per published row.",
        "trajectories.png": "Learned hyperparameters of every level over training, for selected runs: mean over"
        " seeds, band from the lowest to the highest seed.",
    }
    for name in figures:
        out += [f"![{name}]({name})", "", captions.get(name, ""), ""]
    missing = [n for n in captions if n not in figures and (n != "paper_vs_ours.png" or paper is not None)]
    if missing:
        out.append("Not drawn (no data for them): " + ", ".join(missing) + ".")
    return "\n".join(out).rstrip() + "\n"
