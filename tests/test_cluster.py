"""The harness on a real SLURM cluster: sweeps through hydra/launcher=submitit_slurm, preemption, tuning workers.

A one-node cluster (munged, slurmctld, slurmd) is started on this machine for the module and stopped by pid at
the end (tests/slurm_cluster.py). No GPU here, so every job asks for 0 GPUs and 1 CPU; the runs are tiny MLPs on
scikit-learn's digits. When the SLURM or munge daemons are missing, these tests fail with that reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.harness_helpers import REPO, run_text
from tests.slurm_cluster import SlurmCluster, SlurmUnavailableError

pytestmark = [pytest.mark.services, pytest.mark.slow]

# Jobs fit the test node and the shared 2-core machine; the preset's own defaults ask for a GPU and 4 CPUs.
SMALL_JOBS = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.gpus_per_task=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    # Long enough that submitit counts a signal as a preemption, not as the time limit (which it does after 80%).
    "hydra.launcher.timeout_min=30",
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


def run_locally_as_populations(sweep_dir: Path, sweep: list[str], cwd: Path, env: dict[str, str]) -> None:
    """The same sweep through the local hydra/launcher=population, the numbers a SLURM population must give."""
    command = [sys.executable, "-m", "bench", "--multirun", "hydra/launcher=population", f"hydra.sweep.dir={sweep_dir}"]
    here = run_text([*command, *sweep], cwd, env, timeout=600)
    assert here.returncode == 0, here.stderr[-3000:]


def history_without_timing(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv").drop(columns=["wall_time_s"])


# Four copies of one run that differ only in how often they save a checkpoint, which must not change any number.
# checkpoint.pt appearing also marks on disk that a run's training is under way.
SWEEP = [*TINY_RUN, "trainer.epochs=20", "trainer.batch_size=32", "trainer.checkpoint_every=0,1,2,3"]
# Run 0 is never interrupted. Run 1 gets submitit's pre-timeout signal (USR2) in its training step; run 2 is
# requeued by `scontrol requeue`, which sends SIGTERM as a preemption does. Run 3 is left alone.
INTERRUPTIONS = {1: "USR2", 2: "requeue"}


def interrupt(slurm: SlurmCluster, array_task: str, how: str) -> None:
    (job,) = [j for j in slurm.jobs() if f"{j.get('ArrayJobId')}_{j.get('ArrayTaskId')}" == array_task]
    if how == "requeue":
        slurm.run("scontrol", "requeue", array_task)
    else:
        # Signal the job step itself (submitit's srun is step 0): SLURM 22.05 answers a signal sent to an array
        # task while other tasks of the array are pending with "try again later", and scancel keeps retrying.
        slurm.run("scancel", f"--signal={how}", f"{job['JobId']}.0")


@dataclass
class Sweep:
    dir: Path
    cwd: Path
    jobs: set[Path]  # submitit's job folders of the first submission


@pytest.fixture(scope="module")
def interrupted_sweep(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The SWEEP submitted through hydra/launcher=submitit_slurm, with runs 1 and 2 interrupted mid-training."""
    cwd = tmp_path_factory.mktemp("interrupted_sweep")
    sweep_dir = cwd / "sweep"
    log = cwd / "driver.log"
    with log.open("wb") as out:
        driver = subprocess.Popen(sweep_command(sweep_dir, *SWEEP), cwd=cwd, env=slurm.env, stdout=out, stderr=out)
        try:
            for num, how in INTERRUPTIONS.items():
                wait_for(
                    lambda n=num: (sweep_dir / str(n) / "checkpoint.pt").exists(), 180, f"run {num} to train", slurm
                )
                assert not (sweep_dir / str(num) / "metrics.json").exists(), f"run {num} ended before the interruption"
                (array_task,) = [f.name for f in job_folders(sweep_dir) if f.name.endswith(f"_{num}")]
                interrupt(slurm, array_task, how)
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == 0, f"sweep failed:\n{log.read_text(errors='replace')[-3000:]}\n{slurm.logs()}"
    return Sweep(dir=sweep_dir, cwd=cwd, jobs=job_folders(sweep_dir))


