"""W&B conventions, checked on real offline runs (their directories in the test's tmp dir): charts over optimizer
steps, runs named by optimizer and seed, grouped by sweep, tagged by preset, results saved, no banner."""

from __future__ import annotations

from pathlib import Path

from tests.harness_helpers import QUICK, run_bench


def _record_bytes(run_dir: Path) -> bytes:
    """The run's offline `.wandb` file (protobuf records; wandb 0.31 ships no public reader for it)."""
    [path] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return path.read_bytes()


def test_sweep_runs_are_named_grouped_tagged_charted_by_step_and_keep_their_results(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_bench(
        ["-m", "seed=0,1", "logger=wandb", "debug=steps", *QUICK, f"hydra.sweep.dir={sweep}"], tmp_path,
        extra_env={"WANDB_SILENT": "false"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wandb: " not in proc.stdout + proc.stderr  # the banner is silenced by the logger, not by the test's env
    from wandb.proto import wandb_internal_pb2

    # `define_metric("*", step_metric="step")` as W&B serializes it: every chart's x axis is the optimizer step.
    step_axis = wandb_internal_pb2.MetricRecord(glob_name="*", step_metric="step").SerializeToString()
    for job, seed in (("0", 0), ("1", 1)):
        content = _record_bytes(sweep / job)
        assert f"adam(0.001)/sgd(1e-05)-seed{seed}".encode() in content  # the run's name
        assert f"sweep-{sweep.parent.name}-{sweep.name}".encode() in content  # its group: the sweep
        assert b"steps" in content  # tagged with the debug preset
        assert step_axis in content
        files = sweep / job / "wandb"
        assert list(files.glob("offline-run-*/files/metrics.json")) and list(
            files.glob("offline-run-*/files/history.csv")
        )


def test_report_logs_native_tables_and_charts(tmp_path: Path, monkeypatch) -> None:
    from tests.test_report import _report, _sensitivity_tree

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _sensitivity_tree(tmp_path / "results")
    _report(tmp_path, "logger=wandb", "logger.group=sens-1")
    import wandb

    wandb.teardown()  # the W&B service writes the run's files asynchronously; this waits for them
    [run] = list((tmp_path / "report" / "wandb").glob("offline-run-*"))
    files = {p.name for p in run.rglob("*.table.json")}
    # The summary as a W&B table, and the sensitivity curve as a native line chart (a vega spec over its own table).
    assert any(f.startswith("summary_") for f in files) and any(f.startswith("sensitivity_chart_table") for f in files)
    assert b"test error by initial step size" in next(run.glob("*.wandb")).read_bytes()


def test_a_population_logs_each_member_to_its_own_wandb_run(tmp_path: Path) -> None:
    # Four jobs trained as one population (hydra/launcher=population): each still gets its own offline W&B run in
    # its own job directory, named, grouped and charted as the basic launcher's runs are, with its own results.
    sweep = tmp_path / "sweep"
    proc = run_bench(
        ["-m", "optimizer.base=sgd", "optimizer.lr=0.03,0.3", "seed=0,1", "logger=wandb", "debug=steps", *QUICK,
         "hydra/launcher=population", f"hydra.sweep.dir={sweep}"], tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "population of 4: jobs #0, #1, #2, #3" in proc.stdout + proc.stderr
    assert "runs alone" not in proc.stdout + proc.stderr
    from wandb.proto import wandb_internal_pb2

    step_axis = wandb_internal_pb2.MetricRecord(glob_name="*", step_metric="step").SerializeToString()
    for job, (lr, seed) in enumerate([(0.03, 0), (0.03, 1), (0.3, 0), (0.3, 1)]):
        content = _record_bytes(sweep / str(job))
        assert f"sgd({lr})/sgd(1e-05)-seed{seed}".encode() in content  # the member's own name
        assert f"sweep-{sweep.parent.name}-{sweep.name}".encode() in content and step_axis in content
        metrics = (sweep / str(job) / "metrics.json").read_text()
        [saved] = list((sweep / str(job) / "wandb").glob("offline-run-*/files/metrics.json"))
        assert saved.read_text() == metrics  # its own results, not a neighbour's
        assert '"population"' in metrics
