"""Read result directories (harness runs, tune studies, population members) into one table.

Every run directory holds a `metrics.json` in the harness schema; a tune study directory also holds a
`study_summary.json` naming its rerun directories, so its other run directories are its trials. A diverged
run stays in the table as a miss (test error 1.0) and is counted, never dropped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm.auto import tqdm

from bench.schema import NUMBER_KEYS, TEXT_KEYS, environment_label

__all__ = ["MISS_ERROR", "REQUIRED_KEYS", "ReportInputError", "Runs", "find_run_dirs", "load_runs"]

# The keys of the harness's metrics.json that the report needs; the rest are optional.
REQUIRED_KEYS = (
    "test_error",
    "diverged",
    "epochs",
    "wall_time_s",
    "method",
    "family",
    "height",
    "init",
    "seed",
    "dataset",
    "model",
)
# A run that diverged (or has no finite test error) failed at its task: it counts as getting every
# test example wrong, so averages over seeds show the failure instead of hiding it.
MISS_ERROR = 1.0
_SKIP_DIRS = {".hydra", "wandb", "__pycache__", ".git"}


class ReportInputError(ValueError):
    """Bad report input; the message is one line naming the directory and what is wrong."""


@dataclass
class Runs:
    """Every run found below the inputs, plus the summaries of the tune studies among them."""

    table: pd.DataFrame
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Re-runs bench.rerun could not train (a learned value the base optimizer cannot use): rerun.json records.
    unusable: list[dict[str, Any]] = field(default_factory=list)


def find_run_dirs(inputs: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """Run directories (holding metrics.json) and study directories (holding study_summary.json) below `inputs`."""
    runs: dict[Path, None] = {}
    studies: dict[Path, None] = {}
    for raw in inputs:
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise ReportInputError(f"`input` must be an existing directory, but got {raw}")
        found = 0
        for dirpath, dirnames, filenames in os.walk(root):
            # Sorted walk: the table's row order (and so the report) does not depend on the filesystem.
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            here = Path(dirpath).resolve()
            if "metrics.json" in filenames:
                runs[here] = None
                found += 1
            if "study_summary.json" in filenames:
                studies[here] = None
        if found == 0:
            raise ReportInputError(
                f"`input` must contain run directories (with metrics.json), but {raw} has none below it"
            )
    return list(runs), list(studies)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ReportInputError(f"`{path}` must be valid JSON, but got a parse error: {e}") from None
    if not isinstance(data, dict):
        raise ReportInputError(f"`{path}` must hold a JSON object, but got {type(data).__name__}")
    return data


def _hydra_info(run_dir: Path) -> dict[str, Any]:
    """The sweep's W&B group, planned epochs, step-size schedule and experiment preset (runs launched by Hydra)."""
    info: dict[str, Any] = {
        "group": None, "planned_epochs": None, "schedule": None, "experiment": None, "batch_size": None,
    }  # fmt: skip
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        logger = cfg.get("logger") or {}
        trainer = cfg.get("trainer") or {}
        if isinstance(logger, dict):
            info["group"] = logger.get("group")
        if isinstance(trainer, dict):
            info["planned_epochs"] = trainer.get("epochs")
            info["batch_size"] = trainer.get("batch_size")
        optimizer = cfg.get("optimizer") or {}
        if isinstance(optimizer, dict):
            info["schedule"] = optimizer.get("schedule")
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    if overrides_path.is_file():
        for item in yaml.safe_load(overrides_path.read_text()) or []:
            key, _, value = str(item).partition("=")
            if key.lstrip("+") == "experiment":
                info["experiment"] = value
    return info


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _start(metrics: dict[str, Any], init: dict[str, Any]) -> dict[str, float]:
    """Every level's initial hyperparameters as history.csv columns (L1.lr, L2.lr, ...): where trajectories start.

    A tower's normalized spec (`optimizer`) holds them all; otherwise only the weight optimizer's `init` is known.
    """
    start = {f"L1.{k}": v for k, v in init.items()}
    if metrics["family"] == "tower":
        from hypergrad import parse_spec

        try:
            levels = parse_spec(str(metrics.get("optimizer", ""))).levels
        except ValueError:
            return start  # a spec this library version cannot read: the weight level's start is still known
        for i, level in enumerate(levels[1:], start=2):
            start.update({f"L{i}.{k}": float(v) for k, v in level.values.items()})
    return start


