"""Tune a baseline with Optuna, then rerun its best configuration on fresh seeds: `python -m bench.tune [overrides]`.

One invocation is one worker on one study (`bench/conf/tune.yaml` = the harness config + `tune:` + the baseline's
`search_space:`). Each trial is an ordinary harness run (`bench.train.run`) with the suggested values written
into the config; it reports the validation error after every epoch so the pruner can stop it, and a diverged
trial is recorded as FAIL with its reason while the study goes on. `tune.n_trials` is the study's total over
all workers. When the study is done, worker 0 reruns the best configuration on `tune.reruns` seeds (their test
error is the result) and writes `study_summary.json`, which counts the compute of every trial and rerun.

    python -m bench.tune optimizer=adam tune.n_trials=30 trainer.epochs=5
    # two workers on one study (or `-m tune.worker=0,1 hydra/launcher=joblib`):
    python -m bench.tune optimizer=sgd tune.storage=journal:study.log tune.worker=0 &
    python -m bench.tune optimizer=sgd tune.storage=journal:study.log tune.worker=1
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState
from tqdm.auto import tqdm

from bench.io import to_jsonable
from bench.logger import backends
from bench.tune_storage import StorageSpec, parse_storage

log = logging.getLogger(__name__)

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "SearchParam",
    "TrialFailed",
    "compose_tune_config",
    "main",
    "parse_search_space",
    "tune",
    "validate_tune",
]

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "none")
_PARAM_TYPES = ("float", "int", "categorical")
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrialFailed(Exception):
    """Raised by the objective for a diverged (or preempted) run: Optuna records the trial as FAIL with the
    reason in its `fail_reason` user attribute, and the study goes on."""


class _StudyFull(Exception):
    """The study already holds `tune.n_trials` trials: this worker stops."""


@dataclass(frozen=True)
class SearchParam:
    """One tuned value: Optuna parameter `name`, written to the config at `key`.

    `one_minus` samples 1 - value instead of the value (betas and momenta: what matters is how close
    they are to 1, so their distance to 1 is searched on a log scale).
    """

    name: str
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    one_minus: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution (its constructor checks the range, the step and the log scale)."""
        if self.type == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def config_value(self, value: Any) -> Any:
        return 1.0 - value if self.one_minus else value


def parse_search_space(space: DictConfig | dict | None) -> list[SearchParam]:
    """Read a `bench/conf/search_space/*.yaml` mapping `name: {type, low, high, log, step, choices, key, one_minus}`.

    `key` defaults to `optimizer.<name>` (or `optimizer.<name without one_minus_>` for `one_minus` params).
    """
    if space is None or len(space) == 0:
        raise ValueError("`search_space` must define at least one parameter, but got an empty search space")
    params = []
    for name, spec in space.items():
        where = f"search_space.{name}"
        if not isinstance(spec, (DictConfig, dict)):
            raise ValueError(f"`{where}` must be a mapping with a `type`, but got {spec!r}")
        spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec)
        kind = spec.get("type")
        if kind not in _PARAM_TYPES:
            raise ValueError(f"`{where}.type` must be one of {list(_PARAM_TYPES)}, but got {kind!r}")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "key", "one_minus"}
        if unknown:
            raise ValueError(f"`{where}` must not have keys {sorted(unknown)}, but got {spec!r}")
        one_minus = bool(spec.get("one_minus", False))
        default_key = "optimizer." + (name.removeprefix("one_minus_") if one_minus else name)
        key = spec.get("key", default_key)
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"`{where}.choices` must be a non-empty list, but got {choices!r}")
            params.append(SearchParam(name, key, kind, choices=tuple(choices)))
            continue
        low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        numeric = (int,) if kind == "int" else (int, float)
        if not all(isinstance(v, numeric) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ValueError(f"`{where}` must have numbers low < high, but got low={low!r}, high={high!r}")
        if log and low <= 0:
            raise ValueError(f"`{where}.low` must be > 0 for a log scale, but got {low!r}")
        param = SearchParam(name, key, kind, low, high, log, spec.get("step"), one_minus=one_minus)
        try:
            param.distribution()
        except ValueError as e:  # e.g. a step on a log scale, or a step that does not divide the range
            raise ValueError(f"`{where}` must describe a valid {kind} range, but got {spec!r}: {e}") from None
        params.append(param)
    return params


def compose_tune_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `bench/conf/tune.yaml` with command-line style `overrides`, as `python -m bench.tune` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bench.config import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return compose("tune", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="tune"):
        return compose("tune", overrides=list(overrides))


def _tunable_baselines() -> list[str]:
    from bench.config import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "search_space").glob("*.yaml"))


