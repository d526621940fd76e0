"""`python -m bench.rerun`: the base optimizer re-run at the values its tower learned (Table 1's re-run rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.rerun import main, plan_reruns, rerun_spec, run_reruns
from bench.train import run

ROOT = Path(__file__).resolve().parents[1]


def _tower_run(out: Path, spec: str | None, seed: int, keys: tuple[str, ...] = ()) -> dict:
    overrides = [
        *([f"optimizer.spec='{spec}'"] if spec else keys),
        f"seed={seed}",
        "trainer.epochs=1",
        "trainer.max_steps=4",
        "trainer.progress=false",
        "dataset.train_size=512",
        "experiment=mnist_table",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "bench" / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run(cfg, output_dir=out)


def test_a_rerun_starts_at_and_keeps_the_values_its_tower_learned(tmp_path: Path) -> None:
    # A large hyper-step, so the learned values are far from the initial ones.
    towers = {s: _tower_run(tmp_path / "runs" / str(s), "rmsprop(0.01)/sgd(0.01)", s) for s in (0, 1)}
    plans = run_reruns(tmp_path / "runs", tmp_path / "reruns")
    assert [p["status"] for p in plans] == ["completed", "completed"]
    for plan in plans:
        seed = plan["seed"]
        learned = towers[seed]["hyperparameters"][0]
        rerun = json.loads((tmp_path / "reruns" / f"runs_{seed}" / "metrics.json").read_text())
        assert rerun["height"] == 0 and rerun["seed"] == seed
        for name in ("lr", "gamma"):
            assert rerun["init"][name] == pytest.approx(learned[name], rel=1e-6)
            assert rerun["hyperparameters"][0][name] == pytest.approx(learned[name], rel=1e-6)  # fixed: not learned
        assert learned["lr"] != pytest.approx(0.01, rel=1e-3)
        # The report sees the preset: the re-run's Hydra overrides keep experiment=mnist_table.
        assert (
            "experiment=mnist_table" in (tmp_path / "reruns" / f"runs_{seed}" / ".hydra" / "overrides.yaml").read_text()
        )


def test_a_tower_built_from_the_sweep_keys_is_re_run_at_its_learned_values(tmp_path: Path) -> None:
    # A sensitivity sweep's tower: optimizer.base/lr/height/hyper_lr, no spec. The re-run's spec replaces them.
    keys = ("optimizer.base=sgd", "optimizer.lr=0.03", "optimizer.height=1", "optimizer.hyper_lr=0.01")
    tower = _tower_run(tmp_path / "runs" / "0", None, 0, keys)
    (plan,) = run_reruns(tmp_path / "runs", tmp_path / "reruns")
    assert plan["status"] == "completed" and plan["rerun_of"] == "sgd(0.03)/sgd(0.01)"
    rerun = json.loads((tmp_path / "reruns" / "runs_0" / "metrics.json").read_text())
    assert rerun["height"] == 0 and rerun["init"]["lr"] == pytest.approx(tower["hyperparameters"][0]["lr"], rel=1e-6)


def test_mean_mode_reruns_every_seed_with_the_groups_mean(tmp_path: Path) -> None:
    towers = [_tower_run(tmp_path / "runs" / str(s), "sgd(0.01)/sgd(0.01)", s) for s in (0, 1)]
    mean = sum(t["hyperparameters"][0]["lr"] for t in towers) / 2
    plans = plan_reruns(tmp_path / "runs", mode="mean")
    assert [p["learned"]["lr"] for p in plans] == pytest.approx([mean, mean])


def test_an_unusable_learned_value_is_recorded_with_the_value_not_a_crash(tmp_path: Path) -> None:
    assert rerun_spec("adam(0.001)/sgd(1e-5)", {"lr": 0.004, "beta1": 1.2, "beta2": 0.999}) == (
        None,
        "adam: beta1 must be in (0, 1), but got 1.2",
    )
    # A finished tower whose learned step size went negative (as sgd/sgd does on some tasks).
    _tower_run(tmp_path / "runs" / "0", "sgd(0.01)/sgd(0.01)", 0)
    metrics_path = tmp_path / "runs" / "0" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["hyperparameters"][0]["lr"] = -0.0173
    metrics_path.write_text(json.dumps(metrics))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "reruns")]) == 0
    record = json.loads((tmp_path / "reruns" / "runs_0" / "rerun.json").read_text())
    assert record["status"] == "unusable" and record["learned"]["lr"] == -0.0173
    assert "-0.0173" in record["reason"]
    assert not (tmp_path / "reruns" / "runs_0" / "metrics.json").exists()
    assert "unusable" in (tmp_path / "reruns" / "reruns.csv").read_text()


def test_cli_refuses_a_missing_directory_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
