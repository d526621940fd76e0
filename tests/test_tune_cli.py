"""`python -m bench.tune` on bad input: one line on stderr, exit code 2, and the study's storage untouched."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import optuna
import pytest

from bench.tune import main
from tests.harness_helpers import REPO, run_text

SGD = ["optimizer=sgd", "dataset=digits"]


@pytest.fixture
def journal_with_a_study(tmp_path: Path) -> Path:
    """A journal storage already holding a study with one finished trial."""
    path = tmp_path / "study.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(storage=storage, study_name="kept", direction="minimize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.1}, distributions={"lr": optuna.distributions.FloatDistribution(1e-6, 1.0)}, value=0.5
        )
    )
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tune.sampler=bogus"],
            "`tune.sampler` must be one of ['tpe', 'random', 'qmc', 'cmaes', 'gp'], but got 'bogus'",
        ),
        (["tune.pruner=bogus"], "`tune.pruner` must be one of ['median', 'hyperband', 'none'], but got 'bogus'"),
        (["tune.n_trials=0"], "`tune.n_trials` must be an integer >= 1, but got 0"),
        (["tune.n_trials=-3"], "`tune.n_trials` must be an integer >= 1, but got -3"),
        (["tune.reruns=-1"], "`tune.reruns` must be a count >= 0 or a list of integer seeds, but got -1"),
        (["optimizer=tower"], "`optimizer` must be a baseline with a search space, one of ['adagrad', 'adam'"),
        (["optimizer=prodigy"], "but got 'prodigy'"),
        (["optimizer=nadam"], "but got 'nadam'"),
        (["~search_space.lr", "~search_space.weight_decay", "~search_space.schedule"], "an empty search space"),
        (["search_space.lr.low=0"], "`search_space.lr.low` must be > 0 for a log scale, but got 0"),
        (["search_space.lr.high=-1"], "`search_space.lr` must have numbers low < high"),
        (["+search_space.lr.step=0.1"], "`search_space.lr` must describe a valid float range"),
        (["tune.median.n_startup_trials=-1"], "`tune.median` must hold valid median pruner settings"),
        (["tune.grace_period_s=0.5"], "`tune.grace_period_s` must be an integer >= 1 or null, but got 0.5"),
        (["tune.bogus=1"], "Could not override 'tune.bogus'"),
        (["trainer.epochs=0"], "`trainer.epochs` must be a positive integer, but got 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_the_study_untouched(
    overrides: list[str], message: str, journal_with_a_study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = journal_with_a_study.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*SGD, *overrides, f"tune.storage=journal:{journal_with_a_study}", "tune.study_name=kept"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert journal_with_a_study.read_bytes() == before


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("mysql://user:secret@localhost/db", "`tune.storage` must be one of sqlite://..., postgresql://... or journal"),
        ("redis://localhost:6379", "(backend 'redis')"),
        ("sqlite://", "`tune.storage` must name a file for SQLite (sqlite:///PATH)"),
        ("journal:", "`tune.storage` must name a file after journal:"),
        ("no url at all", "`tune.storage` must be one of"),
    ],
)
def test_unusable_storage_is_rejected_before_anything_is_created(
    storage: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*SGD, f"tune.storage={storage}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
    assert "secret" not in err  # a password in the URL is never echoed
    assert list(tmp_path.iterdir()) == []


def test_command_line_exit_code_and_stderr(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "bench.tune", *SGD, "tune.sampler=bogus", f"hydra.run.dir={run_dir}"]
    result = run_text(command, REPO, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: `tune.sampler` must be one of") and result.stderr.count("\n") == 1
    assert not run_dir.exists()  # no run directory, no default SQLite study
