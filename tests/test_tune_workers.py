"""Several `python -m bench.tune` processes on one study: a journal file, and a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bench.tune import compose_tune_config, tune
from bench.tune_storage import parse_storage
from tests.harness_helpers import REPO
from tests.pg_server import start_postgres

N_TRIALS = 6
FAST = ["optimizer=sgd", "dataset=digits", "trainer.progress=false", "trainer.epochs=2", "trainer.max_steps=6"]


def _worker_overrides(storage: str, worker: int, run_dir: Path) -> list[str]:
    study = [f"tune.n_trials={N_TRIALS}", "tune.reruns=1", f"tune.storage={storage}", "tune.study_name=shared"]
    return [*study, f"tune.worker={worker}", f"hydra.run.dir={run_dir}"]


def _run_workers(tmp_path: Path, storage: str, env: dict[str, str] | None = None) -> list[Path]:
    """Start two workers on one study at once; wait for both; return their run directories."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    run_dirs = [tmp_path / f"worker{w}" for w in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.tune", *FAST, *_worker_overrides(storage, w, run_dir)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w, run_dir in enumerate(run_dirs)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    return run_dirs


def _assert_exactly_n_trials(study: optuna.Study, run_dirs: list[Path]) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(N_TRIALS))  # none lost, none extra
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
    # Each trial ran exactly once: one run directory per trial number, over both workers.
    dirs = sorted(int(d.name) for run_dir in run_dirs for d in (run_dir / "trials").iterdir())
    assert dirs == list(range(N_TRIALS))
    assert sorted(t.user_attrs["run_dir"] for t in trials) == sorted(
        str(d) for run_dir in run_dirs for d in (run_dir / "trials").iterdir()
    )
    summary = json.loads((run_dirs[0] / "study_summary.json").read_text())
    assert summary["n_trials"] == N_TRIALS and summary["n_unfinished"] == 0
    assert summary["total_epochs"] == sum(t.user_attrs["epochs"] for t in trials) + summary["reruns"][0]["epochs"]
    assert [r["seed"] for r in summary["reruns"]] == [1]
    # Worker 1 neither waits for the study nor reruns: the best is rerun once, not once per worker.
    assert json.loads((run_dirs[1] / "study_summary.json").read_text())["reruns"] == []


@pytest.mark.slow
def test_two_processes_on_one_journal_file_run_exactly_n_trials(tmp_path: Path) -> None:
    journal = tmp_path / "study.log"
    run_dirs = _run_workers(tmp_path, f"journal:{journal}")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    _assert_exactly_n_trials(optuna.load_study(study_name="shared", storage=storage), run_dirs)


@pytest.mark.slow
@pytest.mark.services
def test_two_processes_on_one_postgresql_study_run_exactly_n_trials(tmp_path: Path) -> None:
    server = start_postgres()  # raises (the test fails) when PostgreSQL is not installed
    try:
        password = server.url.split(":")[2].split("@")[0]
        # Given through the environment, the URL's password stays out of Hydra's saved config and overrides.
        run_dirs = _run_workers(tmp_path, "${oc.env:TUNE_STORAGE}", env={"TUNE_STORAGE": server.url})
        storage = optuna.storages.RDBStorage(server.sqlalchemy_url)
        try:
            _assert_exactly_n_trials(optuna.load_study(study_name="shared", storage=storage), run_dirs)
        finally:
            storage.engine.dispose()
        summary = json.loads((run_dirs[0] / "study_summary.json").read_text())
        assert summary["storage"] == server.sqlalchemy_url.replace(password, "***")
        leaked = [p for p in tmp_path.rglob("*") if p.is_file() and password in p.read_text(errors="replace")]
        assert leaked == []
    finally:
        server.stop()


@pytest.mark.slow
def test_a_killed_workers_trial_is_marked_failed_and_not_run_again(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    study_args = [f"tune.storage={storage}", "tune.study_name=killed", "tune.n_trials=3", "tune.reruns=0"]
    heartbeat = ["tune.heartbeat_interval_s=1", "tune.grace_period_s=2"]
    # Worker 1 gets a long trial (hundreds of epochs) and is killed in the middle of it.
    long_trial = [*FAST, "trainer.epochs=500", "trainer.max_steps=null", "tune.worker=1"]
    with open(tmp_path / "victim.err", "w") as err:
        victim = subprocess.Popen(
            [sys.executable, "-m", "bench.tune", *long_trial, *study_args, *heartbeat, f"hydra.run.dir={tmp_path}/v"],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 120
            while not _trial_has_run_an_epoch(db):
                assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "victim.err").read_text()
                time.sleep(0.2)
        finally:
            victim.kill()
            victim.wait()
    summary = tune(
        compose_tune_config([*FAST, *study_args, *heartbeat]), output_dir=tmp_path / "survivor"
    )  # worker 0, in this process

    assert [t["state"] for t in summary["trials"]] == ["fail", "complete", "complete"]
    assert summary["n_trials"] == 3 and summary["n_failed"] == 1  # failed once, never retried
    killed = summary["trials"][0]
    assert killed["epochs"] >= 1 and Path(killed["run_dir"]).parent == tmp_path / "v" / "trials"
    others = [json.loads((Path(t["run_dir"]) / "metrics.json").read_text())["epochs"] for t in summary["trials"][1:]]
    assert summary["total_epochs"] == killed["epochs"] + sum(others)  # the killed trial's compute still counts


def _trial_has_run_an_epoch(db: Path) -> bool:
    # Opened the way bench.tune opens it (under its lock): a second process creating Optuna's tables at
    # the same time as the worker would make one of them fail.
    storage = parse_storage(f"sqlite:///{db}", db).open(heartbeat_interval_s=60, grace_period_s=None)
    try:
        trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    except KeyError:  # the study is not created yet
        return False
    finally:
        storage.engine.dispose()
    return any(t.state == TrialState.RUNNING and t.user_attrs.get("epochs", 0) >= 1 for t in trials)


@pytest.mark.services
def test_the_postgres_fixture_serves_loopback_only_and_leaves_nothing_behind() -> None:
    import psycopg2

    server = start_postgres()
    pid = server.pid()
    conn = psycopg2.connect(server.url)
    with conn, conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone() == ("127.0.0.1",)
    conn.close()
    server.stop()
    assert (pid is not None and not Path(f"/proc/{pid}").exists()) or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not server.root.exists()
