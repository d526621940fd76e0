"""Experiment tracking selected by `logger=NAME`: `none`, `csv`, `tensorboard`, `wandb`, or several at once
(`logger=[csv,tensorboard]`; each selected file adds itself under `logger.backends`).

`csv` writes `steps.csv`, `tensorboard` writes event files under `tensorboard/`, both in the run directory,
with the optimizer step as x axis.

W&B runs offline by default (no account needed; the README's `wandb sync` command uploads later) and keeps
its files inside the run directory. Tracking never stops training: any W&B error prints one warning
line and turns the logger off for the rest of the run. The API key is never put into the config or
the logs: W&B reads it from its own login or WANDB_API_KEY.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.errors import check_int, fail
from bench.io import mask_secrets

__all__ = [
    "BACKENDS",
    "CsvLogger",
    "RunLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "backends",
    "build_logger",
    "validate",
]

BACKENDS = ("csv", "tensorboard", "wandb")

log = logging.getLogger(__name__)


def backends(logger_cfg: Any) -> list[str]:
    """The trackers a `logger` config selects, in BACKENDS order (`[]` for `logger=none`)."""
    chosen = logger_cfg.get("backends")
    if chosen is None:  # a config written before `backends` existed: its `name` says it
        name = logger_cfg.get("name", "none")
        return [] if name in (None, "none") else [str(name)]
    return [b for b in BACKENDS if chosen.get(b)]


def validate(cfg: DictConfig) -> None:
    """Check the run config's `logger` group; raise `ConfigError` with one line."""
    lg = cfg.logger
    allowed = ["none", *BACKENDS]
    if lg.get("name") not in allowed:
        raise fail("logger.name", f"one of {allowed}", lg.get("name"))
    chosen = lg.get("backends")
    if chosen is not None and any(k not in BACKENDS for k in chosen):
        raise fail("logger.backends", f"keys among {list(BACKENDS)}", OmegaConf.to_container(chosen))
    if backends(lg):
        check_int(lg, "log_every_n_steps", 1, prefix="logger.")
    if "wandb" in backends(lg):
        if lg.get("mode") not in ("offline", "online", "disabled"):
            raise fail("logger.mode", "one of ['offline', 'online', 'disabled']", lg.get("mode"))
        if not all(isinstance(t, str) for t in lg.get("tags") or []):
            raise fail("logger.tags", "a list of strings", lg.get("tags"))


