"""Log the report's tables and figures to a W&B run in the sweep's group (offline unless told otherwise)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

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
        for name, path in files.items():
            if name.endswith(".png"):
                payload[Path(name).stem] = wandb.Image(str(path))
        run.log(payload)
        run.save(str(files["report.md"]), base_path=str(output_dir), policy="now")
        return run.dir
    finally:
        run.finish()
