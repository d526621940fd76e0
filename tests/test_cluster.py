"""The harness on a real SLURM cluster: sweeps through hydra/launcher=submitit_slurm, preemption, tuning workers.

A one-node cluster (munged, slurmctld, slurmd) is started on this machine for the module and stopped by pid at
the end (tests/slurm_cluster.py). No GPU here, so every job asks for 0 GPUs and 1 CPU; the runs are tiny MLPs on
scikit-learn's digits. When the SLURM or munge daemons are missing, these tests fail with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailableError

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Jobs fit the test node and the shared 2-core machine; the preset's own defaults ask for a GPU and 4 CPUs.
SMALL_JOBS = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.gpus_per_task=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]
TINY_RUN = ["dataset=digits", "trainer.progress=false", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        with SlurmCluster.start(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except SlurmUnavailableError as e:
        pytest.fail(f"no SLURM test cluster: {e}", pytrace=False)


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bench", "--multirun", *SMALL_JOBS, f"hydra.sweep.dir={sweep_dir}", *overrides]


def run_sweep(slurm: SlurmCluster, cwd: Path, sweep_dir: Path, *overrides: str, timeout_s: float = 240) -> str:
    """Run Hydra's driver until the whole sweep is done; return its output."""
    proc = subprocess.run(
        sweep_command(sweep_dir, *overrides), cwd=cwd, env=slurm.env, capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{slurm.logs()}"
    return proc.stdout + proc.stderr


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, slurm: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{slurm.run('squeue', check=False)}\n{slurm.logs()}")
        time.sleep(0.2)


def job_folders(sweep_dir: Path) -> set[Path]:
    """submitit's per-job folders of a sweep (one per array task: `<array id>_<task>`)."""
    return set((sweep_dir / ".submitit").glob("[0-9]*_[0-9]*"))


def job_logs(folders: set[Path]) -> str:
    """Everything these jobs wrote to stdout and stderr."""
    return "\n".join(
        f.read_text(errors="replace") for folder in sorted(folders) for f in sorted(folder.glob("*_log.*"))
    )


def test_sweep_of_four_runs_lands_every_metrics_file(slurm: SlurmCluster, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    run_sweep(slurm, tmp_path, sweep_dir, *TINY_RUN, "trainer.epochs=1", "optimizer.lr=1e-3,1e-2", "seed=0,1")

    runs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    seen = sorted((round(m["init"]["lr"], 6), m["seed"]) for m in map(read_metrics, runs))
    assert seen == [(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
    assert all(read_metrics(p)["status"] == "completed" for p in runs)
    # The four runs were the four tasks of one SLURM job array.
    first_jobs = job_folders(sweep_dir)
    assert len(first_jobs) == 4 and len({f.name.split("_")[0] for f in first_jobs}) == 1

    # Resubmitting the same sweep trains nothing again: every job finds its finished metrics.json and returns it.
    before = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in runs}
    run_sweep(slurm, tmp_path, sweep_dir, *TINY_RUN, "trainer.epochs=1", "optimizer.lr=1e-3,1e-2", "seed=0,1")
    assert {p.name: (p / "metrics.json").stat().st_mtime_ns for p in runs} == before
    second_jobs = job_folders(sweep_dir) - first_jobs
    assert len(second_jobs) == 4
    assert job_logs(second_jobs).count("skipping") == 4, job_logs(second_jobs)[-3000:]


def history_without_timing(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv").drop(columns=["wall_time_s"])


def test_interrupted_runs_resume_to_the_same_metrics_as_an_uninterrupted_one(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    """Run 0 is never interrupted. Run 1 gets submitit's pre-timeout signal (USR2) and run 2 is requeued by
    `scontrol requeue` (SIGTERM, as on a preemption), each in the middle of training; both save a checkpoint,
    are requeued, resume, and must end exactly where run 0 ends."""
    sweep_dir = tmp_path / "sweep"
    # checkpoint_every only marks progress on disk (the first checkpoint.pt says training is under way).
    overrides = [*TINY_RUN, "trainer.epochs=6", "trainer.batch_size=32", "trainer.checkpoint_every=0,1,2"]
    driver = subprocess.Popen(
        sweep_command(sweep_dir, *overrides),
        cwd=tmp_path,
        env=slurm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        interrupted = {1: ("scancel", "--signal=USR2"), 2: ("scontrol", "requeue")}
        for num, command in interrupted.items():
            wait_for(lambda n=num: (sweep_dir / str(n) / "checkpoint.pt").exists(), 180, f"run {num} to train", slurm)
            assert not (sweep_dir / str(num) / "metrics.json").exists(), f"run {num} finished before it was interrupted"
            (array_task,) = [f.name for f in job_folders(sweep_dir) if f.name.endswith(f"_{num}")]
            slurm.run(*command, array_task)
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, f"sweep failed:\n{output.decode(errors='replace')[-3000:]}\n{slurm.logs()}"

    reference = read_metrics(sweep_dir / "0")
    assert reference["status"] == "completed" and reference["epochs"] == 6
    for num in interrupted:
        run_dir = sweep_dir / str(num)
        assert without_timing(read_metrics(run_dir)) == without_timing(reference), f"run {num}"
        pd.testing.assert_frame_equal(history_without_timing(run_dir), history_without_timing(sweep_dir / "0"))
        # It really was stopped and requeued mid-run, and resumed rather than restarted.
        (array_task,) = [f for f in job_folders(sweep_dir) if f.name.endswith(f"_{num}")]
        log = job_logs({array_task})
        assert "saving a checkpoint after this step" in log, log[-3000:]
        resumed = [line for line in log.splitlines() if line.startswith("resuming ")]
        assert len(resumed) == 1 and not resumed[0].endswith("step 0"), log[-3000:]
        (job,) = [j for j in slurm.jobs() if f"{j['ArrayJobId']}_{j['ArrayTaskId']}" == array_task.name]
        assert int(job["Restarts"]) == 1