def _not_tunable(name: Any) -> str:
    why = " (a tower learns its own hyperparameters)" if name == "tower" else ""
    return f"`optimizer` must be a baseline with a search space, one of {_tunable_baselines()}, but got {name!r}{why}"


_MISSING = object()


def _run_config(cfg: DictConfig) -> DictConfig:
    """The harness config of one run: the tune config without the tuning keys."""
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("tune", "search_space")])
    OmegaConf.set_struct(run_cfg, True)
    return run_cfg


def _apply(run_cfg: DictConfig, space: list[SearchParam], params: dict[str, Any], **extra: Any) -> DictConfig:
    cfg = copy.deepcopy(run_cfg)
    for p in space:
        if p.name in params:
            OmegaConf.update(cfg, p.key, p.config_value(params[p.name]), merge=False)
    for key, value in extra.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _rerun_seeds(cfg: DictConfig) -> list[int]:
    reruns = cfg.tune.reruns
    if isinstance(reruns, int) and not isinstance(reruns, bool):
        # Fresh seeds, not the tuning seed: the selected configuration's own run would flatter it.
        return [cfg.seed + i for i in range(1, reruns + 1)]
    return [int(s) for s in reruns]


def default_storage_path(cfg: DictConfig, study_name: str) -> Path:
    """Where `tune.storage=null` keeps a study: `<paths.log_dir>/studies/<study name>.db` (SQLite)."""
    return Path(cfg.paths.log_dir) / "studies" / f"{study_name}.db"


def study_identity(cfg: DictConfig, plan: _Plan) -> dict[str, Any]:
    """What a study is about; stored as study attributes, and a worker asking for something else is refused."""
    return {
        "task": f"{cfg.model.name}/{cfg.dataset.name}",
        "optimizer": plan.baseline,
        "search_space": {p.name: {"key": p.key, "distribution": repr(p.distribution())} for p in plan.space},
    }


@dataclass(frozen=True)
class _Plan:
    """Everything `tune` needs, checked before the storage is opened."""

    baseline: str
    space: list[SearchParam]
    storage: StorageSpec
    study_name: str
    sampler: optuna.samplers.BaseSampler
    pruner: optuna.pruners.BasePruner
    rerun_seeds: list[int]
    run_cfg: DictConfig


