"""`python -m bench`: the command a user types, run as a subprocess, end to end.

Each test states what the user sees: the default run, sweeps with both launchers, W&B offline files
inside the run directory, and clean one-line errors with a non-zero exit for bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness_helpers import QUICK, REPO, run_bench


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_default_command_trains_the_papers_mlp_offline_and_prints_a_summary(tmp_path: Path) -> None:
    proc = run_bench([f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = _metrics(tmp_path / "run")
    assert (metrics["model"], metrics["dataset"], metrics["optimizer"]) == ("mlp", "mnist5k", "adam(0.001)/sgd(1e-05)")
    assert metrics["status"] == "completed" and metrics["test_error"] < 0.2
    # Under a minute of training on this shared 2-core machine (the paper's MLP is small).
    assert metrics["wall_time_s"] < 60
    # A progress bar while training, a summary table at the end: errors, each level's learned values, time.
    assert "step/s" in proc.stderr or "s/step" in proc.stderr
    assert "test error" in proc.stdout and "L1 initial" in proc.stdout and "L2 final" in proc.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "run" / "history.csv").is_file()


def test_multirun_gives_one_directory_per_run_and_a_diverging_run_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # A hyper step size of 1e10 makes the learned step size explode within a few steps.
    quick = ["trainer.epochs=1", "trainer.max_steps=8", "trainer.progress=false", "trainer.num_threads=1"]
    proc = run_bench(["-m", *quick, "optimizer.hyper_lr=1e-5,1e10", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [_metrics(sweep / str(i)) for i in range(2)]
    assert [r["optimizer"] for r in runs] == ["adam(0.001)/sgd(1e-05)", "adam(0.001)/sgd(10000000000.0)"]
    assert [r["status"] for r in runs] == ["completed", "diverged"]
    assert runs[1]["diverged"] is True and runs[1]["diverged_step"] >= 1


def test_multirun_with_the_joblib_launcher_runs_both_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_bench(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *QUICK, "seed=0,1", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = [_metrics(sweep / str(i)) for i in range(2)]
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(r["status"] == "completed" for r in runs)
    assert runs[0]["test_loss"] != runs[1]["test_loss"]  # the seed reached the run


def test_wandb_offline_keeps_its_files_in_the_run_directory_and_never_the_api_key(tmp_path: Path) -> None:
    key = "sentinel" + "0123456789" * 4
    run_dir = tmp_path / "run"
    proc = run_bench(
        ["logger=wandb", "logger.group=harness-test-group", "logger.tags=[t-one,t-two]", "logger.log_every_n_steps=1",
         *QUICK, f"hydra.run.dir={run_dir}"],
        tmp_path,
        extra_env={"WANDB_API_KEY": key},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [record] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    content = record.read_bytes()
    # The run is grouped and tagged from the config; it holds per-step loss, hyperparameter
    # trajectories of every level, per-epoch metrics and the final summary.
    for text in ("harness-test-group", "t-one", "t-two", "train/loss", "hyper/L1.lr", "hyper/L2.lr",
                 "epoch/val_error", "test_error", "final/L1.lr"):  # fmt: skip
        assert text.encode() in content, text
    assert not (REPO / "wandb").exists()
    every_file = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(key.encode() not in p.read_bytes() for p in every_file)
    assert _metrics(run_dir)["status"] == "completed"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=-1", "error: `trainer.epochs` must be a positive integer, but got -1"),
        ("dataset=cifar10", "error: `dataset.data_dir` must be a directory holding the cifar10 files, but got "),
    ],
)
def test_a_bad_value_exits_2_with_one_line_and_no_metrics(tmp_path: Path, override: str, message: str) -> None:
    proc = run_bench([override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_a_run_directory_under_a_file_exits_with_one_line_naming_it(tmp_path: Path, mode: str) -> None:
    # Hydra makes the directory before the task starts; without the check the user got Hydra's traceback.
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    key = f"hydra.{mode}.dir"
    proc = run_bench([*(["-m", "seed=0,1"] if mode == "sweep" else []), f"{key}={blocker / 'x'}"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot create `{blocker / 'x'}`: `{blocker}` is not a directory; "
        f"pick another directory ({key}=... or paths.log_dir=...)"
    ]
    assert blocker.read_text() == "not a directory"


def test_an_unknown_group_option_lists_the_available_ones(tmp_path: Path) -> None:
    proc = run_bench(["dataset=imagenet", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'dataset/imagenet'" in proc.stderr
    assert "Available options in 'dataset'" in proc.stderr and "mnist5k" in proc.stderr and "cifar10" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_wandb_failure_never_stops_training(tmp_path: Path) -> None:
    # Online mode with no account anywhere (a fresh HOME, no key, an unreachable server): W&B refuses.
    run_dir = tmp_path / "run"
    proc = run_bench(
        ["logger=wandb", "logger.mode=online", *QUICK, f"hydra.run.dir={run_dir}"],
        tmp_path,
        extra_env={"HOME": str(tmp_path / "home"), "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_MODE": "online"},
    )
    assert proc.returncode == 0, proc.stderr
    # A logging warning (Hydra's console handler and the job log), not a traceback.
    output = proc.stdout + proc.stderr
    assert "[WARNING] - W&B logging failed" in output and "training goes on without it" in output
    assert "W&B logging failed" in (run_dir / "__main__.log").read_text()
    assert _metrics(run_dir)["status"] == "completed"
