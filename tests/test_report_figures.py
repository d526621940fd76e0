"""The report's figures: one look per method across figures, the same error axis everywhere, every seed shown."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from bench.report import load_runs
from bench.report.plots import (
    ERROR_AXIS,
    method_styles,
    select_trajectory_runs,
    sensitivity_figure,
    trajectories_figure,
    tuning_curve_figure,
)
from bench.report.tables import reference_error, summarize, tuning_curves
from tests.test_report import write_run

LRS = [1e-3, 1e-2, 1e-1]


def test_past_ten_series_a_repeated_colour_comes_with_another_marker_and_line_style() -> None:
    styles = list(method_styles([f"m{i}" for i in range(60)]).values())
    assert len({(s.color, s.marker) for s in styles}) == 60  # colour and marker alone tell 60 series apart
    for a, b in itertools.combinations(styles[:40], 2):
        if a.color == b.color:
            assert a.marker != b.marker and a.linestyle != b.linestyle
    # The first ten are ten colours: a small figure needs no marker to tell its series apart.
    assert len({s.color for s in styles[:10]}) == 10


def _sweep(root: Path, n_methods: int = 2) -> Path:
    """`n_methods` towers x 3 step sizes x 3 seeds; seed s adds s points to the error, so the seeds differ."""
    for m, lr, seed in itertools.product(range(n_methods), LRS, range(3)):
        write_run(root / f"m{m}_lr{lr:g}_s{seed}", method=f"sgd/sgd({m + 1}e-05)", height=1, lr=lr, seed=seed,
                  test_error=0.05 + 0.01 * m + 0.01 * seed + (0.2 if lr == 1e-3 else 0.0))  # fmt: skip
    return root


def _inputs(root: Path):
    runs = load_runs([root], progress=False)
    summary = summarize(runs, 0.95, 100, 0, "t")
    return runs, summary, method_styles(list(dict.fromkeys(summary["method"])))


def _seed_dots(ax) -> list:
    return [line for line in ax.get_lines() if line.get_linestyle() == "None" and line.get_alpha() is not None]


def test_sensitivity_figure_shows_every_seed_and_the_common_error_axis(tmp_path: Path) -> None:
    runs, summary, styles = _inputs(_sweep(tmp_path / "sweep"))
    fig = sensitivity_figure(summary, styles, reference_error(summary), 0.01, 0.95, "mnist5k, mlp", runs.table)
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_ylim()[0] == pytest.approx(ERROR_AXIS[0]) and ax.get_ylim()[1] >= ERROR_AXIS[1]
    dots = _seed_dots(ax)
    assert len(dots) == 2  # one set of seed dots per method
    plotted = sorted(np.concatenate([d.get_ydata() for d in dots]).tolist())
    assert plotted == pytest.approx(sorted(runs.table["test_error"].tolist()))  # all 18 runs, not a mean
    means = [line for line in ax.get_lines() if line.get_label().endswith("(height 1)")]
    assert {(line.get_color(), line.get_marker()) for line in means} == {(s.color, s.marker) for s in styles.values()}
    plt.close(fig)


def test_tuning_curve_uses_the_same_error_axis_and_a_distinct_look_for_fourteen_methods(tmp_path: Path) -> None:
    root = tmp_path / "table"
    for m, seed in itertools.product(range(14), range(3)):
        write_run(root / f"m{m}_s{seed}", method=f"method{m}", height=0, lr=0.01, seed=seed,
                  test_error=0.03 + 0.002 * m + 0.001 * seed)  # fmt: skip
    runs, summary, styles = _inputs(root)
    fig = tuning_curve_figure(summary, tuning_curves(runs), styles, "cost_epochs", "ctx", runs.table)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(ERROR_AXIS[0])
    handles, labels = ax.get_legend_handles_labels()
    assert len(labels) == 14
    looks = {(h.lines[0].get_color(), h.lines[0].get_marker()) for h in handles}
    assert len(looks) == 14  # no two of the 14 methods drawn alike
    assert len(_seed_dots(ax)) == 14
    plt.close(fig)


def test_trajectories_band_the_seeds_and_leave_out_what_nothing_learned(tmp_path: Path) -> None:
    root = _sweep(tmp_path / "sweep", n_methods=1)
    for run_dir in root.iterdir():
        seed = int(run_dir.name[-1])
        # L1.lr learned (differs by seed), L2.lr the top level: constant in every run.
        history = pd.DataFrame({"epoch": [1, 2, 3], "steps": [20, 40, 60], "test_error": 0.1,
                                "L1.lr": [0.01 * (1 + seed), 0.02 * (1 + seed), 0.03 * (1 + seed)], "L2.lr": 1e-5})  # fmt: skip
        history.to_csv(run_dir / "history.csv", index=False)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        # The tower's spec says where each level starts: the top level at 1e-5, where it stays.
        metrics["optimizer"] = f"sgd({metrics['init']['lr']})/sgd(1e-05)"
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    runs, _, _ = _inputs(root)
    selected = select_trajectory_runs(runs.table, 3)
    assert len(selected) == 9  # every seed of each of the three step sizes
    fig = trajectories_figure(selected, {}, lambda d: pd.read_csv(Path(d) / "history.csv"), "ctx")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["L1.lr (weights' optimizer)"]
    assert "not drawn: L2.lr" in fig._suptitle.get_text()
    ax = visible[0]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 3  # one lowest-highest band per series
    mean = next(line for line in ax.get_lines() if "α₀=0.01 (3 seeds)" in line.get_label())
    assert mean.get_ydata()[-1] == pytest.approx(0.03 * 2)  # epoch 3, mean over seeds 0, 1, 2 of 0.03 * (1 + s)
    plt.close(fig)


def test_paper_figure_puts_each_published_row_beside_our_mean_and_seeds() -> None:
    from bench.report.plots import paper_figure

    runs = pd.DataFrame({"role": "run", "rerun_of": [None, None, None, "sgd(0.01)/sgd(0.01)"],
                         "optimizer": ["sgd(0.01)/sgd(0.01)"] * 3 + ["sgd(0.13)"], "method": "x",
                         "test_error": [0.10, 0.11, 0.12, 0.09]})  # fmt: skip
    comparison = pd.DataFrame({
        "method": ["sgd(0.01)/sgd(0.01)", "re-run of sgd(0.01)/sgd(0.01)", "adam(0.001)"],
        "paper_row": ["SGD / SGD", "re-run after SGD / SGD", "Adam"],
        "paper_test_error": [0.0481, 0.0544, 0.0467], "paper_test_error_std": [0.001, 0.001, 0.0006],
        "ours_test_error_mean": [0.11, 0.09, float("nan")], "ours_ci_low": [0.085, 0.09, float("nan")],
        "ours_ci_high": [0.135, 0.09, float("nan")],
    })  # fmt: skip
    fig = paper_figure(comparison, runs, 0.95, "ctx")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["SGD / SGD", "re-run after SGD / SGD", "Adam"]
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] == pytest.approx(ERROR_AXIS[0])
    dots = sorted(np.concatenate([d.get_xdata() for d in _seed_dots(ax)]).tolist())
    assert dots == pytest.approx([0.09, 0.10, 0.11, 0.12])  # every seed of the tower and of its re-run
    assert "paper (mean ± std as published)" in ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert paper_figure(comparison.assign(ours_test_error_mean=float("nan")), runs, 0.95) is None


def test_a_height_figure_of_the_paper_is_drawn_and_tabled_beside_our_towers(tmp_path: Path) -> None:
    from bench.report.tables import paper_comparison, paper_height_curve_points

    runs, summary, styles = _inputs(_sweep(tmp_path / "sweep", n_methods=1))  # height-1 towers at 1e-3..1e-1
    entry = {"log10_lr": [-3, -2], "heights": {1: [0.30, 0.125]}}
    points = paper_height_curve_points(entry)
    assert points == [(1, pytest.approx(1e-3), 0.30), (1, pytest.approx(1e-2), 0.125)]
    fig = sensitivity_figure(summary, styles, reference_error(summary), 0.01, 0.95, "ctx", runs.table, points)
    paper = next(line for line in fig.axes[0].get_lines() if line.get_label() == "paper, height 1 (read by eye)")
    assert paper.get_ydata().tolist() == [0.30, 0.125] and paper.get_linestyle() == "--"
    assert paper.get_color() == styles["sgd/sgd(1e-05)"].color  # the colour of our tower of the same height
    plt.close(fig)
    table = paper_comparison(summary, {"experiments": {"fig": entry}}, "fig")
    assert table["paper_row"].tolist() == ["height 1, initial step 0.001", "height 1, initial step 0.01"]
    # Ours at the same height and step size: seeds 0-2 add 0, 1, 2 points to 25% (1e-3) and 5% (1e-2).
    assert table["ours_test_error_mean"].tolist() == pytest.approx([0.26, 0.06])
    assert table["ours_n_seeds"].tolist() == [3, 3]
    assert table["method"].tolist() == ["sgd/sgd(1e-05)"] * 2  # our tower of that height, by name
