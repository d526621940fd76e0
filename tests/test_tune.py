"""bench.tune: real Optuna studies (SQLite and journal storages) over harness runs on the embedded digits data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from bench.tune import compose_tune_config, parse_search_space, tune

# Each trial trains the MLP on scikit-learn's digits for a few steps: a study of several trials takes seconds.
FAST = ["dataset=digits", "trainer.progress=false", "trainer.epochs=2", "trainer.max_steps=8"]
SUMMARY_KEYS = {
    "best_params",
    "best_value",
    "n_trials",
    "n_complete",
    "n_pruned",
    "n_failed",
    "total_epochs",
    "total_wall_time_s",
    "reruns",
    "study_name",
    "storage",
    "sampler",
    "pruner",
}


@pytest.fixture(autouse=True)
def _studies_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tune.storage=null keeps each study in <paths.log_dir>/studies/ (relative to the working directory).
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine's cores are shared; tiny models gain nothing from more threads


def _metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_tiny_study_writes_summary_with_honest_compute_accounting(tmp_path: Path) -> None:
    cfg = compose_tune_config(["optimizer=adam", *FAST, "tune.n_trials=3", "tune.reruns=2", "tune.sampler=random"])
    summary = tune(cfg, output_dir=tmp_path / "run")

    on_disk = json.loads((tmp_path / "run" / "study_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) >= SUMMARY_KEYS
    assert summary["n_trials"] == 3 == summary["n_complete"] + summary["n_pruned"] + summary["n_failed"]
    assert summary["storage"] == f"sqlite:///{tmp_path / 'outputs' / 'studies' / 'adam-mlp-digits.db'}"
    assert (summary["sampler"], summary["pruner"]) == ("random", "median")

    # Every trial is an ordinary harness run; the best value is the best complete trial's validation error.
    trial_metrics = [_metrics(t["run_dir"]) for t in summary["trials"]]
    complete = [m for t, m in zip(summary["trials"], trial_metrics, strict=True) if t["state"] == "complete"]
    assert summary["best_value"] == min(m["val_error"] for m in complete)
    best = summary["trials"][summary["best_trial"]]
    assert best["params"] == summary["best_params"]
    assert _metrics(best["run_dir"])["init"]["lr"] == pytest.approx(summary["best_params"]["lr"])
    assert _metrics(best["run_dir"])["init"]["beta1"] == pytest.approx(1 - summary["best_params"]["one_minus_beta1"])

    # Reruns: the best configuration on fresh seeds, each with its own run directory and test error.
    assert [r["seed"] for r in summary["reruns"]] == [1, 2]
    for rerun in summary["reruns"]:
        m = _metrics(rerun["run_dir"])
        assert (m["seed"], m["test_error"]) == (rerun["seed"], rerun["test_error"])
        assert m["init"]["lr"] == pytest.approx(summary["best_params"]["lr"])

    # Compute: every trial's and rerun's epochs and steps, as their own metrics.json files record them.
    reruns = [_metrics(r["run_dir"]) for r in summary["reruns"]]
    assert summary["total_epochs"] == sum(m["epochs"] for m in trial_metrics + reruns)
    assert summary["total_steps"] == sum(m["steps"] for m in trial_metrics + reruns) == 5 * 8
    assert summary["total_wall_time_s"] >= sum(m["wall_time_s"] for m in trial_metrics + reruns)
    trial_json = json.loads((Path(best["run_dir"]) / "trial.json").read_text())
    assert (trial_json["trial_number"], trial_json["state"]) == (summary["best_trial"], "complete")


def test_search_spaces_cover_step_sizes_from_1e_6_to_1_and_schedules() -> None:
    for baseline in ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad"):
        space = {p.name: p for p in parse_search_space(compose_tune_config([f"optimizer={baseline}"]).search_space)}
        lr = space["lr"]
        assert (lr.key, lr.type, lr.log) == ("optimizer.lr", "float", True), baseline
        assert lr.low <= 1e-6 and lr.high >= 1.0, baseline
        assert set(space["schedule"].choices) == {"constant", "cosine", "warmup_cosine"}, baseline
        assert "weight_decay" in space, baseline
    adam = {p.name for p in parse_search_space(compose_tune_config(["optimizer=adam"]).search_space)}
    assert {"one_minus_beta1", "one_minus_beta2"} <= adam


def test_median_pruner_stops_a_clearly_worse_trial_early(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="prune", direction="minimize")
    # Three good step sizes first (the median's reference), then a step size that cannot learn.
    for lr in (0.5, 0.4, 0.3, 1e-6):
        study.enqueue_trial({"lr": lr, "weight_decay": 1e-7, "schedule": "constant"})
    cfg = compose_tune_config(
        [
            "optimizer=sgd",
            "dataset=digits",
            "trainer.progress=false",
            "trainer.epochs=3",
            "tune.n_trials=4",
            "tune.reruns=0",
            "tune.pruner=median",
            "tune.median.n_startup_trials=3",
            f"tune.storage={storage}",
            "tune.study_name=prune",
        ]
    )
    summary = tune(cfg, output_dir=tmp_path / "run")

    states = [t["state"] for t in summary["trials"]]
    assert states == ["complete", "complete", "complete", "pruned"]
    pruned = summary["trials"][3]
    assert pruned["params"]["lr"] == 1e-6
    assert pruned["epochs"] == 1  # stopped after its first report, saving two of three epochs
    assert _metrics(pruned["run_dir"])["status"] == "pruned"
    assert summary["n_pruned"] == 1
    assert summary["total_epochs"] == 3 * 3 + 1


def test_diverging_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path: Path) -> None:
    storage = tmp_path / "study.log"
    study = optuna.create_study(storage=_journal(storage), study_name="diverge", direction="minimize")
    # RMSprop's first steps are about 10 x lr: lr=1e38 overflows float32 and the loss turns NaN at once.
    study.enqueue_trial({"lr": 1e38, "one_minus_alpha": 0.01, "weight_decay": 1e-7, "schedule": "constant"})
    cfg = compose_tune_config(
        [
            "optimizer=rmsprop",
            *FAST,
            "search_space.lr.high=1.0e38",
            "tune.n_trials=3",
            "tune.reruns=1",
            f"tune.storage=journal:{storage}",
            "tune.study_name=diverge",
        ]
    )
    summary = tune(cfg, output_dir=tmp_path / "run")

    assert [t["state"] for t in summary["trials"]] == ["fail", "complete", "complete"]
    failed = summary["trials"][0]
    assert failed["fail_reason"].startswith("diverged at step ")
    m = _metrics(failed["run_dir"])
    assert (m["diverged"], m["status"]) == (True, "diverged")
    assert summary["n_failed"] == 1 and summary["best_trial"] != 0
    assert summary["reruns"][0]["test_error"] is not None and math.isfinite(summary["reruns"][0]["test_error"])
    trial = optuna.load_study(study_name="diverge", storage=_journal(storage)).trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == failed["fail_reason"]


def test_continued_study_adds_trials_instead_of_starting_over(tmp_path: Path) -> None:
    storage = f"journal:{tmp_path / 'study.log'}"
    base = ["optimizer=sgd", *FAST, "tune.reruns=0", f"tune.storage={storage}", "tune.study_name=continued"]
    first = tune(compose_tune_config([*base, "tune.n_trials=2"]), output_dir=tmp_path / "first")
    again = tune(compose_tune_config([*base, "tune.n_trials=4"]), output_dir=tmp_path / "second")

    assert first["n_trials"] == 2 and again["n_trials"] == 4
    assert [t["number"] for t in again["trials"]] == [0, 1, 2, 3]
    assert again["trials"][:2] == first["trials"]  # the earlier trials are kept as they were
    assert all(Path(t["run_dir"]).parent == tmp_path / "second" / "trials" for t in again["trials"][2:])
    assert again["total_epochs"] == first["total_epochs"] + sum(t["epochs"] for t in again["trials"][2:])
    # Asking for no more than the study holds runs nothing new.
    same = tune(compose_tune_config([*base, "tune.n_trials=3"]), output_dir=tmp_path / "third")
    assert same["n_trials"] == 4 and not (tmp_path / "third" / "trials").exists()


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "cmaes", "gp"])
def test_each_sampler_is_reproducible_from_the_seed(tmp_path: Path, sampler: str) -> None:
    def params(name: str) -> list[dict]:
        overrides = ["optimizer=momentum", *FAST, "trainer.max_steps=2", "tune.n_trials=3", "tune.reruns=0"]
        cfg = compose_tune_config([*overrides, "seed=3", f"tune.sampler={sampler}", "tune.pruner=none"])
        return [t["params"] for t in tune(cfg, output_dir=tmp_path / name)["trials"]]

    first = params("a")
    assert first == params("b")
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 3  # three distinct configurations


def test_wandb_groups_every_trial_and_rerun_under_the_study_and_logs_its_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = ["logger=wandb", "logger.mode=offline", "tune.study_name=wandb-study"]
    cfg = compose_tune_config(["optimizer=sgd", *FAST, *wandb, "tune.n_trials=1", "tune.reruns=1"])
    summary = tune(cfg, output_dir=tmp_path / "run")
    import wandb

    wandb.teardown()  # W&B writes offline runs asynchronously; a process flushes them at exit, as the CLI does

    run_dirs = [Path(t["run_dir"]) for t in summary["trials"]] + [Path(r["run_dir"]) for r in summary["reruns"]]
    for run_dir, job_type in zip(run_dirs, ["tune_trial", "tune_rerun"], strict=True):
        [record] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        content = record.read_bytes()
        assert b"wandb-study" in content and job_type.encode() in content, run_dir
    [record] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    content = record.read_bytes()
    for text in ("wandb-study", "tune_summary", "best_value", "total_wall_time_s", "n_pruned"):
        assert text.encode() in content, text


def test_trials_trained_as_populations_fill_the_budget_and_record_the_batch_size(tmp_path) -> None:
    """tune.population_size=3: trials are asked in batches, trained together, each told; the summary says so."""

    cfg = compose_tune_config(
        [
            "optimizer=sgd",
            "dataset=digits",
            "trainer.epochs=2",
            "trainer.max_steps=6",
            "tune.n_trials=5",
            "tune.population_size=3",
            "tune.reruns=0",
            "tune.pruner=none",
            "tune.sampler=random",
        ]
    )
    summary = tune(cfg, output_dir=tmp_path)
    assert summary["n_trials"] == 5 and summary["population_size"] == 3
    assert summary["n_complete"] + summary["n_failed"] == 5
    for trial in summary["trials"]:
        record = json.loads((Path(trial["run_dir"]) / "trial.json").read_text())
        metrics = json.loads((Path(trial["run_dir"]) / "metrics.json").read_text())
        assert record["population_size"] in (3, 2)  # two batches: 3 trials, then the remaining 2
        if trial["state"] == "complete":
            assert trial["value"] == metrics["val_error"]


def test_reruns_belong_to_the_best_trial_so_a_continued_study_never_reuses_stale_ones(tmp_path) -> None:
    common = ["optimizer=sgd", "dataset=digits", "trainer.epochs=1", "trainer.max_steps=3", "tune.pruner=none"]
    first = tune(compose_tune_config([*common, "tune.n_trials=2", "tune.reruns=1"]), output_dir=tmp_path)
    more = tune(compose_tune_config([*common, "tune.n_trials=4", "tune.reruns=1"]), output_dir=tmp_path)
    assert more["n_trials"] == 4 and first["n_trials"] == 2  # the second call continued the same study
    for summary in (first, more):
        (rerun,) = summary["reruns"]
        assert Path(rerun["run_dir"]).parent.name == f"trial_{summary['best_trial']}"
        metrics = json.loads((Path(rerun["run_dir"]) / "metrics.json").read_text())
        assert metrics["test_error"] == rerun["test_error"]


def test_population_trials_that_cannot_train_are_told_failed_not_left_running(tmp_path) -> None:
    from bench.config import ConfigError

    cfg = compose_tune_config(
        ["optimizer=sgd", "model=resnet20", "dataset=digits", "trainer.max_steps=2", "tune.n_trials=2",
         "tune.population_size=2", "tune.reruns=0", f"tune.storage=sqlite:///{tmp_path}/study.db"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="BatchNorm"):  # resnet20's running statistics cannot be vectorized
        tune(cfg, output_dir=tmp_path)
    study = optuna.load_study(study_name="sgd-resnet20-digits", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
