"""bench.report: the estimators on hand-computed values, loading result trees, and the written report.

The result directories here are hand-written in the harness's schema (metrics.json, history.csv,
study_summary.json), so each property is checked against numbers chosen to make the answer obvious.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bench.report import ReportInputError, compose_report_config, load_runs, run
from bench.report.stats import bootstrap_ci, expected_best_of_n, robust_range_decades, t_interval
from bench.report.tables import reference_error, robustness, summarize
from tests.harness_helpers import REPO, run_text


def write_run(
    run_dir: Path,
    *,
    method: str = "sgd",
    height: int = 0,
    lr: float | None = 0.01,
    seed: int = 0,
    test_error: float | None = 0.1,
    val_error: float | None = None,
    diverged: bool = False,
    family: str = "tower",
    epochs: int = 3,
    wall_time_s: float = 2.0,
    dataset: str = "mnist5k",
    model: str = "mlp",
    momentum: float | None = None,
    status: str | None = None,
    environment: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """One run directory as the harness writes it; `drop` removes keys to make a broken one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    init: dict[str, Any] = {} if lr is None else {"lr": lr}
    if momentum is not None:
        init["momentum"] = momentum
    metrics = {
        "test_error": test_error,
        "test_loss": None if test_error is None else 2 * test_error,
        "val_error": test_error if val_error is None else val_error,
        "val_loss": 0.3,
        "train_loss": 0.2,
        "diverged": diverged,
        "diverged_step": 17 if diverged else None,
        "diverged_reason": "non-finite loss" if diverged else None,
        "epochs": epochs,
        "steps": epochs * 20,
        "wall_time_s": wall_time_s,
        "optimizer": method if lr is None else f"{method}(lr={lr})",
        "method": method,
        "family": family,
        "height": height,
        "init": init,
        "hyperparameters": [{"lr": lr or 0.0}] * (height + 1),
        "seed": seed,
        "model": model,
        "dataset": dataset,
        "status": status or ("diverged" if diverged else "completed"),
    }
    if environment is not None:
        metrics["environment"] = environment
    for key in drop:
        metrics.pop(key)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    header = ["epoch", "steps", "train_loss", "val_loss", "val_error", "test_loss", "test_error", "wall_time_s"]
    header += [f"L{level + 1}.lr" for level in range(height + 1)]
    lines = [",".join(header)]
    for epoch in range(1, epochs + 1):
        # Each level's step size grows tenfold per epoch from lr: spans decades, as learned step sizes do.
        level_lrs = [(lr or 1e-3) * 10 ** (epoch - 1) / 10**level for level in range(height + 1)]
        row = [epoch, 20 * epoch, 0.2, 0.3, 0.1, 0.2, 0.1, epoch * wall_time_s / epochs, *level_lrs]
        lines.append(",".join(str(v) for v in row))
    (run_dir / "history.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def write_study(
    study_dir: Path,
    *,
    method: str = "adam",
    trials: list[tuple[float, float, float]],
    reruns: list[tuple[int, float]],
    lr: float = 3e-3,
    epochs: int = 3,
    wall_time_s: float = 2.0,
) -> Path:
    """A tune study: trials as (lr, val_error, test_error), reruns as (seed, test_error), and its summary."""
    for n, (trial_lr, val, test) in enumerate(trials):
        write_run(study_dir / "trials" / str(n), method=method, family="baseline", lr=trial_lr, val_error=val,
                  test_error=test, epochs=epochs, wall_time_s=wall_time_s)  # fmt: skip
    rerun_rows = []
    for seed, test in reruns:
        d = write_run(study_dir / "reruns" / f"seed_{seed}", method=method, family="baseline", lr=lr, seed=seed,
                      test_error=test, epochs=epochs, wall_time_s=wall_time_s)  # fmt: skip
        rerun_rows.append({"seed": seed, "test_error": test, "run_dir": str(d)})
    n_runs = len(trials) + len(reruns)
    summary = {
        "study_name": study_dir.name,
        "best_params": {"lr": lr},
        "best_value": min(v for _, v, _ in trials),
        "n_trials": len(trials),
        "n_complete": len(trials),
        "n_pruned": 0,
        "n_failed": 0,
        "total_epochs": n_runs * epochs,
        "total_wall_time_s": n_runs * wall_time_s,
        "reruns": rerun_rows,
    }
    (study_dir / "study_summary.json").write_text(json.dumps(summary))
    return study_dir


