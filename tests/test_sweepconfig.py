"""A sweep's job configs derived from shared compositions (bench.sweepconfig) equal Hydra's full composition.

The population launcher hands Hydra's config loader `bench.sweepconfig.SweepConfigs`, so every job config of a
population sweep, the `hydra` node included, comes from it: for the sweeper's check of the batch, for `run_job`,
for `.hydra/*.yaml` and the task function. Each test composes the jobs both ways, in the loader a `-m` sweep uses.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from bench.config import CONF_DIR
from bench.sweepconfig import SweepConfigs

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SAMPLE = 150


@contextmanager
def _loader() -> Iterator[Any]:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        yield GlobalHydra.instance().config_loader()


def _master(loader: Any, overrides: list[str]) -> DictConfig:
    """The sweep's own config, as `python -m bench -m overrides` loads it before it sweeps."""
    from hydra.types import RunMode

    return loader.load_configuration("config", overrides, run_mode=RunMode.MULTIRUN)


def _jobs(master: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them (the preset's `hydra.sweeper.params` included)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *master.hydra.overrides.task])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _same(a: DictConfig, b: DictConfig) -> None:
    assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)
    # What YAML does not show: struct and read-only flags (a typo'd key must still be refused), resolver cache.
    for key in (None, "hydra"):
        na, nb = (c if key is None else c[key] for c in (a, b))
        assert OmegaConf.is_struct(na) == OmegaConf.is_struct(nb)
        assert OmegaConf.is_readonly(na) == OmegaConf.is_readonly(nb)
    assert a._metadata.resolver_cache == b._metadata.resolver_cache


def _outcome(compose: Any, master: DictConfig, job: list[str]) -> tuple[str, Any]:
    try:
        return "config", compose(master, list(job))
    except Exception as e:  # a job Hydra refuses: the same error, word for word
        return type(e).__name__, str(e)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_equals_hydras_composition(preset, tmp_path):
    with _loader() as loader:
        master = _master(loader, [f"experiment={preset}", f"hydra.sweep.dir={tmp_path}", "trainer.progress=false"])
        derived = SweepConfigs(loader)
        jobs = _jobs(master)
        # Every job where the preset is small; above SAMPLE jobs (the stability grid has 896), the first and last and a
        # fixed random sample: each full composition takes ~0.2 s, and the jobs differ only in plain values.
        checked = jobs if len(jobs) <= SAMPLE else [jobs[0], *random.Random(0).sample(jobs[1:-1], SAMPLE - 2), jobs[-1]]
        for job in checked:
            _same(derived(master, list(job)), loader.load_sweep_config(master, list(job)))
        # Each preset sweeps plain values only: one composition for all its jobs.
        assert len(derived._bases) == 1, preset
    assert preset != "sensitivity_mnist5k" or len(jobs) == 132


# Overrides of every kind Hydra knows: config groups, plain values, `+` / `++` / `~`, dicts, lists, interpolations,
# casts, quoted strings, keys inside other keys, keys that do not exist, `hydra.` keys, values that fail validation.
AXES = [
    ["optimizer=tower", "optimizer=adam", "optimizer=sgd", "optimizer=momentum"],
    ["optimizer.lr=0.1", "optimizer.lr=1e-3", "optimizer.lr=int(2)", "optimizer.lr=null"],
    ["seed=0", "seed=1", "seed=7"],
    ["optimizer.height=0", "optimizer.height=2"],
    ["model=mlp", "model=cnn"],
    ["dataset=digits", "dataset=mnist5k"],
    ["logger=csv", "logger=none"],
    ["+extra.note=a", "+extra.note='b c'", "+extra.list=[a,b]"],
    ["++trainer.epochs=2", "++trainer.new_key=1"],
    ["~trainer.max_steps", "~dataset.train_size"],
    ["trainer={epochs: 4}", "trainer.epochs=3"],
    ["trainer.batch_size=${trainer.eval_batch_size}", "trainer.batch_size=64", "trainer.batch_size='7'"],
    ["model.hidden=[1,2]", "model.output_tanh=false", "model.name=other"],
    ["dataset.train_size=100", "dataset.train_size=null"],
    ["hydra.job.config.override_dirname.exclude_keys=[seed]", "hydra.job.name=other"],
    ["optimizer={lr: 0.5}", "+optimizer.extra=1"],
    ["debug=steps", "experiment=sensitivity_mnist5k"],
    ["trainer.nonexistent=1", "+seed=3", "trainer.epochs=3"],  # refused: no such key, seed exists; or accepted
]


@pytest.mark.parametrize("seed", range(12))
def test_random_sweeps_equal_hydras_composition_job_by_job(seed, tmp_path):
    rng = random.Random(seed)
    axes = rng.sample(AXES, rng.randint(2, 5))
    grid = [rng.sample(axis, min(len(axis), 2)) for axis in axes]
    jobs = [rng.sample(list(combo), len(combo)) for combo in itertools.product(*grid)]  # any order
    with _loader() as loader:
        master = _master(loader, [f"hydra.sweep.dir={tmp_path}"])
        derived = SweepConfigs(loader)
        for job in jobs:
            (kind_a, a), (kind_b, b) = _outcome(derived, master, job), _outcome(loader.load_sweep_config, master, job)
            assert kind_a == kind_b, (job, a, b)
            if kind_a == "config":
                _same(a, b)
            else:
                assert a == b, job


def test_the_launcher_gives_hydra_the_derived_loader_and_it_survives_pickling(tmp_path):
    # hydra/launcher=population_slurm pickles the launcher (its Hydra context and loader) into each array task.
    import pickle

    from bench.sweepconfig import use

    with _loader() as loader:
        use(loader)
        use(loader)  # once per loader
        assert isinstance(loader.load_sweep_config, SweepConfigs) and loader.load_sweep_config.loader is loader
        master = _master(loader, [f"hydra.sweep.dir={tmp_path}"])
        job = ["optimizer.lr=0.5", "seed=3"]
        first = loader.load_sweep_config(master, job)
        copy = pickle.loads(pickle.dumps(loader))
        assert isinstance(copy.load_sweep_config, SweepConfigs) and copy.load_sweep_config.loader is copy
        _same(copy.load_sweep_config(master, job), first)
        _same(first, type(loader).load_sweep_config(loader, master, job))


def test_the_launcher_takes_the_config_the_sweepers_check_made_once_and_a_fresh_one_after(tmp_path):
    # The sweeper composes each job to check the batch and throws the config away; the launcher then takes that same
    # config instead of deriving it again. Taken twice, the second is a new config: changing the first (as the
    # launcher does, setting the job's number) reaches no other job.
    from bench.sweepconfig import use

    with _loader() as loader:
        use(loader)
        configs = loader.load_sweep_config
        master = _master(loader, [f"hydra.sweep.dir={tmp_path}"])
        job = ["optimizer.lr=0.5", "seed=3"]
        checked = configs(master_config=master, sweep_overrides=list(job))  # as Sweeper.validate_batch_is_legal
        taken = configs.take(master, list(job))
        assert taken is checked
        OmegaConf.set_readonly(taken, False)
        taken.seed = 4
        again = configs.take(master, list(job))
        assert again is not taken and again.seed == 3
        _same(again, type(loader).load_sweep_config(loader, master, job))
        other = _master(loader, [f"hydra.sweep.dir={tmp_path / 'other'}"])  # another sweep's config: its own jobs
        configs(master, list(job))
        assert configs.take(other, list(job)).hydra.sweep.dir == str(tmp_path / "other")
