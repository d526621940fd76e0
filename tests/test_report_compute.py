"""Compute in the report is steps x batch size x the calibrated step cost, never the runs' wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.calibrate import _cache_key, calibrate
from bench.report.pipeline import compose_report_config
from bench.report.pipeline import run as report
from bench.train import run

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, spec: str, seed: int = 0) -> None:
    overrides = [f"optimizer.spec='{spec}'", f"seed={seed}", "trainer.epochs=1", "trainer.max_steps=3",
                 "trainer.batch_size=64", "trainer.progress=false", "dataset.train_size=256"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "bench" / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    run(cfg, output_dir=out)
    # Wall time as a busy machine would record it: absurd, and it must not matter.
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_time_s"] = 1000.0 * (seed + 1)
    (out / "metrics.json").write_text(json.dumps(metrics))


def test_compute_uses_the_cached_calibration_not_wall_time(tmp_path: Path) -> None:
    _run(tmp_path / "runs" / "a", "sgd(0.01)")
    _run(tmp_path / "runs" / "b", "sgd(0.01)/sgd(0.01)")
    _run(tmp_path / "runs" / "c", "sgd(0.01)/sgd(0.01)", seed=1)
    cfg = OmegaConf.load(tmp_path / "runs" / "b" / ".hydra" / "config.yaml")
    cache = tmp_path / "step_cost.json"
    # A calibration measured earlier on this device: the tower's step costs 3 SGD steps.
    cache.write_text(
        json.dumps(
            {
                _cache_key(cfg, "sgd(0.01)"): 0.002,
                _cache_key(cfg, "sgd"): 0.002,
                _cache_key(cfg, "sgd/sgd(0.01)"): 0.006,
            }
        )
    )
    assert calibrate(tmp_path / "runs", cache) == {"sgd(0.01)": 1.0, "sgd(0.01)/sgd(0.01)": pytest.approx(3.0)}
    report(compose_report_config([f"input={tmp_path / 'runs'}", "progress=false", "tuning_cost=compute",
                                  f"calibration_cache={cache}"]), output_dir=tmp_path / "report")  # fmt: skip
    summary = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("method")
    assert summary.loc["sgd", "compute_mean"] == 3 * 64
    assert summary.loc["sgd/sgd(0.01)", "compute_mean"] == pytest.approx(3 * 64 * 3.0)  # seeds differ in wall time


def test_calibration_measures_once_and_caches_per_device(tmp_path: Path) -> None:
    _run(tmp_path / "runs" / "a", "sgd(0.01)/sgd(0.01)")
    cache = tmp_path / "step_cost.json"
    first = calibrate(tmp_path / "runs", cache)
    stored = json.loads(cache.read_text())
    assert len(stored) == 2 and all(v > 0 for v in stored.values())  # the tower and the SGD reference
    assert calibrate(tmp_path / "runs", cache) == first  # read back, not measured again


def test_the_calibration_cache_follows_the_environment_and_tests_keep_it_out_of_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.calibrate import default_cache

    # conftest points every test's cache into its own tmp dir; subprocesses inherit the variable.
    assert default_cache() == tmp_path / "calibration" / "step_cost.json"
    monkeypatch.setenv("HYPERGRAD_CALIBRATION_CACHE", str(tmp_path / "elsewhere.json"))
    assert default_cache() == tmp_path / "elsewhere.json"
    monkeypatch.delenv("HYPERGRAD_CALIBRATION_CACHE")
    assert default_cache() == Path.home() / ".cache" / "hypergrad" / "step_cost.json"
