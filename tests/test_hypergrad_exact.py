"""The method is the paper's: equal to torch.optim when nothing is learned, to the reference package, to an
independent slow reference written here from the definition, and hypergradients equal closed forms and finite
differences."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import hypergrad
from hypergrad import core
from hypergrad.rules import AdaGradRule, AdamRule, AdamWRule, RMSPropRule, Rule, SGDRule
from hypergrad.stable import StableAdamRule, StableMomentumRule, StableSGDRule
from tests.hypergrad_helpers import check_hypergradients_by_finite_differences, train_with_core, with_default_vjp

torch.set_default_dtype(torch.float32)


def make_mlp(seed: int = 1, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 10, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(
    spec: str, steps: int = 15, dtype: torch.dtype = torch.float32, **kw
) -> tuple[list[float], nn.Module, object]:
    model = make_mlp(dtype=dtype)
    opt = hypergrad.tower(spec, model.parameters(), **kw)
    losses = []
    for x, y in batches(steps, dtype):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model, opt


# -- 1. nothing learned == torch.optim --------------------------------------------------------------------------
def adam_with_reference_initial_state(params) -> torch.optim.Optimizer:
    # The reference starts Adam's second moment at eps instead of 0 (sqrt is not differentiable at 0): give torch's
    # Adam the same initial state, and the two must agree to round-off.
    params = list(params)
    opt = torch.optim.Adam(params, lr=0.01, eps=1e-8)
    for p in params:
        opt.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p) + 1e-8,
        }
    return opt


TORCH_EQUIVALENTS = [
    ("sgd(0.1)/sgd(0.0)", lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd(0.1, momentum=0.9)/sgd(0.0)", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ("adam(0.01)/sgd(0.0)", adam_with_reference_initial_state),
    # The reference adds eps inside the square root, torch outside: with eps = 0 the two are the same rule.
    ("adagrad(0.1, eps=0.0)/sgd(0.0)", lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1, eps=0)),
    ("rmsprop(0.01, gamma=0.9, eps=0.0)/sgd(0.0)", lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=0)),
]


@pytest.mark.parametrize(("spec", "make_torch"), TORCH_EQUIVALENTS, ids=[s for s, _ in TORCH_EQUIVALENTS])
def test_hyper_step_zero_reproduces_torch_optim_step_by_step(spec, make_torch) -> None:
    ours, theirs = make_mlp(dtype=torch.float64), make_mlp(dtype=torch.float64)
    opt_ours, opt_theirs = hypergrad.tower(spec, ours.parameters()), make_torch(theirs.parameters())
    for x, y in batches(20, torch.float64):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- 2. equal to the paper's reference package -------------------------------------------------------------------
def reference_losses(make_opt, steps: int) -> list[float]:
    from gradient_descent_the_ultimate_optimizer import gdtuo

    mw = gdtuo.ModuleWrapper(make_mlp(), optimizer=make_opt(gdtuo))
    mw.initialize()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the reference's create_graph=True leak warning, its known flaw
        for x, y in batches(steps):
            mw.begin()
            mw.zero_grad()
            loss = nn.functional.cross_entropy(mw.forward(x), y)
            loss.backward(create_graph=True)
            mw.step()
            losses.append(loss.item())
    return losses


REFERENCE_TOWERS = [
    ("sgd(0.1)/sgd(0.01)", lambda g: g.SGD(0.1, optimizer=g.SGD(0.01))),
    (
        "sgd(0.1, momentum=0.9)/sgd(1e-3)/sgd(1e-3)",
        lambda g: g.SGD(0.1, 0.9, optimizer=g.SGD(1e-3, optimizer=g.SGD(1e-3))),
    ),
    ("adam(0.01)/sgd(1e-4)", lambda g: g.Adam(0.01, optimizer=g.SGD(1e-4))),
    ("adam[lr](0.01)/sgd(1e-4)", lambda g: g.AdamBaydin(0.01, optimizer=g.SGD(1e-4))),
    ("adam(0.01)/adam(1e-3)/sgd(1e-4)", lambda g: g.Adam(0.01, optimizer=g.Adam(1e-3, optimizer=g.SGD(1e-4)))),
    ("rmsprop(0.01)/sgd(1e-3)", lambda g: g.RMSProp(0.01, optimizer=g.SGD(1e-3))),
    ("rmsprop[lr](0.01)/sgd(1e-3)", lambda g: g.RMSPropAlpha(0.01, optimizer=g.SGD(1e-3))),
    ("adagrad(0.1)/sgd(1e-3)", lambda g: g.AdaGrad(0.1, optimizer=g.SGD(1e-3))),
    ("sgd(0.05)/adam(1e-3)/adagrad(1e-3)", lambda g: g.SGD(0.05, optimizer=g.Adam(1e-3, optimizer=g.AdaGrad(1e-3)))),
]


@pytest.mark.parametrize(("spec", "make_ref"), REFERENCE_TOWERS, ids=[s for s, _ in REFERENCE_TOWERS])
def test_tower_reproduces_the_reference_package_to_round_off(spec, make_ref) -> None:
    ours, _, _ = train(spec, steps=25)
    theirs = reference_losses(make_ref, 25)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0)


# -- 3. an obviously-correct slow reference, written from the method's definition --------------------------------
class SlowLevel:
    """One level, scalar hyperparameters as separate tensors, state per tensor in a dict: the paper's method read
    literally (update hyperparameters top-down with d loss_t / d h_(t-1), then the weights with the new values)."""

    def __init__(self, kind: str, lr: float, momentum: float = 0.0) -> None:
        self.kind, self.t, self.state = kind, 0, {}
        self.h = {"lr": torch.tensor(lr, dtype=torch.float64)}
        if kind == "sgd" and momentum:
            self.h["momentum"] = torch.tensor(momentum, dtype=torch.float64)
        if kind == "adam":
            self.h["beta1"] = torch.atanh(torch.tensor(2 * 0.9 - 1, dtype=torch.float64))
            self.h["beta2"] = torch.atanh(torch.tensor(2 * 0.999 - 1, dtype=torch.float64))
        self.h = {n: v.requires_grad_() for n, v in self.h.items()}

    def new_values(self, key: str, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "sgd":
            if "momentum" in self.h:
                buf = g if key not in self.state else self.state[key] * self.h["momentum"] + g
                self.state[key] = buf.detach()
                g = buf
            return p - self.h["lr"] * g
        b1, b2 = (torch.tanh(self.h["beta1"]) + 1) / 2, (torch.tanh(self.h["beta2"]) + 1) / 2
        m0, v0 = self.state.get(key, (torch.zeros_like(p), torch.zeros_like(p) + 1e-8))
        m, v = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g
        self.state[key] = (m.detach(), v.detach())
        mh, vh = m / (1 - b1**self.t), v / (1 - b2**self.t)
        return p - self.h["lr"] * mh / (torch.sqrt(vh) + 1e-8)


def slow_reference(levels: list[SlowLevel], steps: int) -> list[float]:
    model = make_mlp(dtype=torch.float64)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for x, y in batches(steps, torch.float64):
        w = {n: p.requires_grad_() if not p.requires_grad else p for n, p in w.items()}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, w, (x,)), y)
        losses.append(loss.item())
        learned = [lv.h for lv in levels[:-1]]
        flat = [(k, name) for k, h in enumerate(learned) for name in h]
        grads = torch.autograd.grad(loss, [w[n] for n in w] + [learned[k][n] for k, n in flat], allow_unused=True)
        g_w = dict(zip(w, grads[: len(w)], strict=True))
        hyper = {
            kn: (torch.tensor(0.0, dtype=torch.float64) if g is None else g.detach())
            for kn, g in zip(flat, grads[len(w) :], strict=True)
        }
        for lv in levels:
            lv.t += 1
        # Top-down: level k+1 (with its new values, still differentiable) updates level k's hyperparameters.
        for k in range(len(levels) - 2, -1, -1):
            levels[k].h = {n: levels[k + 1].new_values(n, hyper[(k, n)], levels[k].h[n].detach()) for n in levels[k].h}
            if k == len(levels) - 2:
                levels[k].h = {n: v.detach().requires_grad_() for n, v in levels[k].h.items()}
        w = {n: levels[0].new_values(n, g_w[n].detach(), w[n].detach()) for n in w}
    return losses


SLOW_TOWERS = [
    ("sgd(0.1)/sgd(0.01)", lambda: [SlowLevel("sgd", 0.1), SlowLevel("sgd", 0.01)]),
    (
        "sgd(0.1, momentum=0.5)/sgd(0.01)/sgd(0.01)",
        lambda: [SlowLevel("sgd", 0.1, 0.5), SlowLevel("sgd", 0.01), SlowLevel("sgd", 0.01)],
    ),
    ("adam(0.01)/sgd(1e-3)", lambda: [SlowLevel("adam", 0.01), SlowLevel("sgd", 1e-3)]),
    (
        "adam(0.01)/adam(1e-3)/sgd(1e-3)/sgd(1e-4)",
        lambda: [SlowLevel("adam", 0.01), SlowLevel("adam", 1e-3), SlowLevel("sgd", 1e-3), SlowLevel("sgd", 1e-4)],
    ),
]


@pytest.mark.parametrize(("spec", "make_levels"), SLOW_TOWERS, ids=[s for s, _ in SLOW_TOWERS])
def test_towers_of_height_1_to_3_equal_the_slow_definition(spec, make_levels) -> None:
    ours, _, _ = train(spec, steps=20, dtype=torch.float64)
    theirs = slow_reference(make_levels(), 20)
    assert ours == pytest.approx(theirs, rel=1e-10, abs=0)


def test_a_50_level_tower_trains() -> None:
    losses, model, opt = train("sgd(0.1)" + "/sgd(1e-3)" * 50, steps=30)
    assert opt.height == 50 and len(opt.hyperparameters()) == 51
    assert all(math.isfinite(v) for level in opt.hyperparameters() for v in level.values())
    assert sum(losses[-5:]) < sum(losses[:5])


# -- 4. hypergradients: closed form, the default (autograd) vjp and central finite differences ---------------------
def test_sgd_hypergradient_is_minus_the_dot_product_of_consecutive_gradients() -> None:
    model = make_mlp(dtype=torch.float64)
    opt = hypergrad.tower("sgd(0.1)/sgd(0.0)", model.parameters())
    (x1, y1), (x2, y2) = batches(2, torch.float64)
    nn.functional.cross_entropy(model(x1), y1).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x2), y2).backward()
    g2 = [p.grad.clone() for p in model.parameters()]
    hyper = core.hypergradients(opt._plan, opt._tower, g2)
    closed = -sum((a * b).sum() for a, b in zip(g1, g2, strict=True))
    assert hyper[0][0].item() == pytest.approx(closed.item(), rel=1e-12)


FD_SPECS = [
    "sgd(0.1, momentum=0.9)/sgd(1e-3)/sgd(1e-3)",
    "adam(0.01)/adam(1e-3)/sgd(1e-3)",
    "adagrad(0.1)/rmsprop(1e-3)/sgd(1e-3)",
    "rmsprop(0.01, gamma=0.9)/adagrad(1e-2)/sgd(1e-3)",
    "adam(0.01)/sgd(1e-3)",
    "adamw(0.01, weight_decay=0.1)/adamw(1e-3)/sgd(1e-3)",
]


def plan_of(spec: str, **kw) -> core.Plan:
    return hypergrad.tower(spec, make_mlp(dtype=torch.float64).parameters(), **kw)._plan


@pytest.mark.parametrize("spec", FD_SPECS)
@pytest.mark.parametrize("parameterization", ["reference", "log"])
@pytest.mark.parametrize("vjp", ["closed form", "default"])
def test_every_hypergradient_equals_central_finite_differences(spec, parameterization, vjp) -> None:
    """d loss_t / d h_(t-1) through one step, for every learned hyperparameter of every level, in float64, with the
    built-in rules' closed-form vjps and with the default vjp (autograd through each rule's update)."""
    plan = plan_of(spec, parameterization=parameterization)
    if vjp == "default":
        plan = with_default_vjp(plan)
    # a few steps first, so that momentum, moments and bias corrections are all in play
    assert check_hypergradients_by_finite_differences(plan, make_mlp(dtype=torch.float64), batches(4, torch.float64))


@pytest.mark.parametrize(
    "spec", [*FD_SPECS, "sgd(0.1)/sgd(1e-3)", "adam[lr](0.01)/sgd(1e-3)", "rmsprop[lr](0.01)/sgd(1e-3)"]
)
def test_closed_form_hypergradients_equal_the_default_vjp_through_a_tower(spec) -> None:
    """The built-in rules' closed-form vjp is only a speed-up: every step's hypergradients equal the default's."""
    plan = plan_of(spec)
    fast = train_with_core(plan, make_mlp(dtype=torch.float64), batches(6, torch.float64))
    slow = train_with_core(with_default_vjp(plan), make_mlp(dtype=torch.float64), batches(6, torch.float64))
    assert all(bool(h.abs().min() > 0) for level in fast[-1] for h in level)  # every level has acted by then
    for a, b in zip(fast, slow, strict=True):
        for level_a, level_b in zip(a, b, strict=True):
            for x, y in zip(level_a, level_b, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-14)


