"""Population training (bench.population): a grid trained as one vectorized job equals its members run alone.

Sweeps through `hydra/launcher=population` (the grid as users ask for it) are tested in test_population_launcher.py.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch
from torch import nn

import hypergrad
from bench.config import ConfigError, compose_config
from bench.population import (
    Member,
    PopulationError,
    evaluate_trials_as_population,
    group_members,
    tell_trials,
    train_population,
)
from bench.train import run

N_TRAIN, BATCH, EPOCHS = 96, 32, 2  # 3 steps per epoch, 6 in all


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 40, 10, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train = (x[:N_TRAIN], y[:N_TRAIN])
    splits = {
        "val": (x[N_TRAIN : N_TRAIN + 20], y[N_TRAIN : N_TRAIN + 20]),
        "test": (x[N_TRAIN + 20 :], y[N_TRAIN + 20 :]),
    }
    seen: list[torch.Tensor] = []

    def batches(epoch: int):
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(100 + epoch))
        for i in range(0, N_TRAIN, BATCH):
            idx = perm[i : i + BATCH]
            seen.append(idx)
            yield train[0][idx], train[1][idx]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)

    return batches, splits, make_model, seen


def _alone(spec: str, seed: int, dtype: torch.dtype) -> tuple[list[float], list[dict[str, float]]]:
    """The obvious single run: an nn.Module, hypergrad.tower, loss.backward(); opt.step(); opt.zero_grad()."""
    batches, _, make_model, _ = _problem(dtype)
    model = make_model(seed)
    opt = hypergrad.tower(spec, model.parameters())
    losses = []
    for epoch in range(1, EPOCHS + 1):
        for x, y in batches(epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return losses, opt.hyperparameters()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return losses, opt.hyperparameters()


def _rel(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((ta - tb).abs() / tb.abs()).max())


MIXED = [  # four heights, each member its own seed; the last one a different base, so a second group
    ("sgd(0.3)", 0),
    ("sgd(0.1)/sgd(0.01)", 1),
    ("sgd(0.05)/sgd(0.01)/sgd(0.001)", 2),
    ("sgd(0.2)/sgd(0.01)/sgd(0.001)/sgd(0.0001)", 3),
]
ADAM = [
    ("adam(0.01)", 0),
    ("adam(0.03)/sgd(0.001)", 1),
    ("adam(0.02)/sgd(0.001)/sgd(0.0001)", 2),
    ("adam(0.01)/sgd(0.001)/sgd(0.0001)/sgd(1e-05)", 3),
]


@pytest.mark.parametrize("configs", [MIXED, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_mixed_heights_equal_single_runs(configs, dtype, tol):
    batches, splits, make_model, seen = _problem(dtype)
    members = [Member(hypergrad.parse_spec(s), seed, f"m{i}") for i, (s, seed) in enumerate(configs)]
    assert len(group_members(members)) == 1  # all four heights share one padded plan
    results = train_population(make_model, members, batches, splits, epochs=EPOCHS)
    # One pass over the data serves every member: they all saw the same batches in the same order.
    assert len(seen) == EPOCHS * math.ceil(N_TRAIN / BATCH)
    for (spec, seed), r in zip(configs, results, strict=True):
        losses, hps = _alone(spec, seed, dtype)
        assert r.status == "completed" and r.steps == len(losses) == 6
        assert _rel(r.step_losses, losses) < tol, spec
        flat = [v for level in hps for v in level.values()]
        assert _rel([v for level in r.hyperparameters for v in level.values()], flat) < tol * 10, spec
        assert [list(level) for level in r.hyperparameters] == [list(level) for level in hps]


def test_members_that_cannot_share_a_plan_train_in_separate_groups():
    batches, splits, make_model, _ = _problem(torch.float64)
    configs = [("sgd(0.1)/sgd(0.01)", 0), ("adam(0.01)/sgd(0.001)", 0), ("sgd(0.1, momentum=0.5)/sgd(0.01)", 1)]
    members = [Member(hypergrad.parse_spec(s), seed, str(i)) for i, (s, seed) in enumerate(configs)]
    assert sorted(map(sorted, group_members(members))) == [[0], [1], [2]]
    results = train_population(make_model, members, batches, splits, epochs=EPOCHS)
    for (spec, seed), r in zip(configs, results, strict=True):
        assert _rel(r.step_losses, _alone(spec, seed, torch.float64)[0]) < 1e-10, spec


def test_a_diverging_member_is_frozen_and_the_others_are_unaffected():
    batches, splits, make_model, _ = _problem(torch.float64)
    healthy = [("sgd(0.1)/sgd(0.01)", 0), ("sgd(0.3)", 1), ("sgd(0.05)/sgd(0.01)/sgd(0.001)", 2)]
    huge = ("sgd(1e308)/sgd(0.01)", 3)  # the first update overflows the weights: the second loss is not finite
    configs = [healthy[0], huge, *healthy[1:]]
    members = [Member(hypergrad.parse_spec(s), seed, str(i)) for i, (s, seed) in enumerate(configs)]
    with_it = train_population(make_model, members, batches, splits, epochs=EPOCHS)
    without = train_population(make_model, [m for i, m in enumerate(members) if i != 1], batches, splits, epochs=EPOCHS)

    bad = with_it[1]
    assert (bad.status, bad.diverged_step, bad.steps) == ("diverged", 2, 1)
    assert bad.diverged_reason == f"non-finite training loss ({bad.step_losses[1]})"
    assert math.isfinite(bad.step_losses[0]) and not math.isfinite(bad.step_losses[1])
    assert bad.step_losses[0] == pytest.approx(_alone(*huge, torch.float64)[0][0], rel=1e-12)
    # As a single run records it: one last row for the epoch it died in, with the step count it reached.
    assert [(row["epoch"], row["steps"]) for row in bad.history] == [(1, 1)]
    for r, alone in zip([with_it[0], *with_it[2:]], without, strict=True):
        assert r.status == "completed" and r.history[-1]["epoch"] == EPOCHS
        assert r.step_losses == alone.step_losses  # bit for bit: nothing of the diverged member leaks
        assert r.hyperparameters == alone.hyperparameters
    for (spec, seed), r in zip(healthy, [with_it[0], *with_it[2:]], strict=True):
        assert _rel(r.step_losses, _alone(spec, seed, torch.float64)[0]) < 1e-10


def test_a_non_finite_hyperparameter_freezes_its_member_before_the_update():
    batches, splits, make_model, _ = _problem(torch.float64)
    members = [
        Member(hypergrad.parse_spec("sgd(0.1, momentum=0.5)/sgd(1e305)"), 0, "bad"),
        Member(hypergrad.parse_spec("sgd(0.1, momentum=0.5)/sgd(0.01)"), 0, "good"),
    ]
    bad, good = train_population(make_model, members, batches, splits, epochs=EPOCHS)
    assert bad.status == "diverged"
    assert re.fullmatch(r"non-finite hyperparameter: hyperparameter '(lr|momentum)' of level 1 became (inf|-inf|nan) "
                        rf"at step {bad.diverged_step}; .*", bad.diverged_reason)  # fmt: skip
    # Frozen with the last finite values, as HyperOptimizer leaves a run when it raises.
    assert all(math.isfinite(v) for level in bad.hyperparameters for v in level.values())
    assert good.status == "completed"
    assert _rel(good.step_losses, _alone("sgd(0.1, momentum=0.5)/sgd(0.01)", 0, torch.float64)[0]) < 1e-10


def test_batchnorm_models_get_a_clear_error_and_run_sequentially():
    batches, splits, _, _ = _problem(torch.float64)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()

    members = [Member(hypergrad.parse_spec("sgd(0.1)/sgd(0.01)"), s, str(s)) for s in (0, 1)]
    with pytest.raises(PopulationError, match=r"BatchNorm layer `1`.*running statistics.*population.mode=sequential"):
        train_population(make_model, members, batches, splits, epochs=1, model_name="bn_mlp")
    results = train_population(make_model, members, batches, splits, epochs=1, mode="sequential")
    assert [r.status for r in results] == ["completed", "completed"]
    assert results[0].step_losses != results[1].step_losses  # two seeds, two runs


def _cfg(tmp_path, *overrides: str):
    return compose_config(
        [
            "dataset=digits",
            "trainer.epochs=2",
            "trainer.batch_size=128",
            "dataset.train_size=512",
            "trainer.progress=false",
            f"paths.output_dir={tmp_path}",
            *overrides,
        ]
    )


def test_optuna_trials_train_together_and_each_is_reported_pruned_and_told(tmp_path):
    import optuna

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.ThresholdPruner(upper=0.85),  # a trial that has learned nothing after an epoch stops
    )
    for lr in (1e-6, 0.5, 1.0):
        study.enqueue_trial({"lr": lr})
    trials = [study.ask() for _ in range(3)]
    base = _cfg(tmp_path, "optimizer=sgd")
    cfgs = []
    for trial in trials:
        cfg = base.copy()
        cfg.optimizer.lr = trial.suggest_float("lr", 1e-6, 1.0, log=True)
        cfgs.append(cfg)
    dirs = [tmp_path / "trials" / str(t.number) for t in trials]
    metrics = evaluate_trials_as_population(trials, cfgs, dirs)
    tell_trials(study, trials, metrics)

    assert [m["init"]["lr"] for m in metrics] == [1e-6, 0.5, 1.0]
    assert [m["status"] for m in metrics] == ["pruned", "completed", "completed"]
    states = [t.state for t in study.get_trials()]
    assert states == [
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.COMPLETE,
    ]
    for frozen, m, directory in zip(study.get_trials(), metrics, dirs, strict=True):
        history = pd.read_csv(directory / "history.csv")
        assert frozen.intermediate_values == dict(zip(history.epoch, history.val_error, strict=True))
        assert json.loads((directory / "metrics.json").read_text())["status"] == m["status"]
    assert metrics[0]["epochs"] == 1 and metrics[1]["epochs"] == 2
    assert [t.value for t in study.get_trials()[1:]] == [metrics[1]["val_error"], metrics[2]["val_error"]]
    # The pruned neighbour changed nothing: each completed trial equals its own harness run.
    for cfg, m in zip(cfgs[1:], metrics[1:], strict=True):
        single = run(cfg, tmp_path / f"alone{m['population']['index']}")
        for key in ("val_error", "val_loss", "test_loss", "train_loss"):
            assert m[key] == pytest.approx(single[key], rel=1e-5, abs=0), key


def test_optuna_trials_must_share_everything_but_the_optimizer(tmp_path):
    import optuna

    study = optuna.create_study()
    trials = [study.ask() for _ in range(2)]
    cfgs = [
        _cfg(tmp_path, "optimizer=sgd"),
        _cfg(tmp_path, "optimizer=sgd", "trainer.batch_size=64"),
    ]
    with pytest.raises(ConfigError, match=r"^`trainer` must be the same for every trial of a population, but trial 1"):
        evaluate_trials_as_population(trials, cfgs, [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists()
