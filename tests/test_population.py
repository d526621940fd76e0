"""The stacked learner (bench.population.StackedLearner): K configurations trained as one vectorized job equal their
members run alone, step by step, and a member that diverges is frozen without touching the others. One trainer
(bench.train.Trainer) drives it exactly as it drives a single run.

Sweeps through `hydra/launcher=population` (the grid as users ask for it) are tested in test_population_launcher.py.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch

import hypergrad
from bench.config import ConfigError, compose_config
from bench.models import build_model
from bench.population import PopulationError, StackedLearner, plan_groups
from bench.train import Trainer, load_data, run
from bench.tune import evaluate_trials_as_population, tell_trials
from tests.hypergrad_helpers import losses_until_nonfinite

BATCH, STEPS = 32, 6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfgs(configs: list[tuple[str, int]], dtype: str, *extra: str) -> list:
    common = ["dataset=digits", "dataset.train_size=96", "model.hidden=8", "model.output_tanh=false",
              f"trainer.dtype={dtype}", f"trainer.batch_size={BATCH}", "trainer.num_threads=1", *extra]  # fmt: skip
    return [compose_config([*common, f'optimizer.spec="{spec}"', f"seed={seed}"]) for spec, seed in configs]


def _batches(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches for every member, in every run."""
    x, y = data.train
    g = torch.Generator().manual_seed(100)
    return [(x[idx], y[idx]) for idx in (torch.randperm(len(x), generator=g)[:BATCH] for _ in range(STEPS))]


def _stacked(configs: list[tuple[str, int]], dtype: str) -> tuple[StackedLearner, list[list[float]]]:
    """Every member's step losses, trained as one stacked learner."""
    cfgs = _cfgs(configs, dtype)
    device, data = load_data(cfgs[0])
    learner = StackedLearner(cfgs, data, device, 3, STEPS)
    losses = []
    for step, (x, y) in enumerate(_batches(data), start=1):
        if learner.per_member:  # one batch per member, stacked: here the same one for all
            x, y = x.expand(learner.size, *x.shape), y.expand(learner.size, *y.shape)
        losses.append(learner.step(x, y, step))
    return learner, torch.stack(losses).T.tolist()


def _alone(spec: str, seed: int, dtype: str) -> tuple[list[float], list[dict[str, float]]]:
    """The obvious single run: an nn.Module, hypergrad.tower, loss.backward(); opt.step(); opt.zero_grad()."""
    [cfg] = _cfgs([(spec, seed)], dtype)
    _, data = load_data(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg.model, data).to(getattr(torch, dtype))
    opt = hypergrad.tower(spec, model.parameters())
    return losses_until_nonfinite(model, opt, _batches(data)), opt.hyperparameters()


def _rel(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((ta - tb).abs() / tb.abs()).max())


MIXED = [  # four heights, each member its own seed
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
@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-10), ("float32", 1e-5)], ids=["f64", "f32"])
def test_mixed_heights_equal_single_runs(configs, dtype, tol):
    assert plan_groups(_cfgs(configs, dtype)) == [[3, 0, 1, 2]]  # all four heights share one padded plan
    learner, losses = _stacked(configs, dtype)
    for (spec, seed), mine, hps in zip(configs, losses, learner.hyperparameters(), strict=True):
        alone, alone_hps = _alone(spec, seed, dtype)
        assert len(mine) == len(alone) == STEPS
        assert _rel(mine, alone) < tol, spec
        flat = [v for level in alone_hps for v in level.values()]
        assert _rel([v for level in hps for v in level.values()], flat) < tol * 10, spec
        assert [list(level) for level in hps] == [list(level) for level in alone_hps]


def test_members_that_cannot_share_a_plan_train_in_separate_groups():
    configs = [("sgd(0.1)/sgd(0.01)", 0), ("adam(0.01)/sgd(0.001)", 0), ("sgd(0.1, momentum=0.5)/sgd(0.01)", 1)]
    assert sorted(map(sorted, plan_groups(_cfgs(configs, "float64")))) == [[0], [1], [2]]
    for spec, seed in configs:
        _, [losses] = _stacked([(spec, seed)], "float64")
        assert _rel(losses, _alone(spec, seed, "float64")[0]) < 1e-10, spec


