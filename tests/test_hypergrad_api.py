"""The library as a user meets it: specs, errors, checkpoints, memory, param groups, DDP, and a conformance suite
that every optimizer passes."""

from __future__ import annotations

import io
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hypergrad
from hypergrad import SGD, Adam, core, parse_spec
from hypergrad.rules import EmptyState, Rule
from hypergrad.transforms import EXP, HALF_TANH, IDENTITY, SQUARE, value_and_slope
from tests.hypergrad_helpers import overflow_at_the_second_step, spawn_two_gloo_ranks


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def data(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=g, dtype=dtype)
    return x, torch.stack([x[:, :3].sum(1), x[:, 3:].prod(1)], 1)


def step(model: nn.Module, opt: torch.optim.Optimizer, i: int, dtype: torch.dtype = torch.float32) -> float:
    x, y = data(i, dtype)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


# -- specs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "normalized"),
    [
        ("adam/sgd(1e-5)", "adam(0.001)/sgd(1e-05)"),
        ("sgd", "sgd(0.01)"),
        ("SGD(0.1, momentum=0.9) / sgd(1e-4) / sgd(1e-4)", "sgd(0.1, momentum=0.9)/sgd(0.0001)/sgd(0.0001)"),
        ("adam[lr](1e-3, beta1=0.8)/sgd(1e-5)", "adam[lr](0.001, beta1=0.8)/sgd(1e-05)"),
        ("rmsprop[lr, gamma](0.01, gamma=0.9)/adagrad", "rmsprop(0.01, gamma=0.9)/adagrad(0.01)"),
        ("adam(lr=2e-3, beta2=0.99)/adam(1e-4)/sgd(1e-6)", "adam(0.002, beta2=0.99)/adam(0.0001)/sgd(1e-06)"),
    ],
)
def test_spec_normalizes_and_round_trips(spec: str, normalized: str) -> None:
    tower = parse_spec(spec)
    assert str(tower) == normalized
    assert parse_spec(str(tower)) == tower


def test_towers_built_in_code_equal_parsed_ones() -> None:
    assert Adam(learn=["lr"]) / SGD(1e-5) == parse_spec("adam[lr]/sgd(1e-5)")
    assert SGD(0.1, momentum=0.9) / SGD(1e-4) / SGD(1e-4) == parse_spec("sgd(0.1, momentum=0.9)/sgd(1e-4)/sgd(1e-4)")
    opt = hypergrad.HyperOptimizer(make_model().parameters(), Adam() / SGD(1e-5))
    assert str(opt) == "adam(0.001)/sgd(1e-05)" and opt.height == 1