def validate_tune(cfg: DictConfig, output_dir: str | Path) -> _Plan:
    """Check the tuning config and the trial config it produces; raise `bench.config.ConfigError` with one line."""
    from bench.config import ConfigError, validate

    t = cfg.tune
    name = cfg.optimizer.get("name")
    if name not in _tunable_baselines() or cfg.get("search_space") is None:
        raise ConfigError(_not_tunable(name))
    if t.sampler not in SAMPLERS:
        raise ConfigError(f"`tune.sampler` must be one of {list(SAMPLERS)}, but got {t.sampler!r}")
    if t.pruner not in PRUNERS:
        raise ConfigError(f"`tune.pruner` must be one of {list(PRUNERS)}, but got {t.pruner!r}")
    for key, minimum in (("n_trials", 1), ("worker", 0), ("heartbeat_interval_s", 1), ("population_size", 1)):
        v = t.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"`tune.{key}` must be an integer >= {minimum}, but got {v!r}")
    if t.population_mode not in ("vectorized", "sequential"):
        raise ConfigError(f"`tune.population_mode` must be 'vectorized' or 'sequential', but got {t.population_mode!r}")
    grace = t.get("grace_period_s")
    if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool) or grace < 1):
        raise ConfigError(f"`tune.grace_period_s` must be an integer >= 1 or null, but got {grace!r}")
    for key in ("timeout_s", "wait_for_workers_s"):
        v = t.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
            raise ConfigError(f"`tune.{key}` must be a positive number or null, but got {v!r}")
    reruns = t.reruns
    ok_int = isinstance(reruns, int) and not isinstance(reruns, bool) and reruns >= 0
    ok_list = OmegaConf.is_list(reruns) and all(isinstance(s, int) and not isinstance(s, bool) for s in reruns)
    if not (ok_int or ok_list):
        raise ConfigError(f"`tune.reruns` must be a count >= 0 or a list of integer seeds, but got {reruns!r}")
    if t.study_name is not None and (not isinstance(t.study_name, str) or not t.study_name.strip()):
        raise ConfigError(f"`tune.study_name` must be a non-empty string or null, but got {t.study_name!r}")
    if t.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            msg = "`tune.sampler` must not be 'cmaes' without the cmaes package (pip install cmaes), but got 'cmaes'"
            raise ConfigError(msg) from None
    study_name = t.study_name or f"{name}-{cfg.model.name}-{cfg.dataset.name}"
    try:
        space = parse_search_space(cfg.search_space)
        # One database per study name, outside the timestamped run directories: running the same command again
        # continues the study (its trials, the sampler's history) instead of starting a new one.
        storage = parse_storage(t.storage, default_storage_path(cfg, study_name))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_cfg = _run_config(cfg)
    for p in space:
        if OmegaConf.select(run_cfg, p.key, default=_MISSING) is _MISSING:
            raise ConfigError(f"`search_space.{p.name}.key` must name a key of the run config, but got {p.key!r}")
    # Each trial's config must be valid too, so a bad range fails now and not in trial 7.
    for extreme in ("low", "high"):
        values = {p.name: (p.choices[-1] if p.type == "categorical" else getattr(p, extreme)) for p in space}
        validate(_apply(run_cfg, space, values))
    # Distinct, reproducible seeds per worker: equal seeds would make workers propose the same first trials.
    sampler_seed = int(np.random.SeedSequence([cfg.seed, t.worker]).generate_state(1)[0])
    try:
        pruner = _make_pruner(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"`tune.{t.pruner}` must hold valid {t.pruner} pruner settings, but got {e}") from None
    sampler = _make_sampler(t.sampler, sampler_seed)
    return _Plan(name, space, storage, study_name, sampler, pruner, _rerun_seeds(cfg), run_cfg)


def _make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    # Samplers that model only numbers (CMA-ES, QMC) sample the categorical schedule independently
    # at random, which is the intended behaviour here, so their per-trial warning is turned off.
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


def _make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    t = cfg.tune
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=t.median.n_startup_trials, n_warmup_steps=t.median.n_warmup_steps
        )
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=t.hyperband.min_resource,
            max_resource=cfg.trainer.epochs,
            reduction_factor=t.hyperband.reduction_factor,
        )
    return optuna.pruners.NopPruner()


