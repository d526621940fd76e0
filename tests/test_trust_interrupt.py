"""Interrupted runs resume by default: SIGINT or SIGTERM saves a checkpoint and prints one line, rerunning the same
command resumes from it, and temporary files of a killed write are cleaned at the next start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.config import compose_config
from bench.train import run
from tests.harness_helpers import QUICK, bench_env, run_bench, run_text, signal_once_started

# Long enough to be interrupted mid-training (thousands of small steps), short enough to finish on resume.
LONG = ["dataset=synthetic", "model=mlp", "trainer.epochs=6", "trainer.batch_size=4", "trainer.progress=false"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_the_same_command_resumes(tmp_path: Path, signum: int) -> None:
    run_dir = tmp_path / "run"
    args = [*LONG, "trainer.num_threads=1", f"hydra.run.dir={run_dir}"]
    stopped = signal_once_started([sys.executable, "-m", "bench", *args], bench_env(tmp_path),
                                  run_dir / ".hydra" / "config.yaml", 3, signum)  # fmt: skip
    err = stopped.stderr
    assert stopped.returncode == 128 + signum, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step "), err[-2000:]
    assert lines[0].endswith("rerun the same command to resume")
    step = int(lines[0].split()[3].rstrip(";"))
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "metrics.json").exists()

    resumed = run_bench(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {step}" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 6 and metrics["steps"] > step


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path: Path) -> None:
    dead = run_text([sys.executable, "-c", "import os; print(os.getpid())"])
    stale = tmp_path / f".checkpoint.pt.{int(dead.stdout)}.{uuid.uuid4().hex}.tmp"
    stale.write_bytes(b"\0" * 1024)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = tmp_path / f".metrics.json.{live.pid}.{uuid.uuid4().hex}.tmp"
        in_progress.write_text("{")
        run(compose_config([*QUICK, "dataset=synthetic", "model=mlp"]), tmp_path)
        assert not stale.exists()  # its writer is gone
        assert in_progress.exists()  # its writer still runs: not ours to delete
    finally:
        live.kill()
        live.wait()


def test_a_run_checkpoints_by_time_by_default(tmp_path: Path) -> None:
    cfg = compose_config([*QUICK, "dataset=synthetic", "model=mlp"])
    assert cfg.trainer.checkpoint_minutes and cfg.trainer.checkpoint_minutes <= 10 and cfg.trainer.resume
    # A tiny interval: every step is past it, so the checkpoint exists even though checkpoint_every is 0.
    run(compose_config([*QUICK, "dataset=synthetic", "model=mlp", "trainer.checkpoint_minutes=1e-6"]), tmp_path)
    assert (tmp_path / "checkpoint.pt").is_file()
