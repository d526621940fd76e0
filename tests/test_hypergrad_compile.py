"""``compile=True`` (opt-in) runs level 0's multi-tensor update and vjp through torch.compile: the same training as
the eager path to round-off, no compile once the state has settled (the step count is not baked into a graph), and where
torch.compile cannot run, one logged warning and the eager results. These tests compile for real (inductor, a C++
compiler): about 10-20 s per tower on this 2-core CPU."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch import nn

import hypergrad
from hypergrad import _foreach
from tests.hypergrad_helpers import train_small_mlp


def _train(spec: str, compile: bool, steps: int, dtype: torch.dtype = torch.float64):
    graphs: list[int] = []

    def count_graphs(opt: torch.optim.Optimizer, step: int) -> None:
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    opt, model, _ = train_small_mlp(spec, steps, dtype, after_step=count_graphs, compile=compile)
    return [p.detach().clone() for p in model.parameters()], opt.hyperparameters(), graphs


@pytest.mark.parametrize("spec", ["adam(0.01)/adam(1e-3)/sgd(1e-4)", "sgd(0.1, momentum=0.9)/sgd(1e-3)"])
def test_a_compiled_tower_trains_as_the_eager_one_and_compiles_only_in_its_first_steps(spec) -> None:
    eager, eager_hp, _ = _train(spec, False, 8)
    compiled, compiled_hp, graphs = _train(spec, True, 8)
    # Round-off: the compiler may reorder or fuse arithmetic (seen here: bitwise equal in float64).
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(compiled_hp, eager_hp, strict=True):
        assert a == pytest.approx(b, rel=1e-10)
    # Graphs are compiled while the state's structure settles (step 1: fresh states; step 2: the first vjp, states
    # that hold what it reads; step 3: momentum's vjp, which acts from the second update on), then reused: Adam's
    # bias corrections change every step but enter as tensors.
    assert graphs[3:] == [graphs[2]] * (len(graphs) - 3), graphs


def test_where_torch_compile_cannot_run_one_warning_and_the_eager_results(monkeypatch, caplog) -> None:
    import torch._inductor.config as inductor

    # A real failure of the real toolchain: inductor is pointed at a C++ compiler that does not exist.
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    monkeypatch.setattr(_foreach, "_COMPILED", {})
    monkeypatch.setattr(_foreach, "_BROKEN", [])
    torch._dynamo.reset()  # no graph compiled by an earlier test may be reused
    spec = "adam(0.01)/sgd(1e-3)"
    with caplog.at_level(logging.WARNING, logger="hypergrad"):
        fallen, _, _ = _train(spec, True, 4)
    eager, _, _ = _train(spec, False, 4)
    torch._dynamo.reset()
    lines = [r.getMessage() for r in caplog.records if r.name == "hypergrad"]
    assert len(lines) == 1 and "torch.compile is unavailable here" in lines[0], lines
    assert all(torch.equal(a, b) for a, b in zip(fallen, eager, strict=True))


@pytest.mark.parametrize(
    ("spec", "stable", "why"),
    [
        ("adam(0.01)/sgd(1e-3)", True, "a stable tower's guarded base has no multi-tensor path"),
        ("sgd(0.1)/sgd(1e-3)", False, "only a built-in base other than plain SGD has a compiled path"),
    ],
)
def test_compile_that_compiles_nothing_says_so_in_one_warning(spec: str, stable: bool, why: str, caplog) -> None:
    # compile=True is a request: where it cannot apply, the eager steps are right, but the user is told so.
    params = nn.Linear(3, 2).parameters()
    with caplog.at_level(logging.WARNING, logger="hypergrad"):
        hypergrad.tower(spec, params, stable=stable, compile=True)
        hypergrad.tower("adam(0.01)/sgd(1e-3)", nn.Linear(3, 2).parameters(), compile=True)  # compiles: no warning
        hypergrad.tower(spec, nn.Linear(3, 2).parameters(), stable=stable)  # not asked: no warning
    lines = [r.getMessage() for r in caplog.records if r.name == "hypergrad"]
    assert len(lines) == 1 and "compile=True compiles nothing for" in lines[0] and why in lines[0], lines


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="compile must be True or False, but got 'yes'"):
        hypergrad.tower("sgd(0.1)/sgd(1e-3)", [torch.zeros(2, requires_grad=True)], compile="yes")


def test_the_harness_key_reaches_the_library_and_a_bad_value_is_one_line() -> None:
    from bench.config import ConfigError, compose_config, validate
    from bench.optim import build_optimizer
    from bench.population import stacked_problem

    for value in (True, False):
        cfg = compose_config([f"optimizer.compile={str(value).lower()}"])
        validate(cfg)
        assert build_optimizer(cfg.optimizer, nn.Linear(3, 2).parameters(), 10, 100).optimizer.compile is value
        assert (stacked_problem(cfg) is not None) is value  # a compiled tower trains alone, never stacked
    with pytest.raises(ConfigError, match=r"^`optimizer.compile` must be true or false, but got 'yes'$"):
        validate(compose_config(["optimizer.compile=yes"]))