def _rerun_of(run_dir: Path) -> str | None:
    """The tower spec a re-run directory (with bench.rerun's rerun.json) was built from, normalized; else None."""
    path = run_dir / "rerun.json"
    if not path.is_file():
        return None
    tower = _read_json(path).get("rerun_of")
    if not tower:
        return None
    from hypergrad import format_spec, parse_spec

    try:
        return format_spec(parse_spec(str(tower)))
    except ValueError:
        return str(tower)


def _setting(x: Any) -> float:
    """An initial hyperparameter as a grid coordinate: a tower stores 0.01 as float32 0.009999999776, and
    the same grid point must group with the baseline's float64 0.01, so round to 6 significant digits."""
    v = _finite(x)
    return v if math.isnan(v) else float(f"{v:.6g}")


_NUMBER_KEYS, _TEXT_KEYS = NUMBER_KEYS, TEXT_KEYS


def _check_types(run_dir: Path, metrics: dict[str, Any]) -> None:
    """A field of the wrong type is a damaged file, not a miss: say which field, and what to do."""

    def bad(key: str, expected: str) -> ReportInputError:
        return ReportInputError(
            f"`{run_dir / 'metrics.json'}` field `{key}` must be {expected}, but got {metrics[key]!r}; "
            "rerun that run directory (trainer.force=true) or leave it out of `input`"
        )

    for key in _NUMBER_KEYS:
        v = metrics.get(key)
        if key in metrics and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(key, "a number or null")
    for key in ("seed", "height"):
        if key in metrics and (isinstance(metrics[key], bool) or not isinstance(metrics[key], int)):
            raise bad(key, "an integer")
    for key in _TEXT_KEYS:
        if key in metrics and not isinstance(metrics[key], str):
            raise bad(key, "a string")
    if "diverged" in metrics and not isinstance(metrics["diverged"], bool):
        raise bad("diverged", "true or false")
    if "init" in metrics and not isinstance(metrics["init"], dict):
        raise bad("init", "a mapping of hyperparameters")
    if "environment" in metrics and not isinstance(metrics["environment"], dict):
        raise bad("environment", "a mapping (torch, device, num_threads, ...)")


def _check_history(run_dir: Path) -> None:
    path = run_dir / "history.csv"
    if not path.is_file():
        return
    try:
        history = pd.read_csv(path)
        ok = "epoch" in history.columns
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        ok, reason = False, str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        reason = "no `epoch` column"
    if not ok:
        raise ReportInputError(
            f"`{path}` must be the harness's history table, but cannot be read ({reason}); "
            "rerun that run directory (trainer.force=true) or leave it out of `input`"
        )


def _row(run_dir: Path | str, metrics: dict[str, Any], on_disk: bool = True) -> dict[str, Any]:
    """One table row from a metrics.json; `on_disk=False` for runs that have no directory (read from W&B)."""
    run_dir = Path(run_dir)
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise ReportInputError(
            f"`{run_dir / 'metrics.json'}` must have the harness's keys, but is missing: {', '.join(missing)}"
        )
    _check_types(run_dir, metrics)
    if on_disk:
        _check_history(run_dir)
    init = metrics["init"] if isinstance(metrics["init"], dict) else {}
    raw_test = _finite(metrics["test_error"])
    diverged = bool(metrics["diverged"]) or metrics.get("status") == "diverged"
    # Counted as a miss both when the harness flagged divergence and when no finite error came out.
    miss = diverged or math.isnan(raw_test)
    raw_val = _finite(metrics.get("val_error"))
    hydra = (
        _hydra_info(run_dir)
        if on_disk
        else dict.fromkeys(("group", "planned_epochs", "schedule", "experiment", "batch_size"))
    )
    method = str(metrics["method"])
    rerun = _rerun_of(run_dir) if on_disk else None
    if rerun is not None:
        # A re-run (bench.rerun) of a tower's base at its learned values: each seed has its own values, so
        # the row groups by the tower it came from, not by an initial step size.
        method = f"{method} re-run of {rerun}"
    if hydra["schedule"] not in (None, "constant") and metrics["family"] != "tower":
        # He et al.'s step decay is another method than the same optimizer at a constant step size.
        method = f"{method} + {hydra['schedule']} schedule"
    return {
        "run_dir": str(run_dir),
        "method": method,
        "family": str(metrics["family"]),
        "height": int(metrics["height"]),
        "optimizer": str(metrics.get("optimizer", metrics["method"])),
        "lr": math.nan if rerun is not None else _setting(init.get("lr")),
        "momentum": math.nan if rerun is not None else _setting(init.get("momentum")),
        "rerun_of": rerun,
        "seed": metrics["seed"],
        "test_error": MISS_ERROR if miss else raw_test,
        "test_error_raw": raw_test,
        "val_error": MISS_ERROR if diverged or math.isnan(raw_val) else raw_val,
        "diverged": diverged,
        "miss": miss,
        "status": str(metrics.get("status", "diverged" if diverged else "completed")),
        "epochs": _finite(metrics["epochs"]),
        "steps": _finite(metrics.get("steps")),
        "wall_time_s": _finite(metrics["wall_time_s"]),
        "dataset": str(metrics["dataset"]),
        "model": str(metrics["model"]),
        "start": _start(metrics, init),
        "has_history": on_disk and (run_dir / "history.csv").is_file(),
        "environment": environment_label(metrics.get("environment")),
        **hydra,
    }