class _BoundedStudy(optuna.Study):
    """A study whose `ask` creates a trial only while the study holds fewer than `n_trials` (under a lock)."""

    def __init__(self, *args: Any, n_trials: int, storage_spec: StorageSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._n_trials = n_trials
        self._storage_spec = storage_spec

    def ask(self, fixed_distributions: dict | None = None) -> optuna.Trial:
        with self._storage_spec.trial_lock(self.study_name):
            trials = self.get_trials(deepcopy=False)
            # An enqueued (WAITING) trial is already counted; running it adds nothing.
            if len(trials) >= self._n_trials and not any(tr.state == TrialState.WAITING for tr in trials):
                raise _StudyFull
            return super().ask(fixed_distributions)


def _open_study(cfg: DictConfig, plan: _Plan) -> _BoundedStudy:
    from bench.config import ConfigError

    if plan.storage.kind == "rdb" and plan.storage.target.startswith("sqlite:///"):
        folder = Path(plan.storage.target.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"tune.storage: cannot create the folder `{folder}` of the SQLite file ({e.strerror}); "
                "pick a writable path"
            ) from None
    storage = plan.storage.open(cfg.tune.heartbeat_interval_s, cfg.tune.grace_period_s)
    identity = json.loads(json.dumps(study_identity(cfg, plan)))  # as the storage gives it back
    with plan.storage.lock("open"):  # workers starting together must not both create the study
        created = optuna.create_study(
            storage=storage, study_name=plan.study_name, direction="minimize", load_if_exists=True
        )
        stored = {k: created.user_attrs[k] for k in identity if k in created.user_attrs}
        if not stored:  # a new study (or one made before studies recorded what they are about)
            for key, value in identity.items():
                created.set_user_attr(key, value)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                created.set_metric_names(["val_error"])  # the dashboard's axis, instead of "Objective 0"
    for key, value in stored.items():
        if value != identity[key]:
            raise ConfigError(
                f"`tune.study_name` {plan.study_name!r} names a study whose {key} is {value!r}, "
                f"but this worker asks for {identity[key]!r} (choose another tune.study_name)"
            )
    study = _BoundedStudy(
        study_name=plan.study_name,
        storage=storage,
        sampler=plan.sampler,
        pruner=plan.pruner,
        n_trials=cfg.tune.n_trials,
        storage_spec=plan.storage,
    )
    if study.directions != [optuna.study.StudyDirection.MINIMIZE]:
        raise ConfigError(
            f"`tune.study_name` must name a study that minimizes validation error, but got {plan.study_name!r}"
        )
    return study


def _record_config(trial: optuna.Trial, plan: _Plan, run_cfg: DictConfig) -> None:
    """The trial's concrete values (as the run config holds them, e.g. beta1 and not one_minus_beta1) and the
    overrides that reproduce the trial as a plain `hypergrad-bench` run."""
    values = {p.key: OmegaConf.select(run_cfg, p.key) for p in plan.space}
    trial.set_user_attr("values", to_jsonable(values))
    trial.set_user_attr("overrides", [f"{k}={v}" for k, v in values.items()])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from bench.io import atomic_write_json

    atomic_write_json(path, data)


def _epoch_reporter(trial: optuna.Trial, progress: dict[str, Any]) -> Any:
    """A trial's epoch callback: record its progress, report its validation error, prune when its pruner says so."""
    start = time.perf_counter()

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        progress.update(epochs=epoch, steps=row.get("steps", 0))
        # Recorded every epoch so a worker killed mid-trial still leaves its compute on the books.
        trial.set_user_attr("epochs", epoch)
        trial.set_user_attr("steps", progress["steps"])
        trial.set_user_attr("wall_time_s", time.perf_counter() - start)
        value = row["val_error"]
        if value is not None and math.isfinite(value):
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_error {value:.4f} after epoch {epoch}")

    return on_epoch


def _write_trial(
    cfg: DictConfig, plan: _Plan, trial: optuna.Trial, params: dict[str, Any], facts: dict[str, Any]
) -> None:
    """`trial.json` next to the trial's metrics.json, whose schema has no room for tuning facts."""
    run_dir = Path(trial.user_attrs["run_dir"])
    _write_json(
        run_dir / "trial.json",
        {
            "role": "trial",
            "study_name": plan.study_name,
            "storage": plan.storage.display(),
            "trial_number": trial.number,
            "worker": cfg.tune.worker,
            "params": params,
            **facts,
        },
    )


class _Objective:
    """One trial = one harness run in `<trials_dir>/<trial number>`."""

    def __init__(self, cfg: DictConfig, plan: _Plan, trials_dir: Path) -> None:
        self.cfg, self.plan, self.trials_dir = cfg, plan, trials_dir
        self.preempted = False

    def __call__(self, trial: optuna.Trial) -> float:
        from bench import train

        params = {p.name: p.suggest(trial) for p in self.plan.space}
        run_dir = self.trials_dir / str(trial.number)
        run_cfg = _apply(self.plan.run_cfg, self.plan.space, params, **_logger_overrides(self.cfg, self.plan, "trial"))
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", self.cfg.tune.worker)
        _record_config(trial, self.plan, run_cfg)
        progress = {"epochs": 0, "steps": 0}
        start = time.perf_counter()
        on_epoch = _epoch_reporter(trial, progress)
        outcome: dict[str, Any] = {"state": "error"}
        try:
            metrics = train.run(run_cfg, output_dir=run_dir, epoch_callback=on_epoch)
            if metrics.get("status") == "preempted":
                # The process is about to be killed (SLURM): record the trial as failed, start no other.
                self.preempted = True
                trial.set_user_attr("fail_reason", "preempted")
                trial.study.stop()
                outcome = {"state": "fail", "fail_reason": "preempted"}
                raise TrialFailed("preempted")
            progress.update(epochs=metrics["epochs"], steps=metrics["steps"])
            if metrics["diverged"]:
                reason = metrics.get("diverged_reason") or "non-finite loss"
                reason = f"diverged at step {metrics.get('diverged_step')}: {reason}"
                trial.set_user_attr("fail_reason", reason)
                outcome = {"state": "fail", "fail_reason": reason}
                raise TrialFailed(reason)
            outcome = {"state": "complete", "value": metrics["val_error"]}
            trial.set_user_attr("test_error", metrics.get("test_error"))
            return metrics["val_error"]
        except optuna.TrialPruned as e:
            outcome = {"state": "pruned", "reason": str(e)}
            raise
        finally:
            wall = time.perf_counter() - start
            trial.set_user_attr("epochs", progress["epochs"])
            trial.set_user_attr("steps", progress["steps"])
            trial.set_user_attr("wall_time_s", wall)
            _write_trial(self.cfg, self.plan, trial, params, {**progress, "wall_time_s": wall, **outcome})


def _logger_overrides(cfg: DictConfig, plan: _Plan, job_type: str) -> dict[str, Any]:
    """W&B: every trial and rerun of a study in one group named after the study."""
    if "wandb" not in backends(cfg.logger):
        return {}
    return {"logger.group": plan.study_name, "logger.job_type": f"tune_{job_type}"}


def _wait_for_workers(study: optuna.Study, timeout_s: float | None) -> None:
    """Worker 0 summarizes only once every other worker's trial has finished (or timed out)."""
    from optuna.storages import fail_stale_trials

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if deadline is not None and time.monotonic() > deadline:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)  # a killed worker's trial becomes FAIL (RDB storages with heartbeat)
        time.sleep(1.0)