CLOSED_FORMS = [
    (SGDRule(), {"lr": 0.1, "momentum": 0.0}),
    (SGDRule(), {"lr": 0.1, "momentum": 0.9}),
    (AdamRule(), {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
    (AdamWRule(), {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}),
    (AdaGradRule(), {"lr": 0.1, "eps": 1e-10, "initial_accumulator_value": 0.1}),
    (RMSPropRule(), {"lr": 0.01, "gamma": 0.9, "eps": 1e-8}),
    (StableSGDRule(), {"lr": 0.1, "momentum": 0.9}),
    (StableMomentumRule(), {"lr": 0.1, "momentum": 0.9}),
    (StableAdamRule(), {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
]


@pytest.mark.parametrize(("rule", "values"), CLOSED_FORMS, ids=[f"{type(r).__name__}-{v}" for r, v in CLOSED_FORMS])
@pytest.mark.parametrize("learn", ["all", "lr", "all but lr"])
@pytest.mark.parametrize("step", [1, 2, 5])
def test_every_closed_form_vjp_equals_the_default_vjp(rule, values, learn, step) -> None:
    """Rule by rule, learned subset by subset, at the first step and later ones (random tensors, float64)."""
    assert not rule.vjp_needs_inputs  # the closed form reads only the state after the step: no gradient copied
    g = torch.Generator().manual_seed(step)
    names = rule.learnable(values)
    names = {"all": names, "lr": ("lr",), "all but lr": tuple(n for n in names if n != "lr")}[learn]
    hp = {n: torch.tensor(v, dtype=torch.float64) if n in names else v for n, v in values.items()}
    param = torch.randn(7, 3, generator=g, dtype=torch.float64)
    state = rule.init(param, hp)
    for t in range(1, step + 1):
        grad = torch.randn(7, 3, generator=g, dtype=torch.float64)
        before = state
        _, state = rule.update(grad, before, hp, t)
    grad_next = torch.randn(7, 3, generator=g, dtype=torch.float64)
    dot = lambda a, b: torch.dot(a.reshape(-1), b.reshape(-1))  # noqa: E731
    closed = rule.vjp(grad_next, None, None, state, hp, step, dot)
    default = Rule.vjp(rule, grad_next, grad, before, state, hp, step, dot)
    zero = torch.zeros((), dtype=torch.float64)
    assert set(closed) <= set(names) and set(default) <= set(names)
    for n in names:
        torch.testing.assert_close(closed.get(n, zero), default.get(n, zero), rtol=1e-10, atol=1e-15)
