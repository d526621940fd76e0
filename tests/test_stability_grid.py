"""scripts/stability_grid.py: a plain `kill` (SIGTERM) or Ctrl-C stops the grid without recording the interrupted
run as a result (a "crashed" row would count as a failed run in the stability report), and the same command then
finishes the grid."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from tests.harness_helpers import REPO, bench_env, run_text, signal_once_started

# Two small stable towers on the synthetic dataset, each long enough (thousands of steps) to be stopped mid-run.
GRID = ["--bases", "sgd", "--heights", "1", "--tower-lrs", "1e-3,1e-1", "--hyper-lrs", "1e-4", "--modes", "stable"]
EXTRA = ["dataset=synthetic", "trainer.epochs=6", "trainer.batch_size=4"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_grid_without_recording_the_run_and_the_same_command_finishes_it(
    tmp_path: Path, signum: int
) -> None:
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    argv = [sys.executable, str(REPO / "scripts" / "stability_grid.py"), str(results), str(runs), *GRID, *EXTRA]
    env = {**bench_env(tmp_path), "PYTHONPATH": str(REPO)}
    stopped = signal_once_started(argv, env, runs, 1.5, signum)  # once the first run has started
    err = stopped.stderr
    assert stopped.returncode == 128 + signum, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped by signal {signum} at step "), err[-2000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    assert [r for r in rows if r["status"] != "completed"] == [], rows  # no "crashed" row
    assert len(rows) < 2  # the interrupted run is not in the results

    again = run_text(argv, REPO, env)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["lr"] for r in rows) == ["1e-1", "1e-3"] and {r["status"] for r in rows} == {"completed"}
    assert all(r["steps"] == 6 * 500 for r in rows)  # each trained to its end: 2,000 training examples / batch 4
    # Each row says where it ran (the preset's one thread), which decides its round-off; the resumed run resumed here.
    assert all(r["environment"]["num_threads"] == 1 and "resumed_from" not in r["environment"] for r in rows), rows
