"""Hydra callbacks of the harness (`hydra.callbacks` in bench/conf/config.yaml and bench/conf/debug/profile.yaml).

- `SweepSummary`: at the end of every `-m` sweep, one table naming each job (its overrides, seed, status,
  errors and directory), printed and written to `<sweep dir>/summary.csv`. It reads what the jobs left on
  disk (metrics.json, or study_summary.json for `hypergrad-tune -m`), so it works with every launcher:
  basic, joblib, submitit (local or SLURM).
- `Profile`: runs each job under cProfile and writes `profile.pstats` and `profile.txt` into its run directory.
"""

from __future__ import annotations

import cProfile
import io
import json
import logging
import pstats
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bench.io import atomic_write, atomic_write_csv, mask_secrets

__all__ = ["Profile", "SweepSummary", "sweep_rows"]

log = logging.getLogger(__name__)

_COLUMNS = ("job", "overrides", "seed", "status", "val_error", "test_error", "epochs", "steps", "wall_time_s", "dir")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory of a sweep: a directory (at any depth) that Hydra gave a `.hydra/overrides.yaml`."""
    found = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    # Numeric job subdirs (0, 1, ..., 10) in launch order, anything else after them by name.
    return sorted(found, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, str(d)))


def _job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    config_path = job_dir / ".hydra" / "config.yaml"

    def config_seed() -> Any:  # read only where metrics.json does not say (a sweep's configs are slow to load)
        return OmegaConf.load(config_path).get("seed") if config_path.is_file() else None

    row: dict[str, Any] = dict.fromkeys(_COLUMNS)
    # Overrides may carry a storage URL's password or a token: masked like everything else a sweep writes.
    shown = " ".join(mask_secrets(list(overrides)))
    row.update(job=str(job_dir.relative_to(sweep_dir)), overrides=shown, dir=str(job_dir))
    metrics_path, study_path = job_dir / "metrics.json", job_dir / "study_summary.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        row.update({k: m.get(k) for k in ("status", "val_error", "test_error", "epochs", "steps", "wall_time_s")})
        row["seed"] = m["seed"] if "seed" in m else config_seed()
    elif study_path.is_file():  # a tune worker: its study's best trial and the mean test error of the reruns
        row["seed"] = config_seed()
        s = json.loads(study_path.read_text())
        errors = [r["test_error"] for r in s.get("reruns") or [] if r.get("test_error") is not None]
        row.update(
            status=s.get("status", "study"),
            val_error=s.get("best_value"),
            test_error=sum(errors) / len(errors) if errors else None,
            epochs=s.get("total_epochs"),
            wall_time_s=s.get("total_wall_time_s"),
        )
    else:
        row.update(seed=config_seed(), status="no result")  # crashed, killed or still running
    return row


def sweep_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of the sweep in `sweep_dir` (the columns of summary.csv)."""
    sweep_dir = Path(sweep_dir)
    return [_job_row(d, sweep_dir) for d in _job_dirs(sweep_dir)]


def format_rows(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(_COLUMNS)).drop(columns=["dir"])
    for col in ("val_error", "test_error"):
        table[col] = table[col].map(lambda v: "" if v is None or v != v else f"{100 * v:.2f}%")
    return table.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.1f}")


class SweepSummary(Callback):
    """Prints the sweep's table and writes `summary.csv` next to the job directories when a `-m` sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = sweep_rows(sweep_dir)
        if not rows:
            return
        path = atomic_write_csv(sweep_dir / "summary.csv", rows)
        # print, not log: the sweep's process has no job log, and the table must show whatever hydra_logging says.
        print(f"sweep of {len(rows)} jobs -> {path}\n{format_rows(rows)}")


class Profile(Callback):
    """cProfile around each job (`debug=profile`): `profile.pstats` and the `top` functions in `profile.txt`."""

    def __init__(self, top: int = 40) -> None:
        self.top = top
        self._profiler: cProfile.Profile | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._profiler = cProfile.Profile()
        self._profiler.enable()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._profiler is None:
            return
        self._profiler.disable()
        out = Path(str(config.hydra.runtime.output_dir))
        stats = pstats.Stats(self._profiler)
        atomic_write(out / "profile.pstats", lambda f: f.write(_dump(stats)), binary=True)
        text = io.StringIO()
        pstats.Stats(self._profiler, stream=text).sort_stats("cumulative").print_stats(self.top)
        atomic_write(out / "profile.txt", lambda f: f.write(text.getvalue()))
        log.info("profile written to %s (profile.pstats, profile.txt)", out)
        self._profiler = None


def _dump(stats: pstats.Stats) -> bytes:
    import marshal

    return marshal.dumps(stats.stats)  # the format `pstats.Stats(path)` reads (what Stats.dump_stats writes)
