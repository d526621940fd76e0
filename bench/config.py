"""Composing and validating the Hydra config of a run.

`compose_config(overrides)` gives the same config as `python -m bench overrides` (for tests and
other entry points); `validate(cfg)` checks every value once, before any work starts, and raises
`ConfigError` with one line: "`key` must be Y, but got Z".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bench.data import DATASETS, KINDS
from bench.errors import ConfigError
from bench.models import MODELS
from bench.optim import BASELINES, SCHEDULES, TOWER_BASES, TUNING_FREE, tower_spec

__all__ = ["CONF_DIR", "ConfigError", "compose_config", "validate"]

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The config directory, `bench/conf/`: shipped inside the package, so an installed wheel finds it."""


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose `bench/conf/config.yaml` with command-line style `overrides`, as `python -m bench` would.

    Works both outside Hydra (tests, scripts) and inside a running Hydra app (which already owns the
    global Hydra state, so its compose is used directly).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _fail(key: str, expected: str, got: Any, hint: str = "") -> ConfigError:
    if isinstance(got, (DictConfig, ListConfig)):
        from omegaconf import OmegaConf

        got = OmegaConf.to_container(got)
    return ConfigError(f"`{key}` must be {expected}, but got {got!r}" + (f"; {hint}" if hint else ""))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(cfg: DictConfig, key: str, minimum: int, *, optional: bool = False, prefix: str = "") -> None:
    v = cfg.get(key)
    if optional and v is None:
        return
    if not _is_int(v) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _fail(prefix + key, what + (" or null" if optional else ""), v)


def _number(
    cfg: DictConfig,
    key: str,
    low: float,
    high: float,
    *,
    prefix: str,
    open_low: bool = False,
    open_high: bool = False,
    optional: bool = False,
) -> None:
    if key not in cfg or (optional and cfg[key] is None):
        return
    v = cfg[key]
    ok = _is_number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}".replace("inf]", "inf)")
        bounds += " or null" if optional else ""
        raise _fail(prefix + key, f"a number in {bounds}", v)


def _bool(cfg: DictConfig, key: str, prefix: str) -> None:
    if not isinstance(cfg.get(key), bool):
        raise _fail(prefix + key, "true or false", cfg.get(key))


def _validate_dataset(cfg: DictConfig) -> None:
    d = cfg.dataset
    if d.get("name") not in DATASETS:
        raise _fail("dataset.name", f"one of {list(DATASETS)}", d.get("name"))
    _int(d, "train_size", 1, optional=True, prefix="dataset.")
    for key in ("val_size", "test_size"):
        if key in d:
            _int(d, key, 0, prefix="dataset.")
    if "seq_len" in d:
        _int(d, "seq_len", 1, prefix="dataset.")
        for key in ("val_fraction", "test_fraction"):
            _number(d, key, 0.0, 0.5, prefix="dataset.", open_low=True)
    if d.name in ("mnist", "fashion_mnist", "cifar10"):
        _bool(d, "download", "dataset.")
        if not d.download:
            from bench.data.vision import missing_files

            missing = missing_files(d)
            if missing:
                root = Path(d.data_dir).expanduser()
                names = ", ".join(str(p.relative_to(root)) for p in missing[:3])
                more = ", ..." if len(missing) > 3 else ""
                raise _fail(
                    "dataset.data_dir",
                    f"a directory holding the {d.name} files",
                    str(d.data_dir),
                    f"missing {names}{more} (pass dataset.download=true to fetch them)",
                )
    if d.name == "cifar10":
        _bool(d, "verify_checksums", "dataset.")
        if d.verify_checksums:
            from bench.data.vision import cifar_checksum_mismatches

            bad = cifar_checksum_mismatches(d)
            if bad:
                raise _fail(
                    "dataset.data_dir",
                    "a directory holding the official CIFAR-10 files (torchvision's md5 checksums)",
                    str(d.data_dir),
                    f"{bad[0].name} does not match; for re-packed files pass dataset.verify_checksums=false",
                )
    if d.name == "war_and_peace":
        _bool(d, "download", "dataset.")
        if not d.download and not Path(d.path).expanduser().is_file():
            raise _fail("dataset.path", "an existing text file", str(d.path), "pass dataset.download=true to fetch it")