def _rerun(cfg: DictConfig, plan: _Plan, best: optuna.trial.FrozenTrial, run_dir: Path) -> list[dict[str, Any]] | None:
    """Re-run the best trial's configuration on the rerun seeds; None when SLURM preempts one (rerun later)."""
    from bench import train

    reruns = []
    for seed in plan.rerun_seeds:
        # Per trial: a continued study whose best trial changed must not find the old best's finished reruns.
        rerun_dir = run_dir / "reruns" / f"trial_{best.number}" / f"seed_{seed}"
        extra = {"seed": seed, **_logger_overrides(cfg, plan, "rerun")}
        start = time.perf_counter()
        metrics = train.run(_apply(plan.run_cfg, plan.space, best.params, **extra), output_dir=rerun_dir)
        if metrics.get("status") == "preempted":
            return None
        record = {
            "seed": seed,
            "test_error": metrics["test_error"],
            "val_error": metrics["val_error"],
            "diverged": bool(metrics["diverged"]),
            "epochs": metrics["epochs"],
            "steps": metrics["steps"],
            "wall_time_s": time.perf_counter() - start,
            "run_dir": str(rerun_dir),
        }
        _write_json(
            rerun_dir / "trial.json",
            {
                "role": "rerun",
                "study_name": plan.study_name,
                "params": best.params,
                "trial_number": best.number,
                **record,
            },
        )
        reruns.append(record)
    return reruns


def _summary(cfg: DictConfig, plan: _Plan, study: optuna.Study, reruns: list[dict[str, Any]]) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    complete = [tr for tr in trials if tr.state == TrialState.COMPLETE]
    best = min(complete, key=lambda tr: tr.value) if complete else None
    rerun_errors = [r["test_error"] for r in reruns if r["test_error"] is not None and not r["diverged"]]

    def count(state: TrialState) -> int:
        return sum(tr.state == state for tr in trials)

    return {
        "study_name": plan.study_name,
        "storage": plan.storage.display(),
        "sampler": cfg.tune.sampler,
        "pruner": cfg.tune.pruner,
        "baseline": plan.baseline,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "search_space": OmegaConf.to_container(cfg.search_space),
        # > 1: trials were sampled in batches of this size before any of them was told (one stacked learner).
        "population_size": cfg.tune.population_size,
        "n_trials": len(trials),
        "n_complete": len(complete),
        "n_pruned": count(TrialState.PRUNED),
        "n_failed": count(TrialState.FAIL),
        "n_unfinished": sum(tr.state not in _FINISHED for tr in trials),
        "best_trial": None if best is None else best.number,
        "best_params": None if best is None else best.params,
        "best_value": None if best is None else best.value,
        # Every trial of the study (this worker's and the others') plus this invocation's reruns.
        "total_epochs": sum(tr.user_attrs.get("epochs", 0) for tr in trials) + sum(r["epochs"] for r in reruns),
        "total_steps": sum(tr.user_attrs.get("steps", 0) for tr in trials) + sum(r["steps"] for r in reruns),
        "total_wall_time_s": sum(tr.user_attrs.get("wall_time_s", 0.0) for tr in trials)
        + sum(r["wall_time_s"] for r in reruns),
        "reruns": reruns,
        "rerun_test_error_mean": float(np.mean(rerun_errors)) if rerun_errors else None,
        "rerun_test_error_std": float(np.std(rerun_errors, ddof=1)) if len(rerun_errors) > 1 else None,
        "trials": [
            {
                "number": tr.number,
                "state": tr.state.name.lower(),
                "value": tr.value,
                "params": tr.params,
                "epochs": tr.user_attrs.get("epochs", 0),
                "wall_time_s": tr.user_attrs.get("wall_time_s", 0.0),
                "run_dir": tr.user_attrs.get("run_dir"),
                "fail_reason": tr.user_attrs.get("fail_reason"),
            }
            for tr in trials
        ],
    }