def test_a_diverging_member_is_frozen_and_the_others_are_unaffected():
    healthy = [("sgd(0.1)/sgd(0.01)", 0), ("sgd(0.3)", 1), ("sgd(0.05)/sgd(0.01)/sgd(0.001)", 2)]
    huge = ("sgd(1e308)/sgd(0.01)", 3)  # the first update overflows the weights: the second loss is not finite
    with_it, losses = _stacked([healthy[0], huge, *healthy[1:]], "float64")
    without, losses_without = _stacked(healthy, "float64")

    health = with_it.health
    assert health.alive.tolist() == [True, False, True, True]
    assert int(health.step[1]) == 2 and health.own_steps(STEPS) == [STEPS, 1, STEPS, STEPS]
    bad = losses[1]
    assert health.reason(1) == f"non-finite training loss ({bad[1]})"
    assert math.isfinite(bad[0]) and not math.isfinite(bad[1])
    assert bad[0] == pytest.approx(_alone(*huge, "float64")[0][0], rel=1e-12)
    # Bit for bit: nothing of the diverged member leaks into the others.
    assert [losses[0], *losses[2:]] == losses_without
    hps = with_it.hyperparameters()
    assert [hps[0], *hps[2:]] == without.hyperparameters()
    for (spec, seed), mine in zip(healthy, losses_without, strict=True):
        assert _rel(mine, _alone(spec, seed, "float64")[0]) < 1e-10


def test_a_non_finite_hyperparameter_freezes_its_member_before_the_update():
    configs = [("sgd(0.1, momentum=0.5)/sgd(1e305)", 0), ("sgd(0.1, momentum=0.5)/sgd(0.01)", 0)]
    learner, losses = _stacked(configs, "float64")
    assert learner.health.alive.tolist() == [False, True]
    step = int(learner.health.step[0])
    assert re.fullmatch(r"non-finite hyperparameter: hyperparameter '(lr|momentum)' of level 1 became (inf|-inf|nan) "
                        rf"at step {step}; .*", learner.health.reason(0))  # fmt: skip
    # Frozen with the last finite values, as HyperOptimizer leaves a run when it raises.
    assert all(math.isfinite(v) for level in learner.hyperparameters()[0] for v in level.values())
    assert _rel(losses[1], _alone(*configs[1], "float64")[0]) < 1e-10


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("inputs", ["own", "shared", "grouped"])
def test_stacked_linear_layers_give_autograds_outputs_and_gradients(shape, bias, inputs):
    # The stacked members' nn.Linear (bench.population._stacked_skeleton: a faster weight-gradient layout, and one
    # wide product where members share their input) computes, for every member, what F.linear and its autograd
    # gradients give that member alone: inputs of any rank, with or without bias, each member's own input, one
    # input for all, or one per group of members (a seed group's batch), float64 to round-off.
    from torch.func import functional_call, stack_module_state

    from bench.population import _stacked_skeleton

    torch.manual_seed(0)
    members, groups = 6, 2
    layers = [torch.nn.Linear(7, 6, bias=bias).double() for _ in range(members)]
    params, _ = stack_module_state(layers)
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    skeleton = _stacked_skeleton(torch.nn.Linear(7, 6, bias=bias).double())

    def member(p, xi):
        return functional_call(skeleton, p, (xi,))

    rows = {"own": members, "shared": 1, "grouped": groups}[inputs]
    x = torch.randn(rows, *shape, dtype=torch.float64, requires_grad=True)
    if inputs == "own":
        out = torch.vmap(member)(params, x)
    elif inputs == "shared":
        out = torch.vmap(member, in_dims=(0, None))(params, x[0])
    else:
        per_group = {n: p.unflatten(0, (groups, -1)) for n, p in params.items()}
        out = torch.vmap(torch.vmap(member, in_dims=(0, None)))(per_group, x).flatten(0, 1)
    of_member = [k * rows // members for k in range(members)]  # the input row each member reads
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params.values()])
    x_grad = torch.zeros_like(x)
    for k, layer in enumerate(layers):
        xk = x[of_member[k]].detach().requires_grad_()
        alone = layer(xk)
        assert torch.allclose(out[k], alone, rtol=1e-12, atol=1e-14)
        own = torch.autograd.grad((alone * weights[k]).sum(), [xk, *layer.parameters()])
        x_grad[of_member[k]] += own[0]
        for mine, theirs in zip(grads[1:], own[1:], strict=True):
            assert mine[k].is_contiguous() and torch.allclose(mine[k], theirs, rtol=1e-12, atol=1e-14)
    assert torch.allclose(grads[0], x_grad, rtol=1e-12, atol=1e-14)  # a shared input: the sum of its members'


