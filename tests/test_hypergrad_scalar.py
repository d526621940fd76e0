"""The hyper levels as Python floats (hypergrad._scalar) compute what the tensor path computes: the new raw
hyperparameters, the rule states and the hypergradients of every level above the first, to 1e-12 in float64 (the
float path is float64 throughout; see the module docstring for float32)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hypergrad
from hypergrad import _scalar, core

SPECS = [
    "sgd(0.1)/sgd(1e-3)/sgd(1e-3)",
    "sgd(0.1, momentum=0.9)/sgd(1e-3, momentum=0.5)/sgd(1e-4)",
    "adam(0.01)/adam(1e-3)/adam(1e-4)/sgd(1e-4)",
    "adam[lr](0.01)/sgd(1e-3)",
    "rmsprop(0.01, gamma=0.9)/adagrad(1e-2)/rmsprop(1e-3)/sgd(1e-3)",
    "sgd(0.05)/adam(1e-3)/adagrad(1e-3)",
    "adam(0.01)" + "/adam(1e-7)" * 6,
]


def steps(spec: str, n: int, parameterization: str = "reference", groups: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    params = list(model.parameters())
    if groups == 2:
        params = [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]
    opt = hypergrad.tower(spec, params, parameterization=parameterization)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n + 1)
    ]
    for x, y in data[:n]:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    x, y = data[n]
    nn.functional.cross_entropy(model(x), y).backward()
    return opt, [p.grad.detach().clone() for p in model.parameters()]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("parameterization", ["reference", "log"])
@pytest.mark.parametrize("groups", [1, 2])
def test_float_chain_equals_the_tensor_path(spec, parameterization, groups) -> None:
    opt, grads_next = steps(spec, 3, parameterization, groups)
    plan = opt._plan
    assert _scalar.applies(plan)
    before, grads, hyper = opt._prev
    live, deltas = core.update(plan, before, grads, hyper)
    hp, rule_states, trace = _scalar.update(plan, before.levels, hyper, before.step + 1)
    for k in range(plan.height):
        for a, b in zip(hp[k], live.levels[k].hp, strict=True):
            close(a, b)
    for k in range(1, plan.height + 1):
        for a, b in zip(rule_states[k - 1], live.levels[k].rule, strict=True):
            assert type(a) is type(b)
            for x, y in zip(a, b, strict=True):
                assert (x is None) == (y is None)
                if x is not None:
                    close(x, y)
    want = core.hypergradients(plan, live, deltas, grads_next)
    got = _scalar.hypergradients(plan, trace, want[0])
    assert len(got) == plan.height - 1
    for a, b in zip(got, want[1:], strict=True):
        close(a[0], b[0])


def test_population_and_wrapped_rules_keep_the_tensor_path() -> None:
    opt, _ = steps("adam(0.01)/sgd(1e-3)", 1)
    assert _scalar.applies(opt._plan)
    assert not _scalar.applies(core.Plan(**{**opt._plan.__dict__, "batch_shape": (3,)}))
    stable = hypergrad.tower("adam(0.01)/sgd(1e-3)", [torch.zeros(2, requires_grad=True)], stable=True)
    assert not _scalar.applies(stable._plan)


def test_float_arithmetic_that_raises_in_python_ends_as_ieee_arithmetic() -> None:
    """1 / 0 raises in Python floats but is inf in torch: such a step is computed again in numpy float64."""

    def f(x, y, m):
        return [x / y, m.sqrt(x - 2.0), m.exp(1000.0 * x)]

    inf = float("inf")
    out = _scalar.ieee(f, 1.0, 0.0)
    assert out[0] == inf and out[1] != out[1] and out[2] == inf
    assert all(type(v) is float for v in out)
    assert _scalar.ieee(f, 4.0, 2.0)[:2] == [2.0, math.sqrt(2.0)]
