"""What Hydra writes into a run directory: once, masked, and never over another run's record.

Hydra's own `.hydra/` writer (`hydra.output_subdir`) rewrites `config.yaml`, `hydra.yaml` and `overrides.yaml` on
every start, before the application can look at the directory: a rerun of a finished directory with other
overrides would leave a record that contradicts its results, and a password in an override would land on disk.
bench/conf/config.yaml therefore switches that writer off (`hydra.output_subdir: null`) and installs `RunDirRecord`,
which writes the same three files itself, at the same point of the job, but

- only when the config is valid (bad input leaves no record behind),
- only when the directory holds no record yet, or `trainer.force=true` starts it over (`bench.train.run` then
  refuses a config that differs from the record, naming the keys),
- with secrets masked (`bench.io.mask_secrets`: passwords in URLs, keys named like password or token); a sweep's
  `multirun.yaml` is masked the same way.

The `unique` resolver gives each process a short random token, so run directories of runs started in the same
second differ (`hydra.run.dir` ends with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bench.io import atomic_write, mask_secrets

__all__ = ["RunDirRecord", "discard_if_unused", "register_resolvers", "write_masked_yaml"]

_TOKEN = uuid.uuid4().hex[:6]
_masked_sweeps: set[Path] = set()  # multirun.yaml files this process masked already
_written: set[Path] = set()  # .hydra/ directories this process wrote (the only ones `discard_if_unused` may remove)


def register_resolvers() -> None:
    """`${unique:}`: one random token per process (cached by OmegaConf, so a sweep's jobs share it)."""
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", lambda: _TOKEN, use_cache=True)


def write_masked_yaml(path: Path, data: Any) -> None:
    """Write `data` (a config or a plain container) as YAML with its secrets masked, atomically."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    if isinstance(data, DictConfig) or OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=False, enum_to_str=True)
    # What OmegaConf.to_yaml writes, without building a config from the plain data first (a sweep's hydra.yaml is
    # large, and a population sweep writes one per job in one process).
    masked = mask_secrets(data)
    text = yaml.dump(
        masked, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=get_omega_conf_dumper()
    )
    atomic_write(path, lambda f: f.write(text))


_plain_record_factory = logging.getLogRecordFactory()


def _masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _plain_record_factory(*args, **kwargs)
    message = record.getMessage()
    masked = mask_secrets(message)
    if masked != message:
        record.msg, record.args = masked, None
    return record


def mask_log_handlers() -> None:
    """Mask secrets in every log record of this process from now on (Hydra logs a sweep's overrides verbatim).

    A record factory, not a handler filter: Hydra's launchers reconfigure logging (new handlers) after callbacks ran.
    """
    logging.setLogRecordFactory(_masked_record)


def refuse_unmakeable_dir(config: DictConfig, key: str) -> None:
    """Exit with one line when the run (or sweep) directory cannot be made: under a file, or in a read-only place.

    Hydra creates the directory itself before the task starts, so bench.__main__'s OSError handler never sees that
    failure and the user would get Hydra's traceback. Only the nearest existing ancestor is checked here (nothing is
    created): `${now:}` in the path resolves again when Hydra makes it.
    """
    try:
        path = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
    except Exception:  # an unresolvable path: Hydra reports it in its own words
        return
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        why = f"`{ancestor}` is not a directory"
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        why = f"`{ancestor}` is not writable"
    else:
        return
    print(f"error: cannot create `{path}`: {why}; pick another directory ({key}=... or paths.log_dir=...)",
          file=sys.stderr)  # fmt: skip
    sys.exit(1)


class RunDirRecord(Callback):
    """Hydra callback: write `.hydra/{config,hydra,overrides}.yaml` once per run directory, with secrets masked."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        mask_log_handlers()
        refuse_unmakeable_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mask_log_handlers()
        refuse_unmakeable_dir(config, "hydra.sweep.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        mask_log_handlers()  # the job's own log file handler is configured just before this
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep_record = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
            if sweep_record.is_file() and sweep_record not in _masked_sweeps:  # once per sweep and process
                write_masked_yaml(sweep_record, OmegaConf.load(sweep_record))
                _masked_sweeps.add(sweep_record)
        out = Path(hydra_cfg.runtime.output_dir) / ".hydra"
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        force = bool(OmegaConf.select(task, "trainer.force", default=False))
        if (out / "config.yaml").is_file() and not force:
            return  # the directory's record stays; bench.train.run refuses a config that differs from it
        if not _valid(task):
            return
        write_masked_yaml(out / "config.yaml", task)
        write_masked_yaml(
            out / "hydra.yaml", {"hydra": OmegaConf.to_container(config.hydra, resolve=False, enum_to_str=True)}
        )
        write_masked_yaml(out / "overrides.yaml", list(hydra_cfg.overrides.task))
        _written.add(out.resolve())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_record = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if sweep_record.is_file():
            write_masked_yaml(sweep_record, OmegaConf.load(sweep_record))


def _valid(task: DictConfig) -> bool:
    if "trainer" not in task:
        return True  # not a training config (bench.report's, say): nothing to check here
    from bench.config import ConfigError, validate

    try:
        validate(task)
    except ConfigError:
        return False  # the application reports it in one line; no record of a run that never starts
    except Exception:
        return True
    return True


def discard_if_unused(directory: str | Path | None = None) -> None:
    """Remove a run directory that Hydra created for a run that never started (only empty log files in it).

    Bad input then leaves nothing behind. A directory holding anything else is left as it is.
    """
    if directory is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        directory = HydraConfig.get().runtime.output_dir
    path = Path(directory)
    if not path.is_dir():
        return
    entries = list(path.iterdir())
    ours = (path / ".hydra").resolve() in _written

    def unused(p: Path) -> bool:
        return (p.is_file() and p.suffix == ".log" and p.stat().st_size == 0) or (p.name == ".hydra" and ours)

    if all(unused(p) for p in entries):
        for p in entries:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()
