"""The optimizer is right in every training loop torch.optim supports: each loop's trajectory (weights and learned
hyperparameters, float64) equals the canonical ``backward(); step(); zero_grad()`` loop's to round-off."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hypergrad
from tests.hypergrad_helpers import spawn_two_gloo_ranks

SPECS = ["sgd(0.1)/sgd(0.01)", "sgd(0.1, momentum=0.9)", "sgd(0.1, momentum=0.9)/sgd(1e-3)", "adam/sgd(1e-4)"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x, torch.stack([x[:, :3].sum(1), x[:, 3:].prod(1)], 1)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


Trajectory = list[tuple[list[torch.Tensor], list[dict[str, float]]]]


def trajectory(
    spec: str, train_step: Callable[[nn.Module, hypergrad.HyperOptimizer, int], None], model: nn.Module | None = None
) -> Trajectory:
    """Weights and hyperparameters after each of 6 calls of `train_step(model, opt, i)`, from `make_model()`'s start."""
    model = make_model() if model is None else model
    opt = hypergrad.tower(spec, model.parameters())
    out = []
    for i in range(6):
        train_step(model, opt, i)
        out.append(([p.detach().clone() for p in model.parameters()], opt.hyperparameters()))
    return out


def canonical(spec: str) -> Trajectory:
    def train_step(model: nn.Module, opt: hypergrad.HyperOptimizer, i: int) -> None:
        loss_of(model, *data(i)).backward()
        opt.step()
        opt.zero_grad()

    return trajectory(spec, train_step)


