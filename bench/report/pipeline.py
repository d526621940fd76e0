"""`run(cfg)`: read the inputs, compute the tables, draw the figures, write everything at once.

Everything that can fail on bad input (reading, validating, computing) happens before the first file is
written, and each file is written atomically, so a failed report leaves no half-written output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from bench.report import claims, plots, tables, write
from bench.report.load import ReportInputError, Runs, load_runs

__all__ = ["CONF_DIR", "PAPER_NUMBERS", "compose_report_config", "run"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PAPER_NUMBERS = Path(__file__).resolve().parent / "paper_numbers.yaml"
_SOURCES = ("files", "wandb")
_COSTS = ("compute", "wall_time_s", "epochs")


def compose_report_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose bench/conf/report.yaml with Hydra overrides, as `python -m bench.report` does (for tests and scripts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="report", overrides=list(overrides or []))


def _inputs(cfg: DictConfig) -> list[str]:
    raw = cfg.get("input")
    if OmegaConf.is_missing(cfg, "input") or raw is None:
        raise ReportInputError("`input` must name a result directory (input=DIR), but got nothing")
    items = list(raw) if isinstance(raw, (ListConfig, list, tuple)) else [raw]
    return [str(i) for i in items]


def validate(cfg: DictConfig) -> None:
    """Check the report's own options before reading anything."""
    if cfg.source not in _SOURCES:
        raise ReportInputError(f"`source` must be one of {', '.join(_SOURCES)}, but got {cfg.source}")
    if not 0.0 < float(cfg.confidence) < 1.0:
        raise ReportInputError(f"`confidence` must be in (0, 1), but got {cfg.confidence}")
    if int(cfg.n_bootstrap) < 1:
        raise ReportInputError(f"`n_bootstrap` must be >= 1, but got {cfg.n_bootstrap}")
    if not float(cfg.robustness.tolerance) >= 0.0:
        raise ReportInputError(f"`robustness.tolerance` must be >= 0, but got {cfg.robustness.tolerance}")
    for t in cfg.robustness.get("profile_absolute") or []:
        if not float(t) >= 0.0:
            raise ReportInputError(f"`robustness.profile_absolute` must hold numbers >= 0, but got {t}")
    for f in cfg.robustness.get("profile_relative") or []:
        if not float(f) >= 1.0:
            raise ReportInputError(f"`robustness.profile_relative` must hold factors >= 1, but got {f}")
    if cfg.get("interval", "t") not in ("t", "bootstrap"):
        raise ReportInputError(f"`interval` must be t or bootstrap, but got {cfg.interval}")
    if cfg.tuning_cost not in _COSTS:
        raise ReportInputError(f"`tuning_cost` must be one of {', '.join(_COSTS)}, but got {cfg.tuning_cost}")
    if _logger_name(cfg) not in ("none", "wandb"):
        raise ReportInputError(f"`logger` must be none or wandb, but got {_logger_name(cfg)}")


def _logger_name(cfg: DictConfig) -> str:
    logger = cfg.get("logger")
    if logger is None or isinstance(logger, str):
        return str(logger or "none")
    return str(logger.get("name", "wandb" if logger.get("project") else "none"))


def _experiment(cfg: DictConfig, runs: Runs, paper: dict[str, Any]) -> str | None:
    """The paper preset the runs reproduce: `paper=NAME`, or found in the runs' Hydra overrides with `auto`."""
    if cfg.paper in (None, "none"):
        return None
    if cfg.paper != "auto":
        if cfg.paper not in paper["experiments"]:
            known = ", ".join(sorted(paper["experiments"]))
            raise ReportInputError(f"`paper` must be auto, none or one of {known}, but got {cfg.paper}")
        return str(cfg.paper)
    found = set(runs.table["experiment"].dropna().unique())
    if not found:
        return None
    # One experiment of the paper can be several presets (CIFAR-10: towers, fixed baseline, step decay).
    for name, entry in paper["experiments"].items():
        if found <= set(entry.get("presets") or [name]):
            return str(name)
    return found.pop() if len(found) == 1 else None


