"""Log the report's tables and figures to a W&B run in the sweep's group (offline unless told otherwise)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

__all__ = ["log_report"]


def log_report(
    logger: DictConfig,
    output_dir: Path,
    group: str | None,
    tables: Mapping[str, pd.DataFrame],
    files: Mapping[str, Path],
) -> str:
    """One W&B run of job type "report" holding every table and PNG; returns the run's local directory.

    The run's files go under `output_dir/wandb`, next to the report they describe; `wandb sync` uploads an
    offline run later.
    """
    import wandb

    settings = OmegaConf.to_container(logger, resolve=True) if isinstance(logger, DictConfig) else dict(logger)
    run = wandb.init(
        project=settings.get("project") or "hypergrad",
        entity=settings.get("entity"),
        group=group,
        job_type=settings.get("job_type") or "report",
        tags=list(settings.get("tags") or []),
        mode=settings.get("mode") or "offline",
        dir=str(output_dir),
        config={"report_dir": str(output_dir)},
    )
    try:
        payload: dict[str, object] = {name: wandb.Table(dataframe=df) for name, df in tables.items() if not df.empty}
        payload.update(_native_charts(wandb, tables))
        for name, path in files.items():
            if name.endswith(".png"):
                payload[Path(name).stem] = wandb.Image(str(path))
        run.log(payload)
        run.save(str(files["report.md"]), base_path=str(output_dir), policy="now")
        return run.dir
    finally:
        run.finish()


def _native_charts(wandb: Any, tables: Mapping[str, pd.DataFrame]) -> dict[str, object]:
    """The report's curves as W&B charts (interactive, filterable), next to the static PNGs."""
    charts: dict[str, object] = {}
    summary = tables.get("summary")
    if summary is not None and not summary.empty and {"lr", "test_error_mean", "method"} <= set(summary.columns):
        points = summary.dropna(subset=["lr", "test_error_mean"])[["method", "lr", "test_error_mean"]]
        if not points.empty:
            table = wandb.Table(dataframe=points.astype({"method": str}))
            charts["sensitivity_chart"] = wandb.plot.line(
                table, "lr", "test_error_mean", stroke="method", title="test error by initial step size"
            )
    curves = tables.get("tuning_curves")
    if curves is not None and not curves.empty:
        table = wandb.Table(dataframe=curves.astype({"study": str}))
        charts["tuning_curve_chart"] = wandb.plot.line(
            table, "cost_wall_time_s", "expected_test_error", stroke="study", title="tuning curve"
        )
    return charts
