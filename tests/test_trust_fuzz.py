"""Every bad value or fault gets one line: malformed inputs to `python -m bench`, `bench.tune` and `bench.report`
each end with exactly one line on stderr, a non-zero exit (2 for bad input) and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness_helpers import QUICK, run_module

FAST = [*QUICK, "dataset=synthetic", "model=mlp"]

BENCH_CASES = {
    "beta1=1 (torch needs < 1)": ["optimizer=adam", "optimizer.beta1=1.0"],
    "20-digit seed": ["seed=12345678901234567890"],
    "negative seed": ["seed=-1"],
    "train_size above the dataset": ["dataset.train_size=100000"],
    "unknown trainer key": ["+trainer.foo=1"],
    "unknown optimizer key": ["+optimizer.parameterization=log"],
    "lr ignored under spec": ["optimizer.spec='adam(0.001)/sgd(1e-05)'", "optimizer.lr=-5"],
    "nan lr": ["optimizer=sgd", "optimizer.lr=nan"],
    "zero epochs": ["trainer.epochs=0"],
    "diverge_factor below 1": ["trainer.diverge_factor=0.5"],
    "negative checkpoint_minutes": ["trainer.checkpoint_minutes=-1"],
    "text model on vectors": ["model=char_lstm"],
    "cifar10 files missing": ["dataset=cifar10", "model=cnn", "dataset.data_dir=/nonexistent"],
}
TUNE_CASES = {
    "unreachable postgres": ["tune.storage=postgresql://u:pw@127.0.0.1:1/db"],
    "unwritable sqlite": ["tune.storage=sqlite:////proc/nope/study.db"],
    "unwritable journal": ["tune.storage=journal:/proc/nope/study.log"],
    "negative seed": ["seed=-1"],
}


def _assert_one_line_and_nothing_written(proc, logs: Path, code: int = 2, allowed: tuple[str, ...] = ()) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    written = [p for p in logs.rglob("*") if p.is_file() and not set(p.relative_to(logs).parts) & set(allowed)]
    assert written == []


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench_rejects_malformed_input_with_one_line(case: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = run_module("bench", [*FAST, *BENCH_CASES[case], f"paths.log_dir={logs}"], tmp_path)
    _assert_one_line_and_nothing_written(proc, logs)


@pytest.mark.parametrize("case", list(TUNE_CASES))
def test_tune_rejects_malformed_input_and_unusable_storages_with_one_line(case: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = run_module("bench.tune", [*FAST, "tune.n_trials=1", *TUNE_CASES[case], f"paths.log_dir={logs}"], tmp_path)
    _assert_one_line_and_nothing_written(proc, logs)


def _finished_run(root: Path, **changes: object) -> Path:
    run_dir = root / "runs" / "0"
    run_dir.mkdir(parents=True)
    metrics = {
        "status": "completed",
        "optimizer": "adam(0.001)",
        "method": "adam",
        "family": "baseline",
        "height": 1,
        "init": {"lr": 0.001},
        "hyperparameters": [{"lr": 0.001}],
        "seed": 0,
        "model": "mlp",
        "dataset": "synthetic",
        "test_error": 0.5,
        "test_loss": 1.0,
        "val_error": 0.5,
        "val_loss": 1.0,
        "train_loss": 1.0,
        "diverged": False,
        "diverged_step": None,
        "diverged_reason": None,
        "epochs": 1,
        "steps": 2,
        "wall_time_s": 1.0,
    }
    metrics.update(changes)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "history.csv").write_text("epoch,steps,train_loss,val_loss,val_error\n1,2,1.0,1.0,0.5\n")
    return root / "runs"


REPORT_CASES = {
    "no such directory": lambda root: root / "missing",
    "truncated metrics.json": lambda root: (_finished_run(root), (root / "runs/0/metrics.json").write_text('{"st'))[0],
    "test_error of the wrong type": lambda root: _finished_run(root, test_error="half"),
    "seed of the wrong type": lambda root: _finished_run(root, seed=[1]),
    "corrupt history.csv": lambda root: (_finished_run(root), (root / "runs/0/history.csv").write_bytes(b'\x00"\n,,'))[
        0
    ],
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_report_rejects_malformed_runs_with_one_line(case: str, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    target = REPORT_CASES[case](root)
    out = tmp_path / "report"
    proc = run_module("bench.report", [f"input={target}", f"output_dir={out}", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode != 0, proc.stdout[-2000:]
    # bench.report's Hydra config (issue 12's) still records its own .hydra/ and log: no report is written.
    _assert_one_line_and_nothing_written(proc, out, code=proc.returncode, allowed=(".hydra", "__main__.log"))
