"""The built wheel, installed into a fresh venv, runs the harness: its configs ship inside the package.

The venv reuses this environment's installed dependencies through a `.pth` line (torch and the bench extra are
gigabytes; this machine has no network); the `.pth` files of that environment are not run from there, so its
editable install of this repository does not leak in, and neither does the checkout (no PYTHONPATH, cwd in tmp).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness_helpers import REPO, bench_env, run_text


@pytest.mark.slow
def test_installed_wheel_shows_help_and_trains_one_epoch(tmp_path: Path) -> None:
    env = bench_env(tmp_path)  # offline W&B in tmp, one thread
    env.pop("PYTHONPATH", None)  # the installed wheel, not this checkout (pip would count its egg-info as installed)
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "outputs", "site", "build", "*.egg-info"))
    build = run_text(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
        source, env, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    [wheel] = list((tmp_path / "dist").glob("hypergrad-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [venv_site] = list(venv.glob("lib/python*/site-packages"))
    (venv_site / "_reuse_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = run_text(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)],
        None, env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr

    work = tmp_path / "work"
    work.mkdir()
    where = run_text(
        [str(venv / "bin" / "python"), "-c", "import bench, hypergrad; print(bench.__file__, hypergrad.__file__)"],
        work, env, timeout=120,
    )  # fmt: skip
    assert where.stdout.split() and all(str(venv_site) in p for p in where.stdout.split()), where.stdout + where.stderr

    helped = run_text([str(venv / "bin" / "hypergrad-bench"), "--help"], work, env, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("hypergrad-bench: ") and "experiment: " in helped.stdout
    run_dir = work / "run"
    trained = run_text(
        [str(venv / "bin" / "hypergrad-bench"), "debug=one_epoch", "trainer.num_threads=1", "trainer.progress=false",
         f"hydra.run.dir={run_dir}"],
        work, env, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert '"status": "completed"' in (run_dir / "metrics.json").read_text()
    assert '"epochs": 1' in (run_dir / "metrics.json").read_text()
