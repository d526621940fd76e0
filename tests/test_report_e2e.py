"""bench.report end to end: a tiny real sweep and a tiny real tune study, trained here, then the report CLI.

Towers of height 0 and 1 (Adam base) x 3 initial step sizes x 2 seeds on the embedded MNIST subset, a few
steps each; the largest step size (1e38) makes Adam's first updates overflow, so those runs really diverge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.report.stats import robust_range_decades
from tests.harness_helpers import run_text

STEP_SIZES = (1e-3, 1e-2, 1e38)
SHORT = ["dataset=mnist5k", "trainer.epochs=2", "trainer.max_steps=20", "trainer.progress=false"]


def _python(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = run_text([sys.executable, *args], tmp_path, env, timeout=600)
    assert result.returncode == 0, f"{args[:2]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_report_on_a_real_sweep_and_study(tmp_path: Path) -> None:
    lrs = ",".join(f"{lr:g}" for lr in STEP_SIZES)
    _python("-m", "bench", "-m", *SHORT, "optimizer=tower", "optimizer.base=adam", "optimizer.height=0,1",
            f"optimizer.lr={lrs}", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp_path=tmp_path)  # fmt: skip
    _python("-m", "bench.tune", *SHORT, "optimizer=adam", "tune.n_trials=3", "tune.reruns=[0,1]", "tune.sampler=random",
            f"hydra.run.dir={tmp_path / 'tune'}", tmp_path=tmp_path)  # fmt: skip
    out = tmp_path / "report"
    cli = _python("-m", "bench.report", f"input={tmp_path / 'sweep'}", f"input={tmp_path / 'tune'}",
                  f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", tmp_path=tmp_path)  # fmt: skip
    assert "17 runs (4 diverged" in cli.stdout  # 12 sweep runs + 3 trials + 2 reruns; both 1e38 settings x 2 seeds
    # The compute calibration went to this test's cache (conftest's HYPERGRAD_CALIBRATION_CACHE), not to ~/.cache.
    assert (tmp_path / "calibration" / "step_cost.json").is_file()

    for name in (
        "summary.csv",
        "report.md",
        "sensitivity.png",
        "sensitivity.svg",
        "tuning_curve.png",
        "trajectories.png",
    ):
        assert (out / name).stat().st_size > 0, name

    summary = pd.read_csv(out / "summary.csv")
    towers = summary[summary["family"] == "tower"]
    assert sorted(set(towers["method"])) == ["adam", "adam/sgd(1e-05)"]
    assert sorted(towers["lr"].unique()) == pytest.approx(sorted(STEP_SIZES))  # float32 lrs grouped with the grid
    assert (towers["n_seeds"] == 2).all() and (towers["seeds"] == "0 1").all()
    assert towers["test_error_ci_low"].le(towers["test_error_mean"] + 1e-12).all()
    assert towers["test_error_mean"].le(towers["test_error_ci_high"] + 1e-12).all()
    huge = towers[towers["lr"] == 1e38]
    assert (huge["n_diverged"] == 2).all() and (huge["test_error_mean"] == 1.0).all()  # misses, not dropped
    assert (towers[towers["lr"] < 1]["n_diverged"] == 0).all()

    tuned = summary[summary["tuned"]]
    assert list(tuned["method"]) == ["adam (tuned)"] and int(tuned["n_seeds"].iloc[0]) == 2
    assert float(tuned["tuning_epochs"].iloc[0]) > 0  # the three trials are charged to the tuned baseline
    assert float(tuned["cost_wall_time_s"].iloc[0]) > float(tuned["wall_time_s_mean"].iloc[0])

    # The robustness figure in report.md is the one the summary rows give.
    reference = float(tuned["test_error_mean"].iloc[0])
    report = (out / "report.md").read_text()
    for method, rows in towers.groupby("method"):
        decades, n_within = robust_range_decades(rows["lr"], rows["test_error_mean"], reference, 0.01)
        line = next(x for x in report.splitlines() if x.startswith(f"| {method} | ") and " of 3 |" in x)
        overall, within = line.split(" | ")[2:4]  # method, decades (own best), decades (overall best), within
        assert within == f"{n_within} of 3" and overall.startswith("nan" if n_within == 0 else f"{decades:g} (")


@pytest.mark.slow
def test_cifar_presets_report_puts_the_figures_numbers_beside_each_grid_cell(tmp_path: Path) -> None:
    """The three CIFAR-10 presets, two steps each on tiny CIFAR-shaped files, are one experiment to the report."""
    from tests.harness_helpers import write_all

    data = write_all(tmp_path / "data")
    tiny = ["trainer.epochs=1", "trainer.max_steps=2", "trainer.progress=false", "trainer.checkpoint_every=0",
            "trainer.batch_size=8", "dataset.val_size=5", f"paths.data_dir={data}"]  # fmt: skip
    inputs = []
    for preset in ("cifar_resnet20", "cifar_resnet20_fixed", "cifar_resnet20_step_decay"):
        _python("-m", "bench", "-m", f"experiment={preset}", *tiny, f"hydra.sweep.dir={tmp_path / preset}",
                tmp_path=tmp_path)  # fmt: skip
        inputs.append(f"input={tmp_path / preset}")
    out = tmp_path / "report"
    # tuning_cost=epochs: calibrating 19 ResNet-20 optimizers would be most of this test's time, and is tested above.
    _python("-m", "bench.report", *inputs, f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}",
            "tuning_cost=epochs", tmp_path=tmp_path)  # fmt: skip
    summary = pd.read_csv(out / "summary.csv")
    grid = summary[summary["family"] == "tower"]
    assert len(grid) == 18 and grid["paper_test_error"].notna().all()
    cell = grid[(grid["height"] == 1) & (grid["lr"] == 1.0) & (grid["momentum"] == 0.99)]
    assert cell["paper_test_error"].tolist() == [0.19]  # the figure's Hyperoptimizer at momentum 0.99, step 1
    report = (out / "report.md").read_text()
    assert "| He et al. 2015 (step decay), every panel | momentum + step schedule | 12.50% |" in report
    assert "### The paper's claims" not in report  # Table 1's claims are not this experiment's
    assert (out / "paper_vs_ours.png").stat().st_size > 0
