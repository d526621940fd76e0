"""Population training (bench.population): a grid trained as one vectorized job equals its members run alone."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

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
    population_members,
    run_population,
    tell_trials,
    train_population,
    validate_population,
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


def _cfg(tmp_path, *overrides: str, population: bool = True):
    return compose_config(
        [
            *(["+population=grid"] if population else []),
            "dataset=digits",
            "trainer.epochs=2",
            "trainer.batch_size=128",
            "dataset.train_size=512",
            "trainer.progress=false",
            f"paths.output_dir={tmp_path}",
            *overrides,
        ]
    )


METRICS_KEYS = {
    "test_error", "test_loss", "val_error", "val_loss", "train_loss", "diverged", "diverged_step", "diverged_reason",
    "epochs", "steps", "wall_time_s", "optimizer", "method", "family", "height", "init", "hyperparameters", "seed",
    "model", "dataset", "status",
}  # fmt: skip


def test_member_directories_have_the_harness_schema(tmp_path):
    cfg = _cfg(
        tmp_path,
        "population.lr=[0.01,0.1]",
        "population.heights=[0,2]",
        "population.seeds=[0,1]",
        "optimizer.base=sgd",
        "optimizer.hyper_lr=0.001",
    )
    metrics = run_population(cfg)
    assert len(metrics) == 8
    summary = json.loads((tmp_path / "population.json").read_text())
    assert [m["dir"] for m in summary["members"]][:2] == ["members/lr=0.01_h=0_seed=0", "members/lr=0.01_h=0_seed=1"]
    for entry, returned in zip(summary["members"], metrics, strict=True):
        run_dir = tmp_path / entry["dir"]
        saved = json.loads((run_dir / "metrics.json").read_text())
        assert set(saved) >= METRICS_KEYS and saved == json.loads(json.dumps(returned))
        history = pd.read_csv(run_dir / "history.csv")
        levels = [f"L{k + 1}.lr" for k in range(saved["height"] + 1)]
        assert list(history.columns) == [
            "epoch", "steps", "train_loss", "val_loss", "val_error", "test_loss", "test_error", "wall_time_s", *levels
        ]  # fmt: skip
        assert list(history.epoch) == [1, 2] and saved["steps"] == 8 and saved["status"] == "completed"
        assert saved["family"] == "tower" and saved["method"] == "sgd" + "/sgd(0.001)" * saved["height"]
        assert saved["init"] == {"lr": pytest.approx(float(entry["name"].split("_")[0].removeprefix("lr=")), rel=1e-7)}
        assert saved["hyperparameters"][-1] == {"lr": 0.001 if saved["height"] else saved["init"]["lr"]}
        assert (run_dir / ".hydra" / "config.yaml").read_text().count(f"seed: {saved['seed']}") >= 1
        if saved["init"]["lr"] == 0.1:  # large enough to learn visibly in 8 steps
            assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]


def test_sequential_mode_gives_the_same_members(tmp_path):
    common = ["population.lr=[0.05]", "population.heights=[0,1]", "population.dtype=float64", "optimizer.base=sgd"]
    vec = run_population(_cfg(tmp_path / "v", *common), tmp_path / "v")
    seq = run_population(_cfg(tmp_path / "s", *common, "population.mode=sequential"), tmp_path / "s")
    for a, b in zip(vec, seq, strict=True):
        assert a["optimizer"] == b["optimizer"]
        for key in ("test_loss", "val_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-10)


def test_baselines_that_couple_members_are_refused_with_the_way_out(tmp_path):
    cfg = _cfg(tmp_path, "optimizer=prodigy", "population.seeds=[0,1]")
    with pytest.raises(
        ConfigError, match=r"^`optimizer` must be .*Prodigy.*sums over all.*couple the members.*sequential"
    ):
        run_population(cfg)
    assert not (tmp_path / "population.json").exists()
    metrics = run_population(
        _cfg(tmp_path, "optimizer=prodigy", "population.seeds=[0,1]", "population.mode=sequential")
    )
    assert [(m["optimizer"], m["family"], m["seed"], m["status"]) for m in metrics] == [
        ("prodigy", "tuning_free", 0, "completed"),
        ("prodigy", "tuning_free", 1, "completed"),
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("population.lr=[0.1,-1]", "`population.lr` must be a non-empty list of step sizes > 0, but got [0.1, -1]"),
        ("population.heights=[1.5]", "`population.heights` must be a non-empty list of integers >= 0, but got [1.5]"),
        (
            "population.mode=parallel",
            "`population.mode` must be one of ['vectorized', 'sequential'], but got 'parallel'",
        ),
        ("population.dtype=half", "`population.dtype` must be one of ['float32', 'float64'], but got 'half'"),
        ("optimizer=schedulefree_sgd", "`optimizer` must be a per-parameter optimizer for a vectorized population"),
        ("trainer.amp=true", "`trainer.amp` must be false for a population (autocast is not applied to the stacked"),
        ("logger=wandb", "`logger` must be none for a population (members write run directories, not W&B runs)"),
    ],
)
def test_bad_population_values_fail_before_training(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        run_population(_cfg(tmp_path, override))
    assert str(e.value).startswith(message)
    assert not any(tmp_path.iterdir())


def test_baselines_train_vectorized_exactly_as_alone(tmp_path):
    # Each member keeps its own torch.optim optimizer over its slice of the stack; a cosine schedule included.
    common = ["optimizer=momentum", "optimizer.schedule=cosine", "population.lr=[0.05,0.2]", "population.dtype=float64"]
    vec = run_population(_cfg(tmp_path / "v", *common), tmp_path / "v")
    seq = run_population(_cfg(tmp_path / "s", *common, "population.mode=sequential"), tmp_path / "s")
    assert [m["init"]["lr"] for m in vec] == [0.05, 0.2]
    for a, b in zip(vec, seq, strict=True):
        assert (a["optimizer"], a["family"], a["status"]) == ("momentum", "baseline", "completed")
        assert a["init"] == b["init"] and a["steps"] == b["steps"] == 8
        for key in ("test_loss", "val_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-10)
        assert a["hyperparameters"][0]["lr"] == pytest.approx(b["hyperparameters"][0]["lr"], rel=1e-12)


@pytest.mark.parametrize(("mode", "tol"), [("sequential", 0.0), ("vectorized", 1e-5)])
def test_a_member_equals_the_harness_run_of_its_configuration(tmp_path, mode, tol):
    # The member whose seed is the run's seed draws the same initialization and batches as `python -m bench`.
    grid = ["population.lr=[0.05]", "population.heights=[0,1,2]", "population.seeds=[0]", f"population.mode={mode}"]
    members = run_population(_cfg(tmp_path / "pop", *grid, "optimizer.base=sgd"), tmp_path / "pop")
    for m in members:
        single = run(
            _cfg(tmp_path / "one", "optimizer.base=sgd", "optimizer.lr=0.05", f"optimizer.height={m['height']}"),
            tmp_path / f"one{m['height']}",
        )
        assert {k: m[k] for k in ("optimizer", "method", "family", "init", "steps", "epochs", "seed", "status")} == {
            k: single[k] for k in ("optimizer", "method", "family", "init", "steps", "epochs", "seed", "status")
        }
        for key in ("test_loss", "val_loss", "train_loss", "test_error", "val_error"):
            assert m[key] == pytest.approx(single[key], rel=tol, abs=0), key
        for mine, theirs in zip(m["hyperparameters"], single["hyperparameters"], strict=True):
            assert mine == pytest.approx(theirs, rel=tol, abs=0)
        history = pd.read_csv(tmp_path / "pop" / "members" / f"lr=0.05_h={m['height']}_seed=0" / "history.csv")
        assert list(history.columns) == list(pd.read_csv(tmp_path / f"one{m['height']}" / "history.csv").columns)


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
    base = _cfg(tmp_path, "optimizer=sgd", population=False)
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
        _cfg(tmp_path, "optimizer=sgd", population=False),
        _cfg(tmp_path, "optimizer=sgd", "trainer.batch_size=64", population=False),
    ]
    with pytest.raises(ConfigError, match=r"^`trainer` must be the same for every trial of a population, but trial 1"):
        evaluate_trials_as_population(trials, cfgs, [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists()


def _cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    # The same Hydra app as `python -m bench +population=NAME`; run from tmp_path so Hydra's own files land there.
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.population",
            *overrides,
            "trainer.progress=false",
            f"paths.output_dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=300,
    )


def test_command_line_trains_the_preset_grid_and_prints_a_summary(tmp_path):
    done = _cli(tmp_path, "+population=grid", "dataset=digits", "population.lr=[0.01,0.1]", "population.heights=[0,1]",
                "trainer.epochs=1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "population of 4 members (0 diverged), best validation error first"
    assert sorted(p.name for p in (tmp_path / "run" / "members").iterdir()) == [
        "lr=0.01_h=0_seed=0", "lr=0.01_h=1_seed=0", "lr=0.1_h=0_seed=0", "lr=0.1_h=1_seed=0"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["population.seeds=[0,0.5]"], "error: `population.seeds` must be a non-empty list of integers, but got [0, 0.5]"),
        (["model=char_lstm", "dataset=pydoc_text"], "error: `model=char_lstm` cannot be trained as a vectorized "
         "population: its LSTM layer `lstm` runs a fused kernel that torch.vmap cannot batch; use population.mode=sequential"),
        (["model=resnet20"], "error: `model=resnet20` cannot be trained as a vectorized population: its BatchNorm layer"),
    ],
)  # fmt: skip
def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    done = _cli(tmp_path, "+population=grid", "dataset=digits", "trainer.epochs=1", *overrides)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "population.json").exists()


@pytest.mark.parametrize(
    "preset",
    sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bench" / "conf" / "population").glob("*.yaml")),
)
def test_every_preset_composes_into_a_valid_grid(preset):
    cfg = compose_config([f"+population={preset}"])
    validate_population(cfg)
    members = population_members(cfg)
    p = cfg.population
    size = len(p.lr or [0]) * len(p.heights or [0]) * len(p.seeds or [0])
    assert len(members) == size and len({m.name for m in members}) == size
    assert len(group_members(members)) == 1  # one vectorized job


@pytest.mark.parametrize("max_steps", [4, 6])  # 4 steps per epoch: a cap at an epoch's end, and inside one
@pytest.mark.parametrize("mode", ["vectorized", "sequential"])
def test_max_steps_records_the_same_epochs_as_a_harness_run(tmp_path, mode, max_steps):
    common = ["optimizer.base=sgd", "optimizer.lr=0.1", "optimizer.height=1", f"trainer.max_steps={max_steps}"]
    (member,) = run_population(_cfg(tmp_path / "pop", *common, f"population.mode={mode}"), tmp_path / "pop")
    single = run(_cfg(tmp_path / "one", *common, population=False), tmp_path / "one")
    mine = pd.read_csv(tmp_path / "pop" / "members" / "lr=0.1_h=1_seed=0" / "history.csv")
    theirs = pd.read_csv(tmp_path / "one" / "history.csv")
    assert list(mine.epoch) == list(theirs.epoch) and list(mine.steps) == list(theirs.steps)
    assert member["steps"] == single["steps"] == max_steps and member["epochs"] == single["epochs"]


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_weights_with_non_finite_outputs_are_a_diverged_member_as_in_the_harness(tmp_path, mode):
    # One step of size 1e38 leaves a finite training loss but weights whose outputs overflow: the harness records
    # that run as diverged at step 1 with a non-finite validation loss, and so must its population member.
    common = ["optimizer.base=sgd", "model.output_tanh=false", "trainer.max_steps=1"]
    grid = ["population.lr=[1e38,0.05]", "population.heights=[0]", "population.seeds=[0]", f"population.mode={mode}"]
    members = run_population(_cfg(tmp_path / "pop", *grid, *common), tmp_path / "pop")
    single = run(_cfg(tmp_path / "one", *common, "optimizer.lr=1e38", "optimizer.height=0"), tmp_path / "one")
    blown, fine = sorted(members, key=lambda m: -m["init"]["lr"])
    keys = ("status", "diverged_step", "steps", "diverged_reason")
    assert {k: blown[k] for k in keys} == {k: single[k] for k in keys}
    assert single["diverged_reason"].startswith("non-finite validation loss")
    assert fine["status"] == "completed"
