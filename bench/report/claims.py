"""The paper beside us: published numbers attached to summary rows, and the paper's claims tested on our runs.

Each claim of Table 1 is evaluated on the runs at hand with Welch's t-test on the per-seed test errors
(scipy.stats.ttest_ind, equal_var=False, two-sided) at level `alpha`: "holds" when the difference has the
claimed sign and p < alpha, "fails" when it has the opposite sign and p < alpha, "within noise" otherwise,
"not evaluated" when the rows it needs are not among the inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from bench.report.stats import welch

__all__ = ["CLAIM_COLUMNS", "answer", "attach_paper", "claims"]

CLAIM_COLUMNS = ["claim", "verdict", "ours", "paper", "n", "test"]


def _norm(spec: str) -> str:
    from hypergrad import format_spec, parse_spec

    try:
        return format_spec(parse_spec(spec))
    except ValueError:
        return spec


def attach_paper(summary: pd.DataFrame, paper: dict[str, Any], experiment: str | None) -> pd.DataFrame:
    """Fill summary's paper_test_error, paper_test_error_std and paper_row for every row with a published value.

    A tower row matches a published row by its normalized spec; a re-run row by the tower it re-runs
    (`rerun_of`), since our re-runs use the values our towers learned, not the paper's.
    """
    summary = summary.copy()
    entry = (paper.get("experiments") or {}).get(experiment) if experiment else None
    if not entry:
        return summary
    for row in entry.get("rows") or []:
        if "spec" not in row:
            continue
        if row.get("rerun_of"):
            mask = summary["rerun_of"] == _norm(str(row["rerun_of"]))
        else:
            mask = (summary["optimizer"] == _norm(str(row["spec"]))) & summary["rerun_of"].isna() & ~summary["tuned"]
        summary.loc[mask, "paper_test_error"] = row.get("test_error")
        summary.loc[mask, "paper_test_error_std"] = row.get("test_error_std")
        summary.loc[mask, "paper_row"] = f"{entry.get('table', '')}: {row.get('paper_row', row['spec'])}".strip(": ")
    return summary


def _errors(runs: pd.DataFrame, *, optimizer: str | None = None, rerun_of: str | None = None) -> np.ndarray:
    finals = runs[runs["role"] == "run"]
    if rerun_of is not None:
        return finals.loc[finals["rerun_of"] == rerun_of, "test_error"].to_numpy(dtype=float)
    keep = (finals["optimizer"] == optimizer) & finals["rerun_of"].isna()
    return finals.loc[keep, "test_error"].to_numpy(dtype=float)


def _verdict(diff: float, p: float, want_negative: bool, alpha: float) -> str:
    if math.isnan(diff):
        return "not evaluated"
    if math.isnan(p) or p >= alpha:
        return "within noise"
    return "holds" if (diff < 0) == want_negative else "fails"


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _combine(verdicts: list[str]) -> str:
    verdicts = [v for v in verdicts if v != "not evaluated"]
    if not verdicts:
        return "not evaluated"
    if all(v == "holds" for v in verdicts):
        return "holds"
    if any(v == "fails" for v in verdicts):
        return "fails"
    return "within noise"


def _test(n_a: int, n_b: int, alpha: float) -> str:
    return f"Welch t, two-sided, alpha {alpha:g} (n = {n_a} vs {n_b})"


def claims(
    runs: pd.DataFrame,
    paper_rows: list[dict[str, Any]],
    robustness: pd.DataFrame | None = None,
    alpha: float = 0.05,
    profile: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(claims table, per-comparison detail) for Table 1's claims, on the runs at hand.

    `paper_rows` are paper_numbers.yaml's rows of the experiment (specs and published values). The height claim
    reads `profile` (tables.robustness_profile: decades at several tolerances) when it has tolerance columns, else
    `robustness`'s `decades_own` at its one tolerance.
    """
    towers = [r for r in paper_rows if "spec" in r and not r.get("rerun_of")]
    published = {_norm(r["spec"]): r for r in towers}
    detail: list[dict[str, Any]] = []

    def compare(kind: str, a: str, b: str, want_negative: bool, a_err: np.ndarray, b_err: np.ndarray) -> str:
        diff, p = welch(a_err, b_err)
        verdict = _verdict(diff, p, want_negative, alpha)
        detail.append(
            {
                "comparison": kind,
                "a": a,
                "b": b,
                "a_mean": float(a_err.mean()) if a_err.size else math.nan,
                "b_mean": float(b_err.mean()) if b_err.size else math.nan,
                "diff": diff,
                "p": p,
                "n_a": a_err.size,
                "n_b": b_err.size,
                "verdict": verdict,
            }
        )
        return verdict

    rows: list[dict[str, Any]] = []
    # 1. Every hyperoptimized row beats its untuned base (the height-0 row of its section).
    beat = []
    for spec in published:
        base = spec.split("/")[0].replace("[lr]", "")
        if "/" not in spec or base not in published:
            continue
        beat.append(
            compare("beats its base", spec, base, True, _errors(runs, optimizer=spec), _errors(runs, optimizer=base))
        )
    sub = [d for d in detail if d["comparison"] == "beats its base"]
    rows.append(
        {
            "claim": "every hyperoptimized row beats its untuned base",
            "verdict": _combine(beat),
            "ours": f"{sum(v == 'holds' for v in beat)} of {len(beat)} rows lower at p < {alpha:g}; "
            f"{sum(v == 'fails' for v in beat)} higher",
            "paper": "14 of 14 hyperoptimized rows (Table 1)",
            "n": f"{min((d['n_a'] for d in sub), default=0)}-{max((d['n_a'] for d in sub), default=0)} seeds per row",
            "test": f"Welch t per row vs its base, two-sided, alpha {alpha:g}",
        }
    )
    # 2. Any hyperoptimizer on SGD roughly halves SGD's error.
    sgd = _errors(runs, optimizer=_norm("sgd(0.01)"))
    ratios, halves = [], []
    for spec in published:
        if spec.startswith("sgd(") and "/" in spec:
            err = _errors(runs, optimizer=spec)
            if err.size and sgd.size:
                ratios.append(float(err.mean() / sgd.mean()))
                # "Halves": the tower's error is below 60% of SGD's, tested as tower - 0.6 * SGD < 0.
                halves.append(compare("halves SGD", spec, "0.6 x sgd(0.01)", True, err, 0.6 * sgd))
    rows.append(
        {
            "claim": "any hyperoptimizer on SGD roughly halves SGD's error (ratio < 0.6)",
            "verdict": _combine(halves),
            "ours": f"ratio tower/SGD {min(ratios):.2f}-{max(ratios):.2f}" if ratios else "–",
            "paper": "ratio 0.50-0.54 (Table 1)",
            "n": f"{sgd.size} seeds SGD",
            "test": f"Welch t of tower vs 0.6 x SGD, alpha {alpha:g}",
        }
    )
    # 3. Learning beta1 (all of Adam's) helps a little with an SGD top, not with an Adam top.
    for top, paper_text, want in (
        ("sgd(1e-05)", "3.03% vs 3.12%: helps", True),
        ("adam(0.001)", "3.05% vs 3.04%: no help", None),
    ):
        a, b = _norm(f"adam(0.001)/{top}"), _norm(f"adam[lr](0.001)/{top}")
        ea, eb = _errors(runs, optimizer=a), _errors(runs, optimizer=b)
        verdict = compare("learning beta1", a, b, True, ea, eb)
        if want is None:  # the paper claims no difference: within noise is what it predicts
            verdict = {"within noise": "holds", "holds": "fails", "fails": "fails"}.get(verdict, verdict)
        rows.append(
            {
                "claim": f"learning Adam's betas as well as its step size {'helps' if want else 'does not help'}"
                f" with an {'SGD' if top.startswith('sgd') else 'Adam'} top",
                "verdict": verdict,
                "ours": f"{_pct(ea.mean() if ea.size else math.nan)} vs {_pct(eb.mean() if eb.size else math.nan)}",
                "paper": paper_text,
                "n": f"{ea.size} vs {eb.size} seeds",
                "test": _test(ea.size, eb.size, alpha),
            }
        )
    # 4. Re-runs vs towers: better after SGD/Adam and SGD/RMSprop, worse after SGD/SGD.
    agree, n_cmp = 0, 0
    texts = []
    for row in paper_rows:
        if not row.get("rerun_of"):
            continue
        tower = _norm(row["rerun_of"])
        er, et = _errors(runs, rerun_of=tower), _errors(runs, optimizer=tower)
        if not er.size or not et.size:
            continue
        verdict = compare("re-run vs tower", f"re-run of {tower}", tower, True, er, et)
        paper_diff = float(row["test_error"]) - float(published.get(tower, {}).get("test_error", math.nan))
        ours_sign = {"holds": "better", "fails": "worse"}.get(verdict, "same")
        paper_std = float(published.get(tower, {}).get("test_error_std", 0)) + float(row["test_error_std"])
        paper_sign = "same" if abs(paper_diff) <= paper_std else ("better" if paper_diff < 0 else "worse")
        n_cmp += 1
        agree += ours_sign == paper_sign
        if tower.startswith("sgd("):
            texts.append(f"{tower}: {ours_sign} (paper {paper_sign})")
    rows.append(
        {
            "claim": "re-running the base at the learned values can beat the tower (after SGD/Adam, SGD/RMSprop)"
            " or lose to it (after SGD/SGD)",
            "verdict": "not evaluated" if not n_cmp else ("holds" if agree == n_cmp else f"{agree} of {n_cmp} agree"),
            "ours": "; ".join(texts) or "–",
            "paper": "better / worse / same by more than the two stds (Table 1)",
            "n": f"{n_cmp} towers with re-runs",
            "test": f"Welch t re-run vs tower, alpha {alpha:g}; paper's direction from its mean +- std",
        }
    )
    # 5. Taller towers are less sensitive to the initial step size (needs a sensitivity sweep).
    verdict, ours, test = _height_claim(profile, robustness)
    rows.append(
        {
            "claim": "taller towers are less sensitive to the initial step size",
            "verdict": verdict,
            "ours": ours,
            "paper": "height 3 within 13-15% over 8 decades (figure)",
            "n": "grid points per height",
            "test": test,
        }
    )
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS), pd.DataFrame(detail)