def test_a_sweep_of_four_runs_is_one_job_array_and_lands_every_metrics_file(interrupted_sweep: Sweep) -> None:
    runs = sorted(p.name for p in interrupted_sweep.dir.iterdir() if p.name.isdigit())
    assert runs == ["0", "1", "2", "3"]
    metrics = [read_metrics(interrupted_sweep.dir / num) for num in runs]
    assert [m["status"] for m in metrics] == ["completed"] * 4
    assert [m["epochs"] for m in metrics] == [20] * 4
    assert len(interrupted_sweep.jobs) == 4 and len({f.name.split("_")[0] for f in interrupted_sweep.jobs}) == 1


@pytest.mark.parametrize("num", sorted(INTERRUPTIONS))
def test_an_interrupted_run_resumes_to_the_metrics_of_an_uninterrupted_one(
    interrupted_sweep: Sweep, slurm: SlurmCluster, num: int
) -> None:
    sweep_dir = interrupted_sweep.dir
    assert without_timing(read_metrics(sweep_dir / str(num))) == without_timing(read_metrics(sweep_dir / "0"))
    pd.testing.assert_frame_equal(history_without_timing(sweep_dir / str(num)), history_without_timing(sweep_dir / "0"))
    # It really was stopped mid-training and requeued, and it resumed rather than started over.
    (array_task,) = [f for f in interrupted_sweep.jobs if f.name.endswith(f"_{num}")]
    log = job_logs({array_task})
    assert "saving a checkpoint after this step" in log, log[-3000:]
    # A log record: "[time][bench.train][INFO] - resuming ..."
    resumed = [line for line in log.splitlines() if line.split("] - ")[-1].startswith("resuming ")]
    assert len(resumed) == 1 and not resumed[0].endswith(" step 0"), log[-3000:]
    (job,) = [j for j in slurm.jobs() if f"{j.get('ArrayJobId')}_{j.get('ArrayTaskId')}" == array_task.name]
    assert int(job["Restarts"]) == 1


def test_periodic_checkpoints_do_not_change_the_result(interrupted_sweep: Sweep) -> None:
    sweep_dir = interrupted_sweep.dir
    assert without_timing(read_metrics(sweep_dir / "3")) == without_timing(read_metrics(sweep_dir / "0"))