# --- the estimators, on numbers whose answer is known by hand ---------------------------------------------


def test_bootstrap_ci_is_the_percentile_interval_of_the_exact_bootstrap_distribution() -> None:
    # Resampling [0, 0, 1]: the mean is k/3 with k ~ Binomial(3, 1/3), so P(0) = 8/27, P(1/3) = 12/27,
    # P(2/3) = 6/27, P(1) = 1/27. The 2.5th percentile is 0 and the 97.5th is 1 (P(mean < 1) = 26/27 < 0.975);
    # the 35th and 65th percentiles (a 30% interval) both fall in the 1/3 atom (cumulative 0.296 .. 0.741).
    assert bootstrap_ci([0.0, 0.0, 1.0], confidence=0.95) == (0.0, 1.0)
    lo, hi = bootstrap_ci([0.0, 0.0, 1.0], confidence=0.30)
    assert lo == pytest.approx(1 / 3) and hi == pytest.approx(1 / 3)


def test_bootstrap_ci_is_degenerate_on_one_value_and_seeded() -> None:
    assert bootstrap_ci([0.25, 0.25, 0.25, 0.25]) == (0.25, 0.25)
    assert bootstrap_ci([0.07]) == (0.07, 0.07)
    values = [0.031, 0.029, 0.035, 0.04, 0.033]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_ci_matches_the_normal_interval_on_a_larger_sample() -> None:
    # For 40 roughly symmetric values the percentile bootstrap is close to mean +- 1.96 * sd / sqrt(n)
    # (with the plug-in sd, which is what resampling the empirical distribution uses).
    values = 0.05 + 0.01 * np.sin(np.arange(40) * 1.7)
    lo, hi = bootstrap_ci(values, n_resamples=20000)
    half = 1.96 * values.std(ddof=0) / math.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_expected_best_of_n_equals_hand_computed_values() -> None:
    errors = [0.4, 0.1, 0.3, 0.2]
    # Best of 2 draws with replacement is the i-th smallest with probability ((5-i)/4)^2 - ((4-i)/4)^2:
    # 7/16, 5/16, 3/16, 1/16 -> (7*0.1 + 5*0.2 + 3*0.3 + 1*0.4) / 16 = 3.0 / 16.
    assert expected_best_of_n(errors, 2) == pytest.approx(3.0 / 16)
    assert expected_best_of_n(errors, 1) == pytest.approx(0.25)  # one draw: the mean
    assert expected_best_of_n(errors, 200) == pytest.approx(0.1, abs=1e-12)  # many draws: the minimum


def test_expected_best_of_n_equals_enumerating_every_draw() -> None:
    errors = [0.4, 0.1, 0.3, 0.1, 0.25]
    for n in (1, 2, 3):
        draws = list(itertools.product(errors, repeat=n))
        assert expected_best_of_n(errors, n) == pytest.approx(sum(min(d) for d in draws) / len(draws))
    curve = [expected_best_of_n(errors, n) for n in range(1, 8)]
    assert all(a >= b for a, b in itertools.pairwise(curve))  # more trials never make the expected best worse


def test_expected_best_of_n_reports_the_test_error_of_the_best_validation_trial() -> None:
    test, val = [0.5, 0.1, 0.3], [0.2, 0.3, 0.1]
    # By validation the order is trial 2 (test 0.3), trial 0 (0.5), trial 1 (0.1); weights 5/9, 3/9, 1/9.
    assert expected_best_of_n(test, 2, rank_by=val) == pytest.approx((5 * 0.3 + 3 * 0.5 + 1 * 0.1) / 9)
    pairs = list(itertools.product(range(3), repeat=2))
    by_hand = sum(test[min(p, key=lambda i: val[i])] for p in pairs) / len(pairs)
    assert expected_best_of_n(test, 2, rank_by=val) == pytest.approx(by_hand)


