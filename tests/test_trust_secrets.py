"""Secrets never reach disk or the terminal: a password in a storage URL and any key named like a password or
token are masked in every file a run or a sweep writes and in everything it prints."""

from __future__ import annotations

from pathlib import Path

from bench.io import mask_secrets
from tests.harness_helpers import QUICK, run_bench, run_module

SECRET = "Sup3rS3cretPW"
FAST = [*QUICK, "dataset=synthetic", "model=mlp"]
SECRET_OVERRIDES = [
    f"+db_url=postgresql://alice:{SECRET}1@db.example.org:5432/studies",
    f"+api_token={SECRET}2",
    f"+wandb_password={SECRET}3",
]


def _files_holding(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_no_file_a_run_or_a_sweep_writes_holds_a_secret(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    single = run_bench([*FAST, *SECRET_OVERRIDES, f"paths.log_dir={logs}"], tmp_path)
    sweep = run_bench(["-m", *FAST, *SECRET_OVERRIDES, "seed=0,1", f"paths.log_dir={logs}"], tmp_path)
    for proc in (single, sweep):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert SECRET not in proc.stdout + proc.stderr
    written = [p for p in logs.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in written) and any(p.name == "overrides.yaml" for p in written)
    assert _files_holding(logs, SECRET) == []
    # What is kept says where the study lived, without the password.
    assert _files_holding(logs, "postgresql://alice:***@db.example.org:5432/studies")


def test_a_storage_password_is_masked_in_the_error_line_and_nothing_is_left_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "tune"
    url = f"postgresql://alice:{SECRET}@127.0.0.1:1/studies"  # nothing listens on port 1
    proc = run_module("bench.tune", [*FAST, f"tune.storage={url}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2 and SECRET not in proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "could not be opened" in proc.stderr and "alice:***@" in proc.stderr
    assert not run_dir.exists()


def test_mask_secrets_covers_urls_secret_keys_and_overrides() -> None:
    assert mask_secrets({"storage": "postgresql://u:pw@h/db", "n": 3}) == {"storage": "postgresql://u:***@h/db", "n": 3}
    assert mask_secrets({"api_token": "abc", "password": None, "lr": 0.1}) == {
        "api_token": "***",
        "password": None,
        "lr": 0.1,
    }
    assert mask_secrets(["+db.password=hunter2", "seed=1"]) == ["+db.password=***", "seed=1"]
    assert mask_secrets("journal:/scratch/study.log") == "journal:/scratch/study.log"
