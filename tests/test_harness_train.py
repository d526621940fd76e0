"""bench.train.run: a run learns, writes its files atomically, survives interruption, and settles every ending.

These call `run` directly on composed configs (the CLI is covered in test_harness_cli.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch

from bench.config import compose_config
from bench.schema import ENVIRONMENT_KEYS, HISTORY_COLUMNS, METRICS_KEYS
from bench.train import read_checkpoint, request_checkpoint, run
from tests.harness_helpers import QUICK

METRIC_KEYS = set(METRICS_KEYS)
FAST = ["trainer.progress=false", "trainer.num_threads=1"]


def _without_time(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def test_short_run_on_mnist5k_lowers_the_loss_and_writes_both_files(tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "trainer.epochs=3", "dataset.train_size=1024"])
    metrics = run(cfg, tmp_path)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics) >= METRIC_KEYS
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns[: len(HISTORY_COLUMNS)]) == list(HISTORY_COLUMNS)
    assert {"L1.lr", "L1.beta1", "L1.beta2", "L2.lr"} <= set(history.columns)
    assert history["epoch"].tolist() == [1, 2, 3] and history["steps"].tolist() == [4, 8, 12]
    # It learned: the loss falls epoch over epoch, and the test error beats chance (90%) by far.
    assert history["train_loss"].is_monotonic_decreasing
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    assert metrics["test_error"] < 0.5
    # The tower's identity, and the step size it learned (level 1 moved, level 2 is fixed at the top).
    assert metrics["optimizer"] == "adam(0.001)/sgd(1e-05)" and metrics["method"] == "adam/sgd(1e-05)"
    assert (metrics["family"], metrics["height"], metrics["status"], metrics["diverged"]) == (
        "tower",
        1,
        "completed",
        False,
    )
    assert metrics["init"]["lr"] == pytest.approx(1e-3)
    assert metrics["hyperparameters"][0]["lr"] != pytest.approx(1e-3)
    assert metrics["hyperparameters"][1] == {"lr": pytest.approx(1e-5)}
    assert history["L1.lr"].iloc[-1] == pytest.approx(metrics["hyperparameters"][0]["lr"])
    # Written atomically: no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "metrics.json"]


def test_tower_keys_build_the_spec_and_spec_overrides_them(tmp_path: Path) -> None:
    keys = run(
        compose_config(
            [*QUICK, "optimizer.base=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.5", "optimizer.height=2"]
        ),
        tmp_path / "keys",
    )
    assert keys["optimizer"] == "sgd(0.05, momentum=0.5)/sgd(1e-05)/sgd(1e-05)"
    assert (keys["height"], keys["method"]) == (2, "sgd/sgd(1e-05)/sgd(1e-05)")
    assert keys["init"] == {"lr": pytest.approx(0.05), "momentum": pytest.approx(0.5)}
    spec = run(compose_config([*QUICK, 'optimizer.spec="adam[lr](0.002)/adam(1e-4)"']), tmp_path / "spec")
    assert spec["optimizer"].startswith("adam[lr](0.002)/adam(0.0001") and spec["height"] == 1


@pytest.mark.parametrize("stable", [False, True])
def test_an_adamw_base_takes_its_weight_decay_from_the_key(tmp_path: Path, stable: bool) -> None:
    overrides = ["optimizer.base=adamw", "optimizer.weight_decay=0.1", f"optimizer.stable={str(stable).lower()}"]
    metrics = run(compose_config([*QUICK, *overrides]), tmp_path)
    assert metrics["optimizer"] == "adamw(0.001, weight_decay=0.1)/sgd(1e-05)"
    assert metrics["init"]["weight_decay"] == pytest.approx(0.1)
    # The level above learns it, as every other hyperparameter of the base.
    assert metrics["hyperparameters"][0]["weight_decay"] != pytest.approx(0.1, rel=1e-9)
    # Left null, the base keeps the library's (and torch.optim.AdamW's) default.
    default = run(compose_config([*QUICK, "optimizer.base=adamw"]), tmp_path / "default")
    assert default["optimizer"] == "adamw(0.001)/sgd(1e-05)" and default["init"]["weight_decay"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("overrides", "family"),
    [
        (["optimizer=momentum", "optimizer.schedule=cosine"], "baseline"),
        (["optimizer=schedulefree_adamw"], "tuning_free"),
    ],
)
def test_baselines_record_their_family_and_zero_height(tmp_path: Path, overrides: list[str], family: str) -> None:
    metrics = run(compose_config([*QUICK, *overrides]), tmp_path)
    name = overrides[0].split("=")[1]
    assert (metrics["optimizer"], metrics["method"], metrics["family"], metrics["height"]) == (name, name, family, 0)
    assert len(metrics["hyperparameters"]) == 1 and "lr" in metrics["init"]


def _interrupt_at(epoch: int):
    def callback(e: int, row: dict[str, Any]) -> None:
        if e == epoch:
            raise KeyboardInterrupt  # as a kill would: no chance to write anything more

    return callback


@pytest.mark.parametrize(
    "optimizer",
    [[], ["optimizer=adam", "optimizer.schedule=warmup_cosine"]],
    ids=["tower", "scheduled_adam"],
)
def test_resume_from_an_epoch_checkpoint_ends_with_the_uninterrupted_metrics(
    tmp_path: Path, optimizer: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [*FAST, *optimizer, "trainer.epochs=3", "dataset.train_size=512", "trainer.checkpoint_every=1"]
    whole = run(compose_config(overrides), tmp_path / "whole")

    with pytest.raises(KeyboardInterrupt):
        run(compose_config(overrides), tmp_path / "cut", epoch_callback=_interrupt_at(2))
    assert not (tmp_path / "cut" / "metrics.json").exists()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="bench.train")  # these notes are log records (the job log)
    resumed = run(compose_config(overrides), tmp_path / "cut")
    # It continued from the checkpoint of epoch 2 (rather than quietly starting over).
    assert f"resuming {tmp_path / 'cut'} from epoch 2, step 4" in caplog.text

    assert _without_time(resumed) == _without_time(whole)
    cut_history = pd.read_csv(tmp_path / "cut" / "history.csv").drop(columns="wall_time_s")
    whole_history = pd.read_csv(tmp_path / "whole" / "history.csv").drop(columns="wall_time_s")
    pd.testing.assert_frame_equal(cut_history, whole_history)


@pytest.mark.parametrize("threads", [1, 2])
def test_metrics_record_the_environment_the_run_trained_in(tmp_path: Path, threads: int) -> None:
    # Thread count and torch version change a run's numbers by round-off (not its identity): a user comparing two
    # result folders must be able to see them.
    before = torch.get_num_threads()
    try:
        metrics = run(compose_config([*QUICK, f"trainer.num_threads={threads}"]), tmp_path)
    finally:
        torch.set_num_threads(before)
    environment = json.loads((tmp_path / "metrics.json").read_text())["environment"]
    assert environment == metrics["environment"]
    assert (environment["num_threads"], environment["torch"], environment["device"]) == (
        threads,
        torch.__version__,
        "cpu",
    )
    # exactly the keys the schema documents (what report readers rely on), and no `resumed_from` on a fresh run
    assert set(environment) == set(ENVIRONMENT_KEYS) == {"torch", "python", "hypergrad", "device", "num_threads"}


def test_resuming_a_checkpoint_from_another_environment_records_it_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [*FAST, "trainer.epochs=2", "dataset.train_size=512", "trainer.checkpoint_every=1"]
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(overrides), tmp_path, epoch_callback=_interrupt_at(1))
    # The other machine is simulated: the checkpoint's recorded environment is rewritten to one with 64 threads and
    # another torch version, as if it had been written there.
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    other = {**state["environment"], "torch": "2.0.0+other", "num_threads": 64}
    torch.save({**state, "environment": other}, tmp_path / "checkpoint.pt")

    caplog.clear()
    caplog.set_level(logging.INFO, logger="bench.train")
    metrics = run(compose_config(overrides), tmp_path)
    assert "resuming" in caplog.text  # it did resume, not start over
    [line] = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    assert "torch 2.0.0+other, cpu, 64 threads" in line and f"torch {torch.__version__}, cpu, 1 thread" in line
    assert "round-off" in line
    assert metrics["environment"]["resumed_from"] == other
    assert metrics["environment"]["num_threads"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["environment"] == metrics["environment"]


def test_preemption_request_saves_mid_epoch_and_the_rerun_finishes_identically(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [*FAST, "trainer.epochs=2", "dataset.train_size=512"]
    whole = run(compose_config(overrides), tmp_path / "whole")

    def preempt_after_first_epoch(epoch: int, row: dict[str, Any]) -> None:
        request_checkpoint()  # what a SLURM signal handler would call

    stopped = run(compose_config(overrides), tmp_path / "cut", epoch_callback=preempt_after_first_epoch)
    assert stopped["status"] == "preempted"
    assert stopped["steps"] == 3  # one step into epoch 2 (2 batches of 256 per epoch)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()

    caplog.clear()
    caplog.set_level(logging.INFO, logger="bench.train")  # these notes are log records (the job log)
    resumed = run(compose_config(overrides), tmp_path / "cut")
    assert f"resuming {tmp_path / 'cut'} from epoch 1, step 3" in caplog.text
    assert _without_time(resumed) == _without_time(whole)


def test_a_diverging_run_is_recorded_as_diverged_not_dropped(tmp_path: Path) -> None:
    # A hyper step size of 1e10 blows the learned step size up within a few steps.
    metrics = run(compose_config([*FAST, 'optimizer.spec="adam(0.001)/sgd(1e10)"']), tmp_path)
    assert metrics["diverged"] is True and metrics["status"] == "diverged"
    assert isinstance(metrics["diverged_step"], int) and 1 <= metrics["diverged_step"] < metrics["steps"] + 2
    assert "non-finite" in metrics["diverged_reason"]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_weights_blown_up_by_the_last_step_count_as_diverged(tmp_path: Path) -> None:
    # One step of size 1e38 leaves finite training losses behind but weights whose outputs overflow.
    overrides = ["optimizer=sgd", "optimizer.lr=1e38", "model.output_tanh=false"]
    metrics = run(compose_config([*QUICK, "trainer.max_steps=1", *overrides]), tmp_path)
    assert (metrics["status"], metrics["diverged_step"]) == ("diverged", 1)
    assert metrics["diverged_reason"].startswith("non-finite validation loss")
    assert metrics["val_loss"] is None  # not a number: JSON null, never NaN


def test_a_step_size_that_overflows_the_optimizer_is_a_diverged_run(tmp_path: Path) -> None:
    # torch's Adam refuses lr / bias_correction beyond float range: recorded as diverged, not a crash.
    metrics = run(compose_config([*QUICK, "optimizer=adam", "optimizer.lr=1e38"]), tmp_path)
    assert (metrics["status"], metrics["diverged_step"]) == ("diverged", 1)
    assert metrics["diverged_reason"].startswith("optimizer step overflowed")


def test_a_run_no_longer_than_its_warmup_completes(tmp_path: Path) -> None:
    # warmup_cosine with nothing left to decay after the warmup (one step in all) must still train and finish.
    overrides = ["optimizer=adam", "optimizer.schedule=warmup_cosine", "trainer.epochs=1", "trainer.max_steps=1"]
    metrics = run(compose_config([*FAST, *overrides]), tmp_path)
    assert metrics["status"] == "completed" and metrics["steps"] == 1


def test_a_finished_run_is_skipped_unless_forced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bench.train")
    cfg = compose_config(QUICK)
    first = run(cfg, tmp_path)
    stamp = (tmp_path / "metrics.json").stat().st_mtime_ns

    again = run(cfg, tmp_path)
    assert again == first
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == stamp
    assert f"skipping {tmp_path}" in caplog.text

    forced = run(compose_config([*QUICK, "trainer.force=true"]), tmp_path)
    assert (tmp_path / "metrics.json").stat().st_mtime_ns != stamp
    assert _without_time(forced) == _without_time(first)  # same seed, same result


def test_a_pruned_run_records_pruned_and_the_exception_reaches_the_caller(tmp_path: Path) -> None:
    def prune(epoch: int, row: dict[str, Any]) -> None:
        assert {"val_error", "val_loss", "train_loss", "epoch", "steps"} <= set(row)
        raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    with pytest.raises(optuna.TrialPruned):
        run(compose_config([*FAST, "trainer.epochs=3", "dataset.train_size=256"]), tmp_path, epoch_callback=prune)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["status"], metrics["epochs"], metrics["diverged"]) == ("pruned", 1, False)
    # A pruned run is not a finished one: running the directory again trains it.
    assert run(compose_config([*FAST, "trainer.epochs=3", "dataset.train_size=256"]), tmp_path)["status"] == "completed"


def test_bfloat16_autocast_run_still_learns(tmp_path: Path) -> None:
    metrics = run(compose_config([*FAST, "trainer.amp=true", "trainer.epochs=2", "dataset.train_size=1024"]), tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert metrics["status"] == "completed"
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0] and metrics["test_error"] < 0.6


def test_a_failing_epoch_callback_records_failed_with_the_error_and_propagates(tmp_path: Path) -> None:
    def broken(epoch: int, row: dict[str, Any]) -> None:
        raise RuntimeError("storage went away")

    with pytest.raises(RuntimeError, match="storage went away"):
        run(compose_config(QUICK), tmp_path, epoch_callback=broken)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == "RuntimeError: storage went away"
