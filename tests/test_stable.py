"""The opt-in stable mode (docs/stable.md): no tower diverges, the default still is the paper's reference, the
stable parameterization's hypergradients are exact, and the harness key reaches the library."""

from __future__ import annotations

import gc
import itertools
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import hypergrad
from hypergrad import core
from hypergrad.rules import AdaGradRule, AdamRule, AdamWRule, RMSPropRule, SGDRule
from hypergrad.stable import (
    GROW,
    HORIZON,
    MAX_LOG_LR,
    MAX_MOMENTUM,
    MAX_RADIUS,
    MOMENTUM_HORIZON,
    RADIUS,
    SHRINK,
    GuardedRule,
    StableAdamRule,
    StableAdamWRule,
    StableMomentumRule,
    StableRule,
    StableSGDRule,
    TrustRegionRule,
    stabilize,
)
from hypergrad.transforms import EXP, HALF_TANH, IDENTITY, SQUARE
from tests.hypergrad_helpers import check_hypergradients_by_finite_differences, losses_until_nonfinite
from tests.test_hypergrad_exact import REFERENCE_TOWERS, batches, make_mlp, reference_losses, train

BASES = ["sgd({lr})", "sgd({lr}, momentum=0.9)", "adam({lr})", "adamw({lr})", "adagrad({lr})", "rmsprop({lr})"]


def full_batch_losses(spec: str, stable: bool, steps: int) -> list[float]:
    model = make_mlp()
    x, y = torch.cat([b[0] for b in batches(4)]), torch.cat([b[1] for b in batches(4)])
    opt = hypergrad.tower(spec, model.parameters(), stable=stable, check_finite=False)
    return losses_until_nonfinite(model, opt, [(x, y)] * steps)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("height", [1, 3])
@pytest.mark.parametrize("hyper_lr", [1e-10, 1e-4, 1e-1])
def test_stable_towers_never_diverge_nor_end_above_their_initial_loss(base: str, height: int, hyper_lr: float) -> None:
    # 10: a step size at which every base but plain SGD ruins the network in its first steps when nothing guards it.
    for lr in (1e-6, 1e-2, 10.0):
        spec = base.format(lr=lr) + f"/sgd({hyper_lr})" * height
        losses = full_batch_losses(spec, stable=True, steps=40)
        assert all(math.isfinite(v) for v in losses), spec
        assert losses[-1] <= losses[0] + 1e-6, (spec, losses[0], losses[-1])


def test_the_reference_mode_explodes_where_the_stable_mode_does_not() -> None:
    # The example: Adam under SGD hyper levels, on an MLP of MNIST-like width, is non-finite within 8 steps.
    def losses(stable: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
        spec = "adam(0.001)/sgd(1e-5)/sgd(1e-5)/sgd(1e-5)"
        opt = hypergrad.tower(spec, model.parameters(), stable=stable, check_finite=False)
        return losses_until_nonfinite(model, opt, [(x, y)] * 40)

    assert not math.isfinite(losses(stable=False)[-1])
    stable = losses(stable=True)
    assert len(stable) == 40 and all(math.isfinite(v) for v in stable) and stable[-1] < stable[0]


def test_a_stable_hyper_update_is_bounded_and_independent_of_the_hypergradient_scale() -> None:
    rule = StableRule(hypergrad.rules.rules()["sgd"])
    hp = {"lr": 1e3, "momentum": 0.0}
    state = rule.init(torch.zeros(3), hp)
    delta, _ = rule.update(torch.tensor([1e-30, 1.0, -1e30]), state, hp, 1)
    assert delta.abs().max().item() <= RADIUS * (1 + 1e-6)
    assert delta.tolist() == pytest.approx([RADIUS * math.tanh(1e3 / RADIUS)] * 2 + [-RADIUS], rel=1e-6)


@pytest.mark.parametrize(("spec", "make_ref"), REFERENCE_TOWERS[:4], ids=[s for s, _ in REFERENCE_TOWERS[:4]])
def test_stable_false_still_reproduces_the_reference_package(spec, make_ref) -> None:
    ours, _, _ = train(spec, steps=20, stable=False)
    assert ours == pytest.approx(reference_losses(make_ref, 20), rel=1e-6, abs=0)


def test_stable_adam_equals_adam_while_its_betas_are_constant() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5) for _ in range(6)]
    hp = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    plain, stable = AdamRule(), StableAdamRule()
    s1, s2 = plain.init(grads[0], hp), stable.init(grads[0], hp)
    for t, g in enumerate(grads, start=1):
        d1, s1 = plain.update(g, s1, hp, t)
        d2, s2 = stable.update(g, s2, hp, t)
        torch.testing.assert_close(d1, d2)