BAD_SPECS = [
    ("adamax/sgd", r"unknown optimizer 'adamax' \(known: adagrad, adam, adamw, rmsprop, sgd\) at position 0"),
    ("adam/sgd(1e-5", r"expected ',' or '\)', found end of spec at position 13"),
    ("adam//sgd", r"expected an optimizer name, found '/' at position 5"),
    ("sgd(-0.1)", r"lr must be in \[0, inf\), but got -0.1"),
    ("adam(beta1=1.0)/sgd", r"beta1 must be in \(0, 1\), but got 1.0"),
    ("rmsprop(gamma=0)/sgd", r"gamma must be in \(0, 1\), but got 0.0"),
    ("sgd(momentum=1.5)/sgd", r"momentum must be in \[0, 1\), but got 1.5"),
    ("sgd(0.1, nesterov=1)", r"unknown hyperparameter 'nesterov' for sgd \(allowed: lr, momentum\) at position 9"),
    ("sgd(0.1, 0.9)", r"the step size must be the first argument; name the others.* at position 9"),
    ("adam[lr, beta3]/sgd", r"cannot learn 'beta3'; learnable here: lr, beta1, beta2"),
    ("sgd[momentum](0.1)/sgd", r"momentum is learnable only when it starts non-zero"),
    ("adam[lr]", r"has a learned subset in brackets, but nothing above it learns it"),
    ("", r"spec must name at least one optimizer"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_spec_is_one_clear_value_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        hypergrad.tower(spec, make_model().parameters())
    assert "Traceback" not in str(info.value)


def test_bad_param_group_values_are_named() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"param group key 'weight_decay' is not a hyperparameter of sgd"):
        hypergrad.tower("sgd/sgd", [{"params": model.parameters(), "weight_decay": 0.1}])
    with pytest.raises(ValueError, match=r"lr must be in \[0, inf\), but got -1.0"):
        hypergrad.tower("sgd/sgd", [{"params": model.parameters(), "lr": -1.0}])
    with pytest.raises(ValueError, match=r"lr must be > 0 with parameterization='log', but got 0.0"):
        hypergrad.tower("sgd(0.0)/sgd", model.parameters(), parameterization="log")
    with pytest.raises(ValueError, match=r"parameterization must be 'reference' or 'log', but got 'sqrt'"):
        hypergrad.tower("sgd/sgd", model.parameters(), parameterization="sqrt")


# -- transforms -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("transform", "values"),
    [(IDENTITY, [-1.0, 0.0, 3.0]), (SQUARE, [0.0, 1e-4, 2.0]), (HALF_TANH, [0.1, 0.5, 0.999]), (EXP, [1e-8, 1.0])],
)
def test_transform_inverse_is_exact_to_round_off(transform, values) -> None:
    v = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(transform.forward(transform.inverse(v)), v, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("transform", [IDENTITY, SQUARE, HALF_TANH, EXP], ids=lambda t: t.name)
def test_transform_derivative_equals_autograd(transform) -> None:
    raw = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(transform.forward(raw).sum(), raw)
    got = torch.ones_like(raw) if transform.derivative is None else transform.derivative(raw.detach())
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transform", [IDENTITY, SQUARE, HALF_TANH, EXP], ids=lambda t: t.name)
def test_value_and_slope_are_forward_and_derivative_bit_for_bit(transform, dtype) -> None:
    # The core keeps the slope from the step that computed the value; a restored checkpoint calls derivative instead.
    raw = torch.tensor([-2.0, -0.3, -0.0, 0.0, 0.7, 3.0, 40.0], dtype=dtype)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]  # compared as bit patterns
    value, slope = value_and_slope(transform, raw)
    assert torch.equal(value.view(bits), transform.forward(raw).view(bits))
    if transform.derivative is None:
        assert slope is None
    else:
        assert torch.equal(slope.view(bits), transform.derivative(raw).view(bits))


# -- conformance: every optimizer ---------------------------------------------------------------------------------
CONFORMANCE = [
    "sgd(0.05)/sgd(1e-3)",
    "sgd(0.05, momentum=0.5)/adam(1e-3)",
    "adam(0.01)/sgd(1e-5)",
    "adagrad(0.1)/sgd(1e-3)",
    "rmsprop(0.003)/sgd(1e-4)",
    "adam[lr](0.01)/sgd(1e-5)/sgd(1e-5)",
]


@pytest.mark.parametrize("spec", CONFORMANCE)
def test_conformance_quadratic_converges_with_finite_values(spec: str) -> None:
    torch.manual_seed(0)
    target = torch.randn(20)
    w = nn.Parameter(torch.zeros(20))
    opt = hypergrad.tower(spec, [w])
    first = None
    for _ in range(300):
        loss = ((w - target) ** 2).sum()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1 * first
    assert all(torch.isfinite(torch.tensor(list(lv.values()))).all() for lv in opt.hyperparameters())


@pytest.mark.parametrize("spec", CONFORMANCE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conformance_dtype_is_kept_and_runs_are_repeatable(spec: str, dtype: torch.dtype) -> None:
    runs = []
    for _ in range(2):
        model = make_model(dtype=dtype)
        opt = hypergrad.tower(spec, model.parameters())
        losses = [step(model, opt, i, dtype) for i in range(5)]
        assert all(p.dtype == dtype for p in model.parameters())
        assert all(h.dtype == dtype for lv in opt._tower.levels for h in lv.hp)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("spec", [*CONFORMANCE, "sgd(0.05)/sgd(1e-3)/sgd(1e-3)/sgd(1e-3)"])
def test_state_dict_round_trip_continues_bit_identically(spec: str) -> None:
    model = make_model()
    straight_opt = hypergrad.tower(spec, model.parameters())
    straight = [step(model, straight_opt, i) for i in range(10)]

    model = make_model()
    opt = hypergrad.tower(spec, model.parameters())
    first = [step(model, opt, i) for i in range(5)]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # a checkpoint holds only tensors and plain containers

    model2 = make_model(seed=123)
    opt2 = hypergrad.tower(spec, model2.parameters())
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed = first + [step(model2, opt2, i) for i in range(5, 10)]
    assert resumed == straight
    assert opt2.hyperparameters() == straight_opt.hyperparameters()


def test_loading_a_state_dict_of_another_tower_is_refused() -> None:
    model = make_model()
    opt = hypergrad.tower("adam/sgd(1e-5)", model.parameters())
    step(model, opt, 0)
    other = hypergrad.tower("adam/sgd(1e-4)", model.parameters())
    with pytest.raises(ValueError, match=r"state_dict is for tower 'adam\(0.001\)/sgd\(1e-05\)'"):
        other.load_state_dict(opt.state_dict())


def test_memory_stays_flat_over_2000_steps() -> None:
    """No graph or state accumulates across steps (the reference's create_graph=True leak)."""

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))  # 1 MB of weights per copy
    # Random labels can drive beta2 to 1 after many steps; the values are irrelevant to what is measured here.
    opt = hypergrad.tower("adam(1e-3)/sgd(1e-6)/sgd(1e-6)", model.parameters(), check_finite=False)
    x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))

    def run(n: int) -> None:
        for _ in range(n):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    run(200)
    before = rss_mb()
    run(2000)
    # One leaked step (graph plus state) is about 3 MB here, so a leak would show as gigabytes.
    assert rss_mb() - before < 20


