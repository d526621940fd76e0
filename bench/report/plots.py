"""The report's figures: sensitivity to the initial hyperparameters, tuning cost, hyperparameter trajectories.

matplotlib with the Agg backend, so figures render on machines without a display (clusters, CI).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from bench.io import atomic_write
from bench.report.tables import Reference, fixed_setting

__all__ = [
    "ERROR_AXIS",
    "Style",
    "method_colors",
    "method_styles",
    "paper_figure",
    "save_figure",
    "select_trajectory_runs",
    "sensitivity_figure",
    "trajectories_figure",
    "tuning_curve_figure",
]

_PERCENT = FuncFormatter(lambda y, _: f"{100 * y:.3g}%")
_HISTORY_COLUMN = re.compile(r"^L(\d+)\.(.+)$")


# Ten colours (tab10) combined with twelve markers and four line styles: series i gets colour i % 10, marker
# i % 12 and line style (i // 10) % 4, so past ten series a repeated colour comes with another marker (no two of
# the first 60 series share colour and marker) and, among the first 40, also with another line style.
_MARKERS = "osD^v<>pPXh*"
_LINESTYLES = ("-", "--", ":", "-.")
# Every test-error axis spans at least 1%-100%, so figures of different reports can be laid side by side.
ERROR_AXIS = (0.01, 1.0)


@dataclass(frozen=True)
class Style:
    """How one method is drawn in every figure of a report."""

    color: tuple
    marker: str
    linestyle: str


def method_styles(methods: list[str]) -> dict[str, Style]:
    """One fixed colour, marker and line style per method, so a method looks the same in every figure.

    >>> styles = method_styles([f"m{i}" for i in range(12)])
    >>> len({(s.color, s.marker) for s in styles.values()})
    12
    """
    cmap = plt.get_cmap("tab10")
    return {
        m: Style(cmap(i % 10), _MARKERS[i % len(_MARKERS)], _LINESTYLES[(i // 10) % len(_LINESTYLES)])
        for i, m in enumerate(methods)
    }


def method_colors(methods: list[str]) -> dict[str, tuple]:
    """The colour of each method in `method_styles`."""
    return {m: s.color for m, s in method_styles(methods).items()}


def _label(method: str, family: str, height: int) -> str:
    """The legend name: the tower spec in the paper's notation, with its height for towers."""
    return f"{method} (height {height})" if family == "tower" else str(method)


def _error_axis(ax, values: np.ndarray) -> None:
    """Test error always on a log axis from 1% to 100% (the same axes in every report: a 3% next to a 90% error
    stays readable, and two reports' figures compare at a glance), extended down by whole decades only when an
    error is below 1%; labels at 1-2-5 steps; test errors are never negative, and a zero is clipped."""
    ax.set_yscale("log", nonpositive="clip")
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    low = ERROR_AXIS[0]
    if positive.size and positive.min() < low:
        low = 10.0 ** math.floor(math.log10(positive.min()))
    ax.set_ylim(low, ERROR_AXIS[1] * 1.05)
    ax.set_ylabel("final test error (log scale)")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(_PERCENT)
    ax.grid(True, which="major", alpha=0.3)


def _reference_lines(ax, summary: pd.DataFrame, styles: dict[str, Style]) -> None:
    """Methods that were not swept (tuned, tuning-free, one-setting recipes) as horizontal lines to compare with."""
    fixed = summary[fixed_setting(summary)]
    for _, row in fixed.iterrows():
        style = "--" if row["tuned"] else ":" if row["family"] == "tuning_free" else "-."
        color = styles[row["method"]].color
        ax.axhline(row["test_error_mean"], color=color, ls=style, lw=1.5, label=row["method"])
        ax.axhspan(row["test_error_ci_low"], row["test_error_ci_high"], color=color, alpha=0.08)