def _validate_model(cfg: DictConfig) -> None:
    name = cfg.model.get("name")
    if name not in MODELS:
        raise _fail("model.name", f"one of {sorted(MODELS)}", name)
    kind = KINDS[cfg.dataset.name]
    if kind not in MODELS[name]:
        fitting = [m for m, kinds in MODELS.items() if kind in kinds]
        raise _fail("model", f"one of {fitting} for the {kind} dataset {cfg.dataset.name!r}", name)
    for key in ("hidden", "channels", "embedding", "layers", "width"):
        if key in cfg.model:
            _int(cfg.model, key, 1, prefix="model.")
    if name == "resnet20" and (not _is_int(cfg.model.depth) or cfg.model.depth < 8 or (cfg.model.depth - 2) % 6):
        raise _fail("model.depth", "6n+2 for n >= 1 (20, 32, 44, 56, ...)", cfg.model.depth)


def _validate_tower(o: DictConfig) -> None:
    if not isinstance(o.get("stable", False), bool):
        raise _fail("optimizer.stable", "true or false", o.get("stable"))
    if not o.get("spec"):
        for key in ("base", "hyper"):
            if o.get(key) not in TOWER_BASES:
                raise _fail(f"optimizer.{key}", f"one of {list(TOWER_BASES)}", o.get(key))
        _number(o, "lr", 0.0, math.inf, prefix="optimizer.", open_low=True)
        _number(o, "hyper_lr", 0.0, math.inf, prefix="optimizer.")
        _int(o, "height", 0, prefix="optimizer.")
        if o.get("momentum") is not None:
            if o.base != "sgd":
                raise _fail("optimizer.momentum", f"null for base {o.base!r} (only sgd has momentum)", o.momentum)
            _number(o, "momentum", 0.0, 1.0, prefix="optimizer.")
    elif not isinstance(o.spec, str):
        raise _fail("optimizer.spec", "a string in the paper's notation, e.g. 'adam(0.001)/sgd(1e-05)'", o.spec)
    import hypergrad

    spec = tower_spec(o)
    try:
        hypergrad.parse_spec(spec)
    except ValueError as e:
        first_line = str(e).splitlines()[0]
        raise _fail(
            "optimizer.spec", "a tower in the paper's notation such as 'adam(0.001)/sgd(1e-05)'", spec, first_line
        ) from None


@functools.cache
def _load_yaml_cached(path: str, mtime: float) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _load_yaml(path: Path) -> Any:
    """A packaged config file as plain data, read once per process (a sweep validates every job)."""
    import copy

    return copy.deepcopy(_load_yaml_cached(str(path), path.stat().st_mtime))


def _group_defaults(group: str, name: str) -> list[dict[str, Any]]:
    """The bench/conf/<group>/*.yaml files whose `name` is `name`, as plain dicts (what that choice may set)."""

    found = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        data = _load_yaml(path)
        if isinstance(data, dict) and data.get("name") == name:
            found.append(data)
    return found


def _unknown_keys(node: DictConfig, group: str, allowed: set[str]) -> None:
    unknown = sorted(set(node.keys()) - allowed)
    if unknown:
        raise _fail(
            f"{group}.{unknown[0]}",
            f"absent: it is not a {group} setting here (the settings are {sorted(allowed)})",
            node[unknown[0]],
            "a misspelt or ignored key would silently change nothing",
        )


