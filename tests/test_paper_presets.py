"""The paper presets run the paper's experiments: their specs are the rows of bench/report/paper_numbers.yaml."""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from hypergrad import format_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((ROOT / "bench/report/paper_numbers.yaml").read_text())


def _sweep_specs(preset: str) -> list[str]:
    with initialize_config_dir(config_dir=str(ROOT / "bench" / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    raw = cfg.hydra.sweeper.params["optimizer.spec"]
    return [s.strip().strip("'") for s in raw.split("',")]


def _norm(spec: str) -> str:
    return format_spec(parse_spec(spec))


def test_mnist_table_preset_runs_every_tower_of_table_1_and_nothing_else() -> None:
    tower_rows = [r for r in PAPER["experiments"]["mnist_table"]["rows"] if "rerun_of" not in r]
    assert len(tower_rows) == 18
    assert [_norm(s) for s in _sweep_specs("mnist_table")] == [_norm(r["spec"]) for r in tower_rows]


def test_mnist_table_preset_has_the_papers_setup_and_leaves_the_dataset_to_the_user() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "bench" / "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=mnist_table"], return_hydra_config=True)
        offline = compose("config", overrides=["experiment=mnist_table", "dataset=mnist5k"])
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.model.name) == (30, 256, "mlp")
    assert cfg.hydra.sweeper.params.seed == "0,1,2"
    assert cfg.dataset.name == "mnist5k"  # the default dataset, not one the preset forces
    assert offline.dataset.name == "mnist5k"


def test_every_rerun_row_follows_its_tower_and_its_learned_values_are_a_valid_base_optimizer() -> None:
    rows = PAPER["experiments"]["mnist_table"]["rows"]
    for previous, row in itertools.pairwise(rows):
        if "rerun_of" in row:
            assert row["rerun_of"] == previous["spec"]
            tower = parse_spec(row["rerun_of"])
            rerun = parse_spec(row["spec"])
            assert len(rerun.levels) == 1 and rerun.levels[0].rule.name == tower.levels[0].rule.name
            for name, value in row["learned"].items():
                assert abs(rerun.levels[0].values[name] - value) < 1e-9
    assert sum("rerun_of" in r for r in rows) == 14
    for row in rows:
        assert 0 < row["test_error"] < 1 and 0 <= row["test_error_std"] < 0.01