def _curves(ax, data: pd.DataFrame, x: str, styles: dict[str, Style], seeds: pd.DataFrame | None = None) -> None:
    """One line per method over `x` (the mean over seeds) with its CI band, every seed as a small faint dot of
    the same colour and marker, and an x where a seed diverged."""
    for i, (method, group) in enumerate(data.groupby("method", sort=False)):
        group = group.sort_values(x)
        style = styles[method]
        # Shrinking markers keep curves that coincide (all heights at one start) visible on top of each other.
        label = _label(method, group["family"].iloc[0], int(group["height"].iloc[0]))
        ax.plot(group[x], group["test_error_mean"], ls=style.linestyle, marker=style.marker, color=style.color,
                lw=1.8, ms=max(3.0, 7.0 - 1.2 * i), label=label)  # fmt: skip
        low, high = group["test_error_ci_low"], group["test_error_ci_high"]
        ax.fill_between(group[x], low, high, color=style.color, alpha=0.15)
        if seeds is not None:
            own = seeds[(seeds["method"] == method) & seeds[x].isin(group[x])]
            if "momentum" in group and group["momentum"].notna().any() and x != "momentum":
                own = own[own["momentum"].isin(group["momentum"].dropna())]
            ax.plot(own[x], own["test_error"], ls="none", marker=style.marker, color=style.color, ms=2.5, alpha=0.45)
        bad = group[group["n_diverged"] > 0]
        ax.plot(bad[x], bad["test_error_mean"], "x", color=style.color, ms=9, mew=2)


def _paper_curves(ax, data: pd.DataFrame, paper: Sequence[tuple[int, float, float]], styles: dict[str, Style]) -> None:
    """The paper's curves (read by eye) as thin dashed lines with open markers, one per tower height."""
    points = pd.DataFrame(list(paper), columns=["height", "lr", "error"])
    for height, curve in points.groupby("height"):
        towers = data[(data["family"] == "tower") & (data["height"] == height)]
        style = styles[towers["method"].iloc[0]] if len(towers) else Style((0.4, 0.4, 0.4, 1.0), "o", "-")
        ax.plot(curve["lr"], curve["error"], ls="--", lw=0.9, marker=style.marker, mfc="none", ms=5, color=style.color,
                alpha=0.8, label=f"paper, height {height} (read by eye)")  # fmt: skip


def sensitivity_figure(
    summary: pd.DataFrame,
    styles: dict[str, Style],
    reference: Reference | None,
    tolerance: float,
    confidence: float,
    context: str = "",
    runs: pd.DataFrame | None = None,
    paper: Sequence[tuple[int, float, float]] = (),
) -> Figure | None:
    """Final test error against initial step size (log axis), one curve per tower height, CI bands, and each
    seed's own result as a dot when `runs` (one row per run: method, lr, momentum, test_error) is given.
    `paper`: (height, initial step size, test error) points of the paper's figure, drawn as thin dashed lines in
    the colour of our tower of that height.

    When the sweep also varies the initial momentum, one panel per momentum value, and a second row of
    panels against momentum at each step size. None when no method was swept over its step size.
    """
    swept = summary[~fixed_setting(summary) & summary["lr"].notna()]
    if swept.empty or swept.groupby("method")["lr"].nunique().max() < 2:
        return None  # each method at one step size (a table of methods, not a sweep): nothing to draw
    momenta = sorted(swept["momentum"].dropna().unique())
    # A sweep over momentum, not just methods that differ in it: one method at one lr with several momenta.
    vary_momentum = swept.dropna(subset=["momentum"]).groupby(["method", "lr"])["momentum"].nunique().max() > 1
    lr_panels = momenta if vary_momentum else [None]
    lrs = sorted(swept["lr"].unique())
    if vary_momentum and len(lrs) > 4:
        lrs = [lrs[i] for i in np.linspace(0, len(lrs) - 1, 4).round().astype(int)]
    ncols = max(len(lr_panels), len(lrs) if vary_momentum else 1)
    nrows = 2 if vary_momentum else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 1.5, 4.2 * nrows), squeeze=False, sharey=True)
    all_errors = summary["test_error_mean"].to_numpy(dtype=float)
    seeds = None if runs is None else runs[(runs["role"] == "run") & runs["rerun_of"].isna()]
    if seeds is not None:
        all_errors = np.concatenate([all_errors, seeds["test_error"].to_numpy(dtype=float)])

    for i, momentum in enumerate(lr_panels):
        ax = axes[0, i]
        # Methods without a momentum (Adam, ...) belong in every momentum's panel.
        data = swept if momentum is None else swept[(swept["momentum"] == momentum) | swept["momentum"].isna()]
        _curves(ax, data, "lr", styles, seeds)
        _paper_curves(ax, data, paper, styles)
        _reference_lines(ax, summary, styles)
        if reference is not None:
            ax.axhline(reference.error + tolerance, color="0.4", lw=0.8, ls="-.",
                       label=f"robustness threshold ({reference.label} + {100 * tolerance:g} pt)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("initial step size α (log scale)")
        title = "test error vs initial step size"
        ax.set_title(title if momentum is None else f"{title}, initial momentum {momentum:g}")
        _error_axis(ax, all_errors)
    if vary_momentum:
        for j, lr in enumerate(lrs):
            ax = axes[1, j]
            _curves(ax, swept[(swept["lr"] == lr) & swept["momentum"].notna()], "momentum", styles, seeds)
            _reference_lines(ax, summary, styles)
            # Momentum near 1 is where the behaviour changes: logit spacing separates 0.9 from 0.99
            # (it cannot show 0 or 1, so those sweeps keep a linear axis).
            logit = momenta[0] > 0.0 and momenta[-1] < 1.0
            if logit:
                ax.set_xscale("logit")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(momenta, [f"{m:g}" for m in momenta])
            ax.set_xlabel("initial momentum μ" + (" (logit scale)" if logit else ""))
            ax.set_title(f"test error vs initial momentum, initial step size {lr:g}")
            _error_axis(ax, all_errors)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    handles, labels = _unique_legend(axes)
    title = (
        f"line: mean over seeds, band: {100 * confidence:g}% CI,\nsmall dots: each seed;"
        " × = a seed diverged (counted as 100%)"
    )
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=title,
               fontsize=8, ncols=2 if len(labels) > 12 else 1)  # fmt: skip
    if context:
        fig.suptitle(context)
    fig.tight_layout()
    return fig