# -- behaviour ----------------------------------------------------------------------------------------------------
def test_non_finite_hyperparameters_raise_and_leave_weights_untouched() -> None:
    # A constant gradient of 1e3: the second step's hypergradient is -3e6, and 1e35 * 3e6 overflows float32, while
    # the gradients stay finite.
    error, snapshot, w = overflow_at_the_second_step("sgd(0.1)/sgd(1e35)")
    assert isinstance(error, FloatingPointError) and error.level == 1 and error.step == 2
    assert torch.equal(snapshot, w)


def test_a_non_finite_gradient_is_named_as_the_cause() -> None:
    model = make_model()
    opt = hypergrad.tower("adam/sgd(1e-5)", model.parameters())
    step(model, opt, 0)
    x, y = data(1)
    x[0, 0] = float("nan")
    nn.functional.mse_loss(model(x), y).backward()
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(hypergrad.NonFiniteGradientError, match=r"the gradient of parameter 0 \(shape \(5, 6\)\) is"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters(), strict=True))


def test_log_parameterization_keeps_step_sizes_positive_where_the_reference_goes_negative() -> None:
    results = {}
    for param in ("reference", "log"):
        model = make_model()
        opt = hypergrad.tower("sgd(0.05)/sgd(0.5)", model.parameters(), parameterization=param)
        lrs = []
        for i in range(40):
            step(model, opt, i)
            lrs.append(opt.hyperparameters()[0]["lr"])
        results[param] = lrs
    assert min(results["reference"]) < 0  # this hyper-step size is too large for a raw step size
    assert min(results["log"]) > 0


def test_each_param_group_learns_its_own_step_size() -> None:
    model = make_model()
    opt = hypergrad.tower(
        "sgd(0.05)/sgd(1e-2)",
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
    )
    assert opt.hyperparameters(0)[0]["lr"] == pytest.approx(0.05) and opt.hyperparameters(1)[0]["lr"] == pytest.approx(
        0.01
    )
    for i in range(10):
        step(model, opt, i)
    lr0, lr1 = opt.hyperparameters(0)[0]["lr"], opt.hyperparameters(1)[0]["lr"]
    assert lr0 != pytest.approx(0.05) and lr1 != pytest.approx(0.01) and lr0 != lr1


def test_a_user_defined_rule_gets_its_hypergradients_for_free() -> None:
    class DecayedSGD(Rule):
        name = "dsgd"
        defaults = {"lr": 0.01, "decay": 0.0}
        transforms = {"lr": IDENTITY, "decay": IDENTITY}

        def init(self, param, hp):
            return EmptyState()

        def update(self, grad, state, hp, step):
            return grad * hp["lr"] / (1.0 + hp["decay"] * step), state

    hypergrad.register(DecayedSGD())
    model = make_model()
    opt = hypergrad.tower("dsgd(0.05, decay=0.1)/sgd(1e-2)", model.parameters())
    losses = [step(model, opt, i) for i in range(30)]
    learned = opt.hyperparameters()[0]
    assert set(learned) == {"lr", "decay"} and learned["decay"] != pytest.approx(0.1)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_parameters_without_gradients_are_left_alone() -> None:
    model = make_model()
    frozen = nn.Parameter(torch.ones(3))
    opt = hypergrad.tower("adam/sgd(1e-5)", [*model.parameters(), frozen])
    for i in range(3):
        step(model, opt, i)
    assert torch.equal(frozen, torch.ones(3))


