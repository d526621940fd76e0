"""Issue 14's report from a stability grid (scripts/stability_grid.py's JSON lines or a sweep of the preset).

    python scripts/stability_report.py RESULTS [RESULTS ...] OUT_DIR [--dataset NAME] [--bases B,B]
        [--tuned STUDY_SUMMARY.json] [--title TEXT]

RESULTS are JSON-lines files, folders of them, or Hydra sweep directories of the `experiment=stability` preset
(`python -m bench -m experiment=stability ...`, any launcher: a folder holding `multirun.yaml`). A folder of JSON lines
stands for every `*.jsonl` in it; a sweep stands for its jobs, each read from its `metrics.json` and
`.hydra/overrides.yaml` into the grid's row and key (a job of the preset and the same run of scripts/stability_grid.py
are one run here), and a sweep with a job that has not finished is refused in one line. Files are read in the order
given (a file named twice is read at its last place), and a run's row in a later file replaces the row with the same key
(dataset, overrides, base, height, mode, initial step size, top hyper-step, seed) from an earlier one:
`docs/data/stability docs/data/stability/NEW.jsonl` reads NEW last, so its rows win. Two files of one folder with
different results for the same run are refused (only their names would order them); identical copies are one run.
stability.md lists, per base, mode and height, the files its rows came from, how many earlier rows with a
different result were replaced, and the environments (torch version, device, threads) its rows ran in, so a rerun
that covered only part of a grid is visible. One report is one dataset:
results that hold several need `--dataset`, and `--tuned` must be a study on the report's dataset and model.

Writes OUT_DIR/stability.png (test error against the initial step size, one line per height; one column per top
hyper-step; one row per base and mode, a base's reference row above its stable row; the mean over seeds) and
OUT_DIR/stability.md: failed runs per mode and height, the decades of initial step size over which each height stays
within 1 point of the base's best fixed-hyperparameter run per top hyper-step, the decades of top hyper-step over
which that reaches 8 (`hyper_decades`), the height-3 cells behind them, and the baselines (the grid's `baselines` part
and an Optuna study's `study_summary.json`) beside the stable towers, with their compute.

Decades of initial step size are counted over the grid's consecutive initial step sizes (the towers part runs every
second decade, 1e-11..10), as the grid measures them; decades of top hyper-step only over measured decades (see
`hyper_decades`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from bench.schema import (
    STABILITY_GRID_KEYS,
    STABILITY_MOMENTUM,
    STABILITY_ROW_FIELDS,
    environment_label,
    environments_counted,
    stability_key,
)

TOLERANCE = 1e-3  # how far above the initial training loss a run may end before it counts as failed
POINT = 0.01  # the goal's "within 1 point" of test error
WINDOW = (1e-11, 1e-3)  # the comparison's 8 decades of initial step size: where no tuning would start
TOP = 30.0  # the figure's y range in %: the goal is about a few points near the best run, not 80% against 90%


DEFAULT_DATASET = "mnist5k"  # the stability preset's dataset: its runs carry no `dataset=` override
DEFAULT_MODEL = "mlp"  # the stability preset's model: its runs carry no `model=` override


def inputs(paths: Sequence[Path]) -> list[tuple[Path, int]]:
    """The files to read, in reading order, each with its place on the command line: a folder is its `*.jsonl` files
    in name order, all at the folder's place; a file met twice is read at its last place (so `FOLDER FOLDER/NEW.jsonl`
    reads NEW last, at a place of its own)."""
    files: list[tuple[Path, int]] = []
    for place, path in enumerate(paths):
        sweep = path.is_dir() and (path / "multirun.yaml").is_file()
        found = [path] if sweep else sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if path.is_dir() and not found:
            raise ValueError(
                f"results {str(path)!r} must hold *.jsonl files or be a Hydra sweep directory (with multirun.yaml), "
                "but it is neither"
            )
        if not path.is_dir() and not path.is_file():
            raise ValueError(f"results must be existing files or folders, but got {str(path)!r}")
        for f in found:
            files = [(g, q) for g, q in files if g.resolve() != f.resolve()] + [(f, place)]
    return files


def _dataset(extra: list[str]) -> str:
    return next((e.split("=", 1)[1] for e in extra if e.startswith("dataset=")), DEFAULT_DATASET)


def _model(extra: list[str]) -> str:
    return next((e.split("=", 1)[1] for e in extra if e.startswith("model=")), DEFAULT_MODEL)


# What a run measured; its wall time is not part of it (the same run twice takes different times).
RESULT = ("status", "diverged", "test_error", "train_loss", "steps", "hyperparameters", "error")

# What a sweep job's metrics.json config must give for its grid cell.
CELL_KEYS = ("optimizer.base", "optimizer.height", "optimizer.lr", "optimizer.hyper_lr", "optimizer.stable", "seed")


def sweep_rows(sweep: Path) -> list[dict]:
    """The grid's rows for the jobs of a Hydra sweep of the `experiment=stability` preset (see the module docstring).
    Refused in one line (ValueError): a job without metrics.json, a job that did not run the preset, one whose
    optimizer is not a tower, or an SGD momentum other than the grid's 0.9."""
    jobs = sorted(p.parent.parent for p in sweep.glob("**/.hydra/overrides.yaml"))
    unfinished = [j for j in jobs if not (j / "metrics.json").is_file()]
    if not jobs or unfinished:
        raise ValueError(
            f"sweep {str(sweep)!r}: {len(unfinished)} of {len(jobs)} jobs have no metrics.json"
            + (f" (first: {str(unfinished[0])!r})" if unfinished else "")
            + ": a job still running or stopped before its end has no result yet; run the sweep again (finished "
            "runs are skipped) and report it when every job has finished"
        )
    rows = []
    for job in jobs:
        overrides = [str(o) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []]
        if "experiment=stability" not in {o.lstrip("+") for o in overrides}:
            raise ValueError(
                f"sweep job {str(job)!r} must have run experiment=stability (the grid's settings), but its overrides "
                f"are {overrides}"
            )
        m = json.loads((job / "metrics.json").read_text())
        cfg = m.get("config") or {}
        missing = [k for k in ("optimizer.name", *CELL_KEYS) if k not in cfg]
        if missing:
            raise ValueError(f"sweep job {str(job)!r}: its metrics.json's config must name {missing}, but it does not")
        if cfg.get("optimizer.name") != "tower":
            raise ValueError(
                f"sweep job {str(job)!r}: optimizer must be the preset's tower, but got {cfg.get('optimizer.name')!r} "
                "(the baselines: scripts/stability_grid.py --part baselines)"
            )
        base, momentum = cfg["optimizer.base"], cfg.get("optimizer.momentum") or 0.0
        if base == "sgd" and momentum:
            if momentum != STABILITY_MOMENTUM:
                raise ValueError(
                    f"sweep job {str(job)!r}: optimizer.momentum must be {STABILITY_MOMENTUM} (the grid's momentum "
                    f"base) or 0, but got {momentum!r}"
                )
            base = "momentum"
        c = dict(base=base, height=int(cfg["optimizer.height"]), lr=_k(float(cfg["optimizer.lr"])),
                 hyper_lr=_k(float(cfg["optimizer.hyper_lr"])), stable=bool(cfg["optimizer.stable"]),
                 seed=int(cfg["seed"]))  # fmt: skip
        extra = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in STABILITY_GRID_KEYS]
        result = {f: m.get(f) for f in STABILITY_ROW_FIELDS}
        rows.append({"key": stability_key(c, extra), **c, "extra": extra, **result})
    return rows


