"""Issue 14's report from a stability grid (scripts/stability_grid.py's JSON lines): the figure and the tables.

    python scripts/stability_report.py RESULTS.jsonl OUT_DIR

Writes OUT_DIR/stability.png (test error against the initial step size, one line per height; one column per top
hyper-step, the reference and the stable mode side by side; one row per base) and OUT_DIR/stability.md (failed runs
per mode and height, and the decades of initial step size over which height h stays within 1 point of the base's
best fixed-hyperparameter run, per top hyper-step).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

TOLERANCE = 1e-3  # how far above the initial training loss a run may end before it counts as failed


def load(path: Path) -> pd.DataFrame:
    df = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    df["lr"] = df["lr"].astype(float)
    df["hyper_lr"] = df["hyper_lr"].astype(float)
    df["mode"] = df["stable"].map({True: "stable", False: "reference"})
    loss = pd.to_numeric(df["train_loss"], errors="coerce")
    # The initial training loss: every run of a base starts from the same seeded network, and the height-0 run at the
    # grid's smallest step size barely moves it (8 epochs at 1e-7 change it by < 1e-3), so its loss stands for it.
    h0 = df[df["height"] == 0].sort_values("lr").groupby("base").first()
    initial = df["base"].map(pd.to_numeric(h0["train_loss"], errors="coerce"))
    # A run fails when it diverged, crashed, or ended above the loss it started from.
    df["failed"] = (df["status"] != "completed") | loss.isna() | (loss > initial + TOLERANCE)
    return df


def decades(group: pd.DataFrame, target: float) -> float:
    """Widest run of consecutive grid step sizes within 1 point of ``target``, in decades (0: a single one)."""
    ok = group.sort_values("lr")
    best, start = -1.0, None
    for lr, err, failed in zip(ok["lr"], ok["test_error"], ok["failed"], strict=True):
        good = not failed and err is not None and err <= target + 0.01
        if good:
            start = lr if start is None else start
            best = max(best, math.log10(lr / start))
        else:
            start = None
    return best


def _block(text: str) -> str:
    return f"```\n{text}\n```"


def tables(df: pd.DataFrame) -> str:
    towers = df[df["height"] > 0]
    fails = towers.groupby(["mode", "height"])["failed"].agg(["sum", "count"]).reset_index()
    lines = [
        "## Failed runs (diverged, crashed, or final training loss above the initial one)",
        "",
        _block(fails.to_string(index=False)),
    ]
    best = df[(df["height"] == 0) & ~df["failed"]].groupby("base")["test_error"].min()
    lines += ["", "## Best fixed-hyperparameter test error per base (height 0, over the grid's step sizes)", ""]
    lines += [_block(best.to_frame("best error").to_string())]
    rows = []
    for (mode, base, height, k), g in towers.groupby(["mode", "base", "height", "hyper_lr"]):
        rows.append(dict(mode=mode, base=base, height=height, hyper_lr=k, decades=decades(g, best.get(base, 0.0))))
    robust = pd.DataFrame(rows)
    if not robust.empty:
        pivot = robust.pivot_table(index=["base", "height"], columns=["mode", "hyper_lr"], values="decades")
        lines += ["", "## Decades of initial step size within 1 point of the best fixed run (-1: none)", ""]
        lines += [_block(pivot.round(0).to_string())]
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(df["base"]))
    ks = sorted(df.loc[df["height"] > 0, "hyper_lr"].unique())
    cols = [(k, m) for k in ks for m in ("reference", "stable")]
    fig, axes = plt.subplots(len(bases), len(cols), figsize=(2.2 * len(cols), 2.0 * len(bases)), squeeze=False)
    for r, base in enumerate(bases):
        fixed = df[(df["base"] == base) & (df["height"] == 0)].sort_values("lr")
        for c, (k, mode) in enumerate(cols):
            ax = axes[r][c]
            ax.plot(fixed["lr"], 100 * fixed["test_error"].astype(float), "k--", lw=1, label="height 0")
            sel = df[(df["base"] == base) & (df["hyper_lr"] == k) & (df["mode"] == mode) & (df["height"] > 0)]
            for h, g in sel.groupby("height"):
                g = g.sort_values("lr")
                err = [
                    100 * e if (e is not None and not f) else 100.0
                    for e, f in zip(g["test_error"], g["failed"], strict=True)
                ]
                ax.plot(g["lr"], err, marker="o", ms=3, label=f"height {h}")
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            if r == 0:
                ax.set_title(f"{mode}\ntop hyper-step {k:g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{base}\ntest error %", fontsize=8)
            if r == len(bases) - 1:
                ax.set_xlabel("initial step size", fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Test error vs initial step size (failed runs drawn at 100%)", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(results: Path, out: Path) -> None:
    if not results.is_file():
        print(f"results must be an existing JSON-lines file, but got {str(results)!r}", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    df = load(results)
    figure(df, out / "stability.png")
    text = tables(df)
    fd, tmp = tempfile.mkstemp(suffix=".md", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out / "stability.md")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python scripts/stability_report.py RESULTS.jsonl OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