def test_a_resubmitted_sweep_trains_no_finished_run_again(interrupted_sweep: Sweep, slurm: SlurmCluster) -> None:
    runs = [interrupted_sweep.dir / str(num) for num in range(4)]
    before = {p: ((p / "metrics.json").stat().st_mtime_ns, (p / "history.csv").stat().st_mtime_ns) for p in runs}
    already = job_folders(interrupted_sweep.dir)
    # Resubmitted the way a user would: the helper script, naming the sweep directory.
    script = [str(REPO / "scripts/slurm/submit_sweep.sh"), "--driver", "foreground", interrupted_sweep.dir.name]
    launcher = [o for o in SMALL_JOBS if not o.startswith("hydra/launcher=")]  # the script chooses the launcher
    env = dict(slurm.env, SWEEP_ROOT=str(interrupted_sweep.dir.parent), PYTHON=sys.executable)
    proc = run_text(["bash", *script, *launcher, *SWEEP], interrupted_sweep.cwd, env, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Every job of the new array found its run's finished metrics.json and returned it untouched.
    after = {p: ((p / "metrics.json").stat().st_mtime_ns, (p / "history.csv").stat().st_mtime_ns) for p in runs}
    assert after == before
    resubmitted = job_folders(interrupted_sweep.dir) - already
    assert len(resubmitted) == 4
    assert job_logs(resubmitted).count("skipping ") == 4, job_logs(resubmitted)[-3000:]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    """One PostgreSQL server (Debian's postgresql, started on loopback) for the tuning tests; one study each."""
    from tests.pg_server import start_postgres

    server = start_postgres()  # raises (the test fails) when PostgreSQL is not installed
    try:
        yield server
    finally:
        server.stop()


def submit_tune_workers(slurm: SlurmCluster, url: str, cwd: Path, workers: int, study: str, *overrides: str) -> str:
    """scripts/slurm/submit_tune_workers.sh with jobs sized for the test node; returns the array's job id."""
    env = dict(slurm.env, TUNE_STORAGE=url, TUNE_ROOT=str(cwd), PYTHON=sys.executable)
    env.update(WORKER_GPUS="0", WORKER_CPUS="1", WORKER_MEM="1G", WORKER_TIME_MIN="10")
    script = str(REPO / "scripts/slurm/submit_tune_workers.sh")
    proc = run_text(["bash", script, str(workers), study, *overrides], cwd, env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert url not in proc.stdout + proc.stderr
    return re.search(r"submitted job array (\d+)", proc.stdout).group(1)


def study_trials(server: Any, study: str) -> list[Any]:
    import optuna

    storage = optuna.storages.RDBStorage(server.sqlalchemy_url)
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials()
    except KeyError:  # no such study yet
        return []
    finally:
        storage.engine.dispose()


TUNE_RUN = [*TINY_RUN, "optimizer=sgd", "trainer.batch_size=16", "tune.sampler=random", "tune.pruner=none"]


def test_two_tuning_workers_on_slurm_fill_one_postgresql_study(
    slurm: SlurmCluster, postgres: Any, tmp_path: Path
) -> None:
    """submit_tune_workers.sh submits a job array of two `bench.tune` workers on one PostgreSQL study: together
    they run exactly tune.n_trials trials, each trial once, and worker 0 writes the summary."""
    import optuna

    n_trials, study = 6, "sgd-digits-slurm"
    overrides = [*TUNE_RUN, "trainer.epochs=2", f"tune.n_trials={n_trials}", "tune.reruns=1"]
    array_id = submit_tune_workers(slurm, postgres.url, tmp_path, 2, study, *overrides)
    # The URL (with its password) reaches the workers through their environment only.
    script = slurm.run("scontrol", "write", "batch_script", f"{array_id}_0", "-")
    assert "$TUNE_STORAGE" in script and postgres.url not in script
    slurm.wait_idle(timeout_s=300)

    study_dir = tmp_path / study
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(study_dir.glob("worker_*.log")))
    jobs = [j for j in slurm.jobs() if j.get("ArrayJobId") == array_id]
    assert sorted(j["ArrayTaskId"] for j in jobs) == ["0", "1"]
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), logs[-3000:]

    trials = study_trials(postgres, study)
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Both workers took part, and every trial is one harness run in the shared trials directory.
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert sorted(p.name for p in (study_dir / "trials").iterdir()) == sorted(str(t.number) for t in trials)
    assert all(read_metrics(study_dir / "trials" / str(t.number))["status"] == "completed" for t in trials)
    summary = json.loads((study_dir / "worker_0" / "study_summary.json").read_text())
    assert (summary["n_trials"], summary["n_complete"], summary["n_failed"]) == (n_trials, n_trials, 0)
    assert len(summary["reruns"]) == 1


def test_a_tuning_worker_cancelled_mid_trial_leaves_that_trial_failed_and_the_study_goes_on(
    slurm: SlurmCluster, postgres: Any, tmp_path: Path
) -> None:
    import optuna

    n_trials, study = 4, "cancelled-worker"
    # Longer trials, so worker 1 can be caught in one; a fast heartbeat, so its trial is declared dead soon.
    overrides = [*TUNE_RUN, "trainer.epochs=10", f"tune.n_trials={n_trials}", "tune.reruns=0"]
    overrides += ["tune.heartbeat_interval_s=1", "tune.grace_period_s=2"]
    array_id = submit_tune_workers(slurm, postgres.url, tmp_path, 2, study, *overrides)

    def worker_1_running() -> list[Any]:
        running = [t for t in study_trials(postgres, study) if t.state == optuna.trial.TrialState.RUNNING]
        return [t for t in running if t.user_attrs.get("worker") == 1]

    wait_for(lambda: bool(worker_1_running()), 180, "worker 1 to start a trial", slurm)
    (victim,) = worker_1_running()
    slurm.run("scancel", f"{array_id}_1")
    slurm.wait_idle(timeout_s=300)

    jobs = {j["ArrayTaskId"]: j for j in slurm.jobs() if j.get("ArrayJobId") == array_id}
    assert (jobs["0"]["JobState"], jobs["1"]["JobState"]) == ("COMPLETED", "CANCELLED")
    trials = {t.number: t for t in study_trials(postgres, study)}
    # Exactly the budget: the cancelled worker's trial failed (and counts), the surviving worker ran the rest.
    assert sorted(trials) == list(range(n_trials))
    assert trials[victim.number].state == optuna.trial.TrialState.FAIL
    others = [t for n, t in trials.items() if n != victim.number]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["worker"] == 0 for t in others)


