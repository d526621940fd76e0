"""scripts/stability_report.py: the goal's "decades of top hyper-step" counts only measured decades. A grid that ran
top hyper-steps 1e-10, 1e-7, 1e-4 and 1e-1 cannot show 4 decades, however well each of them does; hyper-steps one
decade apart can, and one that misses (or a failed run inside it) breaks the run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.harness_helpers import REPO

spec = importlib.util.spec_from_file_location("stability_report", REPO / "scripts" / "stability_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

FIXED_LRS = [f"1e{e}" for e in range(-11, 2)]  # height 0 at every decade, as the grid's `fixed` part
TOWER_LRS = FIXED_LRS[::2]  # 1e-11 .. 1e1 every second decade: 12 decades, as the grid's `towers` part
BEST = 0.060  # the best fixed run's test error; the goal's band ends at 0.070


def row(height: int, lr: str, k: str | None, err: float, status: str = "completed", loss: float = 0.2) -> dict:
    mode = "stable" if height else "ref"
    key = f"adam_h{height}_lr{lr}_k{k}_{mode}_seed0"
    return dict(key=key, base="adam", height=height, lr=lr, hyper_lr=k, stable=bool(height), seed=0, extra=[],
                status=status, diverged=status == "diverged", test_error=err, train_loss=loss, steps=480,
                wall_time_s=3.0, hyperparameters=None, error=None)  # fmt: skip


def measured(tmp_path: Path, towers: dict[str, dict[str, float]], status: dict[tuple[str, str], str]) -> dict:
    """Write a results file (height 0 at every decade; height-3 towers at 0.065 unless ``towers[k][lr]`` says
    otherwise) and read the report's hyper-step decades back from it, per measure."""
    lines = [row(0, lr, None, BEST if lr == "1e-3" else 0.5, loss=2.3 if lr == "1e-11" else 0.2) for lr in FIXED_LRS]
    for k, errs in towers.items():
        for lr in TOWER_LRS:
            lines.append(row(3, lr, k, errs.get(lr, 0.065), status.get((k, lr), "completed")))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, robust = report.robustness(report.cells(report.load(path)))
    got = report.hyper_decades(robust).set_index(["mode", "base", "height"]).loc[("stable", "adam", 3)]
    return dict(got)


def test_consecutive_decades_that_each_keep_8_decades_of_initial_step_size_count_their_span(tmp_path: Path) -> None:
    ks = ["1e-10", "1e-9", "1e-8", "1e-7", "1e-6"]
    assert measured(tmp_path, {k: {} for k in ks}, {}) == dict(hyper_decades=4.0, hyper_span=4.0)


def test_hyper_steps_three_decades_apart_count_no_decade_however_well_each_does(tmp_path: Path) -> None:
    ks = ["1e-10", "1e-7", "1e-4", "1e-1"]
    # The coarse span would call this 9 decades; only the measured ones count, and no two are one decade apart.
    assert measured(tmp_path, {k: {} for k in ks}, {}) == dict(hyper_decades=0.0, hyper_span=9.0)


@pytest.mark.parametrize(
    ("errs", "status"),
    [({"1e-5": 0.071}, {}), ({}, {("1e-8", "1e-5"): "diverged"})],
    ids=["one cell 1.1 points above the best", "one run diverged"],
)
def test_a_measured_decade_that_misses_breaks_the_run(
    tmp_path: Path, errs: dict[str, float], status: dict[tuple[str, str], str]
) -> None:
    ks = ["1e-10", "1e-9", "1e-8", "1e-7", "1e-6"]
    # At 1e-8 the initial step sizes within 1 point are 1e-11..1e-7 and 1e-3..10: 4 decades each, not 8.
    towers = {k: (errs if k == "1e-8" else {}) for k in ks}
    assert measured(tmp_path, towers, status) == dict(hyper_decades=1.0, hyper_span=1.0)


def test_no_hyper_step_that_keeps_8_decades_reads_minus_one(tmp_path: Path) -> None:
    ks = ["1e-10", "1e-9"]
    towers = {k: {"1e-7": 0.2, "1e-1": 0.2} for k in ks}  # within 1 point over 4 decades at most
    assert measured(tmp_path, towers, {}) == dict(hyper_decades=-1.0, hyper_span=-1.0)
