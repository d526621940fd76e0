"""The paper presets run the paper's experiments: their specs are the rows of bench/report/paper_numbers.yaml."""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

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


def _compose(preset: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "bench" / "conf"), version_base=None):
        return compose("config", overrides=[f"experiment={preset}", *overrides], return_hydra_config=True)


def _grid_specs(preset: str) -> list[str]:
    """The spec of every run of a preset that sweeps optimizer.momentum x optimizer.lr (as bench.optim builds it)."""
    from bench.optim import tower_spec

    cfg = _compose(preset)
    params = cfg.hydra.sweeper.params
    specs = []
    for momentum in str(params["optimizer.momentum"]).split(","):
        for lr in str(params["optimizer.lr"]).split(","):
            specs.append(
                _norm(tower_spec(OmegaConf.merge(cfg.optimizer, {"momentum": float(momentum), "lr": float(lr)})))
            )
    return specs


def test_cifar_presets_run_the_figures_grid_its_curves_and_the_papers_epochs() -> None:
    entry = PAPER["experiments"]["cifar_resnet20"]
    published = {_norm(r["spec"]): r for r in entry["rows"] if "spec" in r}
    towers, fixed = _grid_specs("cifar_resnet20"), _grid_specs("cifar_resnet20_fixed")
    # Every cell of the figure's 3x3 grid, as the Hyperoptimizer curve (height 1) and the Baseline curve (height 0).
    assert sorted(towers + fixed) == sorted(published) and len(published) == 18
    for spec in towers:
        levels = parse_spec(spec).levels
        # No learned subset given: every learnable one, which for SGD started at a non-zero momentum is both.
        assert len(levels) == 2 and levels[0].learned is None
        assert set(levels[0].rule.learnable(levels[0].values)) == {"lr", "momentum"}
        assert published[spec]["paper_row"].startswith("Hyperoptimizer")
    for spec in fixed:
        assert len(parse_spec(spec).levels) == 1 and published[spec]["paper_row"].startswith("Baseline")
    # The rows are the `grid` the figure was read into, cell by cell.
    for row in published.values():
        base = parse_spec(row["spec"]).levels[0].values
        pair = entry["grid"][round(base["momentum"], 6)][round(base["lr"], 6)]
        assert row["test_error"] == pair[len(parse_spec(row["spec"]).levels) - 1]
    he = _compose("cifar_resnet20_step_decay")
    for preset in ("cifar_resnet20", "cifar_resnet20_fixed", "cifar_resnet20_step_decay"):
        cfg = _compose(preset)
        assert (cfg.trainer.epochs, cfg.model.name, cfg.dataset.name) == (200, "resnet20", "cifar10")
    assert set(entry["presets"]) == {"cifar_resnet20", "cifar_resnet20_fixed", "cifar_resnet20_step_decay"}
    he_row = next(r for r in entry["rows"] if "spec" not in r)
    assert (he_row["method"], he_row["lr"]) == ("momentum + step schedule", he.optimizer.lr)


def test_char_lstm_preset_uses_table_1_rows_and_claims_no_published_numbers() -> None:
    # The paper publishes nothing for the RNN but the task: the optimizers are Table 1's, the numbers none.
    table_1 = {_norm(r["spec"]) for r in PAPER["experiments"]["mnist_table"]["rows"] if "rerun_of" not in r}
    specs = [_norm(s) for s in _sweep_specs("char_lstm_war_and_peace")]
    assert len(specs) == len(set(specs)) == 7 and set(specs) <= table_1
    assert PAPER["experiments"]["char_lstm_war_and_peace"]["rows"] == []
    cfg = _compose("char_lstm_war_and_peace")
    assert (cfg.model.name, cfg.dataset.name, cfg.hydra.sweeper.params.seed) == ("char_lstm", "war_and_peace", "0,1,2")