def _tolerance_label(name: str) -> str:
    kind, value = name.split("_", 1)
    return f"best + {100 * float(value):g} pt" if kind == "abs" else f"{value} x best"


def _height_claim(profile: pd.DataFrame | None, robustness: pd.DataFrame | None) -> tuple[str, str, str]:
    """(verdict, ours, test) of "taller towers are less sensitive to the initial step size".

    At each tolerance of the profile, a height's score is the most decades of initial step size (contiguous, within
    the tolerance of the method's own best) of any method of that height. The claim holds at a tolerance when the
    score is non-decreasing in height and the tallest beats the shortest. A tolerance at which every height scores
    the same decides nothing (too tight: each height is within it at its best point only; too loose: every height
    covers the whole grid) and is left out; the verdict combines the others.
    """
    if profile is not None and not profile.empty:
        table = profile
        names = [c for c in profile.columns if c.startswith(("abs_", "rel_")) and not c.endswith("_range")]
    else:
        table, names = robustness, []
    if not names and robustness is not None and not robustness.empty and "decades_own" in robustness:
        table = robustness.assign(**{f"abs_{float(robustness['tolerance'].iloc[0]):g}": robustness["decades_own"]})
        names = [f"abs_{float(robustness['tolerance'].iloc[0]):g}"]
    test = "decades within tolerance of own best, non-decreasing in height and tallest > shortest"
    if table is None or table.empty or not names or table["height"].nunique() < 2:
        return "not evaluated", "no sweep over initial step sizes of several heights among the inputs", test
    test = (
        f"{test}, at each tolerance ({', '.join(_tolerance_label(n) for n in names)}; the best method per height);"
        " a tolerance at which every height scores the same decides nothing and is left out"
    )
    parts, held, judged = [], 0, 0
    for name in names:
        by_h = table.groupby("height")[name].max().sort_index()
        scores = ", ".join(f"h{h} {d:g}" for h, d in by_h.items())
        if by_h.nunique(dropna=False) <= 1:
            parts.append(f"{_tolerance_label(name)}: {scores} (every height the same: left out)")
            continue
        judged += 1
        ok = bool(by_h.is_monotonic_increasing and by_h.iloc[-1] > by_h.iloc[0])
        held += ok
        parts.append(f"{_tolerance_label(name)}: {scores} decades ({'holds' if ok else 'fails'})")
    if "grid_mean" in table:
        grid = table.groupby("height")["grid_mean"].min().sort_index()
        parts.append("grid mean " + ", ".join(f"h{h} {_pct(e)}" for h, e in grid.items()))
    if not judged:
        verdict = "no difference at any tolerance"
    elif held == judged:
        verdict = "holds"
    elif held == 0:
        verdict = "fails"
    else:
        verdict = f"holds at {held} of {judged} tolerances"
    return verdict, "; ".join(parts), test