def test_robust_range_is_the_longest_contiguous_run_within_tolerance_in_decades() -> None:
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    errors = [0.9, 0.05, 0.04, 0.9, 0.045, 0.05]
    # Within 0.04 + 0.011: 1e-3, 1e-2 (one decade) and 1, 10 (one decade); ties keep the first.
    assert robust_range_decades(lrs, errors, reference=0.04, tolerance=0.011) == (pytest.approx(1.0), 2)
    assert robust_range_decades(lrs[::-1], errors[::-1], 0.04, 0.011)[1] == 2  # order of rows does not matter
    assert robust_range_decades(lrs, errors, reference=0.0, tolerance=0.04)[1] == 1
    decades, n = robust_range_decades(lrs, errors, reference=0.0, tolerance=0.001)
    assert math.isnan(decades) and n == 0
    assert robust_range_decades(lrs, [0.04] * 6, reference=0.04, tolerance=0.0) == (pytest.approx(5.0), 6)


# --- loading result trees ----------------------------------------------------------------------------------


def _sensitivity_tree(root: Path) -> Path:
    """Heights 0 and 1 over 5 step sizes x 2 seeds, one diverged run, and a tuned Adam study."""
    grid = {
        ("sgd", 0): [0.9, 0.5, 0.05, 0.3, 0.9],
        ("sgd/sgd(1e-05)", 1): [0.9, 0.05, 0.04, 0.05, 0.9],
    }
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    for (method, height), errors in grid.items():
        for lr, error in zip(lrs, errors, strict=True):
            for seed in (0, 1):
                diverged = height == 0 and lr == 1.0 and seed == 1
                write_run(
                    root / "sweep" / f"h{height}_lr{lr:g}_s{seed}",
                    method=method,
                    height=height,
                    lr=lr,
                    seed=seed,
                    test_error=None if diverged else error,
                    diverged=diverged,
                    wall_time_s=2.0 * (height + 1),
                )
    write_study(root / "tune" / "adam", trials=[(1e-4, 0.2, 0.21), (3e-3, 0.05, 0.05), (0.3, 0.9, 0.9)],
                reruns=[(0, 0.044), (1, 0.046)])  # fmt: skip
    write_run(root / "free" / "prodigy", method="prodigy", family="tuning_free", lr=None, test_error=0.06)
    return root


def test_loading_keeps_a_diverged_run_as_a_miss(tmp_path: Path) -> None:
    runs = load_runs([_sensitivity_tree(tmp_path)])
    table = runs.table
    assert len(table) == 20 + 3 + 2 + 1  # every directory with a metrics.json, trials and reruns included
    diverged = table[table["diverged"]]
    assert len(diverged) == 1 and diverged["test_error"].iloc[0] == 1.0 and diverged["miss"].iloc[0]
    summary = summarize(runs)
    row = summary[(summary["method"] == "sgd") & (summary["lr"] == 1.0)].iloc[0]
    assert row["n_seeds"] == 2 and row["n_diverged"] == 1
    assert row["test_error_mean"] == pytest.approx((0.9 + 1.0) / 2)  # the miss counts as 100% error


def test_summary_has_one_row_per_setting_with_ci_and_tuning_cost(tmp_path: Path) -> None:
    summary = summarize(load_runs([_sensitivity_tree(tmp_path)]))
    assert len(summary) == 2 * 5 + 1 + 1  # two heights x five step sizes, the tuned baseline, prodigy
    for column in ("test_error_mean", "test_error_ci_low", "test_error_ci_high", "n_diverged", "cost_wall_time_s"):
        assert column in summary.columns
    assert (summary["test_error_ci_low"] <= summary["test_error_mean"] + 1e-12).all()
    assert (summary["test_error_mean"] <= summary["test_error_ci_high"] + 1e-12).all()
    tuned = summary[summary["tuned"]].iloc[0]
    assert tuned["method"] == "adam (tuned)" and tuned["seeds"] == "0 1"
    assert tuned["test_error_mean"] == pytest.approx(0.045)
    # Three trials of 3 epochs and 2 s each were spent finding the configuration, on top of one run.
    assert tuned["tuning_epochs"] == 9 and tuned["cost_wall_time_s"] == pytest.approx(2.0 + 6.0)
    tower = summary[summary["method"] == "sgd/sgd(1e-05)"]
    assert (tower["tuning_epochs"] == 0).all() and (tower["cost_wall_time_s"] == 4.0).all()


