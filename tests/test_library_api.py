"""What a torch user expects of an optimizer: AdamW, a step size per tensor, a repr with the current values, one
argument order, ``hypergrad.rules`` as a module."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import hypergrad


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        nn.functional.mse_loss(model(x), x[:, :2].sin()).backward()
        opt.step()
        opt.zero_grad()


def test_adamw_with_hyper_step_zero_is_torch_adamw_step_by_step() -> None:
    ours, theirs = make_model(), make_model()
    opt = hypergrad.tower("adamw(0.01, weight_decay=0.1)/sgd(0.0)", ours.parameters())
    ref = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1)
    for p in theirs.parameters():  # the second moment starts at eps, as the reference's Adam (see AdamRule)
        ref.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": 1e-8 + 0 * p}
    for _ in range(10):
        train(ours, opt, 1)
        train(theirs, ref, 1)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adamw_learns_its_weight_decay() -> None:
    model = make_model()
    opt = hypergrad.tower("adamw(0.01, weight_decay=0.1)/sgd(1e-3)", model.parameters())
    train(model, opt, 10)
    assert opt.hyperparameters()[0]["weight_decay"] != pytest.approx(0.1, abs=1e-9)
    assert sorted(opt.hyperparameters()[0]) == ["beta1", "beta2", "lr", "weight_decay"]


def test_per_tensor_step_sizes_are_one_param_group_per_tensor() -> None:
    a, b = make_model(), make_model()
    per_tensor = hypergrad.tower("sgd(0.1)/sgd(1e-2)", a.parameters(), per_tensor=True)
    groups = hypergrad.tower("sgd(0.1)/sgd(1e-2)", [{"params": [p]} for p in b.parameters()])
    train(a, per_tensor, 5)
    train(b, groups, 5)
    lrs = [per_tensor.hyperparameters(i)[0]["lr"] for i in range(4)]
    assert lrs == [groups.hyperparameters(i)[0]["lr"] for i in range(4)]
    assert len(set(lrs)) == 4  # each tensor learned its own
    assert [g["lr"] for g in per_tensor.param_groups] == lrs


def test_repr_shows_the_current_values_per_group() -> None:
    model = make_model()
    opt = hypergrad.tower("adam(0.01)/sgd(1e-3)", model.parameters())
    train(model, opt, 3)
    text = repr(opt)
    lr = opt.hyperparameters()[0]["lr"]
    assert text.startswith("HyperOptimizer 'adam(0.01)/sgd(0.001)' (\nParameter Group 0\n")
    assert f"    lr: {lr:.6g} (learned)" in text and "    eps: 1e-08\n" in text
    assert "Level 2 (sgd): lr=0.001" in text


def test_repr_names_the_options_that_change_the_method() -> None:
    params = list(make_model().parameters())
    assert repr(hypergrad.tower("adam/sgd(1e-3)", params, stable=True)).startswith(
        "HyperOptimizer 'adam(0.001)/sgd(0.001)', stable=True (\n"
    )
    log = hypergrad.tower("adam/sgd(1e-3)", params, parameterization="log")
    assert repr(log).startswith("HyperOptimizer 'adam(0.001)/sgd(0.001)', parameterization='log' (\n")


def test_one_argument_order_and_the_torch_order_still_works() -> None:
    model = make_model()
    a = hypergrad.HyperOptimizer("adam/sgd(1e-5)", model.parameters())
    b = hypergrad.HyperOptimizer(model.parameters(), "adam/sgd(1e-5)")  # torch.optim's order, kept for old code
    c = hypergrad.tower("adam/sgd(1e-5)", model.parameters())
    assert str(a) == str(b) == str(c)
    with pytest.raises(TypeError, match=r"spec must be a string such as 'adam/sgd\(1e-5\)', but got list"):
        hypergrad.HyperOptimizer(list(model.parameters()), list(model.parameters()))


def test_hypergrad_rules_is_the_module() -> None:
    module = importlib.import_module("hypergrad.rules")
    assert hypergrad.rules is module
    assert {"sgd", "adam", "adamw", "adagrad", "rmsprop"} <= set(module.rules())  # tests may register more