def test_stable_adamw_equals_adamw_while_its_hyperparameters_are_constant() -> None:
    torch.manual_seed(0)
    grads, w = [torch.randn(5) for _ in range(6)], torch.randn(5)
    hp = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
    plain, stable = AdamWRule(), StableAdamWRule()
    s1, s2 = plain.init(w, hp), stable.init(w, hp)
    for t, g in enumerate(grads, start=1):
        d1, s1 = plain.update(g, s1, hp, t)
        d2, s2 = stable.update(g, s2, hp, t)
        torch.testing.assert_close(d1, d2)


def weight_decays(spec: str, stable: bool, steps: int = 60) -> tuple[list[float], list[float]]:
    """A linear regression whose weights start at 0.1 and must reach 5: every decay is in the way, so the tower's
    hypergradient keeps pushing the learned weight decay down. Its weight decay and loss per step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.full((4,), 5.0)
    w = nn.Parameter(torch.full((4,), 0.1))
    opt = hypergrad.tower(spec, [w], stable=stable, check_finite=False)
    decays, losses = [], []
    for _ in range(steps):
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        decays.append(opt.hyperparameters()[0]["weight_decay"])
        losses.append(loss.item())
    return decays, losses


def test_a_learned_adamw_weight_decay_stays_positive_where_the_reference_drives_it_below_zero() -> None:
    assert min(weight_decays("adamw(0.05, weight_decay=0.1)/sgd(1e-3)", stable=False)[0]) < 0.0
    for hyper_lr in (1e-3, 1e-1):  # 1e-1: the reference is NaN; before, the stable AdamW's beta1 reached 1.0: NaN
        decays, losses = weight_decays(f"adamw(0.05, weight_decay=0.1)/sgd({hyper_lr})", stable=True)
        assert all(d > 0.0 for d in decays) and all(math.isfinite(v) for v in losses), hyper_lr
        assert decays[-1] < 1e-3 * 0.1  # still learned: pushed down by decades (a factor per step), never past 0


def test_a_zero_adamw_weight_decay_stays_zero_in_the_stable_mode_and_a_learned_one_must_start_above_zero() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = hypergrad.tower("adamw(0.01, weight_decay=0)/sgd(1e-3)", [w], stable=True)
    assert opt._plan.learned[0] == ("lr", "beta1", "beta2")  # log 0 does not exist: not learned, as SGD momentum 0
    for _ in range(3):  # with a zero gradient AdamW's step is its decay alone: none
        w.grad = torch.zeros(3)
        opt.step()
    assert w.detach().tolist() == [1.0, 1.0, 1.0] and opt.param_groups[0]["weight_decay"] == 0.0
    groups = [{"params": [w]}, {"params": [nn.Parameter(torch.ones(2))], "weight_decay": 0.0}]
    with pytest.raises(
        ValueError, match=re.escape("adamw: weight_decay must be > 0 while learned (stored as its log), but got 0.0")
    ):
        hypergrad.tower("adamw(0.01, weight_decay=0.1)/sgd(1e-3)", groups, stable=True)
    hypergrad.tower("adamw(0.01, weight_decay=0.1)/sgd(1e-3)", groups, stable=False)  # the reference stores it raw


STABLE_FD_SPECS = [
    "sgd(0.1, momentum=0.9)/sgd(1e-2)/sgd(1e-2)",
    "adam(0.01)/sgd(1e-2)/sgd(1e-2)",
    "adamw(0.01, weight_decay=0.1)/sgd(1e-2)/sgd(1e-2)",
    "adagrad(0.1)/adam(1e-2)/sgd(1e-2)",
    "rmsprop(0.01, gamma=0.9)/sgd(1e-2)",
]


@pytest.mark.parametrize("spec", STABLE_FD_SPECS)
@pytest.mark.parametrize("method", ["trust", "normalized"])
def test_stable_hypergradients_equal_central_finite_differences(spec: str, method: str) -> None:
    """d loss_t / d raw h_(t-1) (log step sizes, bounded hyper levels, the guarded stable bases' closed forms),
    float64. The guard does not bind at these step sizes; the horizon is 0 (the paper's one-step hypergradient: a
    horizon > 0 changes what the step size's hypergradient is, see the next test)."""
    tower = stabilize(hypergrad.parse_spec(spec), method, horizon=0.0)
    assert isinstance(tower.levels[0].rule, GuardedRule)
    if "momentum" in spec and method == "trust":  # the momentum's limit is part of what is checked (not binding here)
        assert tower.levels[1].rule.limits == (MAX_LOG_LR, math.atanh(2 * MAX_MOMENTUM - 1))
    model = make_mlp(dtype=torch.float64)
    n = len(list(model.parameters()))
    plan = core.make_plan(tower, [{}], [n], parameterization="log")
    if stabilize(hypergrad.parse_spec(spec)).levels[0].rule.horizon == 0.0:  # bases with momentum: the default
        assert plan == hypergrad.tower(spec, model.parameters(), stable=True)._plan or method == "normalized"
    assert check_hypergradients_by_finite_differences(plan, model, batches(5, torch.float64)) > 0


@pytest.mark.parametrize(
    ("base", "trail"),
    [
        ("sgd(0.05)", "steps"),
        ("rmsprop(0.01)", "steps"),
        ("adagrad(0.1)", "steps"),
        ("sgd(0.05, momentum=0.9)", "adaptive"),
        ("rmsprop(0.01)", "adaptive"),
        ("sgd(0.05)", "adaptive"),
    ],
)
def test_with_a_horizon_the_step_size_hypergradient_is_the_next_gradient_dot_the_decayed_sum_of_steps(
    base: str, trail: str
) -> None:
    # steps:    d loss_t / d log lr = grad_t . sum_j b^j delta_(t-j), the first-order effect of scaling the last
    #           ~1/(1-b) steps.
    # adaptive: d loss_t / d log lr = lr_t grad_t . U_t, U_t = b_t U_(t-1) + delta_t / lr_t, with
    #           b_t = b min(1, lr_t / lr_(t-1)): the steps per unit step size, forgotten as fast as the step size falls.
    b = 0.9
    # guard=1e6: never binds (RMSProp's first steps at 0.01 would bind the default guard on this MLP). The level
    # above is fast (1e-1) so that the step size moves both ways and the adaptive trail forgets.
    tower = stabilize(hypergrad.parse_spec(base + "/sgd(1e-1)"), guard=1e6, horizon=b, trail=trail)
    model = make_mlp(dtype=torch.float64)
    params = list(model.parameters())
    plan = core.make_plan(tower, [{}], [len(params)], parameterization="log")
    state = core.init(plan, params)
    trail_sum = [torch.zeros_like(p) for p in params]
    lrs: list[float] = []
    for x, y in batches(8, torch.float64):
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        if state.trace:
            dots = sum(torch.dot(g.flatten(), t.flatten()) for g, t in zip(grads, trail_sum, strict=True))
            expected = -dots if trail == "steps" else -lrs[-1] * dots
            found = core.hypergradients(plan, state, grads)[0][0][0]
            assert found.item() == pytest.approx(expected.item(), rel=1e-9)
        deltas, state = core.update(plan, state, grads)
        lr = core.natural_values(plan, 0, state.levels[0].hp)[0]["lr"].item()  # the step size this step used
        decay = b if trail == "steps" or not lrs else b * min(1.0, lr / lrs[-1])
        lrs.append(lr)
        with torch.no_grad():
            for p, d, t in zip(params, deltas, trail_sum, strict=True):
                p -= d
                t.mul_(decay).add_(d if trail == "steps" else d / lr)
    assert found.item() != 0.0
    if trail == "adaptive":  # the step size fell at least once: the forgetting was exercised
        assert any(later < earlier for earlier, later in itertools.pairwise(lrs))


def test_a_learned_momentum_stops_at_its_limit_and_still_comes_back() -> None:
    # Unbounded, a run of "larger" walks the stored value past 9, where (tanh + 1)/2 is exactly 1 in float32: the
    # buffer then sums every gradient forever and the hypergradient through tanh is 0, so nothing can undo it.
    rule = stabilize(hypergrad.parse_spec("sgd(0.1, momentum=0.9)/sgd(1e-2)")).levels[1].rule
    hp = {"lr": 1e-2, "momentum": 0.0}
    state = rule.init(torch.tensor([math.log(0.1), math.atanh(0.8)]), hp)
    for _ in range(60):  # d loss / d stored momentum < 0: "larger", at a size the region binds
        _, state = rule.update(torch.tensor([0.0, -1e3]), state, hp, 1)
    momentum = HALF_TANH.forward(state.raw[1]).item()
    assert momentum == pytest.approx(MAX_MOMENTUM, rel=1e-6)
    assert state.raw[0].item() == pytest.approx(math.log(0.1))  # the step size's column, far inside its limit
    _, state = rule.update(torch.tensor([0.0, 1e-3]), state, hp, 1)  # "smaller" moves it back at once
    assert HALF_TANH.forward(state.raw[1]).item() < momentum
    with pytest.raises(ValueError, match=re.escape("limits must be one number > 0 (or inf) per value below")):
        TrustRegionRule(SGDRule(), ((EXP, IDENTITY),), limits=(1.0, 2.0))


def test_a_learned_step_size_stops_where_float32_still_represents_it_and_still_comes_back() -> None:
    # Long past convergence, a "smaller" that vanishes with the loss and that the gain compensates lowered a step size
    # by up to a factor e per step to a denormal float32 (~1e-41), where the hypergradient turned NaN and the run
    # stopped (digits CNN, 60 epochs, 5 of 210 towers; docs/stable.md). The stored log step size stops at -MAX_LOG_LR.
    rule = stabilize(hypergrad.parse_spec("sgd(0.1)/sgd(1e-2)")).levels[1].rule
    hp = {"lr": 1e-2, "momentum": 0.0}
    state = rule.init(torch.tensor([math.log(0.1)]), hp)
    for _ in range(300):  # d loss / d log step size > 0: "smaller", every step, at a size the region binds
        _, state = rule.update(torch.tensor([1e3]), state, hp, 1)
    assert state.raw.item() == -MAX_LOG_LR
    lr = torch.exp(state.raw).item()  # what the base multiplies by: a normal float32, not a denormal or 0
    assert torch.finfo(torch.float32).tiny < lr < 1e-34
    _, state = rule.update(torch.tensor([-1e-3]), state, hp, 1)  # "larger" moves it back up at once
    assert state.raw.item() > -MAX_LOG_LR


def test_the_guard_bounds_a_step_by_rho_times_the_initial_norm_and_leaves_smaller_steps_alone() -> None:
    rule = GuardedRule(SGDRule(), rho=0.5)
    lr = torch.tensor(1.0, dtype=torch.float64)
    hp = {"lr": lr, "momentum": 0.0}
    state = rule.init(torch.full((4,), 2.0, dtype=torch.float64), hp)  # initial norm 4: steps of norm <= 2
    small = torch.full((4,), 0.5, dtype=torch.float64)
    delta, after = rule.update(small, state, hp, 1)
    assert torch.equal(delta, small) and after.scale.item() == 1.0
    g = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)  # norm 5: shrunk to 2, same direction
    delta, after = rule.update(g, state, hp, 1)
    torch.testing.assert_close(delta, g * 0.4)

    def vjp(grad_next):
        return rule.vjp(grad_next, g, state, after, hp, 1, lambda a, b: torch.dot(a, b))["lr"].item()

    # The next gradient along g says "larger" (d loss / d lr = -vjp < 0): dropped while the guard binds. Against g it
    # says "smaller": kept, as the hypergradient of the step taken (0.4 times the base's).
    assert vjp(g) == 0.0
    assert vjp(-g) == pytest.approx(-0.4 * 25.0)
    with pytest.raises(ValueError, match=re.escape("horizon must be in [0, 1), but got 1.0")):
        GuardedRule(SGDRule(), horizon=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_stable_momentum_base_takes_torch_sgds_steps_while_its_momentum_stays_put(dtype: torch.dtype) -> None:
    # D_t = mu D_(t-1) + (1 - mu) g_t and delta_t = lr D_t / (1 - mu_0): with mu = mu_0 the reference's steps (torch's
    # buffer is D_t / (1 - mu_0)); only the rounding of the average differs.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g, dtype=dtype)
    ref = w.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    rule, hp = StableMomentumRule(), {"lr": 0.1, "momentum": 0.9}
    state = rule.init(w, hp)
    for t in range(1, 31):
        grad = torch.randn(5, 3, generator=g, dtype=dtype)
        ref.grad = grad.clone()
        opt.step()
        delta, state = rule.update(grad, state, hp, t)
        w = w - delta
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(w, ref.detach(), rtol=tol, atol=tol)


def test_the_stable_momentum_does_not_move_the_effective_step_size() -> None:
    # What the stable momentum base changes: the momentum's hypergradient. In the reference, delta = lr * buf with
    # buf = mu buf + g, so raising the momentum also lengthens the step (lr / (1 - mu) in the long run); with the
    # averaged buffer a constant gradient gives the same step at any momentum, and so a zero momentum hypergradient.
    rule, ref = StableMomentumRule(), SGDRule()
    mu = torch.tensor(0.9, dtype=torch.float64)
    hp = {"lr": 0.1, "momentum": mu}
    g = torch.ones(3, dtype=torch.float64)
    state, ref_state = rule.init(g, hp), ref.init(g, hp)
    for t in range(1, 400):  # 0.9^400 ~ 5e-19: both at their steady state
        delta, state = rule.update(g, state, hp, t)
        ref_delta, ref_state = ref.update(g, ref_state, hp, t)
    torch.testing.assert_close(delta, ref_delta)  # both at the steady state lr / (1 - mu) * g
    dot = lambda a, b: torch.dot(a, b)  # noqa: E731
    assert rule.vjp(g, g, None, state, hp, 399, dot)["momentum"].item() == pytest.approx(0.0, abs=1e-12)
    assert ref.vjp(g, g, None, ref_state, hp, 399, dot)["momentum"].item() == pytest.approx(0.1 * 3 * 10, rel=1e-6)
    with pytest.raises(ValueError, match=re.escape("momentum must be < 1 in the stable mode, but got 1.0")):
        rule.init(g, {"lr": 0.1, "momentum": 1.0})


# sgd: with its trail; momentum: with its adaptive trail and the last step size it reads
@pytest.mark.parametrize(
    "spec", ["adam(0.01)/sgd(1e-2)/sgd(1e-2)", "sgd(0.1)/sgd(1e-2)", "sgd(0.1, momentum=0.9)/sgd(1e-2)"]
)
def test_a_stable_optimizer_survives_a_checkpoint_round_trip(spec: str) -> None:
    straight, _, _ = train(spec, steps=12, stable=True)
    model = make_mlp()
    opt = hypergrad.tower(spec, model.parameters(), stable=True)
    losses = []
    for i, (x, y) in enumerate(batches(12)):
        if i == 6:
            saved, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            model = make_mlp()
            model.load_state_dict(weights)
            opt = hypergrad.tower(spec, model.parameters(), stable=True)
            opt.load_state_dict(saved)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # Bit for bit: a checkpoint holds no kept graph (hypergrad.stable._Graph), so the first step after loading runs
    # the hyper levels' steps again, with the same results.
    assert losses == straight


@pytest.mark.parametrize(
    "spec",
    [
        "sgd(0.1)/sgd(1e-2)/sgd(1e-2)/sgd(1e-2)",
        "adam(0.01)/adam(1e-3)/adam(1e-3)",
        "adam(0.01)/sgd(1e-2)/sgd(1e-2)/sgd(1e-2)",
        "sgd(0.1, momentum=0.9)/sgd(1e-2)/sgd(1e-2)",
        "rmsprop(0.01)/sgd(1e-2)/sgd(1e-2)",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_hyper_level_that_keeps_its_step_graph_computes_the_same_bits_as_one_that_runs_the_step_again(
    spec: str, dtype: torch.dtype
) -> None:
    # A learned stable hyper level keeps the autograd graph of its step for the next step's vjp instead of running the
    # step again there (hypergrad.stable._Graph). Without the kept graph (a checkpoint restored, ...) the vjp runs it
    # again: both must give the same bits at every step, and the graphs must not outlive their optimizer.
    from hypergrad import stable

    def run(keep: bool) -> tuple[list[torch.Tensor], list[float], set[int]]:
        model = make_mlp(dtype=dtype)
        opt = hypergrad.tower(spec, model.parameters(), stable=True)
        kept: set[int] = set()
        for x, y in batches(15, dtype):
            if not keep:
                stable._GRAPHS.clear()
            nn.functional.cross_entropy(model(x), y).backward()
            before = set(stable._GRAPHS)
            opt.step()
            opt.zero_grad()
            kept |= set(stable._GRAPHS) - before
        values = [v for level in opt.hyperparameters() for v in level.values()]
        return [p.detach().clone() for p in model.parameters()], values, kept

    weights_kept, values_kept, made = run(keep=True)
    weights_again, values_again, _ = run(keep=False)
    assert made, "no hyper level kept a graph: the test no longer tests the kept graph"
    assert all(torch.equal(a, b) for a, b in zip(weights_kept, weights_again, strict=True))
    assert values_kept == values_again
    gc.collect()
    assert not made & set(stable._GRAPHS), "a kept graph outlived its optimizer"


@pytest.mark.parametrize("stable", [False, True])
def test_a_step_under_inference_mode_gives_the_same_bits_as_outside_it(stable: bool) -> None:
    # Under torch.inference_mode() a stable hyper level's hypergradient (autograd) was silently zero, even inside
    # torch.enable_grad(), and the reference mode's Adam base failed inside torch ("Inference tensors do not track
    # version counter"); a step now runs outside the mode whoever calls it.
    def steps(inference: bool, closure: bool) -> tuple[list[torch.Tensor], list]:
        model = make_mlp()
        opt = hypergrad.tower("adam(0.01)/sgd(1e-2)/sgd(1e-2)", model.parameters(), stable=stable)
        for x, y in batches(8):

            def loss(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                out = nn.functional.cross_entropy(model(x), y)
                out.backward()
                return out

            if not closure:
                loss()
            with torch.inference_mode(inference):
                opt.step(loss if closure else None)
        return [p.detach().clone() for p in model.parameters()], opt.hyperparameters()

    plain = steps(False, False)
    assert plain[1][1]["lr"] != 1e-2  # the second level learns: its hypergradient is not zero
    for closure in (False, True):
        weights, values = steps(True, closure)
        assert all(torch.equal(a, b) for a, b in zip(weights, plain[0], strict=True))
        assert values == plain[1]


def test_a_rule_differentiated_by_autograd_refuses_inference_mode_in_one_line() -> None:
    # Called directly (not through a step, which leaves the mode), the default vjp would find no graph and return
    # zero hypergradients: it refuses instead.
    rule = StableRule(SGDRule())  # no closed-form vjp: Rule.vjp's autograd
    hp = {"lr": torch.tensor(0.1), "momentum": 0.0}
    state = rule.init(torch.zeros(1), hp)
    delta, after = rule.update(torch.ones(1), state, hp, 1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"come from autograd, which torch.inference_mode"):
        rule.vjp(torch.ones(1), torch.ones(1), state, after, hp, 1, torch.dot)


@pytest.mark.parametrize("stable", [False, True])
def test_the_harness_key_reaches_the_library(stable: bool) -> None:
    from bench.config import compose_config, validate
    from bench.optim import build_optimizer

    cfg = compose_config(["optimizer.height=2", f"optimizer.stable={str(stable).lower()}"])
    validate(cfg)
    built = build_optimizer(cfg.optimizer, nn.Linear(3, 2).parameters(), 10, 100)
    opt = built.optimizer
    assert opt.stable is stable
    assert opt.parameterization == ("log" if stable else "reference")
    assert all(isinstance(lv.rule, TrustRegionRule) == stable for lv in opt.spec.levels[1:])
    assert isinstance(opt.spec.levels[0].rule, GuardedRule) == stable


@pytest.mark.parametrize("stable", [False, True])
def test_the_weight_decay_key_reaches_an_adamw_base(stable: bool) -> None:
    from bench.config import compose_config, validate
    from bench.optim import build_optimizer

    overrides = ["optimizer.base=adamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.5", "optimizer.height=0"]
    cfg = compose_config([*overrides, f"optimizer.stable={str(stable).lower()}"])
    validate(cfg)
    w = nn.Parameter(torch.full((4,), 2.0))
    opt = build_optimizer(cfg.optimizer, [w], 10, 100).optimizer
    # With a zero gradient AdamW's step is its decoupled decay alone: w <- w - lr * weight_decay * w.
    w.grad = torch.zeros_like(w)
    opt.step()
    assert w.detach() == pytest.approx(torch.full((4,), 2.0 * (1 - 0.01 * 0.5)), rel=1e-6)


def test_a_non_boolean_stable_key_is_one_clear_line() -> None:
    from bench.config import ConfigError, compose_config, validate

    with pytest.raises(ConfigError, match=re.escape("`optimizer.stable` must be true or false, but got 'yes'")):
        validate(compose_config(["optimizer.stable=yes"]))


def test_stabilize_keeps_the_spelling_and_wraps_the_base_in_the_guard() -> None:
    tower = hypergrad.parse_spec("adam(0.001)/sgd(1e-05)/adam(1e-05)")
    stable = stabilize(tower)
    assert hypergrad.format_spec(stable) == hypergrad.format_spec(tower)
    assert isinstance(stable.levels[0].rule, GuardedRule)
    assert isinstance(stable.levels[0].rule.inner, StableAdamRule)
    assert stable.levels[0].rule.horizon == 0.0  # Adam has momentum: the one-step hypergradient
    # The defaults per base: the steps' trail for SGD and AdaGrad, no trail for Adam and AdamW (all three as before
    # the fourth round), the adaptive trail for RMSProp and for SGD with momentum, whose momentum is also limited and
    # whose horizon is shorter (sixth round).
    for spec, horizon, trail in [
        ("sgd(0.1)/sgd(1e-5)", HORIZON, "steps"),
        ("adagrad(0.1)/sgd(1e-5)", HORIZON, "steps"),
        ("rmsprop(0.01)/sgd(1e-5)", HORIZON, "adaptive"),
        ("adam(0.001)/sgd(1e-5)", 0.0, "steps"),
        ("adamw(0.001)/sgd(1e-5)", 0.0, "steps"),
        ("sgd(0.1, momentum=0.9)/sgd(1e-5)", MOMENTUM_HORIZON, "adaptive"),
    ]:
        levels = stabilize(hypergrad.parse_spec(spec)).levels
        assert (levels[0].rule.horizon, levels[0].rule.trail) == (horizon, trail), spec
        limits = levels[1].rule.limits  # the step size where float32 represents it; a momentum in [0.01, 0.99]
        momentum = (math.atanh(2 * MAX_MOMENTUM - 1),) if "momentum" in spec else (math.inf,) * (len(limits) - 1)
        assert limits == (MAX_LOG_LR, *momentum), spec
    # The base each mode runs, and how the level above stores each value below (stored, reference): only step sizes
    # and AdamW's weight decay are stored as their log; the weight decay is the only change of the fifth round. SGD
    # with momentum runs the averaged buffer of the sixth round; plain SGD keeps StableSGDRule.
    log, half = (EXP, IDENTITY), (HALF_TANH, HALF_TANH)
    for spec, base, pairs in [
        ("sgd(0.1)/sgd(1e-5)", StableSGDRule, [log]),
        ("sgd(0.1, momentum=0.9)/sgd(1e-5)", StableMomentumRule, [log, (HALF_TANH, IDENTITY)]),
        ("adagrad(0.1)/sgd(1e-5)", AdaGradRule, [log]),
        ("rmsprop(0.01)/sgd(1e-5)", RMSPropRule, [(EXP, SQUARE), half]),
        ("adam(0.001)/sgd(1e-5)", StableAdamRule, [log, half, half]),
        ("adamw(0.001)/sgd(1e-5)", StableAdamWRule, [log, half, half, log]),
        ("adamw(0.001, weight_decay=0)/sgd(1e-5)", StableAdamWRule, [log, half, half]),
    ]:
        levels = stabilize(hypergrad.parse_spec(spec)).levels
        assert type(levels[0].rule.inner) is base, spec
        assert list(levels[1].rule.below) == pairs, spec
    assert [type(lv.rule) for lv in stable.levels[1:]] == [TrustRegionRule, TrustRegionRule]
    assert [type(lv.rule) for lv in stabilize(tower, "normalized").levels[1:]] == [StableRule, StableRule]
    with pytest.raises(ValueError, match="method must be 'trust' or 'normalized', but got 'sign'"):
        stabilize(tower, "sign")
    assert OmegaConf.create({"s": hypergrad.format_spec(stable)}).s == "adam(0.001)/sgd(1e-05)/adam(1e-05)"


# rmsprop(0.001): at 0.01 its first steps (10 lr per weight) move this MLP's tensors by 0.5 times their norm: the guard binds
@pytest.mark.parametrize("spec", ["sgd(0.1)/sgd(1e-4)", "adam(0.01)/sgd(1e-6)", "rmsprop(0.001)/sgd(1e-5)"])
def test_where_the_reference_is_mild_the_stable_mode_follows_it(spec: str) -> None:
    # Small hyper-updates are far inside the trust region and the guard does not bind: with the paper's one-step
    # hypergradient (horizon 0), the stable step is the reference's to first order.
    reference, _, ref_opt = train(spec, steps=20)
    stable, _, st_opt = train(stabilize(hypergrad.parse_spec(spec), horizon=0.0), steps=20, stable=True)
    assert stable == pytest.approx(reference, rel=1e-4)
    for name, value in ref_opt.hyperparameters()[0].items():
        assert st_opt.hyperparameters()[0][name] == pytest.approx(value, rel=1e-3), name


def test_the_trust_radius_and_the_gain_grow_while_the_sign_holds_and_shrink_when_it_flips() -> None:
    rule = TrustRegionRule(hypergrad.rules.rules()["sgd"], ((EXP, IDENTITY),) * 2)
    hp = {"lr": 1.0, "momentum": 0.0}
    state = rule.init(torch.zeros(2, dtype=torch.float64), hp)  # two step sizes of 1
    radii, gains = [], []
    # Column 0: "larger" 20 times at a size the region binds, then "smaller" twice. Column 1: "larger" 20 times at a
    # size far inside the region, then "smaller" twice.
    for g in [[-1e60, -1e-6]] * 20 + [[1e60, 1e-6]] * 2:
        _, state = rule.update(torch.tensor(g, dtype=torch.float64), state, hp, 1)
        radii.append(state.radius.tolist())
        gains.append(state.gain.tolist())
    # A binding region widens by GROW per step (the first step has no previous sign to agree with) up to MAX_RADIUS,
    # and the gain stays 1: the step is the radius, whatever the hypergradient's size.
    assert [r[0] for r in radii[:3]] == pytest.approx([RADIUS, RADIUS * GROW, RADIUS * GROW**2])
    assert radii[19][0] == MAX_RADIUS and all(g[0] == 1.0 for g in gains)
    # A loose region stays put and the gain on the reference's update grows instead: a tiny hyper-step still learns.
    assert [r[1] for r in radii[:20]] == pytest.approx([RADIUS] * 20)
    assert [g[1] for g in gains[:20]] == pytest.approx([GROW**t for t in range(20)])
    assert state.raw[1].item() < 22 * 1e-6 * gains[19][1]
    # A flip shrinks both by SHRINK once; the step after it neither grows nor shrinks them (iRprop-).
    assert radii[20][0] == radii[21][0] == MAX_RADIUS * SHRINK
    assert gains[20][1] == gains[21][1] == pytest.approx(GROW**19 * SHRINK)


def test_a_stable_step_size_crosses_eight_decades_in_two_epochs_of_mnist5k() -> None:
    # The goal's 8 decades of initial step size: with a fixed radius of 0.1 they take 184 steps (11 epochs of
    # mnist5k at batch 256); with the adaptive radius, at most 32 steps (two epochs), in both directions.
    for sign in (-1.0, 1.0):
        rule = TrustRegionRule(hypergrad.rules.rules()["sgd"], ((EXP, IDENTITY),))
        hp = {"lr": 1.0, "momentum": 0.0}
        state = rule.init(torch.zeros(1, dtype=torch.float64), hp)
        for _ in range(32):  # a hypergradient large enough that the region binds all the way
            _, state = rule.update(torch.tensor([sign * 1e60], dtype=torch.float64), state, hp, 1)
        assert -sign * state.raw.item() >= 8 * math.log(10)


def test_a_top_hyper_step_ten_decades_too_small_still_learns_in_the_stable_mode() -> None:
    # The gain: sgd(1e-6) under three sgd(1e-10) levels. The reference moves nothing in 100 steps; the stable mode
    # grows the gains while the hypergradients keep their sign and trains.
    spec = "sgd(1e-6)/sgd(1e-10)/sgd(1e-10)/sgd(1e-10)"
    reference = full_batch_losses(spec, stable=False, steps=100)
    stable = full_batch_losses(spec, stable=True, steps=100)
    assert reference[-1] > 0.99 * reference[0]
    assert stable[-1] < 0.2 * stable[0]


def test_a_stable_tower_survives_the_edge_of_stability_on_a_full_batch() -> None:
    # Without the guard (guard=None), the loss reaches ~0.01, the hypergradient vanishes, the gain compensates it and
    # walks the step size to 33, and the loss goes 0.01 -> 11 within 150 steps. With the guard, a step that would
    # move a tensor by more than 0.3 times its initial norm is shrunk and "larger" no longer reaches the tower.
    losses = full_batch_losses("sgd(1e-6)/sgd(1e-10)/sgd(1e-10)/sgd(1e-10)", stable=True, steps=300)
    assert all(math.isfinite(v) for v in losses)
    assert max(losses[150:]) < 0.05 * losses[0]