def test_a_population_sweep_is_one_array_of_chunks_that_lands_every_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    # 12 jobs, at most 5 per population: three array tasks (5, 5, 2), each job in its own <num>/ directory with
    # the numbers the local population launcher gives (float64).
    sweep = [*TINY_RUN, "trainer.epochs=2", "trainer.dtype=float64", "optimizer.base=sgd", "optimizer.lr=0.03,0.3",
             "optimizer.height=0,1", "seed=0,1,2", "hydra.launcher.max_members=5"]  # fmt: skip
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    command = [sys.executable, "-m", "bench", "--multirun", "hydra/launcher=population_slurm", *SMALL_JOBS[1:]]
    done = run_text([*command, f"hydra.sweep.dir={on_slurm}", *sweep], tmp_path, slurm.env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + slurm.logs()
    assert len(job_folders(on_slurm)) == 3
    run_locally_as_populations(local, sweep, tmp_path, slurm.env)
    for num in range(12):
        a, b = read_metrics(on_slurm / str(num)), read_metrics(local / str(num))
        assert a["status"] == "completed" and (a["population"]["size"], b["population"]["size"]) == (
            5 if num < 10 else 2,
            5 if num < 10 else 2,
        )
        for key in ("test_loss", "val_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-10), (num, key)
        assert (on_slurm / str(num) / ".hydra" / "config.yaml").read_text() == (
            local / str(num) / ".hydra" / "config.yaml"
        ).read_text()
    assert not (on_slurm / ".population").exists() or not any((on_slurm / ".population").iterdir())


def test_a_preempted_population_resumes_from_its_checkpoint_to_the_same_results(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    # One population of 4 jobs gets submitit's pre-timeout signal (USR2) mid-training: it saves its checkpoint,
    # submitit requeues the array task, and the requeued task resumes; every job ends as an uninterrupted one.
    # A checkpoint every 60 ms of training (a population saves as a single run does) marks that training is under way.
    sweep = [*TINY_RUN, "trainer.epochs=40", "trainer.dtype=float64", "optimizer.base=sgd", "optimizer.lr=0.03,0.3",
             "optimizer.height=0,1", "trainer.checkpoint_minutes=0.001"]  # fmt: skip
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    command = [sys.executable, "-m", "bench", "--multirun", "hydra/launcher=population_slurm", *SMALL_JOBS[1:]]
    log = tmp_path / "driver.log"
    with log.open("wb") as out:
        driver = subprocess.Popen([*command, f"hydra.sweep.dir={on_slurm}", *sweep], cwd=tmp_path, env=slurm.env,
                                  stdout=out, stderr=out)  # fmt: skip
        try:
            wait_for(lambda: any((on_slurm / ".population").glob("*/*.pt")), 180, "the population to train", slurm)
            # One population: one task (the module's cluster still lists earlier tests' finished jobs).
            (job,) = [j for j in slurm.jobs() if str(on_slurm) in j.get("StdOut", "") + j.get("Command", "")]
            slurm.run("scancel", "--signal=USR2", f"{job['JobId']}.0")  # its job step, as `interrupt` does
            assert driver.wait(timeout=600) == 0, log.read_text()[-3000:] + slurm.logs()
        finally:
            driver.kill()
    folders = {d for d in (on_slurm / ".submitit").iterdir() if d.is_dir()}
    assert "checkpoint saved; submitit requeues the job" in job_logs(folders)
    run_locally_as_populations(local, sweep, tmp_path, slurm.env)
    for num in range(4):
        a, b = read_metrics(on_slurm / str(num)), read_metrics(local / str(num))
        assert a["status"] == b["status"] == "completed"
        for key in ("test_loss", "val_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-10), (num, key)
        assert history_without_timing(on_slurm / str(num)).equals(history_without_timing(local / str(num)))