def _unique_legend(axes) -> tuple[list, list[str]]:
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def tuning_curve_figure(
    summary: pd.DataFrame,
    curves: pd.DataFrame,
    styles: dict[str, Style],
    cost: str = "cost_wall_time_s",
    context: str = "",
    runs: pd.DataFrame | None = None,
) -> Figure:
    """Expected best-of-n test error of each tuned baseline against its compute; single runs as points (mean over
    seeds with its interval, and each seed as a small dot when `runs` is given). The legend goes below the axes
    in as many columns as fit, so the axes keep the figure's width however many methods there are."""
    n_series = summary["method"].nunique() + curves["study"].nunique() if len(curves) else summary["method"].nunique()
    legend_rows = math.ceil(n_series / 2)
    fig, ax = plt.subplots(figsize=(11.0, 6.0 + 0.22 * legend_rows))
    unit = {
        "cost_wall_time_s": "wall-clock seconds",
        "cost_epochs": "epochs",
        "cost_compute": "compute: steps x batch x calibrated step cost (SGD-equivalent examples)",
    }[cost]
    for _study, group in curves.groupby("study", sort=False):
        label = f"{group['method'].iloc[0]} (tuned): expected best of n trials"
        tuned = styles.get(f"{group['method'].iloc[0]} (tuned)")
        color = tuned.color if tuned else "0.2"
        ax.plot(group[cost], group["expected_test_error"], ".-", color=color, lw=2, label=label)
        for n in (1, len(group)):
            row = group[group["n"] == n].iloc[0]
            ax.annotate(f"n={n}", (row[cost], row["expected_test_error"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=color)  # fmt: skip
    for _, row in summary[summary["tuned"]].iterrows():
        # The tuned baseline's final result (its reruns) at its full price: every trial plus one run.
        mean = row["test_error_mean"]
        yerr = [[mean - row["test_error_ci_low"]], [row["test_error_ci_high"] - mean]]
        label = f"{row['method']}: best trial re-run, tuning included"
        ax.errorbar(row[cost], mean, yerr=yerr, fmt="*", ms=12, capsize=3, color=styles[row["method"]].color,
                    label=label)  # fmt: skip
    single = summary[~summary["tuned"]]
    per_run_cost = {"cost_wall_time_s": "wall_time_s_mean", "cost_epochs": "epochs_mean"}.get(cost, "compute_mean")
    seeds = None if runs is None else runs[runs["role"] == "run"]
    per_seed_cost = {"cost_wall_time_s": "wall_time_s", "cost_epochs": "epochs"}.get(cost, "compute")
    for method, group in single.groupby("method", sort=False):
        style = styles[method]
        mean = group["test_error_mean"]
        yerr = np.clip(np.vstack([mean - group["test_error_ci_low"], group["test_error_ci_high"] - mean]), 0, None)
        label = _label(method, group["family"].iloc[0], int(group["height"].iloc[0]))
        ax.errorbar(group[per_run_cost], mean, yerr=yerr, fmt=style.marker, color=style.color, ms=6, capsize=2,
                    label=label, mec="black", mew=0.4)  # fmt: skip
        if seeds is not None and per_seed_cost in seeds and len(group) == 1:
            own = seeds[seeds["method"] == method]
            ax.plot(own[per_seed_cost], own["test_error"], ls="none", marker=style.marker, color=style.color, ms=2.5,
                    alpha=0.5)  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    low, high = ax.get_xlim()
    # On a narrow range every minor tick gets a label, otherwise the axis would show one or two numbers.
    keep = "123456789" if high / low < 4 else "25"
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in keep else ""))
    ax.set_xlabel(f"compute per result ({unit}, log scale)")
    if curves.empty:
        ax.set_title("test error vs compute per run (no tune study among the inputs)")
    else:
        ax.set_title("tuning cost: expected best-of-n tuned baseline vs single runs")
    errors = [summary["test_error_mean"].to_numpy(float), curves["expected_test_error"].to_numpy(float)]
    _error_axis(ax, np.concatenate(errors))
    ncols = 1 if n_series <= 6 else 2
    title = "one run per setting: mean over seeds with its interval"
    title += "; small dots: each seed" if runs is not None else ""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False, fontsize=7.5, ncols=ncols,
              title=title, title_fontsize=8)  # fmt: skip
    if context:
        ax.set_title(f"{ax.get_title()}\n{context}", fontsize=10)
    fig.tight_layout()
    return fig


