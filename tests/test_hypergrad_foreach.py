"""The multi-tensor rules (hypergrad._foreach) are the per-tensor rules, only faster: updates bitwise, closed-form
vjps to round-off (they sum the dot products over tensors before the scalar factors, see the module docstring)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from hypergrad import _foreach
from hypergrad.rules import rules

SHAPES = [(128, 784), (128,), (10, 128), (10,)]  # the paper's MNIST MLP

CASES = [
    ("sgd", {"lr": 0.1}, ("lr",)),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, ("lr", "momentum")),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, ()),
    ("adam", {"lr": 0.01}, ("lr", "beta1", "beta2")),
    ("adam", {"lr": 0.01}, ("lr",)),
    ("adam", {"lr": 0.01}, ("beta2",)),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}, ("lr", "beta1", "beta2", "weight_decay")),
    ("adagrad", {"lr": 0.1}, ("lr",)),
    ("rmsprop", {"lr": 0.01, "gamma": 0.9}, ("lr", "gamma")),
    ("rmsprop", {"lr": 0.01, "gamma": 0.9}, ("lr",)),
]
IDS = [f"{n}-{'+'.join(learned) or 'fixed'}" for n, _, learned in CASES]


def setup(name: str, values: dict, learned: tuple, dtype: torch.dtype, seed: int = 0):
    rule = rules()[name]
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(4)]
    hp = dict(rule.defaults, **values)
    hp = {k: torch.tensor(v, dtype=dtype) if k in learned else float(v) for k, v in hp.items()}
    states = [rule.init(p, hp) for p in params]
    return rule, grads, states, hp


def per_tensor(rule, grads, states, hp, step):
    out = [rule.update(g, s, hp, step) for g, s in zip(grads, states, strict=True)]
    return [d for d, _ in out], [s for _, s in out]


def flat(states) -> list[torch.Tensor | None]:
    return [t for s in states for t in s]


@pytest.mark.parametrize(("name", "values", "learned"), CASES, ids=IDS)
def test_foreach_update_is_the_per_tensor_update_bitwise(name, values, learned) -> None:
    rule, grads, states, hp = setup(name, values, learned, torch.float32)
    ours, theirs = states, states
    for step, g in enumerate(grads, start=1):
        out = _foreach.update(rule, g, ours, hp, step)
        assert out is not None
        d_ours, ours = out
        d_theirs, theirs = per_tensor(rule, g, theirs, hp, step)
        assert [type(x) for x in ours] == [type(x) for x in theirs]
        for a, b in zip(d_ours + flat(ours), d_theirs + flat(theirs), strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (step, (a - b).abs().max())


@pytest.mark.parametrize(
    ("name", "values", "learned"), [c for c in CASES if c[2]], ids=[i for c, i in zip(CASES, IDS, strict=True) if c[2]]
)
def test_foreach_vjp_is_the_sum_of_per_tensor_vjps(name, values, learned) -> None:
    rule, grads, states, hp = setup(name, values, learned, torch.float64)
    for step in range(1, len(grads)):
        _, after = per_tensor(rule, grads[step - 1], states, hp, step)
        g_next = grads[step]
        ours = _foreach.vjp(rule, g_next, after, hp, step)

        def dot(a, b):
            return torch.dot(a.reshape(-1), b.reshape(-1))

        theirs: dict[str, torch.Tensor] = {}
        for u, g, b, a in zip(g_next, grads[step - 1], states, after, strict=True):
            assert not rule.vjp_needs_inputs  # the foreach vjp reads only the states after the step
            for k, v in rule.vjp(u, g, b, a, hp, step, dot).items():
                theirs[k] = v if k not in theirs else theirs[k] + v
        assert ours is not None and sorted(ours) == sorted(theirs)
        assert set(ours) == set(learned) - ({"momentum"} if step == 1 else set())  # momentum acts from step 2
        for k in ours:
            # abs: at step 1 Adam's d delta / d beta1 is exactly 0 (the bias correction cancels it), and both sides
            # are the round-off of terms of order 1.
            assert ours[k].item() == pytest.approx(theirs[k].item(), rel=1e-12, abs=1e-13), (step, k)
        states = after


def test_population_hyperparameters_take_the_per_tensor_path_with_one_logged_line(caplog) -> None:
    rule, grads, states, hp = setup("adam", {"lr": 0.01}, ("lr",), torch.float32)
    hp["lr"] = torch.full((3, 1), 0.01)  # three members, broadcast against (members, ...) tensors
    _foreach._told.discard("batched")
    with caplog.at_level(logging.INFO, logger="hypergrad"):
        assert _foreach.update(rule, grads[0], states, hp, 1) is None
        assert _foreach.update(rule, grads[0], states, hp, 2) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "hypergrad"]
    assert len(lines) == 1 and "population" in lines[0]


def test_a_user_rule_is_not_taken_by_the_foreach_path() -> None:
    from hypergrad.rules import EmptyState, Rule

    class Plain(Rule):
        name = "plain_for_test"
        defaults = {"lr": 0.1}
        transforms = {}

        def init(self, param, hp):
            return EmptyState()

        def update(self, grad, state, hp, step):
            return grad * hp["lr"], state

    assert _foreach.update(Plain(), [torch.ones(2)], [EmptyState()], {"lr": 0.1}, 1) is None


def _train(spec: str, dtype: torch.dtype, steps: int = 8) -> list[torch.Tensor]:
    import hypergrad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    opt = hypergrad.tower(spec, [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 10, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "spec", ["sgd(0.1, momentum=0.9)", "adam(0.01)", "rmsprop(0.01)", "adagrad(0.1)", "adamw(0.01)"]
)
def test_the_optimizer_on_the_foreach_path_trains_bit_for_bit_as_per_tensor(spec, monkeypatch) -> None:
    """Nothing learned: the weights' updates only, which the foreach path reproduces bitwise (float32)."""
    calls = []
    real = _foreach.update
    monkeypatch.setattr(_foreach, "update", lambda *a: calls.append(1) or real(*a))
    fast = _train(spec, torch.float32)
    assert calls  # the core took the foreach path
    monkeypatch.setattr(_foreach, "BUILTIN", ())
    slow = _train(spec, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


@pytest.mark.parametrize(
    "spec", ["adam(0.01)/adam(1e-3)/sgd(1e-4)", "sgd(0.1, momentum=0.5)/sgd(1e-3)", "rmsprop(0.01)/sgd(1e-3)"]
)
def test_a_tower_on_the_foreach_path_trains_as_per_tensor(spec, monkeypatch) -> None:
    """Learned levels: the vjps agree to round-off (dots summed before the scalar factors), float64."""
    fast = _train(spec, torch.float64)
    monkeypatch.setattr(_foreach, "BUILTIN", ())
    slow = _train(spec, torch.float64)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_vjp_on_the_updates_kept_values_is_bitwise_the_vjp_that_computes_them(name, monkeypatch) -> None:
    """The eager update keeps sqrt(v_hat) and sqrt(v_hat) + eps for the next vjp: it must give the very same bits as
    the vjp computing them, and a state written in place since must not be served the kept values."""
    monkeypatch.setattr(_foreach, "_DENS", {})  # nothing left by another test
    rule, grads, states, hp = setup(name, {"lr": 0.01}, tuple(rules()[name].transforms), torch.float32)
    _, after = _foreach.update(rule, grads[0], states, hp, 1)
    _, after = _foreach.update(rule, grads[1], after, hp, 2)
    key = id(after[0].exp_avg_sq)
    assert key in _foreach._DENS and len(_foreach._DENS) == 1  # kept by the update; the step before's dropped
    kept = _foreach.vjp(rule, grads[2], after, hp, 2)
    assert key not in _foreach._DENS  # used once
    computed = _foreach.vjp(rule, grads[2], after, hp, 2)
    assert sorted(kept) == sorted(computed) and all(torch.equal(kept[k], computed[k]) for k in kept)

    _, after = _foreach.update(rule, grads[2], after, hp, 3)
    after[0].exp_avg_sq.mul_(2.0)  # a write in place after the update
    calls = []
    real = _foreach._adam_vjp
    monkeypatch.setattr(_foreach, "_adam_vjp", lambda *a: calls.append(a[-1]) or real(*a))
    _foreach.vjp(rule, grads[3], after, hp, 3)
    assert calls == [None]  # computed from the state as it is now, not taken from the update


# -- Adam's scalars as numbers of the dtype (_foreach.adam_values, adam_hypergradient) -------------------------------
def _state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor of the optimizer's tower state, levels and traces, in order."""
    from hypergrad import core

    state = core.materialize(opt._live)

    def walk(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for k in sorted(x):
                yield from walk(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                yield from walk(v)

    return [t.clone() for t in walk([state.levels, state.trace])]


def _train_recording(spec: str, dtype: torch.dtype, how: str, steps: int = 10) -> list[torch.Tensor]:
    """Weights and the whole state after every step; ``how="peek"``: and the hypergradients, read by
    core.hypergradients before each step (which takes the update's numbers and leaves the step to compute its own
    from tensors); ``how="write"``: level 0's raw values of a group halved in place after every third step (which
    the next hypergradient reads, through the views of them that the trace's values are)."""
    import hypergrad
    from hypergrad import core

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    params = list(model.parameters())
    opt = hypergrad.tower(spec, [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}])
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(16, 10, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if how == "peek" and opt._live is not None:
            out += [h.clone() for level in core.hypergradients(opt._plan, opt._live, [p.grad for p in params])
                    for h in level]  # fmt: skip
        opt.step()
        opt.zero_grad()
        out += [p.detach().clone() for p in params] + _state_tensors(opt)
        if how == "write" and opt._live.step % 3 == 0:
            with torch.no_grad():
                opt._live.levels[0].hp[1].mul_(0.5)
    return out


@pytest.mark.parametrize(
    "spec", ["adam(0.01)/sgd(1e-3)", "adam(0.01)" + "/adam(1e-3)" * 3, "adam(0.01)" + "/sgd(1e-3)" * 3]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("how", ["step", "peek", "write"])
def test_adam_scalars_as_numbers_give_the_tensor_paths_results_bitwise(spec, dtype, how, monkeypatch) -> None:
    """adam/...: level 0's scalars (values, bias corrections, the vjp's scalar part) as numbers of the dtype give the
    very weights, hyperparameters, hypergradients and state, bit for bit, that the 0-dim tensor operations give."""
    calls = []
    real = _foreach.adam_hypergradient
    monkeypatch.setattr(_foreach, "adam_hypergradient", lambda *a: calls.append(1) or real(*a))
    fast = _train_recording(spec, dtype, how)
    # every step after the first took the numbers path, both param groups, except after a write
    assert len(calls) == 2 * (9 if how != "write" else 6)
    monkeypatch.setattr(_foreach, "numbers_apply", lambda *a: False)
    slow = _train_recording(spec, dtype, how)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_the_numbers_path_is_taken_only_where_it_applies() -> None:
    import hypergrad

    def numbers(spec, **kw) -> bool:
        return hypergrad.tower(spec, [torch.zeros(2)], **kw)._plan.numbers

    assert numbers("adam(0.01)/sgd(1e-3)") and numbers("adam(0.01)/adam(1e-3)/adam(1e-3)")
    assert not numbers("adam(0.01)")  # nothing learned
    assert not numbers("adam[lr](0.01)/sgd(1e-3)")  # a subset learned: fixed values meet the scalars as floats
    assert not numbers("adam(0.01)/sgd(1e-3)", parameterization="log")  # exp stays torch's
    assert not numbers("adamw(0.01)/sgd(1e-3)") and not numbers("sgd(0.1, momentum=0.9)/sgd(1e-3)")


RAWS = [  # level 0's raw (lr, beta1, beta2): ordinary, saturated tanh (beta = 1: c = 0), negative, huge, inf, nan
    (0.01, 1.47, 3.45),
    (-0.3, 0.1, -0.2),
    (1e-3, 30.0, 40.0),
    (2.0, -30.0, 9.0),
    (1e30, 1e30, -1e30),
    (0.0, float("inf"), float("-inf")),
    (float("nan"), 0.5, float("nan")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("step", [1, 2, 3, 4, 7, 1000])
def test_adam_numbers_are_the_0dim_tensor_operations_bitwise(dtype, step) -> None:
    """adam_values' numbers and _adam_sums on numbers equal the 0-dim tensor operations of the tensor path, bit for
    bit, also where they give 0, inf or nan (a bias correction of a saturated beta, an overflowing product)."""
    from hypergrad.rules import _power_corrections
    from hypergrad.transforms import HALF_TANH, value_and_slope

    def same(x, tensor) -> bool:
        return torch.equal(torch.tensor(float(x), dtype=dtype).view(1), tensor.view(1).to(dtype)) or (
            math.isnan(float(x)) and bool(tensor.isnan())
        )

    g = torch.Generator().manual_seed(step)
    for raw in RAWS:
        raw = torch.tensor(raw, dtype=dtype)
        _foreach._NUMS.clear()
        ((values,), ((_, d1_ours, d2_ours),)) = _foreach.adam_values([{"eps": 1e-8}], [raw], step)
        ((_, n),) = _foreach._NUMS.values()
        lr = raw.select(-1, 0)  # the tensor path's values: core._values_slopes
        (b1, d1), (b2, d2) = (
            value_and_slope(HALF_TANH, raw.select(-1, 1)),
            value_and_slope(HALF_TANH, raw.select(-1, 2)),
        )
        hp = {"lr": lr, "beta1": b1, "beta2": b2}
        c1, c2, dc1, dc2 = _power_corrections(hp, step)
        a1, a2 = torch.rsub(b1, 1.0), torch.rsub(b2, 1.0)
        for x, t in zip(n[:11], (lr, b1, b2, a1, a2, c1, c2, dc1, dc2, d1, d2), strict=True):
            assert same(x, t)
        assert all(same(x, values[k]) for x, k in zip(n, ("lr", "beta1", "beta2"), strict=False))
        assert same(n.d1, d1_ours) and same(n.d2, d2_ours)  # the slopes the trace keeps
        for _ in range(5):
            dots = torch.randn(4, generator=g, dtype=dtype) * 10.0 ** torch.randint(-30, 30, (4,), generator=g)
            theirs = _foreach._adam_sums(_foreach._ADAM, dots[0], dots[1], None, dots[2], dots[3], lr, b1, b2, c1,
                                         c2, dc1, dc2, a1, a2)  # fmt: skip
            num = type(n.lr)
            with np.errstate(all="ignore"):
                ours = _foreach._adam_sums(_foreach._ADAM, *(num(x) for x in dots[:2].tolist()), None,
                                           *(num(x) for x in dots[2:].tolist()), n.lr, n.b1, n.b2, n.c1, n.c2,
                                           n.dc1, n.dc2, n.a1, n.a2)  # fmt: skip
            assert all(same(ours[k], theirs[k]) for k in theirs)