def load(paths: Sequence[Path], dataset: str | None = None, bases: Sequence[str] | None = None) -> pd.DataFrame:
    """Every run of ``paths`` (see `inputs`), a later file's row replacing an earlier one's with the same key; the
    columns `source` (the file a row was kept from) and `replaced` (the file whose different result it replaced).
    Two files of one folder that hold different results for one run are refused: only their names would order them,
    and a name says nothing about which result is the newer."""
    rows: dict[str, dict] = {}
    found: set[str] = set()
    for f, place in inputs(paths):
        lines = sweep_rows(f) if f.is_dir() else [json.loads(t) for t in f.read_text().splitlines() if t.strip()]
        for r in lines:
            found.add(_dataset(r["extra"]))
            if dataset is not None and _dataset(r["extra"]) != dataset:
                continue  # another dataset's runs neither count nor conflict
            old = rows.get(r["key"])
            if old is not None and old["source"] == f.name:
                continue  # the grid never writes a key twice to one file; a hand-made repeat keeps the first
            changed = old is not None and any(old.get(k) != r.get(k) for k in RESULT)
            if changed and old["place"] == place:
                raise ValueError(
                    f"run {r['key']!r} has different results in {old['source']} and {f.name}, which only their names "
                    "order: name the file whose rows should win after the folder (FOLDER FOLDER/FILE.jsonl)"
                )
            rows[r["key"]] = {**r, "source": f.name, "place": place, "replaced": old["source"] if changed else None}
    if dataset is None and len(found) > 1:
        raise ValueError(f"the results hold runs on datasets {sorted(found)}: pass --dataset with one of them")
    if dataset is not None and dataset not in found:
        raise ValueError(f"--dataset must be one of {sorted(found)} (the datasets in the results), but got {dataset!r}")
    df = pd.DataFrame(list(rows.values()))
    df["dataset"] = df["extra"].map(_dataset)
    settings = sorted({" ".join(e) for e in df["extra"]})
    if len(settings) > 1:
        raise ValueError(f"the results mix runs with different overrides {settings}: report one setting at a time")
    if bases is not None:
        unknown = sorted(set(bases) - set(df["base"]))
        if unknown:
            raise ValueError(f"--bases must name bases in the results {sorted(set(df['base']))}, but got {unknown}")
        df = df[df["base"].isin(bases)]
    df = df.reset_index(drop=True)
    df["lr"] = pd.to_numeric(df["lr"], errors="coerce")
    df["hyper_lr"] = pd.to_numeric(df["hyper_lr"], errors="coerce")
    df["mode"] = df["stable"].map({True: "stable", False: "reference"})
    # rows written before the grid recorded its environment (during the eleventh round) have none
    recorded = df["environment"] if "environment" in df else pd.Series([None] * len(df), index=df.index)
    df["environment"] = recorded.map(lambda e: environment_label(e) if isinstance(e, dict) else "not recorded")
    df["test_error"] = pd.to_numeric(df["test_error"], errors="coerce")
    loss = pd.to_numeric(df["train_loss"], errors="coerce")
    towers = df["height"].notna()
    # The initial training loss: every run of a base and seed starts from the same seeded network, and the height-0
    # run at the grid's smallest step size barely moves it (1e-11 for 30 epochs), so its final loss stands for it.
    h0 = df[df["height"] == 0].sort_values("lr").groupby(["base", "seed"]).first()
    initial = pd.Series(
        [h0["train_loss"].get((b, s), math.nan) for b, s in zip(df["base"], df["seed"], strict=True)], index=df.index
    )
    initial = pd.to_numeric(initial, errors="coerce")
    # A run fails when it diverged, crashed, or ended above the loss it started from.
    df["failed"] = (df["status"] != "completed") | loss.isna() | (towers & (loss > initial + TOLERANCE))
    return df


def cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per grid cell (seeds pooled): mean test error, and failed when any of its seeds failed."""
    keys = ["mode", "base", "height", "hyper_lr", "lr"]
    g = df[df["height"].notna()].fillna({"hyper_lr": 0.0}).groupby(keys, dropna=False)
    return g.agg(test_error=("test_error", "mean"), failed=("failed", "any"), seeds=("seed", "nunique")).reset_index()


def decades(group: pd.DataFrame, target: float) -> float:
    """Widest run of consecutive grid step sizes within 1 point of ``target``, in decades (-1: none, 0: one)."""
    ok = group.sort_values("lr")
    best, start = -1.0, None
    for lr, err, failed in zip(ok["lr"], ok["test_error"], ok["failed"], strict=True):
        if not failed and not math.isnan(err) and err <= target + POINT + 1e-9:  # 1e-9: 0.09 + 0.01 > 0.1 in floats
            start = lr if start is None else start
            best = max(best, math.log10(lr / start))
        else:
            start = None
    return best


def _k(k: float) -> str:
    """A hyper-step as the grid names it: 1e-4, not 0.0001 or 1.000000e-04."""
    e = round(math.log10(k)) if k > 0 else 0
    return f"1e{e}" if k > 0 and math.isclose(k, 10.0**e) else f"{k:g}"


def _block(text: str) -> str:
    return f"```\n{text}\n```"


def robustness(c: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    # The best fixed run is the base alone in the reference mode; a stable height-0 run is the guarded base.
    fixed = c[(c["height"] == 0) & (c["mode"] == "reference") & ~c["failed"]]
    best = fixed.groupby("base")["test_error"].min()
    rows = []
    for (mode, base, height, k), g in c[c["height"] > 0].groupby(["mode", "base", "height", "hyper_lr"]):
        rows.append(dict(mode=mode, base=base, height=int(height), hyper_lr=k, decades=decades(g, best.get(base, 0.0))))
    return best, pd.DataFrame(rows)


def hyper_decades(robust: pd.DataFrame, need: float = 8.0) -> pd.DataFrame:
    """Per mode, base and height, how many decades of top hyper-step keep the initial step size robust over at least
    ``need`` decades (-1: at no hyper-step).

    ``hyper_decades`` is the goal's measure: the longest run of measured hyper-steps one decade apart (1e-10, 1e-9,
    ...) that each meet ``need``; a decade is counted only where it was measured, so hyper-steps 1e-10 and 1e-7 that
    both meet, with 1e-9 and 1e-8 not run, count 0 decades each, not 3. ``hyper_span`` is the coarse reading of the
    same cells: the widest span of consecutive *measured* hyper-steps that each meet, however far apart, which the
    unmeasured decades between them could only shorten (an upper bound on the goal's measure)."""
    rows = []
    for (mode, base, height), g in robust.groupby(["mode", "base", "height"]):
        g = g.sort_values("hyper_lr")
        strict = span = -1.0
        run = gap = None  # the first hyper-step of the current run, decade by decade and grid step by grid step
        prev = None
        for k, d in zip(g["hyper_lr"], g["decades"], strict=True):
            if d >= need:
                next_decade = prev is not None and math.isclose(math.log10(k / prev), 1.0, abs_tol=1e-6)
                run = run if run is not None and next_decade else k
                gap = gap if gap is not None else k
                strict = max(strict, math.log10(k / run))
                span = max(span, math.log10(k / gap))
            else:
                run = gap = None
            prev = k
        rows.append(dict(mode=mode, base=base, height=height, hyper_decades=strict, hyper_span=span))
    return pd.DataFrame(rows)


def comparison(df: pd.DataFrame, c: pd.DataFrame, tuned: Path | None) -> pd.DataFrame:
    rows = []
    for name, g in df[df["height"].isna()].groupby("base"):
        rows.append(
            dict(
                method=name + (" (1e-3, untuned)" if name == "adam" else ""),
                test_error=g["test_error"].mean(),
                std=g["test_error"].std(),
                seeds=len(g),
                compute_s=g["wall_time_s"].mean(),
                compute_steps=g["steps"].mean(),
                note="one run",
            )
        )
    if tuned is not None:
        s = json.loads(tuned.read_text())
        errs = [r["test_error"] for r in s["reruns"]]
        rows.append(
            dict(
                method="adam, Optuna-tuned",
                test_error=sum(errs) / len(errs),
                std=pd.Series(errs).std(),
                seeds=len(errs),
                compute_s=s["total_wall_time_s"],
                compute_steps=s["total_steps"],
                note=f"{s['n_trials']} trials + {len(errs)} reruns, {s['total_epochs']} epochs in all",
            )
        )
    # Stable height-3 towers, untuned: any initial step size in the 8 decades 1e-11..1e-3, one run each.
    towers = df[(df["height"] == 3) & (df["mode"] == "stable") & df["lr"].between(*WINDOW)]
    for (base, k), g in towers.groupby(["base", "hyper_lr"]):
        per_lr = g.groupby("lr")["test_error"].mean()
        rows.append(
            dict(
                method=f"stable {base}/sgd({k:g})x3",
                test_error=per_lr.mean(),
                std=g["test_error"].std(),
                seeds=g["seed"].nunique(),
                compute_s=g["wall_time_s"].mean(),
                compute_steps=g["steps"].mean(),
                note=f"one run; mean over initial step sizes {WINDOW[0]:g}..{WINDOW[1]:g}, worst {per_lr.max():.3f}",
            )
        )
    out = pd.DataFrame(rows)
    if tuned is not None:
        # The goal's "fraction of the tuned baseline's total compute": every trial and rerun of the study against
        # one run, in wall seconds (noisy on a shared machine) and in training steps (a tower's step costs more).
        total = out[out["method"] == "adam, Optuna-tuned"].iloc[0]
        out["of_tuned_s"] = out["compute_s"] / total["compute_s"]
        out["of_tuned_steps"] = out["compute_steps"] / total["compute_steps"]
    return out


def sources(df: pd.DataFrame) -> pd.DataFrame:
    """Per base, mode and height: the files its rows were kept from (rows each) and how many of them replaced an
    earlier file's different result for the same run."""
    d = df.assign(height=df["height"].map(lambda h: "baseline" if pd.isna(h) else str(int(h))))
    d = d.assign(mode=d["mode"].where(d["height"] != "baseline", "-"))
    rows = []
    for (base, mode, height), g in d.groupby(["base", "mode", "height"], sort=True):
        counts = g["source"].value_counts()
        rows.append(
            dict(
                base=base,
                mode=mode,
                height=height,
                runs=len(g),
                files=", ".join(f"{f} ({n})" for f, n in counts.sort_index().items()),
                replaced=int(g["replaced"].notna().sum()),
                environments=", ".join(f"{e} ({n})" for e, n in g["environment"].value_counts().sort_index().items()),
            )
        )
    return pd.DataFrame(rows)


def environments_note(df: pd.DataFrame) -> str | None:
    """One paragraph when the rows come from more than one environment (torch version, device, thread count, or
    none recorded); None when they share one. Their results then differ by round-off that 30 epochs amplify."""
    if (counted := environments_counted(df["environment"])) is None:
        return None
    return (
        f"These rows come from {counted[0]} environments: {counted[1]}. Training amplifies their different round-off "
        "far beyond it (a rerun's test error can move by a few test examples, and a decade count near its threshold "
        "by a cell), so compare cells of one environment where a conclusion rests on a small difference; the "
        "`environments` column above says which rows each cell has."
    )


def tables(df: pd.DataFrame, tuned: Path | None) -> str:
    c = cells(df)
    runs = df[(df["height"] > 0) | ((df["height"] == 0) & (df["mode"] == "stable"))]  # stable height 0: guarded
    runs = runs.assign(diverged=runs["status"] == "diverged", height=runs["height"].astype(int))
    fails = runs.groupby(["mode", "height"]).agg(
        runs=("failed", "size"), failed=("failed", "sum"), diverged=("diverged", "sum")
    )
    fails = pd.concat([fails, runs.groupby("mode").agg(runs=("failed", "size"), failed=("failed", "sum"),
                                                       diverged=("diverged", "sum")).assign(height="all")
                       .set_index("height", append=True)]).sort_index()  # fmt: skip
    lines = [
        f"Dataset {df['dataset'].iloc[0]}; {len(df)} runs. Where the rows came from (files read in order, a later "
        "file's row replacing an earlier one's with the same key; replaced: rows whose earlier result differed):",
        "",
        _block(sources(df).to_string(index=False)),
        "",
        *([note, ""] if (note := environments_note(df)) else []),
        "## Failed runs (diverged, crashed, or final training loss above the initial one; diverged: of them, the "
        "trainer's own divergence stop), all seeds",
        "",
        _block(fails.to_string()),
    ]
    per_base = runs.groupby(["mode", "base", "height"])["failed"].agg(["sum", "count"])
    per_base = (per_base["sum"].astype(int).astype(str) + "/" + per_base["count"].astype(str)).unstack("height")
    lines += ["", "Per base (failed/runs, by height):", "", _block(per_base.fillna("").to_string())]
    failed = runs[runs["failed"]]
    if not failed.empty:
        where = failed.groupby(["mode", "base", "lr"])["key"].count().rename("failed runs").reset_index()
        lines += [
            "",
            "Where they failed (all heights, hyper-steps and seeds):",
            "",
            _block(where.to_string(index=False)),
        ]
    fixed = df[(df["height"] == 0) & df["failed"]]
    if not fixed.empty:
        lines += ["", "Height 0 (no tower) at the same step sizes:", ""]
        lines += [_block(fixed.groupby(["base", "lr"])["key"].count().rename("failed runs").to_string())]
    best, robust = robustness(c)
    lines += ["", "## Best fixed-hyperparameter test error per base (height 0, mean over seeds, every decade)", ""]
    lines += [_block(best.to_frame("best error").to_string())]
    if not robust.empty:
        pivot = robust.pivot_table(index=["base", "height"], columns=["mode", "hyper_lr"], values="decades")
        lines += ["", "## Decades of initial step size within 1 point of the best fixed run (-1: none)", ""]
        pivot = pivot.rename(columns=lambda v: _k(v) if isinstance(v, float) else v)  # 1e-10, not 1.000000e-10
        lines += [_block(pivot.round(0).to_string())]
        hd = hyper_decades(robust).pivot_table(
            index=["base", "height"], columns="mode", values=["hyper_decades", "hyper_span"]
        )
        lines += [
            "",
            "## Decades of top hyper-step over which the initial step size is robust over >= 8 decades",
            "",
            "hyper_decades: the longest run of measured hyper-steps one decade apart that each reach 8 decades (the "
            "goal's measure; an unmeasured decade breaks the run); hyper_span: the widest span of consecutive measured "
            "hyper-steps that each reach 8 decades, however far apart (an upper bound). -1: at none.",
            "",
        ]
        lines += [_block(hd.to_string())]
    h3 = c[c["height"] == 3]
    if not h3.empty:
        # The cells behind the decades: which initial step size breaks a run, and by how much.
        lines += ["", "## Height 3: test error per cell (%, mean over seeds; * : a seed failed)", ""]
        for (mode, base), g in h3.groupby(["mode", "base"]):
            text = (100 * g["test_error"]).round(1).astype(str) + g["failed"].map({True: "*", False: ""})
            table = g.assign(cell=text, k=g["hyper_lr"].map(_k), lr=g["lr"].map(_k))
            table = table.pivot(index="lr", columns="k", values="cell")
            table = table.loc[sorted(table.index, key=float), sorted(table.columns, key=float)]
            lines += [
                f"{base}, {mode} (best fixed {100 * best.get(base, math.nan):.1f}%):",
                "",
                _block(table.to_string()),
            ]
    comp = comparison(df, c, tuned)
    if not comp.empty:
        lines += [
            "",
            "## Baselines and stable towers (test error, mean over seeds; compute per run or study, in wall seconds "
            "and training steps)",
            "",
        ]
        lines += [_block(comp.round(4).to_string(index=False))]
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cells(df)
    best, _ = robustness(c)
    towers = c[c["height"] > 0]
    ks = sorted(towers["hyper_lr"].unique())
    # One row per base and mode that has towers (the reference and the stable row of a base one above the other),
    # one column per top hyper-step: a grid with many hyper-steps stays as wide as it has hyper-steps.
    rows = [
        (base, mode)
        for base in dict.fromkeys(df.loc[df["height"].notna(), "base"])
        for mode in ("reference", "stable")
        if ((towers["base"] == base) & (towers["mode"] == mode)).any()
    ]
    fig, axes = plt.subplots(
        len(rows),
        len(ks),
        figsize=(max(2.2 * len(ks) + 1.0, 8.0), 2.0 * len(rows) + 0.9),  # the title beside the legend: >= 8 in
        squeeze=False,
        layout="constrained",
    )
    for r, (base, mode) in enumerate(rows):
        fixed = c[(c["base"] == base) & (c["height"] == 0) & (c["mode"] == "reference")].sort_values("lr")
        for col, k in enumerate(ks):
            ax = axes[r][col]
            ax.plot(fixed["lr"], (100 * fixed["test_error"]).clip(upper=TOP), "k--", lw=1, label="height 0")
            if base in best:  # the goal's band: within 1 point of the best fixed run
                ax.axhline(100 * (best[base] + POINT), color="grey", lw=0.6, ls=":")
            sel = towers[(towers["base"] == base) & (towers["hyper_lr"] == k) & (towers["mode"] == mode)]
            for h, g in sel.groupby("height"):
                g = g.sort_values("lr")
                err = [min(100 * e, TOP) if not f else TOP for e, f in zip(g["test_error"], g["failed"], strict=True)]
                ax.plot(g["lr"], err, marker="o", ms=3, color=f"C{int(h) - 1}", label=f"height {int(h)}")
            if sel.empty:
                ax.text(
                    0.5,
                    0.5,
                    "not run",
                    transform=ax.transAxes,
                    ha="center",
                    fontsize=7,
                    color="grey",
                    backgroundcolor="white",
                )
            ax.set_xscale("log")
            ax.set_xticks([1e-11, 1e-7, 1e-3, 1e1])  # every fourth decade: a narrow panel's labels stay apart
            ax.minorticks_off()
            ax.set_ylim(0, TOP + 1)
            if r == 0:
                ax.set_title(f"top hyper-step {_k(k)}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{base}, {mode}\ntest error %", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("initial step size", fontsize=8)
            ax.tick_params(labelsize=6)
    # One legend beside the panels, from the panel that draws the most heights: inside a panel it hid data.
    handles, labels = max(axes.flat, key=lambda a: len(a.get_lines())).get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle(
        f"{title}\ntest error vs initial step size, mean over seeds; dotted: best fixed run + 1 point;\n"
        f"errors above {TOP:g}% and failed runs drawn at {TOP:g}%",
        fontsize=9,
    )
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "results", type=Path, nargs="+", help="JSON-lines files, folders of them or sweeps of the preset; later win"
    )
    p.add_argument("out", type=Path)
    p.add_argument("--dataset", default=None, help="the dataset to report (needed when the results hold several)")
    p.add_argument("--bases", default=None, help="comma-separated bases to report (default: all in the results)")
    p.add_argument("--tuned", type=Path, default=None, help="an Optuna study's study_summary.json (bench.tune)")
    p.add_argument("--title", default="stability grid")
    args = p.parse_args(argv)
    if args.tuned is not None and not args.tuned.is_file():
        p.error(f"--tuned must be an existing file, but got {str(args.tuned)!r}")
    try:
        df = load(args.results, args.dataset, args.bases.split(",") if args.bases else None)
    except ValueError as e:
        p.error(str(e))
    if args.tuned is not None:
        # The tuned baseline is compared with the towers' runs: a study on another dataset or model would be read
        # as if it were on theirs.
        study = json.loads(args.tuned.read_text())
        runs = sorted({(_dataset(e), _model(e)) for e in df["extra"]})
        if [(study.get("dataset"), study.get("model"))] != runs:
            p.error(
                f"--tuned must be a study on the report's dataset and model {runs[0] if len(runs) == 1 else runs}, "
                f"but {str(args.tuned)!r} is on {(study.get('dataset'), study.get('model'))}"
            )
    if not (df["height"] > 0).any():
        p.error(
            f"the results must hold tower runs (height >= 1) to report, but bases {sorted(set(df['base']))} have none"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    figure(df, args.out / "stability.png", args.title)
    text = tables(df, args.tuned)
    fd, tmp = tempfile.mkstemp(suffix=".md", dir=args.out)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, args.out / "stability.md")
    print(text)


if __name__ == "__main__":
    main()
