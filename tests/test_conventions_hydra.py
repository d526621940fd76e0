"""Hydra conventions a lightning-hydra-template user expects: presets without `+`, logger/debug groups,
per-entry-point help, console scripts with tab completion, and a summary table at the end of every sweep."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import tomllib

from bench.config import compose_config
from tests.harness_helpers import QUICK, REPO, bench_env, run_bench, run_text


def test_experiment_preset_is_selected_without_plus() -> None:
    cfg = compose_config(["experiment=mnist_table"])
    assert cfg.trainer.epochs == 30 and cfg.logger.group == "mnist_table"


@pytest.mark.parametrize(
    ("preset", "max_steps", "epochs"), [("steps", 5, 1), ("one_epoch", None, 1), ("profile", 50, 1)]
)
def test_debug_presets_shorten_the_run_and_keep_debug_output_apart(
    preset: str, max_steps: int | None, epochs: int
) -> None:
    cfg = compose_config([f"debug={preset}"])
    assert (cfg.trainer.max_steps, cfg.trainer.epochs, cfg.paths.log_dir) == (max_steps, epochs, "outputs/debug")


def test_csv_and_tensorboard_loggers_together_write_their_files_with_the_optimizer_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["logger=[csv,tensorboard]", "logger.log_every_n_steps=1", *QUICK, f"hydra.run.dir={run_dir}"]
    proc = run_bench(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(run_dir / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert {"train/loss", "hyper/L1.lr", "hyper/L2.lr"} <= set(rows[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("epoch/val_error")] == [2]


def test_unknown_logger_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_bench(["logger.name=mlflow", *QUICK, f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: `logger.name` must be one of ['none', 'csv', 'tensorboard', 'wandb'], but got 'mlflow'"
    )


def test_job_log_holds_the_summary_with_seed_and_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_bench(["seed=3", *QUICK, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_log = (run_dir / "__main__.log").read_text()
    assert f"seed 3, dir {run_dir}" in job_log and "test error" in job_log and "epoch 1:" in job_log


def test_sweep_ends_with_a_table_naming_every_job_printed_and_in_summary_csv(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_bench(["-m", "seed=0,1", "hydra/launcher=joblib", *QUICK, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["seed"], r["status"], r["dir"]) for r in rows] == [
        ("0", "0", "completed", str(sweep / "0")),
        ("1", "1", "completed", str(sweep / "1")),
    ]
    assert f"sweep of 2 jobs -> {sweep / 'summary.csv'}" in proc.stdout
    # Parallel workers log one line per epoch instead of drawing progress bars over each other.
    assert "step/s" not in proc.stderr and "s/step" not in proc.stderr


def test_debug_profile_writes_a_readable_profile(tmp_path: Path) -> None:
    import pstats

    run_dir = tmp_path / "run"
    proc = run_bench(
        ["debug=profile", "trainer.max_steps=2", "trainer.num_threads=1", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert pstats.Stats(str(run_dir / "profile.pstats")).total_calls > 0
    assert "cumulative" in (run_dir / "profile.txt").read_text()


@pytest.mark.parametrize(
    ("module", "app", "shows", "hides"),
    [
        ("bench", "hypergrad-bench", ["debug: one_epoch, profile, steps", "logger: csv, none, tensorboard, wandb"], []),
        ("bench.tune", "hypergrad-tune", ["optuna-dashboard", "search_space:"], []),
        ("bench.report", "hypergrad-report", ["logger=none|wandb", "input:"], ["experiment:", "search_space:"]),
    ],
)
def test_each_entry_point_has_its_own_help(
    tmp_path: Path, module: str, app: str, shows: list[str], hides: list[str]
) -> None:
    proc = run_text([sys.executable, "-m", module, "--help"], REPO, bench_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{app}: ") and "powered by Hydra" not in proc.stdout
    assert f'eval "$({app} -sc install=bash)"' in proc.stdout
    assert all(s in proc.stdout for s in shows), proc.stdout
    assert not any(h in proc.stdout for h in hides), proc.stdout


def _console_script(tmp_path: Path, name: str) -> Path:
    """The launcher pip writes for a `[project.scripts]` entry, for this checkout (the venv's may be another's)."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, func = target.split(":")
    script = tmp_path / "bin" / name
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
    return script


def test_console_scripts_complete_config_groups_in_bash(tmp_path: Path) -> None:
    for name, line, expected in [
        ("hypergrad-bench", "hypergrad-bench logger=", {"logger=csv", "logger=tensorboard", "logger=wandb"}),
        ("hypergrad-bench", "hypergrad-bench debug=", {"debug=steps", "debug=one_epoch", "debug=profile"}),
        ("hypergrad-tune", "hypergrad-tune search_space=", {"search_space=adam", "search_space=sgd"}),
    ]:
        script = _console_script(tmp_path, name)
        # What the function installed by `eval "$(hypergrad-bench -sc install=bash)"` runs on <TAB>.
        env = {**bench_env(tmp_path), "COMP_LINE": line, "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}
        proc = run_text([str(script), "-sc", "query=bash"], REPO, env)
        assert proc.returncode == 0, proc.stderr
        assert expected <= set(proc.stdout.split()), proc.stdout
    install = run_text(
        [str(_console_script(tmp_path, "hypergrad-bench")), "-sc", "install=bash"], REPO, bench_env(tmp_path)
    )
    assert "complete -o nospace -o default -F hydra_bash_completion hypergrad-bench" in install.stdout