def answer(summary: pd.DataFrame, claims_table: pd.DataFrame, dataset: str, epochs: float, n_seeds: str) -> str:
    """The report's opening paragraph: what the data at hand says about the paper's claims."""
    verdicts = dict(zip(claims_table["claim"], claims_table["verdict"], strict=True))
    held = [c for c, v in verdicts.items() if v == "holds"]
    failed = [c for c, v in verdicts.items() if v == "fails"]
    towers = summary[(summary["family"] == "tower") & (summary["height"] >= 1) & summary["rerun_of"].isna()]
    bases = summary[(summary["family"] == "tower") & (summary["height"] == 0) & summary["rerun_of"].isna()]
    # One epoch or seed is a smoke run's (reproduce_paper.sh --smoke): "1 epoch", not "1 epochs".
    parts = [f"On `{dataset}` ({epochs:g} epoch{'s' * (epochs != 1)}, {n_seeds} seed{'s' * (n_seeds != '1')} per row)"]
    if len(towers) and len(bases):
        parts.append(
            f", the untuned base optimizers end at {_pct(bases['test_error_mean'].min())}-"
            f"{_pct(bases['test_error_mean'].max())} test error and the hyperoptimized towers at"
            f" {_pct(towers['test_error_mean'].min())}-{_pct(towers['test_error_mean'].max())}"
        )
    parts.append(". ")
    parts.append(
        f"Of the paper's {len(verdicts)} claims tested below, {len(held)} hold{'s' if len(held) == 1 else ''}"
        + (f", {len(failed)} fail{'s' if len(failed) == 1 else ''} ({'; '.join(failed)})" if failed else "")
        + ", and the rest are within noise or not evaluated on these inputs."
    )
    paper = summary.dropna(subset=["paper_test_error"])
    if len(paper):
        gap = (paper["test_error_mean"] - paper["paper_test_error"]).to_numpy(dtype=float)
        parts.append(
            f" Against the paper's published values (on its data, which may differ from ours), our rows are"
            f" {100 * float(np.nanmin(gap)):+.2f} to {100 * float(np.nanmax(gap)):+.2f} percentage points off"
            f" ({len(paper)} rows with a published value)."
        )
    return "".join(parts)
