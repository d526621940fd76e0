"""A run directory has one identity: other configs are refused naming the keys, nothing in it is rewritten
(.hydra/ included), simultaneous runs never share a directory, and an exploded run is recorded as diverged."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import compose_config
from bench.train import RunDirError, run
from tests.harness_helpers import QUICK, REPO, bench_env, run_bench

FAST = [*QUICK, "dataset=synthetic", "model=mlp"]


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith(".log")
    }


def test_rerunning_a_finished_directory_under_another_config_is_refused_and_rewrites_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_bench([*FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(run_dir)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json"} <= set(before)
    for change in ("seed=5", "optimizer.lr=0.5", "model.hidden=7"):
        proc = run_bench([*FAST, change, f"hydra.run.dir={run_dir}"], tmp_path)
        key = change.split("=")[0]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and key in proc.stderr and "trainer.force=true" in proc.stderr
        assert _snapshot(run_dir) == before
    # The same config with other non-result settings skips, and still rewrites nothing.
    proc = run_bench([*FAST, "trainer.eval_batch_size=64", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0 and "skipping" in proc.stdout and _snapshot(run_dir) == before
    # trainer.force=true starts over under the new config, and the record says so.
    proc = run_bench([*FAST, "seed=5", "trainer.force=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["seed"] == 5
    assert "seed: 5" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_resuming_a_checkpoint_under_another_seed_is_refused(tmp_path: Path) -> None:
    cfg = [*FAST, "trainer.max_steps=null", "trainer.epochs=1", "trainer.checkpoint_every=1"]
    run(compose_config(cfg), tmp_path)
    (tmp_path / "metrics.json").unlink()  # as if killed after the checkpoint
    with pytest.raises(RunDirError, match=r"checkpoint\.pt: seed: 0 -> 5"):
        run(compose_config([*cfg, "seed=5"]), tmp_path)


def test_a_corrupt_metrics_json_says_what_to_do_and_force_recovers(tmp_path: Path) -> None:
    run(compose_config(FAST), tmp_path)
    (tmp_path / "metrics.json").write_text('{"status": "compl')
    with pytest.raises(RunDirError, match=r"metrics\.json` is not valid JSON .*move it aside"):
        run(compose_config(FAST), tmp_path)
    assert run(compose_config([*FAST, "trainer.force=true"]), tmp_path)["status"] == "completed"


def test_runs_started_together_get_their_own_directories(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench", *FAST, f"paths.log_dir={tmp_path / 'logs'}"],
            cwd=REPO,
            env=bench_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    results = list((tmp_path / "logs").rglob("metrics.json"))
    assert len(results) == 3 and len({r.parent for r in results}) == 3


def test_an_exploding_run_with_finite_numbers_is_recorded_as_diverged_with_the_rule(tmp_path: Path) -> None:
    # SGD with a huge step on a small CNN: the loss grows 1e8-fold while every number stays finite.
    cfg = [*QUICK, "dataset=digits", "model=cnn", "optimizer=sgd", "optimizer.lr=1e4", "trainer.max_steps=20"]
    metrics = run(compose_config(cfg), tmp_path)
    assert (metrics["status"], metrics["diverged"]) == ("diverged", True)
    assert "exceeded trainer.diverge_factor=100 times its initial value" in metrics["diverged_reason"]
    # The same run with the rule off is what main recorded: "completed".
    assert run(compose_config([*cfg, "trainer.diverge_factor=null"]), tmp_path / "off")["status"] == "completed"
    # A healthy run is not touched by the rule.
    assert run(compose_config([*cfg[:-2], "trainer.max_steps=20"]), tmp_path / "ok")["status"] == "completed"
