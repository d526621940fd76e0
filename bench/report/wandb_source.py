"""`source=wandb`: read the runs of W&B projects through the public API instead of run directories.

Each W&B run's summary must carry the harness's metrics.json keys (the harness logs its final metrics as the
run summary). This needs network access to the W&B server and an API key in the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from bench.report.load import REQUIRED_KEYS, ReportInputError, Runs, _check_compatible, _row

__all__ = ["load_wandb_runs", "metrics_from_summary"]


def metrics_from_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A run's metrics.json content back from its W&B summary.

    W&B summaries hold flat values, so the harness logs `init` as `init/<name>` and the final hyperparameters as
    `final/L<level>.<name>`: they are nested again here.
    """
    metrics = {k: summary[k] for k in (*REQUIRED_KEYS, "val_error", "status", "steps", "optimizer") if k in summary}
    init = {k.removeprefix("init/"): v for k, v in summary.items() if k.startswith("init/")}
    if init:
        metrics.setdefault("init", init)
    levels: dict[int, dict[str, Any]] = {}
    for key, value in summary.items():
        if key.startswith("final/L") and "." in key:
            level, name = key.removeprefix("final/L").split(".", 1)
            if level.isdigit():
                levels.setdefault(int(level), {})[name] = value
    if levels:
        metrics.setdefault("hyperparameters", [levels[k] for k in sorted(levels)])
    return metrics


def load_wandb_runs(projects: list[str]) -> Runs:
    """One row per finished W&B run of each `entity/project`, in the same table as load_runs gives."""
    import wandb

    try:
        api = wandb.Api()
    except wandb.errors.Error as e:
        raise ReportInputError(f"`source=wandb` needs a W&B API key, but got: {str(e).splitlines()[0]}") from None
    rows = []
    for project in projects:
        before = len(rows)
        try:
            wb_runs = list(api.runs(project))
        except (wandb.errors.Error, ValueError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ReportInputError(f"`input` must be a readable W&B project, but {project} gave: {message}") from None
        for wb_run in wb_runs:
            if wb_run.job_type in ("report", "tune_summary"):  # summaries of other runs, not runs
                continue
            metrics = metrics_from_summary({k: wb_run.summary[k] for k in wb_run.summary.keys()})  # noqa: SIM118
            row = _row(f"{project}/{wb_run.id}", metrics, on_disk=False)
            row["group"] = wb_run.group
            rows.append(row)
        if len(rows) == before:
            raise ReportInputError(f"`input` must name a W&B project with runs, but {project} has none")
    table = pd.DataFrame(rows).assign(role="run", study=None)
    _check_compatible(table)
    return Runs(table=table)