def assert_same(a: Trajectory, b: Trajectory) -> None:
    for (wa, ha), (wb, hb) in zip(a, b, strict=True):
        for x, y in zip(wa, wb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        for la, lb in zip(ha, hb, strict=True):
            assert la.keys() == lb.keys()
            for k in la:
                assert la[k] == pytest.approx(lb[k], rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("spec", SPECS)
def test_in_place_zeroing_gives_the_same_trajectory_as_set_to_none(spec: str) -> None:
    def train_step(model: nn.Module, opt: hypergrad.HyperOptimizer, i: int) -> None:
        loss_of(model, *data(i)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        opt.state_dict()  # and the state can still be saved

    assert_same(trajectory(spec, train_step), canonical(spec))


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_accumulation_over_micro_batches_equals_the_full_batch(spec: str) -> None:
    def train_step(model: nn.Module, opt: hypergrad.HyperOptimizer, i: int) -> None:
        x, y = data(i)
        for part in (slice(0, 4), slice(4, 8)):  # two micro-batches, each half of the mean
            (loss_of(model, x[part], y[part]) / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    assert_same(trajectory(spec, train_step), canonical(spec))


@pytest.mark.parametrize("spec", SPECS)
def test_step_with_a_closure_equals_the_canonical_loop(spec: str) -> None:
    def train_step(model: nn.Module, opt: hypergrad.HyperOptimizer, i: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model, *data(i))
            loss.backward()
            return loss

        assert isinstance(opt.step(closure), torch.Tensor)

    assert_same(trajectory(spec, train_step), canonical(spec))


def test_momentum_buffer_never_aliases_the_gradient() -> None:
    model = make_model()
    opt = hypergrad.tower("sgd(0.1, momentum=0.9)", model.parameters())
    loss_of(model, *data(0)).backward()
    opt.step()
    buffers = [s.momentum_buffer for s in opt._tower.levels[0].rule]
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(b.untyped_storage().data_ptr() not in grads for b in buffers)


def test_a_compiled_model_trains_as_the_eager_one() -> None:
    # backend="aot_eager" traces forward and backward as inductor does, without the C++ compile (about 50 s per
    # model on this CPU); what the optimizer sees, gradients of a compiled graph, is the same.
    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")

    def train_step(model: nn.Module, opt: hypergrad.HyperOptimizer, i: int) -> None:
        loss_of(compiled, *data(i)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    assert_same(trajectory("adam/sgd(1e-4)", train_step, model), canonical("adam/sgd(1e-4)"))


def test_grad_scaler_with_in_place_zeroing_equals_the_plain_loop() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def train_step(model: nn.Module, opt: hypergrad.HyperOptimizer, i: int) -> None:
        scaler.scale(loss_of(model, *data(i))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)

    assert_same(trajectory("adam/sgd(1e-4)", train_step), canonical("adam/sgd(1e-4)"))


# -- DDP, gradients as views of the communication buckets -----------------------------------------------------------
def _ddp_worker(rank: int, port: int, out: str, spec: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(make_model(), gradient_as_bucket_view=True)
    opt = hypergrad.tower(spec, model.parameters())
    for i in range(6):
        x, y = data(i)
        part = slice(4 * rank, 4 * rank + 4)  # each rank half the batch; the all-reduce averages the halves
        loss_of(model, x[part], y[part]).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # with bucket views, DDP zeroes in place whatever is asked
    torch.save({"hp": opt.hyperparameters(), "w": [p.detach() for p in model.parameters()]}, f"{out}.{rank}")
    # Both ranks done before either tears gloo down: a rank that closes its sockets while the other still talks makes
    # gloo's background thread abort the other process ("terminate called without an active exception", seen in CI).
    dist.barrier()
    open(f"{out}.done.{rank}", "w").close()  # see spawn_two_gloo_ranks
    del model
    dist.destroy_process_group()


@pytest.mark.parametrize("spec", ["sgd(0.1, momentum=0.9)/sgd(1e-3)", "adam/sgd(1e-4)"])
def test_ddp_with_gradients_as_bucket_views_equals_one_process(tmp_path, spec: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_two_gloo_ranks(_ddp_worker, (port, str(tmp_path / "out"), spec), str(tmp_path / "out.done"))
    alone = canonical(spec)[-1]
    for r in (0, 1):
        got = torch.load(tmp_path / f"out.{r}", weights_only=True)
        assert_same([(got["w"], got["hp"])], [alone])


def _exit_worker(rank: int, port: int, out: str, when: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if when == "abort before the barrier" and rank == 0:
        os.abort()
    dist.barrier()
    open(f"{out}.done.{rank}", "w").close()
    if when == "abort after the barrier" and rank == 0:
        os.abort()  # what gloo's teardown does now and then
    if when == "raise after the barrier" and rank == 1:
        raise ValueError("a failure of the test's own code")
    dist.destroy_process_group()


def test_the_ddp_tests_forgive_only_an_abort_after_their_work_is_done(tmp_path) -> None:
    # spawn_two_gloo_ranks must not hide a real failure behind its allowance for gloo's teardown abort.
    outcomes = {}
    for when in ("abort after the barrier", "abort before the barrier", "raise after the barrier"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(tmp_path / when.replace(" ", "_"))
        try:
            spawn_two_gloo_ranks(_exit_worker, (port, out, when), f"{out}.done")
            outcomes[when] = "passed"
        except Exception as e:
            outcomes[when] = type(e).__name__
    assert outcomes == {
        "abort after the barrier": "passed",
        "abort before the barrier": "ProcessExitedException",
        "raise after the barrier": "ProcessRaisedException",
    }


# -- the functional core owns what it keeps --------------------------------------------------------------------------
CORE_SPECS = [
    "sgd(0.1)/sgd(1e-2)",
    "sgd(0.1, momentum=0.9)/sgd(1e-2)",
    "adam/sgd(1e-4)",
    "adamw/sgd(1e-4)",
    "adagrad/sgd(1e-2)",
    "rmsprop/sgd(1e-4)",
]


@pytest.mark.parametrize("vjp", ["closed form", "default"])
@pytest.mark.parametrize("spec", CORE_SPECS)
def test_core_update_keeps_no_reference_to_the_callers_gradients(spec: str, vjp: str) -> None:
    """Overwriting the gradient buffers in place after each update (as zero_grad(set_to_none=False) and DDP's bucket
    views do) changes nothing, for every built-in rule's closed form and for the default vjp."""
    from hypergrad import core
    from tests.hypergrad_helpers import with_default_vjp

    def run(overwrite: bool) -> list[torch.Tensor]:
        model = make_model()
        plan = hypergrad.tower(spec, model.parameters())._plan
        plan = with_default_vjp(plan) if vjp == "default" else plan
        weights = [p.detach().clone() for p in model.parameters()]
        state = core.init(plan, weights)
        buffers = [torch.zeros_like(w) for w in weights]
        for i in range(5):
            leaves = [w.requires_grad_() for w in weights]
            names = [n for n, _ in model.named_parameters()]
            out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (data(i)[0],))
            grads = torch.autograd.grad(nn.functional.mse_loss(out, data(i)[1]), leaves)
            if overwrite:  # one set of buffers, overwritten after each update
                for b, g in zip(buffers, grads, strict=True):
                    b.copy_(g)
                deltas, state = core.update(plan, state, buffers)
                for b in buffers:
                    b.fill_(7.0)
            else:  # fresh gradients each step, never touched again
                deltas, state = core.update(plan, state, grads)
            weights = [w.detach() - d for w, d in zip(weights, deltas, strict=True)]
        return weights + [h for level in state.levels for h in level.hp]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