def test_batchnorm_models_get_a_clear_error():
    cfg = compose_config(["dataset=digits", "model=resnet20", 'optimizer.spec="sgd(0.1)/sgd(0.01)"'])
    device, data = load_data(cfg)
    with pytest.raises(PopulationError, match=r"BatchNorm layer `.*`.*running statistics.*as single runs"):
        StackedLearner([cfg, cfg], data, device, 3, STEPS)


@pytest.mark.parametrize("spec", ["sgd(0.1)/sgd(0.01)/sgd(0.001)", "adam(0.01)/sgd(0.001)"])
def test_one_trainer_gives_a_population_of_one_the_single_runs_results(tmp_path, spec):
    # The same config through the one trainer, once with the module learner (`python -m bench`) and once as a
    # stacked population of one: the same history and metrics, float64, to round-off.
    [cfg] = _cfgs([(spec, 3)], "float64", "trainer.epochs=2", "trainer.progress=false")
    single = run(cfg, tmp_path / "single")
    [stacked] = Trainer([cfg], [tmp_path / "stacked"], stacked=True).fit()
    for key in set(single) - {"wall_time_s", "hyperparameters", "init"}:
        if isinstance(single[key], float):
            assert stacked[key] == pytest.approx(single[key], rel=1e-10, abs=0), key
        else:
            assert stacked[key] == single[key], key
    for mine, theirs in zip(stacked["hyperparameters"], single["hyperparameters"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-10)
    a, b = (pd.read_csv(tmp_path / d / "history.csv").drop(columns="wall_time_s") for d in ("single", "stacked"))
    pd.testing.assert_frame_equal(a, b, rtol=1e-10, atol=0)


def test_every_population_member_records_the_environment_it_trained_in(tmp_path):
    # Each member's metrics.json is a run's: it says where it trained, as a single run's does.
    cfgs = _cfgs([("sgd(0.1)", 0), ("sgd(0.3)/sgd(0.01)", 1)], "float32", "trainer.epochs=1", "trainer.progress=false")
    Trainer(cfgs, [tmp_path / str(i) for i in range(2)], stacked=True).fit()
    for i in range(2):
        environment = json.loads((tmp_path / str(i) / "metrics.json").read_text())["environment"]
        assert (environment["torch"], environment["device"], environment["num_threads"]) == (
            torch.__version__,
            "cpu",
            1,
        )


def test_members_sharing_a_seed_share_their_batches_with_the_results_of_their_own(tmp_path):
    # Members ordered by seed in runs of equal length (as bench.launcher orders a population) take one batch per
    # seed, and the first layer multiplies it with the run's weights side by side; in any other order every member
    # takes its own batch. Each member ends with the same results either way (float64, to round-off).
    specs = ["sgd(0.1)", "sgd(0.3)/sgd(0.01)", "sgd(0.05)/sgd(0.01)/sgd(0.001)"]
    by_seed = [(spec, seed) for seed in (0, 1) for spec in specs]
    mixed = [by_seed[i] for i in (0, 3, 1, 4, 2, 5)]  # seeds 0, 1, 0, 1, ...: no run of one seed
    results = {}
    for name, configs in (("grouped", by_seed), ("mixed", mixed)):
        cfgs = _cfgs(configs, "float64", "trainer.epochs=2", "trainer.progress=false")
        trainer = Trainer(cfgs, [tmp_path / name / str(i) for i in range(len(cfgs))], stacked=True)
        groups = {"grouped": [0, 3], "mixed": list(range(6))}[name]
        assert trainer.learner.batch_members == groups
        results[name] = dict(zip(configs, trainer.fit(), strict=True))
    for member, grouped in results["grouped"].items():
        alone = results["mixed"][member]
        for key in ("train_loss", "val_loss", "test_loss", "val_error", "test_error", "steps"):
            assert grouped[key] == pytest.approx(alone[key], rel=1e-12, abs=0), (member, key)
    assert results["grouped"][by_seed[0]]["test_loss"] != results["grouped"][by_seed[3]]["test_loss"]


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
    assert metrics[0]["steps"] == 4 and metrics[1]["steps"] == 8  # 4 steps per epoch: the pruned one stopped there
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