def _check_compatible(table: pd.DataFrame) -> None:
    """One report compares methods on one task: mixing datasets, models or run lengths is an input error."""
    for key in ("dataset", "model", "planned_epochs"):
        values = table[key].dropna().unique()
        if len(values) > 1:
            examples = ", ".join(f"{key}={v} in {table.loc[table[key] == v, 'run_dir'].iloc[0]}" for v in values[:3])
            raise ReportInputError(
                f"`input` must hold runs of one sweep (one {key}), but got {len(values)} values: {examples}; "
                f"report them separately"
            )


def _study_roles(study_dir: Path, summary: dict[str, Any], run_dirs: list[Path]) -> dict[Path, str]:
    """Tag the study's runs as reruns or trials: those its summary lists, and any other run below it."""

    def listed(key: str) -> set[Path]:
        paths = set()
        for entry in summary.get(key) or []:
            path = entry.get("run_dir") if isinstance(entry, dict) else None
            if path:
                p = Path(path)
                paths.add((p if p.is_absolute() else study_dir / p).resolve())
        return paths

    reruns, trials = listed("reruns"), listed("trials")  # trials may live elsewhere (tune.trials_dir)
    roles = {}
    for run_dir in run_dirs:
        below = run_dir != study_dir and study_dir in run_dir.parents
        if run_dir in reruns or (below and "reruns" in run_dir.relative_to(study_dir).parts):
            roles[run_dir] = "rerun"
        elif run_dir in trials or below:
            roles[run_dir] = "trial"
    return roles


def load_runs(inputs: list[str | Path], progress: bool = True) -> Runs:
    """Read every run below `inputs` into a table, one row per run directory.

    Columns: run_dir, method, family, height, optimizer, lr and momentum (initial values; NaN when the
    method has none), seed, test_error (MISS_ERROR for a diverged run), test_error_raw, val_error, diverged,
    miss, status, epochs, steps, wall_time_s, dataset, model, has_history, environment (bench.schema.environment_label:
    torch version, device and thread count, "unknown" for a run that did not record them), group, planned_epochs,
    experiment,
    role ("run", "trial" or "rerun") and study (the study directory for trials and reruns).
    """
    if not inputs:
        raise ReportInputError("`input` must name at least one directory, but got none")
    run_dirs, study_dirs = find_run_dirs(inputs)
    rows = [
        _row(d, _read_json(d / "metrics.json"))
        for d in tqdm(run_dirs, desc="reading runs", unit="run", disable=not progress or len(run_dirs) < 50)
    ]
    table = pd.DataFrame(rows)
    table["role"] = "run"
    table["study"] = None
    studies: dict[str, dict[str, Any]] = {}
    for study_dir in study_dirs:
        summary = _read_json(study_dir / "study_summary.json")
        for key in ("total_epochs", "total_wall_time_s", "n_trials"):
            if key not in summary:
                raise ReportInputError(f"`{study_dir / 'study_summary.json'}` must have `{key}`, but it is missing")
        studies[str(study_dir)] = summary
        for run_dir, role in _study_roles(study_dir, summary, run_dirs).items():
            mask = table["run_dir"] == str(run_dir)
            table.loc[mask, "role"] = role
            table.loc[mask, "study"] = str(study_dir)
    _check_compatible(table)
    unusable = [
        record
        for raw in inputs
        for path in sorted(Path(raw).expanduser().rglob("rerun.json"))
        if not (path.parent / "metrics.json").is_file() and (record := _read_json(path)).get("status") == "unusable"
    ]
    return Runs(table=table, studies=studies, unusable=unusable)
