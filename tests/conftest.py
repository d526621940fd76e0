"""Test-wide settings.

- The tests' CIFAR-10 files are tiny re-packed batches, not the official ones, so runs read them through the
  documented opt-out (HYPERGRAD_VERIFY_CHECKSUMS=false: numpy-only unpickling); tests of the checksum check
  itself pass `dataset.verify_checksums=true`.
- Tests marked `services` need real PostgreSQL or SLURM daemons. Where those are not installed they skip with one
  line naming the install command; HYPERGRAD_REQUIRE_SERVICES=1 (set by .ci/run, which installs them) turns every
  such skip into a failure.
- The compute calibration cache (bench.calibrate) goes to each test's tmp dir (HYPERGRAD_CALIBRATION_CACHE, which
  subprocesses inherit), never to ~/.cache/hypergrad.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HYPERGRAD_VERIFY_CHECKSUMS", "false")

REQUIRE_SERVICES = os.environ.get("HYPERGRAD_REQUIRE_SERVICES", "") not in ("", "0")
INSTALL = "apt-get install postgresql slurm-wlm munge (or run .ci/run)"


@pytest.fixture(autouse=True)
def _calibration_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERGRAD_CALIBRATION_CACHE", str(tmp_path / "calibration" / "step_cost.json"))


def missing_services() -> list[str]:
    """The service programs the `services` tests need that this machine lacks."""
    import shutil

    from tests.slurm_cluster import DAEMONS, _sbin

    missing = [name for name in DAEMONS if _sbin(name) is None]
    try:
        from tests.pg_server import find_postgres_bin

        find_postgres_bin()
    except RuntimeError:
        missing.append("postgres (initdb, pg_ctl)")
    if shutil.which("runuser") is None and os.geteuid() == 0:
        missing.append("runuser")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REQUIRE_SERVICES or not any(item.get_closest_marker("services") for item in items):
        return
    missing = missing_services()
    if missing:
        skip = pytest.mark.skip(reason=f"needs {', '.join(missing)}: {INSTALL}")
        for item in items:
            if item.get_closest_marker("services"):
                item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Under HYPERGRAD_REQUIRE_SERVICES a missing service is a failure, with the same one line.
    if REQUIRE_SERVICES and item.get_closest_marker("services"):
        missing = missing_services()
        if missing:
            pytest.fail(f"HYPERGRAD_REQUIRE_SERVICES=1 but this machine lacks {', '.join(missing)}: {INSTALL}")


@pytest.fixture
def bench_cli():
    """Run `python -m bench ARGS` as a user would: a fresh process with this checkout on PYTHONPATH, one thread.

    Returns `run(*args, cwd) -> subprocess.CompletedProcess` (stdout and stderr captured as text).
    """
    import subprocess
    import sys

    from tests.harness_helpers import checkout_env, run_text

    def run(*args: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_text([sys.executable, "-m", "bench", *args], cwd, checkout_env(), timeout)

    return run
