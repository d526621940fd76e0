"""Schedulers and ``param_groups``, mixed precision, and every bad input refused at construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergrad


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def data(i: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x.to(dtype), torch.stack([x[:, :3].sum(1), x[:, 3:].prod(1)], 1).to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched=None, dtype=torch.float64) -> list[float]:
    losses = []
    for i in range(steps):
        x, y = data(i, dtype)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


# -- schedulers and param_groups ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_sched",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)),  # warmup
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3),  # warmup
    ],
)
@pytest.mark.parametrize("spec", ["sgd(0.1)", "sgd(0.1)/sgd(0.0)"])
def test_a_scheduler_changes_the_step_size_as_it_does_for_torch_optim(make_sched, spec: str) -> None:
    """With nothing learned (height 0, or a hyper-step of 0), a tower under a scheduler is torch.optim.SGD under it."""
    ours, theirs = make_model(), make_model()
    opt = hypergrad.tower(spec, ours.parameters())
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1)
    assert train(ours, opt, 8, make_sched(opt)) == pytest.approx(train(theirs, ref, 8, make_sched(ref)), rel=1e-12)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)


def test_param_groups_show_the_learned_values_and_a_write_sets_them() -> None:
    model = make_model()
    opt = hypergrad.tower("adam(0.01)/sgd(1e-3)", model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    train(model, opt, 5)
    learned = opt.hyperparameters()[0]
    assert learned["lr"] != 0.01
    assert {k: opt.param_groups[0][k] for k in learned} == learned  # what LR monitors read
    sched.step()  # a chainable scheduler multiplies the current, learned value
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(0.1 * learned["lr"], rel=1e-6)
    opt.param_groups[0]["beta1"] = 0.5  # by hand
    assert opt.hyperparameters()[0]["beta1"] == pytest.approx(0.5, rel=1e-6)
    before = opt.hyperparameters()[0]["lr"]
    train(model, opt, 1)
    after = opt.hyperparameters()[0]["lr"]
    assert after != before and abs(after - before) < abs(after - learned["lr"])  # learning goes on from the write
    opt.param_groups[0]["lr"] = -5.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: lr must be in \[0, inf\), but got -5.0"):
        opt.step()


# -- mixed precision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train_like_float32(dtype: torch.dtype) -> None:
    low, full = make_model(dtype), make_model(torch.float32)
    opt_low = hypergrad.tower("adam/sgd(1e-5)", low.parameters())
    opt_full = hypergrad.tower("adam/sgd(1e-5)", full.parameters())
    l_low = train(low, opt_low, 30, dtype=dtype)
    l_full = train(full, opt_full, 30, dtype=torch.float32)
    # bf16 keeps 8 bits of mantissa: the losses agree to 5% over 30 steps, and fall.
    assert l_low[-1] == pytest.approx(l_full[-1], rel=0.05) and l_low[-1] < l_low[0]
    assert all(p.dtype == dtype for p in low.parameters())
    assert all(h.dtype == torch.float32 for lv in opt_low._tower.levels for h in lv.hp)
    assert opt_low.hyperparameters()[0]["beta2"] == pytest.approx(0.999, abs=1e-4)


def test_integer_parameters_are_refused_at_construction() -> None:
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point tensor .* but got dtype torch.int64"):
        hypergrad.tower("sgd", [torch.zeros(3, dtype=torch.int64)])


# -- bad input -------------------------------------------------------------------------------------------------
BAD = [
    (
        lambda m: hypergrad.tower("sgd/sgd", [{"params": m.parameters(), "lr": torch.tensor(-5.0)}]),
        ValueError,
        r"lr must be in \[0, inf\), but got -5.0",
    ),
    (
        lambda m: hypergrad.tower("sgd/sgd", [{"params": m.parameters(), "lr": "0.1"}]),
        TypeError,
        r"lr must be a number, but got '0.1'",
    ),
    (
        lambda m: hypergrad.tower("sgd(1e39)", m.float().parameters()),
        ValueError,
        r"lr must be finite in torch.float32 .*but got 1e\+39",
    ),
    (lambda m: hypergrad.tower("sgd(nan)", m.parameters()), ValueError, r"the step size must be a finite number"),
    (lambda m: hypergrad.tower("adam[lr,lr]/sgd", m.parameters()), ValueError, r"'lr' is named twice"),
    (lambda m: hypergrad.tower("sgd(\uff11)", m.parameters()), ValueError, r"expected a number or key=value"),
    (
        lambda m: hypergrad.tower("sgd/sgd", [m[0].weight, m[2].bias, m[0].weight]),
        ValueError,
        r"params\[2\] is params\[0\] again: each tensor must appear once",
    ),
    (lambda m: hypergrad.Adam(learn="lr"), TypeError, r"learn must be a list of hyperparameter names"),
    (lambda m: hypergrad.Adam(m.parameters(), lr=1e-3), TypeError, r"builds one level of a tower, not an optimizer"),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD)
def test_bad_input_is_refused_at_construction_with_one_clear_error(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make(make_model())


@pytest.mark.parametrize("spec", ["sgd/sgd(1e-3)", "adam/sgd(1e-3)"])
def test_a_sparse_gradient_is_refused_at_the_first_step_before_any_weight_moves(spec: str) -> None:
    # torch.optim.SGD takes sparse gradients; a tower's hypergradients and bases are dense arithmetic. The first step
    # of a plain SGD base once went through and the second failed inside torch (reshape of a sparse tensor).
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = hypergrad.tower(spec, emb.parameters())
    emb(torch.tensor([1, 2])).pow(2).sum().backward()
    with pytest.raises(ValueError, match=r"shape \(10, 3\) has a torch.sparse_coo gradient .* build the module with "):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_hyperparameters_before_the_first_step_do_not_block_add_param_group() -> None:
    model = make_model()
    opt = hypergrad.tower("sgd/sgd(1e-3)", list(model.parameters())[:2])
    assert opt.hyperparameters()[0]["lr"] == 0.01
    opt.add_param_group({"params": list(model.parameters())[2:], "lr": 0.1})
    train(model, opt, 2)
    assert opt.hyperparameters(1)[0]["lr"] != opt.hyperparameters(0)[0]["lr"]


def test_a_state_dict_of_another_model_or_with_missing_keys_is_refused_at_load() -> None:
    model = make_model()
    opt = hypergrad.tower("adam/sgd(1e-5)", model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"state_dict parameter 0 has shape \(5, 6\), but this optimizer's"):
        hypergrad.tower("adam/sgd(1e-5)", other.parameters()).load_state_dict(sd)
    del sd["tower"]["state"]
    with pytest.raises(ValueError, match=r"state_dict\['tower'\] must have the keys .* but 'state' is missing"):
        hypergrad.tower("adam/sgd(1e-5)", make_model().parameters()).load_state_dict(sd)
