"""`source=wandb`: read the runs of W&B projects through the public API instead of run directories.

Each W&B run's summary must carry the harness's metrics.json keys (the harness logs its final metrics as the
run summary). This needs network access to the W&B server and an API key in the environment.
"""

from __future__ import annotations

import pandas as pd

from bench.report.load import REQUIRED_KEYS, ReportInputError, Runs, _check_compatible, _row

__all__ = ["load_wandb_runs"]


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
            if wb_run.job_type == "report":
                continue
            metrics = {k: wb_run.summary.get(k) for k in REQUIRED_KEYS if k in wb_run.summary}
            metrics.update({k: wb_run.summary.get(k) for k in ("val_error", "status", "steps", "optimizer")})
            row = _row(f"{project}/{wb_run.id}", metrics, on_disk=False)
            row["group"] = wb_run.group
            rows.append(row)
        if len(rows) == before:
            raise ReportInputError(f"`input` must name a W&B project with runs, but {project} has none")
    table = pd.DataFrame(rows).assign(role="run", study=None)
    _check_compatible(table)
    return Runs(table=table)