def test_robustness_is_computed_from_the_summary_rows(tmp_path: Path) -> None:
    summary = summarize(load_runs([_sensitivity_tree(tmp_path)]))
    reference = reference_error(summary)
    assert reference.error == pytest.approx(0.045) and "adam (tuned)" in reference.label
    table = robustness(summary, reference, tolerance=0.01).set_index("method")
    # Height 1 stays within 4.5% + 1 pt from 1e-3 to 1e-1 (two decades); height 0 only at 1e-2.
    assert table.loc["sgd/sgd(1e-05)", "decades"] == pytest.approx(2.0)
    assert table.loc["sgd/sgd(1e-05)", "n_within"] == 3
    assert table.loc["sgd", "decades"] == pytest.approx(0.0) and table.loc["sgd", "n_within"] == 1
    assert "adam (tuned)" not in table.index and "prodigy" not in table.index  # nothing to sweep there


def test_a_one_setting_recipe_is_the_reference_without_a_tuned_baseline(tmp_path: Path) -> None:
    # The CIFAR-10 layout: a swept fixed baseline, and He et al.'s step decay at its single setting.
    for lr, error in ((0.01, 0.2), (0.1, 0.1), (1.0, 0.3)):
        write_run(tmp_path / f"fixed_{lr}", method="momentum", family="baseline", lr=lr, test_error=error)
    write_run(tmp_path / "step", method="step_decay", family="baseline", lr=0.1, test_error=0.08)
    summary = summarize(load_runs([tmp_path]))
    reference = reference_error(summary)
    assert reference.error == pytest.approx(0.08) and "step_decay" in reference.label
    table = robustness(summary, reference, tolerance=0.025).set_index("method")
    assert list(table.index) == ["momentum"] and table.loc["momentum", "n_within"] == 1  # only 0.1 is within


def test_missing_keys_name_the_directory(tmp_path: Path) -> None:
    write_run(tmp_path / "ok", seed=0)
    broken = write_run(tmp_path / "broken", seed=1, drop=("height", "init"))
    with pytest.raises(ReportInputError, match=r"broken/metrics.json` must have .*missing: height, init") as e:
        load_runs([tmp_path])
    assert "\n" not in str(e.value) and str(broken) in str(e.value)


def test_no_run_directories_and_incompatible_sweeps_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportInputError, match=r"`input` must contain run directories .* but .*empty has none"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(ReportInputError, match=r"`input` must be an existing directory, but got .*nowhere"):
        load_runs([tmp_path / "nowhere"])
    write_run(tmp_path / "a" / "run", dataset="mnist5k")
    write_run(tmp_path / "b" / "run", dataset="digits")
    with pytest.raises(ReportInputError, match=r"one sweep \(one dataset\).*dataset=mnist5k in .*a/run"):
        load_runs([tmp_path / "a", tmp_path / "b"])


# --- the written report ------------------------------------------------------------------------------------