def _validate_optimizer(cfg: DictConfig) -> None:
    o = cfg.optimizer
    names = ["tower", *BASELINES, *TUNING_FREE]
    if o.get("name") not in names:
        raise _fail("optimizer.name", f"one of {names}", o.get("name"))
    presets = _group_defaults("optimizer", o.name)
    if presets:
        _unknown_keys(o, "optimizer", set().union(*(p.keys() for p in presets)))
    if o.name == "tower" and o.get("spec") and presets:
        # The spec gives every level's optimizer and values; the separate keys would be ignored without a word.
        defaults = presets[0]
        for key in ("base", "hyper", "lr", "hyper_lr", "height", "momentum"):
            if key in o and key in defaults and o[key] != defaults[key]:
                raise _fail(
                    f"optimizer.{key}",
                    f"left at its default {defaults[key]!r} when optimizer.spec is set (the spec decides it)",
                    o[key],
                    "put the value into optimizer.spec instead",
                )
    if o.name == "tower":
        _validate_tower(o)
        return
    p = "optimizer."
    _number(o, "lr", 0.0, math.inf, prefix=p, open_low=True)
    _number(o, "weight_decay", 0.0, math.inf, prefix=p)
    _number(o, "momentum", 0.0, 1.0, prefix=p)
    for key in ("beta1", "beta2", "alpha"):
        _number(o, key, 0.0, 1.0, prefix=p, open_high=True)  # torch requires < 1 (a moment that never decays)
    for key in ("eps", "d_coef", "reps_rel"):
        _number(o, key, 0.0, math.inf, prefix=p, open_low=True)
    if "warmup_steps" in o:
        _int(o, "warmup_steps", 0, prefix=p)
    schedule = o.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise _fail("optimizer.schedule", f"one of {list(SCHEDULES)}", schedule)
    if o.name.startswith("schedulefree") and schedule != "constant":
        raise _fail("optimizer.schedule", f"'constant' for {o.name} (it replaces the schedule)", schedule)
    if schedule == "warmup_cosine":
        _number(o, "warmup_fraction", 0.0, 1.0, prefix=p)
    if schedule == "step":
        _number(o, "gamma", 0.0, 1.0, prefix=p, open_low=True)
        if not all(_is_int(m) and m > 0 for m in o.get("milestones", [])):
            raise _fail("optimizer.milestones", "a list of positive epoch numbers", o.get("milestones"))


def _validate_trainer(cfg: DictConfig) -> None:
    t, p = cfg.trainer, "trainer."
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _int(t, key, 1, prefix=p)
    _int(t, "max_steps", 1, optional=True, prefix=p)
    _int(t, "num_threads", 1, optional=True, prefix=p)
    _int(t, "checkpoint_every", 0, prefix=p)
    _number(t, "checkpoint_minutes", 0.0, math.inf, prefix=p, open_low=True, optional=True)
    _number(t, "diverge_factor", 1.0, math.inf, prefix=p, open_low=True, optional=True)

    known = set(_load_yaml(CONF_DIR / "trainer" / "default.yaml"))
    _unknown_keys(t, "trainer", known)
    for key in ("resume", "force", "amp", "compile", "progress"):
        _bool(t, key, p)
    if t.get("dtype", "float32") not in ("float32", "float64"):
        raise _fail("trainer.dtype", "one of ['float32', 'float64']", t.get("dtype"))
    if t.device not in ("auto", "cpu", "cuda"):
        raise _fail("trainer.device", "one of ['auto', 'cpu', 'cuda']", t.device)
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _fail("trainer.device", "'cpu' or 'auto' on this machine (no CUDA device is visible)", t.device)


def _validate_logger(cfg: DictConfig) -> None:
    from bench.logger import BACKENDS, backends

    lg = cfg.logger
    allowed = ["none", *BACKENDS]
    if lg.get("name") not in allowed:
        raise _fail("logger.name", f"one of {allowed}", lg.get("name"))
    chosen = lg.get("backends")
    if chosen is not None and any(k not in BACKENDS for k in chosen):
        raise _fail("logger.backends", f"keys among {list(BACKENDS)}", OmegaConf.to_container(chosen))
    if backends(lg):
        _int(lg, "log_every_n_steps", 1, prefix="logger.")
    if "wandb" in backends(lg):
        if lg.get("mode") not in ("offline", "online", "disabled"):
            raise _fail("logger.mode", "one of ['offline', 'online', 'disabled']", lg.get("mode"))
        if not all(isinstance(t, str) for t in lg.get("tags") or []):
            raise _fail("logger.tags", "a list of strings", lg.get("tags"))


def validate(cfg: DictConfig) -> None:
    """Check the whole run config; raise `ConfigError` ("`key` must be Y, but got Z") on the first bad value."""
    seed = cfg.get("seed")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise _fail("seed", "an integer in [0, 2**32)", seed)
    _validate_trainer(cfg)
    _validate_dataset(cfg)
    _validate_model(cfg)
    _validate_optimizer(cfg)
    _validate_logger(cfg)