def _log_summary_to_wandb(cfg: DictConfig, plan: _Plan, summary: dict[str, Any], run_dir: Path) -> None:
    import wandb

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.tune.storage = plan.storage.display()  # a URL's password must not reach W&B

    lg = cfg.logger
    run = wandb.init(
        project=lg.project,
        entity=lg.get("entity"),
        group=plan.study_name,
        job_type="tune_summary",
        name=f"{plan.study_name}-summary",
        mode=lg.mode,
        dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=False),
        tags=list(lg.get("tags") or []),
        reinit="finish_previous",
    )
    try:
        run.summary.update({k: v for k, v in summary.items() if k not in ("trials", "search_space")})
    finally:
        run.finish()


def evaluate_trials_as_population(
    trials: Sequence[optuna.Trial], run_cfgs: Sequence[DictConfig], run_dirs: Sequence[str | Path], *,
    mode: str = "vectorized",
) -> list[dict[str, Any]]:  # fmt: skip
    """Train several asked Optuna trials together as one population; return each trial's metrics.

    `run_cfgs[i]` is trial i's harness config (what `bench.train.run` would get) and `run_dirs[i]` its run directory,
    which receives the harness's files. The configs may differ only in `optimizer`: the members share the data, the
    model, the trainer and the seed, so each member equals the harness run of its own config. After every epoch each
    trial reports its validation error; a trial that its pruner stops is frozen there and ends "pruned". `sequential`
    trains the trials one after another as single runs. Telling the study is the caller's (`tell_trials`).
    """
    from bench.config import ConfigError, validate
    from bench.errors import fail
    from bench.population import plan_groups, stacked_problem
    from bench.train import Trainer, load_data, run

    if not (len(trials) == len(run_cfgs) == len(run_dirs)) or not trials:
        raise ValueError(
            f"trials, run_cfgs and run_dirs must be non-empty and of one length, but got "
            f"{len(trials)}, {len(run_cfgs)} and {len(run_dirs)}"
        )

    def shared(cfg: DictConfig) -> dict[str, Any]:
        return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("optimizer", "paths", "logger")}

    for trial, cfg in zip(trials, run_cfgs, strict=True):
        validate(cfg)
        diff = sorted(k for k in shared(run_cfgs[0]).keys() | shared(cfg).keys()
                      if shared(run_cfgs[0]).get(k) != shared(cfg).get(k))  # fmt: skip
        if diff:
            raise ConfigError(
                f"`{diff[0]}` must be the same for every trial of a population, but trial {trial.number} has "
                f"{shared(cfg).get(diff[0])!r}"
            )
        if mode == "vectorized" and cfg.trainer.checkpoint_every:
            why = "0 for trials trained as one population (a batch of trials is not resumed)"
            raise fail("trainer.checkpoint_every", why, cfg.trainer.checkpoint_every)
        problem = stacked_problem(cfg) if mode == "vectorized" else None
        if problem is not None:
            raise fail("tune.population_mode", f"sequential for these trials ({problem})", mode)

    dirs = [Path(d) for d in run_dirs]
    if mode == "sequential":
        out = []
        for trial, cfg, d in zip(trials, run_cfgs, dirs, strict=True):
            with contextlib.suppress(optuna.TrialPruned):
                run(cfg, d, epoch_callback=_epoch_reporter(trial, {}))
            out.append(
                {**json.loads((d / "metrics.json").read_text()), "population": {"mode": mode, "size": len(trials)}}
            )
        return out
    data = load_data(run_cfgs[0])
    out = [{}] * len(trials)
    for group in plan_groups(run_cfgs):
        trainer = Trainer(
            [run_cfgs[i] for i in group],
            [dirs[i] for i in group],
            stacked=True,
            callbacks=[_epoch_reporter(trials[i], {}) for i in group],
            population={"mode": mode, "data_seed": int(run_cfgs[0].seed), "dtype": str(run_cfgs[0].trainer.dtype)},
            data=data,
        )
        for i, metrics in zip(group, trainer.fit(), strict=True):
            out[i] = metrics
    return out


