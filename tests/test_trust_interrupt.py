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


def test_files_synced_together_appear_whole_in_the_order_written_when_the_block_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A population lands its jobs' files inside `synced_together` (their fsyncs overlap): no reader may see one
    # before its contents are on disk, nor a metrics.json before the history.csv written ahead of it.
    import os

    from bench.io import atomic_write, atomic_write_csv, atomic_write_json, synced_together

    moved: list[Path] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replace(src, dst), moved.append(Path(dst))))
    jobs = [tmp_path / str(i) for i in range(20)]
    with synced_together():
        for i, out in enumerate(jobs):
            atomic_write_csv(out / "history.csv", [{"epoch": 1, "loss": i}])
            with synced_together():  # an inner block joins the outer one
                atomic_write_json(out / "metrics.json", {"job": i})
            assert not (out / "history.csv").exists() and not (out / "metrics.json").exists()
    assert moved == [out / name for out in jobs for name in ("history.csv", "metrics.json")]
    for i, out in enumerate(jobs):
        assert json.loads((out / "metrics.json").read_text()) == {"job": i}
        assert (out / "history.csv").read_text() == f"epoch,loss\n1,{i}\n"

    # An error inside the block: what was written before it lands, the failed write leaves nothing behind.
    def broken(f) -> None:
        f.write("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), synced_together():
        atomic_write_json(tmp_path / "first.json", {"a": 1})
        atomic_write(tmp_path / "broken.json", broken)
    assert json.loads((tmp_path / "first.json").read_text()) == {"a": 1}
    assert not (tmp_path / "broken.json").exists()
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_run_checkpoints_by_time_by_default(tmp_path: Path) -> None:
    cfg = compose_config([*QUICK, "dataset=synthetic", "model=mlp"])
    assert cfg.trainer.checkpoint_minutes and cfg.trainer.checkpoint_minutes <= 10 and cfg.trainer.resume
    # A tiny interval: every step is past it, so the checkpoint exists even though checkpoint_every is 0.
    run(compose_config([*QUICK, "dataset=synthetic", "model=mlp", "trainer.checkpoint_minutes=1e-6"]), tmp_path)
    assert (tmp_path / "checkpoint.pt").is_file()
