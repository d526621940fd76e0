"""bench/conf/ and bench.config: every option and preset composes into a run that trains; bad values get one clear line."""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from bench.config import CONF_DIR, ConfigError, compose_config, validate
from bench.train import run
from tests.harness_helpers import QUICK, checkout_env, run_text, write_all

# Small inputs for each dataset kind, so that every model meets a dataset it fits, fast.
MODEL_DATASET = {"mlp": "digits", "cnn": "digits", "resnet20": "cifar10", "char_lstm": "pydoc_text"}
DATASET_MODEL = {"pydoc_text": "char_lstm", "war_and_peace": "char_lstm"}
# The tiny on-disk files hold a few dozen examples: hold out fewer, use short text windows.
TINY = {
    "mnist": ["dataset.val_size=10"],
    "fashion_mnist": ["dataset.val_size=10"],
    "cifar10": ["dataset.val_size=5"],
    "war_and_peace": ["dataset.seq_len=20"],
    "pydoc_text": ["dataset.seq_len=20"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"))


def _finite_result(metrics: dict) -> bool:
    values = [metrics[k] for k in ("train_loss", "val_loss", "test_loss", "test_error")]
    return metrics["status"] == "completed" and all(isinstance(v, float) and math.isfinite(v) for v in values)


def _group_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for name in _options("dataset"):
        cases.append(
            (f"dataset={name}", [f"dataset={name}", f"model={DATASET_MODEL.get(name, 'mlp')}", *TINY.get(name, [])])
        )
    for name in _options("model"):
        dataset = MODEL_DATASET[name]
        cases.append((f"model={name}", [f"model={name}", f"dataset={dataset}", *TINY.get(dataset, [])]))
    for name in _options("optimizer"):
        cases.append((f"optimizer={name}", [f"optimizer={name}", "dataset=digits"]))
    return cases


@pytest.mark.parametrize(("case", "overrides"), _group_cases(), ids=[c for c, _ in _group_cases()])
def test_every_group_option_composes_and_trains_a_few_steps(
    case: str, overrides: list[str], data_dir: Path, tmp_path: Path
) -> None:
    group, name = case.split("=")
    metrics = run(compose_config([*overrides, *QUICK, "trainer.batch_size=16", f"paths.data_dir={data_dir}"]), tmp_path)
    assert _finite_result(metrics), metrics
    assert metrics["steps"] == 2
    if group in ("dataset", "model"):
        assert metrics[group] == name
    else:
        assert metrics["optimizer"] == name or metrics["family"] == "tower"


@pytest.mark.parametrize("name", _options("logger") + _options("trainer") + _options("paths"))
def test_logger_trainer_and_paths_options_compose_and_validate(name: str) -> None:
    group = next(g for g in ("logger", "trainer", "paths") if name in _options(g))
    cfg = compose_config([f"{group}={name}"])
    validate(cfg)
    assert cfg[group] is not None


# The paper's grids: each preset's sweep has exactly the runs the paper's experiment has.
PRESET_RUNS = {
    "mnist_table": 18 * 3,  # Table 1's 18 towers x 3 seeds
    "cifar_resnet20": 3 * 3,  # initial momentum x initial step size
    "cifar_resnet20_fixed": 3 * 3,
    "cifar_resnet20_step_decay": 1,
    "char_lstm_war_and_peace": 7 * 3,
    "tower_height_sensitivity": 4 * 11,  # heights 0-3 x step sizes 1e-8..100
    "tower_runtime": 8,
    "sensitivity_mnist5k": 4 * 11 * 3,  # heights 0-3 x step sizes 1e-8..100 x 3 seeds, offline
    "stability": 2 * 4 * 4 * 7 * 4,  # modes x bases x heights 0-3 x step sizes 1e-7..1e-1 x top hyper-steps
}


def _sweep(cfg: DictConfig) -> list[list[tuple[str, object]]]:
    """The (key, value) lists Hydra's basic sweeper expands `hydra.sweeper.params` into."""
    params = cfg.hydra.sweeper.get("params") or {}
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        strings = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(value)]
        # Each element back through the override grammar, as the sweeper's job overrides would be.
        axes.append([(key, parser.parse_override(f"{key}={v}").value()) for v in strings])
    return [list(combo) for combo in itertools.product(*axes)]


def test_every_experiment_preset_has_a_test_entry() -> None:
    assert set(_options("experiment")) == set(PRESET_RUNS)


@pytest.mark.parametrize("preset", sorted(PRESET_RUNS))
def test_every_experiment_preset_sweeps_the_papers_grid_and_each_run_is_valid(preset: str, data_dir: Path) -> None:
    composed = compose_config([f"experiment={preset}", f"paths.data_dir={data_dir}"], return_hydra_config=True)
    combos = _sweep(composed)
    assert len(combos) == PRESET_RUNS[preset]
    runs = set()
    for combo in combos:
        cfg = copy.deepcopy(composed)
        for key, value in combo:
            OmegaConf.update(cfg, key, value, merge=False)
        validate(cfg)
        runs.add(json.dumps(OmegaConf.to_container(cfg.optimizer), sort_keys=True) + str(cfg.seed))
    assert len(runs) == len(combos)  # no two runs of a sweep are the same config


@pytest.mark.parametrize("preset", sorted(PRESET_RUNS))
def test_every_experiment_preset_trains_a_few_steps(preset: str, data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={preset}", f"paths.data_dir={data_dir}"])
    dataset = cfg.dataset.name
    metrics = run(
        compose_config([f"experiment={preset}", f"paths.data_dir={data_dir}", *QUICK, *TINY.get(dataset, [])]),
        tmp_path,
    )
    assert _finite_result(metrics), metrics
    assert (metrics["model"], metrics["dataset"]) == (cfg.model.name, dataset)


def test_paper_settings_of_the_presets() -> None:
    table = compose_config(["experiment=mnist_table"])
    default_dataset = compose_config([]).dataset.name  # the preset leaves the dataset to the user (offline default)
    assert (table.trainer.batch_size, table.trainer.epochs, table.model.name, table.dataset.name) == (
        256,
        30,
        "mlp",
        default_dataset,
    )
    cifar = compose_config(["experiment=cifar_resnet20"])
    assert (cifar.trainer.epochs, cifar.model.name, cifar.optimizer.base, cifar.optimizer.height) == (
        200,
        "resnet20",
        "sgd",
        1,
    )
    he = compose_config(["experiment=cifar_resnet20_step_decay"])
    assert (he.optimizer.lr, he.optimizer.momentum, he.optimizer.weight_decay) == (0.1, 0.9, 1e-4)
    assert (he.optimizer.schedule, list(he.optimizer.milestones), he.optimizer.gamma) == ("step", [100, 150], 0.1)


BAD = [
    (["trainer.epochs=-1"], "`trainer.epochs` must be a positive integer, but got -1"),
    (["trainer.batch_size=0"], "`trainer.batch_size` must be a positive integer, but got 0"),
    (["trainer.device=tpu"], "`trainer.device` must be one of ['auto', 'cpu', 'cuda'], but got 'tpu'"),
    (["seed=abc"], "`seed` must be an integer in [0, 2**32), but got 'abc'"),
    (['optimizer.spec="adam("'], "`optimizer.spec` must be a tower in the paper's notation such as 'adam(0.001)/sgd(1e-05)', but got 'adam('"),
    (['optimizer.spec="lion(0.1)"'], "but got 'lion(0.1)'; spec 'lion(0.1)': unknown optimizer 'lion'"),
    (["optimizer.lr=-0.1"], "`optimizer.lr` must be a number in (0, inf), but got -0.1"),
    (["optimizer.height=-1"], "`optimizer.height` must be an integer >= 0, but got -1"),
    (["optimizer.base=lion"], "`optimizer.base` must be one of ['sgd', 'adam', 'adamw', 'adagrad', 'rmsprop'], but got 'lion'"),
    (["optimizer.momentum=0.9"], "`optimizer.momentum` must be null for base 'adam' (only sgd has momentum), but got 0.9"),
    (["optimizer.weight_decay=0.1"], "`optimizer.weight_decay` must be null for base 'adam' (only adamw has weight decay), but got 0.1"),
    (["optimizer.base=adamw", "optimizer.weight_decay=-0.1"], "`optimizer.weight_decay` must be a number in [0, inf), but got -0.1"),
    (['optimizer.spec="adamw(0.001)"', "optimizer.weight_decay=0.1"], "`optimizer.weight_decay` must be left at its default None when optimizer.spec is set"),
    (["optimizer=sgd", "optimizer.schedule=linear"], "`optimizer.schedule` must be one of ['constant', 'cosine', 'warmup_cosine', 'step'], but got 'linear'"),
    (["optimizer=schedulefree_sgd", "optimizer.schedule=cosine"], "`optimizer.schedule` must be 'constant' for schedulefree_sgd"),
    (["optimizer=adam", "optimizer.beta1=1.5"], "`optimizer.beta1` must be a number in [0, 1), but got 1.5"),
    (["dataset.name=imagenet"], "`dataset.name` must be one of ['mnist5k', 'digits', 'synthetic', 'pydoc_text', 'war_and_peace', 'mnist', 'fashion_mnist', 'cifar10'], but got 'imagenet'"),
    (["model=char_lstm"], "`model` must be one of ['mlp', 'cnn', 'resnet20'] for the image dataset 'mnist5k', but got 'char_lstm'"),
    (["model=resnet20", "model.depth=21"], "`model.depth` must be 6n+2 for n >= 1 (20, 32, 44, 56, ...), but got 21"),
    (["logger=wandb", "logger.mode=sometimes"], "`logger.mode` must be one of ['offline', 'online', 'disabled'], but got 'sometimes'"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_each_bad_value_fails_validation_with_one_line_naming_key_and_value(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# One bad value of each package's group, from BAD.
OWN_PACKAGE = {
    "bench.data": ("dataset.name=imagenet",),
    "bench.models": ("model=resnet20", "model.depth=21"),
    "bench.optim": ("optimizer.lr=-0.1",),
    "bench.logger": ("logger=wandb", "logger.mode=sometimes"),
}


@pytest.mark.parametrize("package", sorted(OWN_PACKAGE))
def test_each_group_is_refused_by_its_own_package_imported_alone(package: str, tmp_path: Path) -> None:
    # A fresh interpreter that imports the package first: an import circle would fail here, and the package must
    # check its group without the central validator (bench.config only calls each package's `validate` in turn).
    overrides = OWN_PACKAGE[package]
    message = {tuple(o): m for o, m in BAD}[overrides]
    (tmp_path / "cfg.yaml").write_text(OmegaConf.to_yaml(compose_config(overrides)))
    code = (
        f"import sys, {package} as group\n"
        "from omegaconf import OmegaConf\n"
        "from bench.errors import ConfigError\n"
        "try:\n"
        f"    group.validate(OmegaConf.load({str(tmp_path / 'cfg.yaml')!r}))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print('bench.config' in sys.modules)\n"
    )
    proc = run_text([sys.executable, "-c", code], env=checkout_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    refusal, config_imported = proc.stdout.splitlines()
    assert message in refusal
    assert config_imported == "False"


def test_a_bad_value_fails_before_any_file_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        run(compose_config([*QUICK, "trainer.epochs=0"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
