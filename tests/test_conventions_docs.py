"""The documentation site builds in strict mode (as `make docs` and CI build it), and the W&B Sweeps example drives
the harness with a command line Hydra accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.harness_helpers import QUICK, REPO, bench_env, run_text


def _mkdocs(tmp_path: Path, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return run_text([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], root, env, 300)


def test_docs_build_strict_with_the_api_reference_rendered(tmp_path: Path) -> None:
    proc = _mkdocs(tmp_path, REPO)
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    # The tower's keywords and the rule contract come from the docstrings, rendered by mkdocstrings.
    assert "check_finite" in (site / "api" / "hypergrad" / "index.html").read_text()
    assert "DecayedSGD" in (site / "api" / "rules" / "index.html").read_text()
    assert "args_no_hyphens" in (site / "harness" / "index.html").read_text()


def test_a_broken_api_reference_fails_the_strict_build(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "site", "*.pyc"))
    page = copy / "docs" / "spec.md"
    page.write_text(page.read_text() + "\nSee [`nothing`][hypergrad.no_such_name].\n")
    proc = _mkdocs(tmp_path, copy)
    assert proc.returncode != 0
    assert "hypergrad.no_such_name" in proc.stderr


def test_wandb_sweep_example_command_runs_the_harness(tmp_path: Path) -> None:
    sweep = yaml.safe_load((REPO / "docs" / "examples" / "wandb_sweep.yaml").read_text())
    params = {"optimizer.lr": 0.01, "optimizer.hyper_lr": 1e-5, "seed": 2}
    assert set(params) == set(sweep["parameters"])
    # The agent's macro expansion (wandb's agent needs a W&B server to hand out parameters, so this test expands
    # the macros as its documentation defines them): ${args_no_hyphens} is `key=value` per parameter.
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": [sys.executable],
              "${args_no_hyphens}": [f"{k}={v}" for k, v in params.items()]}  # fmt: skip
    command = [part for arg in sweep["command"] for part in macros.get(arg, [arg])]
    run_dir = tmp_path / "run"
    # Offline here: the example streams to W&B (logger.mode=online), which this machine cannot reach.
    command += ["logger.mode=offline", *QUICK, f"hydra.run.dir={run_dir}"]
    proc = run_text(command, REPO, bench_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert (cfg["optimizer"]["lr"], cfg["optimizer"]["hyper_lr"], cfg["seed"]) == (0.01, 1e-5, 2)
    assert list((run_dir / "wandb").glob("offline-run-*/files/metrics.json"))