def paper_figure(comparison: pd.DataFrame, runs: pd.DataFrame, confidence: float, context: str = "") -> Figure | None:
    """The paper's published test error beside ours, one row per published row, in the paper's order.

    Paper: open black diamond with +- its std (where published). Ours: filled circle at the mean over seeds with
    its interval, each seed a small dot. Test error on the same log axis (1%-100%) as every other figure.
    None when no published row has a result of ours.
    """
    if comparison is None or comparison.empty or comparison["ours_test_error_mean"].isna().all():
        return None
    finals = runs[runs["role"].isin(["run", "rerun"])]
    n = len(comparison)
    fig, ax = plt.subplots(figsize=(10.0, 1.2 + 0.32 * n))
    y = np.arange(n)[::-1]
    errors = []
    for yi, row in zip(y, comparison.itertuples(), strict=True):
        method = str(row.method)
        height = getattr(row, "height", None)
        if height is not None and not pd.isna(height):
            tower = finals[(finals["family"] == "tower") & (finals["height"] == height) & finals["rerun_of"].isna()]
            seeds = tower[np.isclose(tower["lr"].astype(float), float(row.lr), rtol=1e-6)]
        elif method.startswith("re-run of "):
            seeds = finals[finals["rerun_of"] == method.removeprefix("re-run of ")]
        else:
            seeds = finals[((finals["optimizer"] == method) | (finals["method"] == method)) & finals["rerun_of"].isna()]
        if row.paper_test_error is not None and not pd.isna(row.paper_test_error):
            std = row.paper_test_error_std if not pd.isna(row.paper_test_error_std) else 0.0
            ax.errorbar(row.paper_test_error, yi + 0.15, xerr=std, fmt="D", mfc="white", mec="black", color="black",
                        ms=5, capsize=2, label="paper (mean ± std as published)")  # fmt: skip
            errors.append(float(row.paper_test_error))
        if not pd.isna(row.ours_test_error_mean):
            low, high = row.ours_ci_low, row.ours_ci_high
            xerr = [[max(0.0, row.ours_test_error_mean - low)], [max(0.0, high - row.ours_test_error_mean)]]
            ax.errorbar(row.ours_test_error_mean, yi - 0.15, xerr=xerr, fmt="o", color="tab:red", ms=5, capsize=2,
                        label=f"ours (mean, {100 * confidence:g}% CI over seeds)")  # fmt: skip
            ax.plot(seeds["test_error"], np.full(len(seeds), yi - 0.15), ls="none", marker="o", color="tab:red",
                    ms=2.5, alpha=0.5, label="ours, each seed")  # fmt: skip
            errors += seeds["test_error"].tolist()
    names = comparison["paper_row"].where(comparison["paper_row"].notna(), comparison["method"])
    ax.set_yticks(y, [str(name) for name in names])
    ax.tick_params(axis="y", labelsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    # The error axis of every report, here horizontal.
    ax.set_xscale("log", nonpositive="clip")
    positive = [e for e in errors if e > 0]
    low = (
        ERROR_AXIS[0]
        if not positive or min(positive) >= ERROR_AXIS[0]
        else 10.0 ** math.floor(math.log10(min(positive)))
    )
    ax.set_xlim(low, ERROR_AXIS[1] * 1.05)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(_PERCENT)
    ax.set_xlabel("final test error (log scale)")
    ax.grid(True, axis="x", which="major", alpha=0.3)
    handles, labels = _unique_legend([ax])
    # Below the axes (inside, it would cover the bottom rows): about 0.7 inch under the axes, past the x label.
    below = 0.7 / (0.32 * n + 0.6)
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -below), ncols=3, fontsize=8, frameon=False)
    ax.set_title("the paper's published numbers beside ours" + (f"\n{context}" if context else ""), fontsize=10)
    fig.tight_layout()
    return fig


