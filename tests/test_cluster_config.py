"""Cluster settings without a cluster: the launcher presets, the site file, and the scripts' answers to bad input.

The SLURM behaviour itself (sweeps, preemption, tuning workers) is tested against real daemons in test_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from bench.cluster import CheckpointOnPreemption, sbatch_options
from bench.config import compose_config
from tests.harness_helpers import REPO, run_text

# bench/conf/hydra/launcher/submitit_slurm.yaml keeps the plugin's preset name (the documented `hydra/launcher=
# submitit_slurm`), so Hydra validates it against the plugin's schema of that name and says this is deprecated.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*is validated against ConfigStore schema with the same name:UserWarning"
)


def launcher(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    cfg = compose_config(["hydra/launcher=submitit_slurm", *overrides], return_hydra_config=True)
    # Resolve the launcher as Hydra does when it instantiates it (hydra.runtime.cwd is filled in by then).
    cfg.hydra.runtime.cwd = "/submit/dir"
    return {key: OmegaConf.to_container(cfg.hydra[key], resolve=True) for key in ("launcher", "callbacks")}


def test_the_slurm_preset_checkpoints_on_preemption_and_asks_one_gpu_per_run() -> None:
    hydra = launcher()
    assert hydra["callbacks"]["checkpoint_on_preemption"]["_target_"] == "bench.cluster.CheckpointOnPreemption"
    slurm = hydra["launcher"]
    assert (slurm["gpus_per_task"], slurm["tasks_per_node"], slurm["nodes"]) == (1, 1, 1)
    # Requeued runs resume from their checkpoint, so hitting the time limit may be survived a few times.
    assert slurm["max_num_timeout"] > 0 and slurm["signal_delay_s"] > 0
    assert any("OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in line for line in slurm["setup"])
    # The job activates the project's environment: the one active at submission, else ./.venv.
    venv = os.environ.get("VIRTUAL_ENV") or "/submit/dir/.venv"
    assert any(line.startswith(f"venv={venv};") for line in slurm["setup"])


def test_site_settings_from_a_local_slurm_file_override_the_preset(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "slurm.yaml").write_text(
        "partition: gpu-long\naccount: proj42\nqos: high\ntimeout_min: 600\n"
    )
    slurm = launcher(f"hydra.searchpath=[file://{tmp_path}]")["launcher"]
    assert (slurm["partition"], slurm["account"], slurm["qos"], slurm["timeout_min"]) == (
        "gpu-long",
        "proj42",
        "high",
        600,
    )
    assert slurm["gpus_per_task"] == 1  # everything the site file does not name keeps the preset's value
    # Without a site file the preset composes on its own, with no partition (the cluster's default one).
    assert launcher()["launcher"]["partition"] is None


def test_site_settings_become_sbatch_options_for_scripts(tmp_path: Path) -> None:
    site = tmp_path / "slurm.yaml"
    site.write_text(
        "partition: gpu\naccount: proj42\nqos: null\nadditional_parameters:\n  mail_type: END\n  exclusive: true\n"
    )
    assert sbatch_options(site) == ["--partition=gpu", "--account=proj42", "--mail-type=END", "--exclusive"]
    assert sbatch_options(tmp_path / "missing.yaml") == []

    site.write_text("- partition\n")
    proc = run_text([sys.executable, "-m", "bench.cluster", "sbatch-options", str(site)])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"`{site}` must hold a mapping of launcher keys, but got ['partition']"


def test_outside_a_slurm_job_the_callback_leaves_signals_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    callback = CheckpointOnPreemption()
    callback.on_job_start(config=None, task_function=None)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["0", "study"],
            {"TUNE_STORAGE": "postgresql://u@h/db"},
            "N must be a positive number of workers, but got '0'",
        ),
        (
            ["2", "a b"],
            {"TUNE_STORAGE": "postgresql://u@h/db"},
            "STUDY must be letters, digits, '.', '_' or '-', but got 'a b'",
        ),
        (["2", "study"], {}, "TUNE_STORAGE must be a storage every node reaches"),
        (["2", "study"], {"TUNE_STORAGE": "sqlite:///x.db"}, "TUNE_STORAGE must be shared by workers on several nodes"),
    ],
)
def test_submit_tune_workers_refuses_bad_input_before_submitting(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if k != "TUNE_STORAGE"}
    env = {**clean, **env, "TUNE_ROOT": str(tmp_path / "tune")}
    proc = run_text(["bash", str(REPO / "scripts/slurm/submit_tune_workers.sh"), *args], tmp_path, env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message)
    assert not (tmp_path / "tune").exists()  # nothing written, nothing submitted


@pytest.mark.parametrize(
    ("script", "first_line"),
    [
        ("scripts/slurm/submit_tune_workers.sh", "Submit N Optuna workers for one study as a SLURM job array"),
        ("scripts/reproduce_paper.sh", "Run one of the paper's experiments (its Hydra sweep) and then its report"),
    ],
)
def test_a_scripts_help_is_its_header_comment_and_exit_0(tmp_path: Path, script: str, first_line: str) -> None:
    # README lists `--help` for these scripts: it prints the comment block at the top, nothing of the code below.
    proc = run_text(["bash", str(REPO / script), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = []
    for line in (REPO / script).read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    assert proc.stdout.splitlines() == header and header[0].startswith(first_line)
    assert not list(tmp_path.iterdir())  # help writes nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--driver", "screen", "name"], "--driver must be nohup, sbatch or foreground, but got 'screen'"),
        (["a/b"], "NAME must be letters, digits, '.', '_' or '-', but got 'a/b'"),
        (["optimizer.lr=1"], "usage: "),
    ],
)
def test_submit_sweep_refuses_bad_input_before_submitting(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "SWEEP_ROOT": str(tmp_path / "sweeps")}
    proc = run_text(["bash", str(REPO / "scripts/slurm/submit_sweep.sh"), *args], tmp_path, env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message)
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_through_the_submitit_local_preset_lands_every_run(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "bench", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"]
    overrides = ["dataset=digits", "trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu", "seed=0,1"]
    proc = run_text([*command, *overrides], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = sorted(json.loads((sweep_dir / n / "metrics.json").read_text())["seed"] for n in ("0", "1"))
    assert seeds == [0, 1]
    # Each run went through submitit (its job folder and logs sit next to the runs).
    assert len(list((sweep_dir / ".submitit").glob("[0-9]*/*_log.out"))) == 2