class RunLogger:
    """The logger interface; this base class logs nothing (`logger=none`)."""

    def log_step(self, step: int, loss: float, hyperparameters: Callable[[], list[dict[str, float]]]) -> None:
        """Per-step training loss; `hyperparameters()` is called only on steps that are logged."""

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One row of history.csv: the epoch's metrics and every level's hyperparameters."""

    def finish(self, metrics: Mapping[str, Any]) -> None:
        """Final summary, then close."""


class WandbLogger(RunLogger):
    """Logs to a W&B run whose files live under `output_dir/wandb`."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.every = cfg.logger.log_every_n_steps
        self.run = None
        self.output_dir = output_dir
        lg = cfg.logger
        group, tags = _sweep_group_and_tags(lg)

        def init() -> Any:
            import wandb

            run = wandb.init(
                project=lg.project,
                entity=lg.entity,
                group=group,
                tags=tags,
                job_type=lg.job_type,
                mode=lg.mode,
                dir=str(output_dir),
                # Unique within a sweep, readable across sweeps (the group tells sweeps apart).
                name=f"{run_name(cfg)}-seed{cfg.seed}",
                # One W&B run per run directory, so a resumed run continues its W&B run.
                id=hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16],
                resume="allow",
                # A population trains its members in one process: one W&B run each, side by side.
                reinit="create_new",
                config=mask_secrets(OmegaConf.to_container(cfg, resolve=True)),  # a storage URL's password stays home
                # No banner (about 34 lines per run); warnings and errors still show.
                settings=wandb.Settings(silent=True),
            )
            # Charts over optimizer steps (our `step`), not W&B's `_step` (which counts log calls).
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            return run

        self.run = self._safe(init)

    def _safe(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # W&B must never stop training: network, disk, service and API errors alike.
            log.warning("W&B logging failed (%s: %s); training goes on without it", type(e).__name__, e)
            self.run = None
            return None

    def log_step(self, step: int, loss: float, hyperparameters: Callable[[], list[dict[str, float]]]) -> None:
        if self.run is None or step % self.every:
            return
        values = {"step": step, "train/loss": loss}
        for level, hp in enumerate(hyperparameters(), start=1):
            values.update({f"hyper/L{level}.{k}": v for k, v in hp.items()})
        self._safe(lambda: self.run.log(values))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        if self.run is not None:
            values = {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "steps")}
            values.update(step=row["steps"], epoch=row["epoch"])
            self._safe(lambda: self.run.log(values))

    def finish(self, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        summary = summary_of(metrics)
        self._safe(lambda: self.run.summary.update(summary))
        # Copies in the run's files directory are uploaded with the run (run.save would symlink and warn per file).
        for name in ("metrics.json", "history.csv"):
            if (self.output_dir / name).is_file():
                self._safe(lambda n=name: shutil.copy2(self.output_dir / n, Path(self.run.dir) / n))
        self._safe(lambda: self.run.finish(exit_code=0))
        self.run = None


def run_name(cfg: DictConfig) -> str:
    """The optimizer as the paper writes it: a tower's spec (`adam(0.001)/sgd(1e-05)`), or a baseline's name."""
    if cfg.optimizer.get("name") == "tower":
        from bench.optim import tower_spec

        return tower_spec(cfg.optimizer)
    return str(cfg.optimizer.get("name"))


def _sweep_group_and_tags(lg: DictConfig) -> tuple[str | None, list[str]]:
    """`logger.group`, else the sweep's directory (every job of one `-m` sweep, one group); tags plus the preset."""
    group, tags = lg.group, list(lg.tags or [])
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return group, tags
        hc = HydraConfig.get()
    except ImportError:
        return group, tags
    if group is None and str(hc.mode) == "RunMode.MULTIRUN":
        sweep = Path(str(hc.sweep.dir))
        group = f"sweep-{sweep.parent.name}-{sweep.name}"
    for choice in ("experiment", "debug"):
        preset = hc.runtime.choices.get(choice)
        if preset and preset not in tags:
            tags.append(preset)
    return group, tags


def summary_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A run's metrics as a flat W&B summary (bench.report.wandb_source.metrics_from_summary nests it again)."""
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    for level, hp in enumerate(metrics.get("hyperparameters") or [], start=1):
        summary.update({f"final/L{level}.{k}": v for k, v in hp.items()})
    summary.update({f"init/{k}": v for k, v in (metrics.get("init") or {}).items()})
    return summary


def _step_values(step: int, loss: float, hyperparameters: Callable[[], list[dict[str, float]]]) -> dict[str, float]:
    values = {"train/loss": loss}
    for level, hp in enumerate(hyperparameters(), start=1):
        values.update({f"hyper/L{level}.{k}": v for k, v in hp.items()})
    return values


class CsvLogger(RunLogger):
    """`logger=csv`: `steps.csv` in the run directory, one row every `log_every_n_steps` optimizer steps.

    Rows are appended and flushed as they come (a crashed run keeps what it logged); a resumed run appends.
    """

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.every = cfg.logger.log_every_n_steps
        self.path = output_dir / "steps.csv"
        self._file: Any = None
        self._writer: csv.DictWriter | None = None

    def log_step(self, step: int, loss: float, hyperparameters: Callable[[], list[dict[str, float]]]) -> None:
        if step % self.every:
            return
        row = {"step": step, **_step_values(step, loss, hyperparameters)}
        if self._writer is None:
            new = not self.path.is_file()
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in finish)
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), extrasaction="ignore")
            if new:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def finish(self, metrics: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None


class TensorBoardLogger(RunLogger):
    """`logger=tensorboard`: event files in `<run dir>/tensorboard`, x axis the optimizer step."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.every = cfg.logger.log_every_n_steps
        self.writer: Any = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log_step(self, step: int, loss: float, hyperparameters: Callable[[], list[dict[str, float]]]) -> None:
        if self.writer is None or step % self.every:
            return
        for key, value in _step_values(step, loss, hyperparameters).items():
            self.writer.add_scalar(key, value, step)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("epoch", "steps") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, row["steps"])
        self.writer.flush()

    def finish(self, metrics: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MultiLogger(RunLogger):
    """Several loggers at once (`logger=[csv,wandb]`)."""

    def __init__(self, loggers: list[RunLogger]) -> None:
        self.loggers = loggers

    def log_step(self, step: int, loss: float, hyperparameters: Callable[[], list[dict[str, float]]]) -> None:
        hp: list[list[dict[str, float]]] = []  # computed once, shared by every logger that asks on this step

        def cached() -> list[dict[str, float]]:
            if not hp:
                hp.append(hyperparameters())
            return hp[0]

        for lg in self.loggers:
            lg.log_step(step, loss, cached)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_epoch(row)

    def finish(self, metrics: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.finish(metrics)


def build_logger(cfg: DictConfig, output_dir: Path) -> RunLogger:
    """The loggers the `logger` config group selects (one RunLogger that logs nothing for `logger=none`)."""
    classes = {"csv": CsvLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}
    loggers = [classes[name](cfg, output_dir) for name in backends(cfg.logger)]
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers) if loggers else RunLogger()