# -- DDP -------------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)))
    opt = hypergrad.tower("adam(0.01)/sgd(1e-4)", model.parameters())
    for i in range(10):
        x, y = data(100 * rank + i)  # each rank its own batches; all-reduced gradients make them agree
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.save({"hp": opt.hyperparameters(), "w": [p.detach() for p in model.parameters()]}, f"{out}.{rank}")
    # Both ranks done before either tears gloo down (as in test_library_loops): a rank that closes its sockets while
    # the other still talks makes gloo abort the other process ("terminate called without an active exception", CI).
    dist.barrier()
    open(f"{out}.done.{rank}", "w").close()  # see spawn_two_gloo_ranks
    del model
    dist.destroy_process_group()


def test_ddp_two_ranks_end_with_identical_hyperparameters(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_two_gloo_ranks(_ddp_worker, (port, str(tmp_path / "out")), str(tmp_path / "out.done"))
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1))
    assert r0["hp"] == r1["hp"]
    assert r0["hp"][0]["lr"] != pytest.approx(0.01)  # they agree on something that was learned
    assert all(torch.equal(a, b) for a, b in zip(r0["w"], r1["w"], strict=True))


@pytest.mark.parametrize(
    "spec", ["sgd/sgd(1e-3)", "sgd(momentum=0.5)/sgd(1e-3)", "adam/sgd(1e-3)", "rmsprop/sgd(1e-4)"]
)
# (130, 130): a member's tensor large enough that its dot products run member by member (core._DOT_PER_MEMBER).
@pytest.mark.parametrize("shape", [(4,), (130, 130)])
@pytest.mark.parametrize("donate", [False, True])
def test_functional_core_steps_a_population_of_independent_members(
    spec: str, shape: tuple[int, ...], donate: bool
) -> None:
    """With a leading batch dimension, each member follows exactly the path it would follow alone, however its
    dot products are computed and whether the gradients are handed over (``donate``) or copied."""
    tower = parse_spec(spec)
    lrs = torch.tensor([0.01, 0.1, 0.3], dtype=torch.float64)
    plan = core.make_plan(tower, [{"lr": lrs}], [1], batch_shape=(3,))
    w = torch.zeros(3, *shape, dtype=torch.float64)
    state = core.init(plan, [w])
    n = math.prod(shape)  # the loss is a mean, so the hypergradients stay alike for both sizes
    target = torch.arange(float(n), dtype=torch.float64).reshape(shape) / n
    for _ in range(5):
        deltas, state = core.update(plan, state, [2 * (w - target) / n], donate=donate)
        w = w - deltas[0]
    base = tower.levels[0]
    for m, lr in enumerate(lrs.tolist()):
        alone = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        opt = hypergrad.HyperOptimizer([alone], hypergrad.Level(base.rule, {**base.values, "lr": lr}) / tower.levels[1])
        for _ in range(5):
            (((alone - target) ** 2).sum() / n).backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(w[m], alone.detach(), rtol=1e-12, atol=1e-14)


def test_a_donated_gradient_is_kept_without_a_copy() -> None:
    """``donate=True``: the state holds the caller's gradient itself (a population saves a weight-sized copy a step);
    without it, the state holds a copy, so zeroing the caller's buffer changes nothing."""
    plan = core.make_plan(parse_spec("sgd(0.1)/sgd(1e-3)"), [{}], [1], batch_shape=(2,))
    w = torch.zeros(2, 3, dtype=torch.float64)
    for donate in (False, True):
        grad = torch.ones(2, 3, dtype=torch.float64)
        _, state = core.update(plan, core.init(plan, [w]), [grad], donate=donate)
        assert (state.levels[0].rule[0].grad is grad) == donate
        grad.zero_()
        assert torch.equal(state.levels[0].rule[0].grad, torch.zeros_like(grad) if donate else torch.ones_like(grad))


def test_grad_scaler_loop_equals_the_plain_loop() -> None:
    """AMP's GradScaler unscales the gradients before step() reads them: a power-of-two scale changes nothing."""

    def train(scaler: torch.amp.GradScaler | None) -> list[dict[str, float]]:
        model = make_model()
        opt = hypergrad.tower("adam(0.01)/sgd(1e-4)", model.parameters())
        for i in range(6):
            x, y = data(i)
            loss = nn.functional.mse_loss(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        return opt.hyperparameters()

    assert train(torch.amp.GradScaler("cpu", init_scale=2.0**10)) == train(None)