def select_trajectory_runs(table: pd.DataFrame, max_per_method: int = 3) -> pd.DataFrame:
    """For each tower, every seed at its smallest, middle and largest initial step size (runs with a history).

    Towers with hyper levels are the runs that learn hyperparameters; only without any are the other runs
    (whose values move by a schedule at most) drawn instead.
    """
    pool = table[table["has_history"] & table["role"].isin(["run", "rerun"])]
    learning = pool[(pool["family"] == "tower") & (pool["height"] > 0)]
    pool = learning if len(learning) else pool
    # Reruns of a tune study are the tuned baseline: named as in the summary table.
    pool = pool.assign(method=pool["method"].where(pool["role"] == "run", pool["method"] + " (tuned)"))
    picked = []
    for _, group in pool.groupby("method", sort=True):
        lrs = np.sort(group["lr"].dropna().unique())
        if len(lrs) == 0:
            picked.append(group)
            continue
        idx = np.unique(np.linspace(0, len(lrs) - 1, min(max_per_method, len(lrs))).round().astype(int))
        picked.append(group[group["lr"].isin(lrs[idx])].sort_values(["lr", "seed"]))
    return pd.concat(picked) if picked else pool.iloc[0:0]


def _with_start(history: pd.DataFrame, start: object) -> pd.DataFrame:
    """Prepend epoch 0 with the run's initial hyperparameters (its `start`): where each line begins."""
    if not isinstance(start, dict) or not start:
        return history
    first = {k: v for k, v in start.items() if k in history.columns}
    return pd.concat([pd.DataFrame([{"epoch": 0, **first}]), history], ignore_index=True)