def _read_history(run_dir: str) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "history.csv")


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Write summary.csv, sensitivity.png/.svg, tuning_curve.png, trajectories.png and report.md.

    `output_dir` (or `cfg.output_dir`) defaults to Hydra's run directory. Returns the paths written, the
    summary table and `environments`: a note when the runs come from several environments (else None). Raises
    ReportInputError (one line, naming the directory) on bad input, before writing.
    """
    validate(cfg)
    inputs = _inputs(cfg)
    if cfg.source == "wandb":
        from bench.report.wandb_source import load_wandb_runs

        runs = load_wandb_runs(inputs)
    else:
        runs = load_runs(inputs, progress=bool(cfg.progress))
    if cfg.tuning_cost == "compute":
        _add_compute(runs, inputs, cfg.get("calibration_cache"))
    confidence, n_resamples = float(cfg.confidence), int(cfg.n_bootstrap)
    tolerance = float(cfg.robustness.tolerance)

    summary = tables.summarize(runs, confidence, n_resamples, int(cfg.seed), str(cfg.get("interval", "t")))
    curves = tables.tuning_curves(runs)
    reference = tables.reference_error(summary)
    robust = tables.robustness(summary, reference, tolerance)
    profile = tables.robustness_profile(
        summary,
        [float(t) for t in cfg.robustness.get("profile_absolute") or []],
        [float(f) for f in cfg.robustness.get("profile_relative") or []],
    )
    paper = tables.load_paper_numbers(cfg.paper_numbers or PAPER_NUMBERS)
    experiment = _experiment(cfg, runs, paper)
    summary = claims.attach_paper(summary, paper, experiment)
    comparison = tables.paper_comparison(summary, paper, experiment) if experiment else None
    claims_table = claims_detail = None
    answer = None
    paper_rows = (paper["experiments"].get(experiment) or {}).get("rows") if experiment else None
    # The claims table tests Table 1's claims; other experiments have none it could test.
    if paper_rows and (paper["experiments"][experiment].get("claims") == "table_1"):
        claims_table, claims_detail = claims.claims(
            runs.table, paper_rows, robust, float(cfg.get("alpha", 0.05)), profile=profile
        )
        finals = runs.table[runs.table["role"] == "run"]
        n_seeds = finals.groupby("method")["seed"].nunique()
        answer = claims.answer(
            summary,
            claims_table,
            str(runs.table["dataset"].iloc[0]),
            float(finals["epochs"].mean()),
            f"{n_seeds.min()}" if n_seeds.min() == n_seeds.max() else f"{n_seeds.min()}-{n_seeds.max()}",
        )
    paper_meta = None
    if comparison is not None:
        paper_meta = {"source": paper.get("source"), "note": paper["experiments"][experiment].get("note")}

    paper_curve = (
        tables.paper_height_curve_points(paper["experiments"][experiment]) if experiment in paper["experiments"] else []
    )
    styles = plots.method_styles(list(dict.fromkeys(summary["method"])))
    context = _context(runs)
    cost = f"cost_{cfg.tuning_cost}"
    figures = {
        "sensitivity": plots.sensitivity_figure(
            summary, styles, reference, tolerance, confidence, context, runs.table, paper_curve
        ),
        "tuning_curve": plots.tuning_curve_figure(summary, curves, styles, cost, context, runs.table),
        "paper_vs_ours": plots.paper_figure(comparison, runs.table, confidence, context),
        "trajectories": plots.trajectories_figure(
            plots.select_trajectory_runs(runs.table, int(cfg.trajectories.per_method)), styles, _read_history, context
        ),
    }

    out = Path(output_dir or cfg.output_dir or _hydra_output_dir())
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        for suffix in (".svg", ".pdf", ".png"):
            fig_path = out / f"{name}{suffix}"
            plots.save_figure(fig, fig_path, close=suffix == ".png")
            written[fig_path.name] = fig_path
    write.write_summary_csv(summary, out / "summary.csv")
    written["summary.csv"] = out / "summary.csv"
    environments = write.environments_note(runs.table)
    report = write.render_report(
        inputs=inputs,
        runs=runs.table,
        summary=summary,
        robustness=robust,
        profile=profile,
        reference=reference,
        tolerance=tolerance,
        confidence=confidence,
        n_resamples=n_resamples,
        curves=curves,
        studies=runs.studies,
        figures=[n for n in written if n.endswith(".png")],
        paper=comparison,
        paper_meta=paper_meta,
        experiment=experiment,
        answer=answer,
        claims=claims_table,
        claims_detail=claims_detail,
        unusable=runs.unusable,
        interval=str(cfg.get("interval", "t")),
        environments=environments,
    )
    write.write_text(out / "report.md", report)
    written["report.md"] = out / "report.md"

    if _logger_name(cfg) == "wandb":
        from bench.report.wandb_log import log_report

        groups = runs.table["group"].dropna().unique()
        group = cfg.logger.get("group") or (str(groups[0]) if len(groups) == 1 else None)
        logged = {"summary": summary, "robustness": robust, "robustness_profile": profile, "tuning_curves": curves}
        log_report(cfg.logger, out, group, logged, written)
    n_miss = int(runs.table["miss"].sum())
    return {
        "output_dir": out,
        "files": written,
        "summary": summary,
        "robustness": robust,
        "robustness_profile": profile,
        "n_runs": len(runs.table),
        "n_diverged": n_miss,
        "environments": environments,
        "reference": None if reference is None or math.isnan(reference.error) else reference,
    }


def _add_compute(runs: Runs, inputs: list[str], cache: str | None) -> None:
    """runs.table["compute"]: steps x batch size x the optimizer's calibrated step cost (bench.calibrate), never
    wall time. A run whose optimizer could not be calibrated (no composed config on disk) counts cost 1."""
    from bench.calibrate import calibrate, relative_cost

    costs: dict[str, float] = {}
    for raw in inputs:
        costs.update(calibrate(raw, cache))
    table = runs.table
    batch = pd.to_numeric(table["batch_size"], errors="coerce").fillna(1.0)
    weight = table["optimizer"].map(lambda o: relative_cost(costs, o))
    table["compute"] = table["steps"].astype(float) * batch * weight


def _context(runs: Runs) -> str:
    """A figure title naming the task: dataset, model, epochs and the hyper-step sizes of the towers."""
    table = runs.table
    epochs = table["planned_epochs"].dropna().unique() if "planned_epochs" in table else []
    epochs = epochs if len(epochs) else table["epochs"].dropna().unique()
    hyper = set()
    for spec in table.loc[table["family"] == "tower", "optimizer"].unique():
        for level in str(spec).split("/")[1:]:
            hyper.add(level.strip())
    parts = [f"{table['dataset'].iloc[0]}, {table['model'].iloc[0]}"]
    if len(epochs):
        plural = "s" * (len(epochs) > 1 or float(epochs[0]) != 1)
        parts.append(f"{', '.join(f'{float(e):g}' for e in sorted(epochs))} epoch{plural}")
    if hyper:
        shown = sorted(hyper)
        parts.append("hyper levels " + ", ".join(shown[:4]) + (f" (+{len(shown) - 4} more)" if len(shown) > 4 else ""))
    return "; ".join(parts)


def _hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ReportInputError("`output_dir` must be set when the report runs outside a Hydra app, but got null")
    return HydraConfig.get().runtime.output_dir