def tell_trials(study: optuna.Study, trials: Sequence[optuna.Trial], metrics: Sequence[dict[str, Any]]) -> None:
    """Tell `study` how each trial of a population ended: its validation error, pruned, or failed (diverged)."""
    for trial, m in zip(trials, metrics, strict=True):
        trial.set_user_attr("epochs", m["epochs"])
        trial.set_user_attr("steps", m["steps"])
        trial.set_user_attr("population_size", m["population"]["size"])
        if m["status"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif m["status"] in ("diverged", "failed"):
            reason = m.get("error") or f"diverged at step {m['diverged_step']}: {m['diverged_reason']}"
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, m["val_error"])


def _optimize_in_populations(cfg: DictConfig, plan: _Plan, study: optuna.Study, trials_dir: Path) -> None:
    """Ask `tune.population_size` trials, train them together as one population, tell each; until the budget ends.

    The trials of a batch are sampled before any of them is told, so the sampler learns only between batches;
    the summary records the batch size for that reason.
    """
    started = time.perf_counter()
    while cfg.tune.timeout_s is None or time.perf_counter() - started < cfg.tune.timeout_s:
        trials = []
        with contextlib.suppress(_StudyFull), warnings.catch_warnings():
            # Optuna's heartbeat runs only inside Study.optimize: with ask/tell, a worker killed mid-batch leaves
            # its trials RUNNING (not FAIL); the summary's n_unfinished shows them.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            for _ in range(cfg.tune.population_size):
                trials.append(study.ask())
        if not trials:
            return
        params = [{p.name: p.suggest(t) for p in plan.space} for t in trials]
        extra = _logger_overrides(cfg, plan, "trial")
        cfgs = [_apply(plan.run_cfg, plan.space, ps, **extra) for ps in params]
        dirs = [trials_dir / str(t.number) for t in trials]
        batch_start = time.perf_counter()
        try:
            metrics = evaluate_trials_as_population(trials, cfgs, dirs, mode=cfg.tune.population_mode)
        except BaseException:
            for trial in trials:  # asked trials must not stay RUNNING and hold the study's budget
                study.tell(trial, state=TrialState.FAIL)
            raise
        share = (time.perf_counter() - batch_start) / len(trials)  # the batch's cost, split evenly over its trials
        for trial, ps, run_dir, m, run_cfg in zip(trials, params, dirs, metrics, cfgs, strict=True):
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("worker", cfg.tune.worker)
            trial.set_user_attr("wall_time_s", share)
            _record_config(trial, plan, run_cfg)
            if m.get("status") == "completed":
                trial.set_user_attr("test_error", m.get("test_error"))
            facts = {"epochs": m["epochs"], "steps": m["steps"], "wall_time_s": share, "state": m["status"]}
            _write_trial(cfg, plan, trial, ps, {**facts, "population_size": len(trials)})
        tell_trials(study, trials, metrics)


