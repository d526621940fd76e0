"""Experiment tracking selected by `logger=NAME`: `none` or `wandb` (Weights & Biases).

W&B runs offline by default (no account needed; `wandb sync <run dir>/wandb` uploads later) and keeps
its files inside the run directory. Tracking never stops training: any W&B error prints one warning
line and turns the logger off for the rest of the run. The API key is never put into the config or
the logs: W&B reads it from its own login or WANDB_API_KEY.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["RunLogger", "WandbLogger", "build_logger"]


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
        lg = cfg.logger

        def init() -> Any:
            import wandb

            return wandb.init(
                project=lg.project,
                entity=lg.entity,
                group=lg.group,
                tags=list(lg.tags or []),
                job_type=lg.job_type,
                mode=lg.mode,
                dir=str(output_dir),
                name=f"{cfg.optimizer.name}-{output_dir.name}",
                # One W&B run per run directory, so a resumed run continues its W&B run.
                id=hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16],
                resume="allow",
                config=OmegaConf.to_container(cfg, resolve=True),
            )

        self.run = self._safe(init)

    def _safe(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # W&B must never stop training: network, disk, service and API errors alike.
            print(
                f"warning: W&B logging failed ({type(e).__name__}: {e}); training goes on without it", file=sys.stderr
            )
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
        self._safe(lambda: self.run.finish(exit_code=0))
        self.run = None


def summary_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A run's metrics as a flat W&B summary (bench.report.wandb_source.metrics_from_summary nests it again)."""
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    for level, hp in enumerate(metrics.get("hyperparameters") or [], start=1):
        summary.update({f"final/L{level}.{k}": v for k, v in hp.items()})
    summary.update({f"init/{k}": v for k, v in (metrics.get("init") or {}).items()})
    return summary


def build_logger(cfg: DictConfig, output_dir: Path) -> RunLogger:
    """The logger of the `logger` config group."""
    return WandbLogger(cfg, output_dir) if cfg.logger.name == "wandb" else RunLogger()
