"""Composing and validating the Hydra config of a run.

`compose_config(overrides)` gives the same config as `python -m bench overrides` (for tests and
other entry points); `validate(cfg)` checks every value once, before any work starts, and raises
`ConfigError` with one line: "`key` must be Y, but got Z". Each config group is checked by its own
package (`bench.data.validate`, `bench.models.validate`, ...); this module only calls them in turn.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from bench import data, logger, models, optim
from bench.conf import CONF_DIR, load_yaml
from bench.errors import ConfigError, check_bool, check_int, check_known_keys, check_number, fail, is_int

__all__ = ["CONF_DIR", "ConfigError", "compose_config", "validate"]


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


def _validate_run(cfg: DictConfig) -> None:
    """The run's own keys: `seed` and the `trainer` group."""
    seed = cfg.get("seed")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise fail("seed", "an integer in [0, 2**32)", seed)
    t, p = cfg.trainer, "trainer."
    for key in ("epochs", "batch_size", "eval_batch_size"):
        check_int(t, key, 1, prefix=p)
    check_int(t, "max_steps", 1, optional=True, prefix=p)
    check_int(t, "num_threads", 1, optional=True, prefix=p)
    check_int(t, "checkpoint_every", 0, prefix=p)
    check_number(t, "checkpoint_minutes", "(0, inf)", prefix=p, optional=True)
    check_number(t, "diverge_factor", "(1, inf)", prefix=p, optional=True)
    check_known_keys(t, "trainer", set(load_yaml(CONF_DIR / "trainer" / "default.yaml")))
    for key in ("resume", "force", "amp", "compile", "progress"):
        check_bool(t, key, p)
    if t.get("dtype", "float32") not in ("float32", "float64"):
        raise fail("trainer.dtype", "one of ['float32', 'float64']", t.get("dtype"))
    if t.device not in ("auto", "cpu", "cuda"):
        raise fail("trainer.device", "one of ['auto', 'cpu', 'cuda']", t.device)
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise fail("trainer.device", "'cpu' or 'auto' on this machine (no CUDA device is visible)", t.device)


def validate(cfg: DictConfig) -> None:
    """Check the whole run config; raise `ConfigError` ("`key` must be Y, but got Z") on the first bad value."""
    for check in (_validate_run, data.validate, models.validate, optim.validate, logger.validate):
        check(cfg)