def trajectories_figure(
    selected: pd.DataFrame,
    styles: dict[str, Style],
    read_history: Callable[[str], pd.DataFrame],
    context: str = "",
) -> Figure | None:
    """Each level's learned hyperparameters over training (history.csv columns L1.lr, L2.lr, ...).

    One series per method and initial step size: the mean over its seeds as a line, the band from the lowest to
    the highest seed. Hyperparameters that no selected run changes (a top level learns nothing) get no panel;
    the title names them instead.
    """
    histories = {r.run_dir: _with_start(read_history(r.run_dir), r.start) for r in selected.itertuples()}
    columns = sorted(
        {c for h in histories.values() for c in h.columns if _HISTORY_COLUMN.match(c)},
        key=lambda c: (int(_HISTORY_COLUMN.match(c).group(1)), c),
    )
    fixed = [c for c in columns if _constant(c, histories)]
    columns = [c for c in columns if c not in fixed]
    if not columns:
        return None
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols + 2.5, 3.6 * nrows), squeeze=False, sharex=True)
    series = list(selected.groupby(["method", "lr"], sort=False, dropna=False))
    series_styles = method_styles([f"{m} {lr}" for (m, lr), _ in series])
    for ax, column in zip(axes.flat, columns, strict=False):  # spare panels hidden below
        level, name = _HISTORY_COLUMN.match(column).groups()
        for (method, lr), runs in series:
            frames = [histories[d][["epoch", column]] for d in runs["run_dir"] if column in histories[d].columns]
            if not frames:
                continue
            by_epoch = pd.concat(frames).groupby("epoch")[column]
            mean, low, high = by_epoch.mean(), by_epoch.min(), by_epoch.max()
            style = series_styles[f"{method} {lr}"]
            first = runs.iloc[0]
            start = "" if pd.isna(lr) else f", α₀={lr:g}"
            label = f"{_label(method, first['family'], int(first['height']))}{start} ({len(frames)} seeds)"
            ax.plot(mean.index, mean.to_numpy(), ls=style.linestyle, marker=style.marker, color=style.color, ms=3,
                    lw=1.5, label=label)  # fmt: skip
            if len(frames) > 1:
                ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=style.color, alpha=0.15)
        values = pd.concat([h[column] for h in histories.values() if column in h.columns]).to_numpy(float)
        positive = values[np.isfinite(values) & (values > 0)]
        finite = values[np.isfinite(values)]
        if finite.size and (finite <= 0).any() and positive.size and np.ptp(finite) > 0:
            # A learned step size can reach 0 or go negative: symlog shows it where a log axis would drop it.
            ax.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1e-6)
        elif positive.size and positive.max() / positive.min() >= 10:
            ax.set_yscale("log")
        if ax.get_yscale() == "linear":
            ax.ticklabel_format(axis="y", useOffset=False)  # "0.9000012", not "1.2 + 9e-1 offset"
        level_name = "weights' optimizer" if level == "1" else f"hyper level {int(level) - 1}"
        ax.set_title(f"L{level}.{name} ({level_name})")
        ax.set_xlabel("epoch (0: initial value)")
        ax.tick_params(labelbottom=True)  # shared x, but a panel with no panel below must still show its epochs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        scale = {"log": " (log scale)", "symlog": " (symlog scale)"}.get(ax.get_yscale(), "")
        ax.set_ylabel(f"{name}{scale}")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.set_visible(False)
    handles, labels = _unique_legend(axes)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8,
               title="line: mean over seeds; band: lowest to highest seed", title_fontsize=8)  # fmt: skip
    title = "learned hyperparameters over training"
    if fixed:
        title += f" (not learned by any run shown, so not drawn: {', '.join(fixed)})"
    fig.suptitle(title + (f"\n{context}" if context else ""))
    fig.tight_layout()
    return fig


def _constant(column: str, histories: dict[str, pd.DataFrame]) -> bool:
    """True when no history changes `column` over training (up to float32 rounding): nothing learned it, even if
    runs started it at different values (the top level's step size of towers with different hyper-steps)."""

    def still(values: np.ndarray) -> bool:
        finite = values[np.isfinite(values)]
        return finite.size == values.size and (finite.size == 0 or np.ptp(finite) <= 1e-6 * max(1.0, abs(finite).max()))

    return all(still(h[column].to_numpy(float)) for h in histories.values() if column in h.columns)


def save_figure(fig: Figure, path: Path, close: bool = True) -> None:
    """Save atomically (a reader never sees half an image); `close` releases the figure's memory after.

    PNG at 200 dpi; SVG keeps its text as text (svg.fonttype none), so labels stay editable.
    """

    def save(f) -> None:
        with plt.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
            fig.savefig(f, dpi=200, bbox_inches="tight", format=path.suffix[1:])

    try:
        atomic_write(path, save, binary=True)
    finally:
        if close:
            plt.close(fig)