def _report(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose_report_config([f"input={tmp_path / 'results'}", "progress=false", *overrides])
    return run(cfg, output_dir=tmp_path / "report")


def test_report_writes_every_file_and_a_miss_is_visible(tmp_path: Path) -> None:
    _sensitivity_tree(tmp_path / "results")
    result = _report(tmp_path)
    out = tmp_path / "report"
    for name in (
        "summary.csv",
        "report.md",
        "sensitivity.png",
        "sensitivity.svg",
        "tuning_curve.png",
        "trajectories.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files behind
    csv = pd.read_csv(out / "summary.csv")
    assert len(csv) == 12 and csv["n_diverged"].sum() == 1
    report = (out / "report.md").read_text()
    assert "diverged: 1, counted as misses" in report
    # The robustness table: method, decades vs own best and vs the overall best (with their ranges), points within.
    assert "| sgd/sgd(1e-05) | 2 (0.001-0.1) | 2 (0.001-0.1) | 3 of 5 | 4.00% | 90.00% |" in report
    assert result["n_diverged"] == 1


def test_paper_numbers_appear_next_to_ours(tmp_path: Path) -> None:
    _sensitivity_tree(tmp_path / "results")
    numbers = tmp_path / "paper.yaml"
    numbers.write_text(
        "source: a test table\nexperiments:\n  demo:\n    rows:\n"
        "      - {method: sgd/sgd(1e-05), lr: 0.01, test_error: 0.0123}\n"
        "      - {method: adam/adam, lr: 0.001, test_error: 0.02}\n"
    )
    _report(tmp_path, "paper=demo", f"paper_numbers={numbers}")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| sgd/sgd(1e-05) | 0.01 | 1.23% | 4.00% | [4.00%, 4.00%] | 2 |" in report
    assert "| adam/adam | 0.001 | 2.00% | – | [–, –] | 0 |" in report  # not reproduced: shown, not dropped


def test_shipped_paper_numbers_are_sourced_and_not_invented() -> None:
    import yaml

    data = yaml.safe_load((REPO / "bench" / "report" / "paper_numbers.yaml").read_text())
    assert "arXiv:1909.13371" in data["source"]
    for entry in data["experiments"].values():
        for row in entry["rows"]:
            assert 0.0 < row["test_error"] < 1.0 and row.get("table")  # every number says where it comes from


def test_cli_merges_repeated_inputs_and_fails_cleanly_on_bad_input(tmp_path: Path) -> None:
    _sensitivity_tree(tmp_path / "results")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = tmp_path / "cli"
    ok = run_text(
        [sys.executable, "-m", "bench.report", f"input={tmp_path / 'results' / 'sweep'}",
         f"input={tmp_path / 'results' / 'tune'}", f"output_dir={out}", "hydra.run.dir=" + str(tmp_path / "hydra")],
        REPO, env, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "25 runs (1 diverged" in ok.stdout  # both inputs read: 20 sweep runs, 3 trials and 2 reruns
    # A directory name with `=` (population members are named so) must reach the report intact.
    write_run(tmp_path / "bad" / "lr=0.1_seed=0", drop=("seed",))
    bad = run_text(
        [sys.executable, "-m", "bench.report", f"input={tmp_path / 'bad'}", f"output_dir={tmp_path / 'badout'}",
         "hydra.run.dir=" + str(tmp_path / "hydra2")],
        REPO, env, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("error: `")
        and "bad/lr=0.1_seed=0/metrics.json` must have" in bad.stderr
    )
    assert not (tmp_path / "badout").exists()  # nothing half-written


def _environment(threads: int) -> dict[str, Any]:
    return {"torch": "2.5.1", "python": "3.11.7", "hypergrad": "0.1.0", "device": "cpu", "num_threads": threads}


def test_runs_from_two_environments_get_one_line_saying_so_and_one_environment_none(tmp_path: Path) -> None:
    # The same configs on 1 and on 2 CPU threads differ by round-off that training amplifies: a reader comparing
    # them must be told, in the console and in report.md; runs of one environment get no such line.
    for lr in (0.01, 0.1):
        for seed, threads in ((0, 1), (1, 2), (2, 2)):
            write_run(tmp_path / "mixed" / f"lr{lr}_s{seed}", lr=lr, seed=seed, environment=_environment(threads))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    cli = run_text(
        [sys.executable, "-m", "bench.report", f"input={tmp_path / 'mixed'}", f"output_dir={tmp_path / 'out'}",
         "progress=false", "hydra.run.dir=" + str(tmp_path / "hydra")],
        REPO, env, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    [line] = [x for x in cli.stdout.splitlines() if "environments" in x]
    assert "2 environments: torch 2.5.1, cpu, 1 thread (2 runs); torch 2.5.1, cpu, 2 threads (4 runs)" in line
    assert "Round-off differs between them and training amplifies it" in line
    assert line in (tmp_path / "out" / "report.md").read_text()

    for lr in (0.01, 0.1):
        write_run(tmp_path / "one" / f"lr{lr}", lr=lr, environment=_environment(1))
    result = run(compose_report_config([f"input={tmp_path / 'one'}", "progress=false"]), tmp_path / "one_out")
    assert result["environments"] is None
    assert "environments" not in (tmp_path / "one_out" / "report.md").read_text().lower()


def test_a_run_without_a_recorded_environment_counts_as_unknown(tmp_path: Path) -> None:
    # Result folders written before metrics.json recorded the environment cannot be vouched for: "unknown".
    write_run(tmp_path / "old", lr=0.01)
    write_run(tmp_path / "new", lr=0.1, environment=_environment(1))
    result = run(compose_report_config([f"input={tmp_path}", "progress=false"]), tmp_path / "out")
    assert "2 environments:" in result["environments"]
    assert (
        "unknown (1 run)" in result["environments"] and "torch 2.5.1, cpu, 1 thread (1 run)" in result["environments"]
    )


def test_wandb_offline_run_holds_the_tables_and_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _sensitivity_tree(tmp_path / "results")
    _report(tmp_path, "logger=wandb", "logger.group=sens-1")
    import wandb

    wandb.teardown()  # the W&B service writes the run's record file asynchronously; this waits for it
    runs = list((tmp_path / "report" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert "report.md" in files and any(f.startswith("sensitivity") and f.endswith(".png") for f in files)
    assert any(f.startswith("summary") and f.endswith(".table.json") for f in files)
    # The run's record (the .wandb log `wandb sync` uploads) puts it in the sweep's group, as a report job.
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"sens-1" in record and b"report" in record


def test_wandb_source_without_an_api_key_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No W&B server is reachable here, so this checks only the refusal; reading a live project is not tested.
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    cfg = compose_report_config(["source=wandb", "input=someone/sweep", "progress=false"])
    with pytest.raises(ReportInputError, match=r"^`source=wandb` needs a W&B API key, but got: ") as e:
        run(cfg, output_dir=tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_run_logged_to_wandb_reads_back_as_the_same_row(tmp_path: Path) -> None:
    """source=wandb reads what the harness logs: the flat W&B summary nests back into the run's metrics.

    No W&B server can run here, so the summary dict stands in for `wandb.Api().runs(...)[i].summary`; both ends
    are the real code (the harness's summary_of and the report's metrics_from_summary).
    """
    from bench.config import compose_config
    from bench.logger import summary_of
    from bench.report.load import _row
    from bench.report.wandb_source import metrics_from_summary
    from bench.train import run as train_run

    cfg = compose_config(["dataset=digits", "trainer.epochs=1", "trainer.max_steps=2", "trainer.progress=false"])
    metrics = train_run(cfg, tmp_path)
    back = metrics_from_summary(summary_of(metrics))
    assert back["init"] == metrics["init"] and back["hyperparameters"] == metrics["hyperparameters"]
    from_disk, from_wandb = _row(tmp_path, metrics), _row("entity/project/abc123", back, on_disk=False)
    for key in ("test_error", "method", "family", "height", "lr", "momentum", "seed", "diverged", "miss"):
        a, b = from_wandb[key], from_disk[key]
        assert a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)), key


def test_a_t_interval_past_zero_is_clipped_and_report_md_says_so(tmp_path: Path) -> None:
    # Three seeds, one outlier: the symmetric Student-t interval of the mean reaches below 0% test error.
    errors = [0.01, 0.012, 0.2]
    raw_low, raw_high = t_interval(errors, 0.95)
    assert raw_low < 0.0 < raw_high < 1.0
    assert t_interval(errors, 0.95, bounds=(0.0, 1.0)) == (0.0, raw_high)
    assert t_interval([0.068, 0.068, 0.064], 0.95, bounds=(0.0, 1.0)) == t_interval([0.068, 0.068, 0.064], 0.95)
    with pytest.raises(ValueError, match="`bounds` must be"):
        t_interval(errors, 0.95, bounds=(1.0, 0.0))
    # The same row through the report: summary.csv and report.md hold the clipped interval, and the definitions
    # say why an end reads 0.00%.
    for seed, error in enumerate(errors):
        write_run(tmp_path / "results" / f"s{seed}", seed=seed, test_error=error)
    _report(tmp_path)
    row = pd.read_csv(tmp_path / "report" / "summary.csv").iloc[0]
    assert (row["test_error_ci_low"], row["test_error_ci_high"]) == (0.0, pytest.approx(raw_high))
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"[0.00%, {100 * raw_high:.2f}%]" in report
    assert "clipped to that range" in report


def test_a_method_never_within_tolerance_of_the_overall_best_reads_none_within(tmp_path: Path) -> None:
    curves = {("sgd", 0): [0.5, 0.4], ("sgd/sgd(1e-05)", 1): [0.1, 0.1]}
    for (method, height), errors in curves.items():
        for lr, error in zip([0.01, 0.1], errors, strict=True):
            write_run(tmp_path / "results" / f"{height}_{lr:g}", method=method, height=height, lr=lr, test_error=error)
    _report(tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| sgd | 0 (0.1-0.1) | none within | 0 of 2 | 40.00% | 50.00% |" in report
    assert "nan" not in report
