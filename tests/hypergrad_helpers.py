"""Checks of the hypergradient shared by the library's tests, written on the functional core's protocol only
(``core.init``, ``core.update``, ``core.hypergradients``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

import hypergrad
from hypergrad import core
from hypergrad.rules import HP, Rule


class DefaultVJP(Rule):
    """``inner`` without its closed-form vjp: its hypergradients come from the default, autograd through ``update``."""

    vjp_needs_inputs = True

    def __init__(self, inner: Rule) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.defaults = inner.defaults  # type: ignore[misc]
        self.transforms = inner.transforms  # type: ignore[misc]

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        return self.inner.learnable(values)

    def init(self, param: Tensor, hp: HP) -> Any:
        return self.inner.init(param, hp)

    def update(self, grad: Tensor, state: Any, hp: HP, step: int) -> tuple[Tensor, Any]:
        return self.inner.update(grad, state, hp, step)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DefaultVJP) and other.inner == self.inner

    def __hash__(self) -> int:
        return hash((DefaultVJP, self.inner))


def losses_until_nonfinite(model: nn.Module, opt: torch.optim.Optimizer, batches: Any) -> list[float]:
    """Train ``model`` with ``opt`` over ``batches`` (x, y) by cross-entropy; the losses, up to the first non-finite."""
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def with_default_vjp(plan: core.Plan) -> core.Plan:
    """The same plan with every level's hypergradient through the default (autograd) vjp."""
    return dataclasses.replace(plan, rules=tuple(DefaultVJP(r) for r in plan.rules))


def _loss(model: nn.Module, weights: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (x,))
    return nn.functional.cross_entropy(out, y)


def _grads(model: nn.Module, weights: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [w.detach().requires_grad_() for w in weights]
    return list(torch.autograd.grad(_loss(model, leaves, x, y), leaves))


def train_with_core(
    plan: core.Plan, model: nn.Module, data: Sequence[tuple[Tensor, Tensor]]
) -> list[list[list[Tensor]]]:
    """Train ``model``'s weights (a copy) with the core on ``data``; the hypergradients each step used."""
    weights = [p.detach().clone() for p in model.parameters()]
    state = core.init(plan, weights)
    used = []
    for x, y in data:
        grads = _grads(model, weights, x, y)
        used.append(core.hypergradients(plan, state, grads))
        deltas, state = core.update(plan, state, grads)
        weights = [w - d for w, d in zip(weights, deltas, strict=True)]
    return used


def check_hypergradients_by_finite_differences(
    plan: core.Plan, model: nn.Module, data: Sequence[tuple[Tensor, Tensor]], eps: float = 1e-6
) -> int:
    """``d loss_t / d raw h_(t-1)`` of every learned value of every level equals its central finite difference.

    Trains on ``data[:-1]`` with the core; the loss is ``data[-1]``'s after the last step, as a function of the raw
    hyperparameters before that step (the hypergradients that step used held fixed: the paper's one-step
    derivative). Float64 expected. Returns the number of values checked.
    """
    weights = [p.detach().clone() for p in model.parameters()]
    state = core.init(plan, weights)
    for x, y in data[:-1]:
        grads = _grads(model, weights, x, y)
        before, weights_before, grads_before = state, weights, grads
        deltas, state = core.update(plan, state, grads)
        weights = [w - d for w, d in zip(weights, deltas, strict=True)]
    used = core.hypergradients(plan, before, grads_before)
    x, y = data[-1]

    def loss_after_last_step(start: core.TowerState) -> float:
        deltas, _ = core.update(plan, start, grads_before, used)
        return _loss(model, [w - d for w, d in zip(weights_before, deltas, strict=True)], x, y).item()

    assert loss_after_last_step(before) == pytest.approx(_loss(model, weights, x, y).item(), rel=1e-13)
    hyper = core.hypergradients(plan, state, _grads(model, weights, x, y))
    checked = 0
    for k, names in enumerate(plan.learned[:-1]):
        for i, name in enumerate(names):

            def shifted(delta: float, k: int = k, i: int = i) -> core.TowerState:
                levels = list(before.levels)
                hp = levels[k].hp[0].clone()
                hp[..., i] += delta
                levels[k] = core.LevelState([hp], levels[k].rule)
                return before._replace(levels=levels)

            fd = (loss_after_last_step(shifted(eps)) - loss_after_last_step(shifted(-eps))) / (2 * eps)
            assert hyper[k][0][i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (k, name)
            checked += 1
    assert checked == sum(len(n) for n in plan.learned)
    return checked


def overflow_at_the_second_step(
    spec: str, each_step: Callable[[Any], None] = lambda opt: None
) -> tuple[hypergrad.NonFiniteHyperparameterError, Tensor, Tensor]:
    """Train ``spec`` (level 1 starting at step size 1e35) on three weights with a constant gradient of 1e3 until its
    level-1 step size overflows float32 (the second step's hypergradient is -3e6). Returns the error, the weights
    before the failing step and the weights after it; ``each_step(optimizer)`` runs after every completed step."""
    w = nn.Parameter(torch.ones(3))
    opt = hypergrad.tower(spec, [w])
    with pytest.raises(hypergrad.NonFiniteHyperparameterError, match=r"hyperparameter 'lr' of level 1 became") as e:
        for _ in range(2):
            snapshot = w.detach().clone()
            (1e3 * w).sum().backward()
            opt.step()
            opt.zero_grad()
            each_step(opt)
    return e.value, snapshot, w.detach()


def train_small_mlp(
    spec: str,
    steps: int,
    dtype: torch.dtype,
    *,
    groups: int = 2,
    after_step: Callable[[torch.optim.Optimizer, int], None] | None = None,
    **tower: Any,
) -> tuple[torch.optim.Optimizer, nn.Module, torch.Generator]:
    """``steps`` steps of the canonical loop with ``hypergrad.tower(spec, ..., **tower)`` on a 10-8-3 tanh MLP (seed
    0), random batches of 16: two param groups (the second with step size 0.02) or one; ``after_step(opt, step)`` may
    check or change the optimizer between steps. Returns the optimizer, the model and the batch generator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    params = list(model.parameters())
    split = params if groups == 1 else [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]
    opt = hypergrad.tower(spec, split, **tower)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randn(16, 10, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(opt, step)
    return opt, model, g


def spawn_two_gloo_ranks(worker: Callable[..., None], args: tuple, done: str) -> None:
    """``mp.spawn(worker, args, nprocs=2)`` for a worker that writes its results, passes ``dist.barrier()``, touches
    ``f"{done}.{rank}"`` and then tears gloo down.

    gloo's teardown can abort a process after the work is done: a rank that closes its sockets while the other rank's
    background thread still reads makes that thread call std::terminate ("terminate called without an active
    exception"; three times in this project's CI runs, with the barrier already in place). That abort, and only it, is
    not a failure of what these tests check: SIGABRT after some rank passed the barrier, by when both ranks had written
    their results. An exception, any other signal, an abort before the barrier, or a missing result fails as before."""
    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT" or not any(Path(f"{done}.{rank}").exists() for rank in (0, 1)):
            raise