def tune(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or continue) the study as one worker; worker 0 then reruns the best and writes the summary.

    Returns the summary dict (also written to `<output_dir>/study_summary.json`). Raises
    `bench.config.ConfigError` before touching any storage when the config cannot work.
    """
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        output_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(output_dir)
    plan = validate_tune(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trials_dir = Path(cfg.tune.trials_dir) if cfg.tune.get("trials_dir") else run_dir / "trials"

    study = _open_study(cfg, plan)
    objective = _Objective(cfg, plan, trials_dir)
    if cfg.tune.population_size > 1:
        _optimize_in_populations(cfg, plan, study, trials_dir)
    else:
        # A bar over the study's trials (all workers'), advanced as this worker's trials finish.
        bar = tqdm(
            total=cfg.tune.n_trials,
            initial=min(len(study.get_trials(deepcopy=False)), cfg.tune.n_trials),
            desc=f"study {plan.study_name}",
            unit="trial",
            disable=not cfg.trainer.progress,
            dynamic_ncols=True,
        )

        def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            trials = study.get_trials(deepcopy=False)
            bar.n = min(sum(t.state.is_finished() for t in trials), cfg.tune.n_trials)
            complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
            best = min(complete) if complete else None
            bar.set_postfix(best_val_error=best, refresh=False)
            bar.refresh()

        try:
            with contextlib.suppress(_StudyFull):  # the study holds n_trials: this worker's part is done
                study.optimize(objective, timeout=cfg.tune.timeout_s, catch=(TrialFailed,), callbacks=[advance])
        finally:
            bar.close()
    reruns: list[dict[str, Any]] = []
    if cfg.tune.worker == 0 and not objective.preempted:
        _wait_for_workers(study, cfg.tune.wait_for_workers_s)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete and plan.rerun_seeds:
            done = _rerun(cfg, plan, min(complete, key=lambda tr: tr.value), run_dir)
            if done is None:  # preempted: the requeued worker reruns and writes the summary
                return {"status": "preempted"}
            reruns = done
    summary = _summary(cfg, plan, study, reruns)
    summary["worker"] = cfg.tune.worker
    _write_json(run_dir / "study_summary.json", summary)
    if "wandb" in backends(cfg.logger) and cfg.tune.worker == 0:
        _log_summary_to_wandb(cfg, plan, summary, run_dir)
    return summary


def _error(message: str) -> None:
    from bench.io import mask_secrets
    from bench.rundir import discard_if_unused

    print(f"error: {mask_secrets(message.splitlines()[0])}", file=sys.stderr)
    discard_if_unused()  # bad input leaves no run directory behind
    sys.exit(2)


def _precheck(argv: list[str]) -> None:
    """Compose and validate a single (non -m) invocation before Hydra starts, so bad input is one line + exit 2.

    Hydra's own messages for a composition error span several lines and exit 1.
    """
    from hydra._internal.utils import get_args_parser

    from bench.config import ConfigError

    args, _ = get_args_parser().parse_known_args(argv)
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return  # each multirun job validates itself; help and --cfg print and exit
    for override in args.overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "optimizer" and value not in _tunable_baselines():
            _error(_not_tunable(value))
    try:
        cfg = compose_tune_config(args.overrides)
    except Exception as e:  # Hydra raises several types; all mean "the overrides do not compose"
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ else ""
        _error(f"{str(e).splitlines()[0]}{cause}")
    try:
        validate_tune(cfg, Path.cwd())
    except ConfigError as e:
        _error(str(e))


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.tune [hydra overrides]`."""
    import hydra

    from bench.config import CONF_DIR, ConfigError
    from bench.train import Interrupted

    argv = sys.argv[1:] if argv is None else argv
    _precheck(argv)

    @hydra.main(config_path=str(CONF_DIR), config_name="tune", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        try:
            summary = tune(cfg)
        except ConfigError as e:
            _error(str(e))
        except Interrupted as e:  # the trial's checkpoint is saved; the study keeps its finished trials
            print(f"{e}; the study keeps its finished trials", file=sys.stderr)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt:
            print(
                "interrupted; the study keeps its finished trials: rerun the same command to continue it",
                file=sys.stderr,
            )
            sys.exit(130)
        if summary.get("status") == "preempted":
            log.info("preempted during the reruns of the best trial; run the same command again to finish them")
            return
        best = summary["best_value"]
        errors = [r["test_error"] for r in summary["reruns"]]
        log.info(
            f"study {summary['study_name']}: {summary['n_trials']} trials "
            f"({summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed), "
            f"best val_error {best}, best params {summary['best_params']}, rerun test errors {errors}, "
            f"{summary['total_epochs']} epochs / {summary['total_wall_time_s']:.1f}s in all"
        )

    sys.argv = [sys.argv[0], *argv]
    _app()


if __name__ == "__main__":
    main()
