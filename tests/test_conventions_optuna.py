"""Optuna conventions: a study says what it is about, a trial says how to reproduce it, and the same command run
twice continues one study (the default storage is stable per study name), refusing a worker that asks for another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna

from tests.harness_helpers import REPO, bench_env, run_text

FAST = ["dataset=digits", "trainer.progress=false", "trainer.epochs=1", "trainer.max_steps=4", "tune.reruns=0"]


def _tune(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**bench_env(tmp_path), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # From tmp_path: the default storage is <paths.log_dir>/studies/<study>.db relative to the working directory.
    return run_text([sys.executable, "-m", "bench.tune", *FAST, *overrides], tmp_path, env, timeout=300)


def test_second_invocation_continues_the_study_and_trials_record_how_to_reproduce_them(tmp_path: Path) -> None:
    first = _tune(tmp_path, "optimizer=adam", "tune.n_trials=2", f"hydra.run.dir={tmp_path / 'first'}")
    assert first.returncode == 0, first.stderr
    second = _tune(tmp_path, "optimizer=adam", "tune.n_trials=3", f"hydra.run.dir={tmp_path / 'second'}")
    assert second.returncode == 0, second.stderr

    db = tmp_path / "outputs" / "studies" / "adam-mlp-digits.db"
    study = optuna.load_study(study_name="adam-mlp-digits", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    # Both invocations' trials, in one study: 2 from the first, 1 more from the second.
    assert [Path(t.user_attrs["run_dir"]).parent.parent.name for t in trials] == ["first", "first", "second"]
    assert study.metric_names == ["val_error"]
    assert study.user_attrs["task"] == "mlp/digits" and study.user_attrs["optimizer"] == "adam"
    assert set(study.user_attrs["search_space"]) == set(trials[0].params)
    for t in trials:
        values = t.user_attrs["values"]
        # Concrete config values (beta1, not the sampler's one_minus_beta1) and the overrides that reproduce them.
        assert values["optimizer.lr"] == t.params["lr"]
        assert abs(values["optimizer.beta1"] - (1 - t.params["one_minus_beta1"])) < 1e-12
        assert t.user_attrs["overrides"] == [f"{k}={v}" for k, v in values.items()]
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert 0 <= t.user_attrs["test_error"] <= 1


def test_a_worker_asking_for_another_optimizer_under_the_same_study_name_is_refused(tmp_path: Path) -> None:
    made = _tune(
        tmp_path, "optimizer=adam", "tune.n_trials=1", "tune.study_name=mine", f"hydra.run.dir={tmp_path / 'a'}"
    )
    assert made.returncode == 0, made.stderr
    other = _tune(
        tmp_path, "optimizer=sgd", "tune.n_trials=2", "tune.study_name=mine", f"hydra.run.dir={tmp_path / 'b'}"
    )
    assert other.returncode == 2
    # The last line (Optuna's own INFO line "Using an existing study" may come before it), no traceback.
    assert "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1] == (
        "error: `tune.study_name` 'mine' names a study whose optimizer is 'adam', but this worker asks for 'sgd' "
        "(choose another tune.study_name)"
    )
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'outputs' / 'studies' / 'mine.db'}")
    assert len(study.trials) == 1
