"""The hyper levels as Python floats (hypergrad._scalar) compute what the tensor path computes: the same state,
field for field, to 1e-12 in float64 for one step, and the same hypergradients to 1e-10 (the float path is float64
throughout; see the module docstring for float32)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import hypergrad
from hypergrad import _scalar, core
from hypergrad.rules import AdamRule
from tests.hypergrad_helpers import overflow_at_the_second_step, train_small_mlp

SPECS = [
    "sgd(0.1)/sgd(1e-3)/sgd(1e-3)",
    "sgd(0.1, momentum=0.9)/sgd(1e-3, momentum=0.5)/sgd(1e-4)",
    "adam(0.01)/adam(1e-3)/adam(1e-4)/sgd(1e-4)",
    "adam[lr](0.01)/sgd(1e-3)",
    "rmsprop(0.01, gamma=0.9)/adagrad(1e-2)/rmsprop(1e-3)/sgd(1e-3)",
    "sgd(0.05)/adam(1e-3)/adagrad(1e-3)",
    "adamw(0.01)/adam[beta2](1e-3)/sgd(1e-3)",
    "adam(0.01)" + "/adam(1e-7)" * 6,
]


def trained(spec: str, steps: int, parameterization: str = "reference", dtype=torch.float64):
    opt, model, g = train_small_mlp(spec, steps, dtype, parameterization=parameterization)
    x, y = torch.randn(16, 10, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    return opt, model


def leaves(x):
    """Every tensor and float of a state, in order, with None where a field is empty."""
    if isinstance(x, torch.Tensor | float | int) or x is None:
        yield x
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from leaves(x[k])
    else:
        for v in x:
            yield from leaves(v)


def assert_same(a, b, rel: float) -> None:
    la, lb = list(leaves(a)), list(leaves(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert (x is None) == (y is None)
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=rel, atol=1e-300)
        elif x is not None:
            assert float(x) == pytest.approx(float(y), rel=rel, abs=1e-300)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("parameterization", ["reference", "log"])
def test_one_step_on_floats_equals_the_tensor_path(spec, parameterization, monkeypatch) -> None:
    monkeypatch.setattr(_scalar, "applies", _scalar.supports)  # plain SGD towers too, which the core keeps in tensors
    opt, model = trained(spec, 3, parameterization)
    plan, state = opt._plan, opt._tower
    grads = [p.grad.detach().clone() for p in model.parameters()]
    assert _scalar.applies(plan)
    calls = []
    real = _scalar.update
    monkeypatch.setattr(_scalar, "update", lambda *a: calls.append(1) or real(*a))
    hyper_fast = core.hypergradients(plan, state, grads)
    deltas_fast, new_fast = core.update(plan, state, grads)
    assert calls
    monkeypatch.setattr(_scalar, "applies", lambda plan: False)
    hyper_slow = core.hypergradients(plan, state, grads)
    deltas_slow, new_slow = core.update(plan, state, grads)
    # 1e-10: beta's hypergradient is a difference of two nearly equal terms, which amplifies round-off (seen: 1.2e-12).
    assert_same(hyper_fast, hyper_slow, 1e-10)
    assert_same(deltas_fast, deltas_slow, 1e-12)
    assert new_fast.step == new_slow.step
    assert_same(new_fast.levels, new_slow.levels, 1e-12)
    for a, b in zip(new_fast.trace, new_slow.trace, strict=True):
        assert_same(a, b, 1e-12)


@pytest.mark.parametrize("spec", SPECS[:4])
def test_training_on_floats_follows_the_tensor_path(spec, monkeypatch) -> None:
    monkeypatch.setattr(_scalar, "applies", _scalar.supports)
    _, fast = trained(spec, 8)
    monkeypatch.setattr(_scalar, "applies", lambda plan: False)
    _, slow = trained(spec, 8)
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_a_state_written_by_the_float_path_continues_on_the_tensor_path(monkeypatch) -> None:
    """A checkpoint cannot tell the paths apart: the tensor path continues from the float path's state."""
    spec = "adam(0.01)/adam(1e-3)/sgd(1e-4)"
    opt, model = trained(spec, 4)
    state = opt._tower
    grads = [p.grad.detach().clone() for p in model.parameters()]
    fast = core.update(opt._plan, state, grads)
    monkeypatch.setattr(_scalar, "applies", lambda plan: False)
    slow = core.update(opt._plan, state, grads)
    assert_same(fast, slow, 1e-12)


def test_the_core_takes_the_floats_where_a_hyper_level_is_more_than_plain_sgd() -> None:
    assert _scalar.applies(trained("sgd(0.1)/adam(1e-3)/sgd(1e-4)", 1)[0]._plan)
    assert _scalar.applies(trained("sgd(0.1)/sgd(1e-3, momentum=0.5)/sgd(1e-4)", 1)[0]._plan)
    # One level alone costs less in tensors (_scalar._FLOATS_FROM), which are then the rules' own operations.
    assert not _scalar.applies(trained("sgd(0.1)/adam(1e-3)", 1)[0]._plan)
    plain = trained("adam(0.01)/sgd(1e-3)/sgd(1e-3)", 1)[0]._plan
    assert _scalar.supports(plain) and not _scalar.applies(plain)


def test_population_and_wrapped_rules_keep_the_tensor_path() -> None:
    import dataclasses

    opt, _ = trained("adam(0.01)/adam(1e-3)/adam(1e-4)", 1)
    assert _scalar.applies(opt._plan)
    assert not _scalar.applies(dataclasses.replace(opt._plan, batch_shape=(3,)))
    stable = hypergrad.tower("adam(0.01)/sgd(1e-3)", [torch.zeros(2, requires_grad=True)], stable=True)
    assert not _scalar.applies(stable._plan)


def test_float_arithmetic_that_raises_in_python_ends_as_ieee_arithmetic() -> None:
    """1 / 0 raises in Python floats but is inf in torch: such a step is computed again in numpy float64."""

    def f(x, y, ops):
        return [x / y, ops.sqrt(x - 2.0), ops.exp(1000.0 * x)]

    out = _scalar.ieee(f, 1.0, 0.0)
    assert out[0] == math.inf and math.isnan(out[1]) and out[2] == math.inf
    assert all(type(v) is float for v in out)
    assert _scalar.ieee(f, 4.0, 2.0)[:2] == [2.0, math.sqrt(2.0)]


def test_a_value_written_between_steps_is_read_by_the_float_path(monkeypatch) -> None:
    """The floats kept between steps are never stale: a scheduler's write to param_groups (a new level-0 tensor)
    reaches the levels above as it does on the tensor path."""

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        opt = hypergrad.tower("adam(0.01)/adam(1e-3)/sgd(1e-4)", model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            x, y = torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        return [p.detach().clone() for p in model.parameters()]

    calls = []
    real = _scalar.update
    monkeypatch.setattr(_scalar, "update", lambda *a: calls.append(1) or real(*a))
    fast = run()
    assert len(calls) == 6
    monkeypatch.setattr(_scalar, "applies", lambda plan: False)
    slow = run()
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


TALL_SGD = "sgd(0.1)" + "/sgd(1e-3)" * 9  # plain SGD levels, tall enough for the floats (_scalar._SGD_FROM)
# The same above a level 0 that learns several values per group: level 1's dot products over them are the tensor
# path's own torch.dot, the rest is exact floats.
TALL_SGD_ABOVE = ["adam(0.01)" + "/sgd(1e-3)" * 9, "sgd(0.1, momentum=0.9)" + "/sgd(1e-3)" * 9]


def train_two_groups(spec: str, dtype, steps: int = 6, after_step=None) -> list[torch.Tensor]:
    """Weights, learned values and every state tensor after ``steps`` steps of ``spec`` on two param groups;
    ``after_step(opt, step)`` may check or change the optimizer between steps."""
    opt, model, _ = train_small_mlp(spec, steps, dtype, after_step=after_step)
    params = list(model.parameters())
    learned = [torch.tensor(v, dtype=torch.float64) for level in opt.hyperparameters() for v in level.values()]
    state = [t for t in leaves(opt.state_dict()["tower"]["state"]) if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in params] + learned + state


def run_tall_sgd(dtype, steps: int = 6, write=None) -> list[torch.Tensor]:
    """TALL_SGD through `train_two_groups`; ``write(opt, step)`` may change the optimizer between steps."""
    return train_two_groups(TALL_SGD, dtype, steps, write)


def assert_bitwise(fast: list[torch.Tensor], slow: list[torch.Tensor]) -> None:
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", [TALL_SGD, *TALL_SGD_ABOVE])
def test_plain_sgd_levels_on_floats_are_the_tensor_path_bit_for_bit(spec, dtype, monkeypatch) -> None:
    """A tall tower of plain SGD levels runs on floats that do the tensor path's IEEE operations one by one: the same
    weights, learned values and state, bit for bit, in float32 as in float64."""
    calls = []
    real = _scalar._sgd_update
    monkeypatch.setattr(_scalar, "_sgd_update", lambda *a: calls.append(1) or real(*a))
    fast = train_two_groups(spec, dtype)
    assert len(calls) == 6
    monkeypatch.setattr(_scalar, "applies", lambda plan: False)
    assert_bitwise(fast, train_two_groups(spec, dtype))


def test_plain_sgd_floats_that_overflow_raise_and_leave_the_weights_untouched() -> None:
    """A tall plain-SGD tower on the exact float path (its floats kept flat between steps) refuses a step whose new
    value overflows as the tensor path does: the error names the level, and the weights keep their values."""

    def on_the_float_path(opt: hypergrad.HyperOptimizer) -> None:
        assert _scalar._kind(opt._plan) == "sgd" and opt._live.floats is not None  # the exact float path ran

    # Levels 2..5 have step size 0, so level 1's step size stays 1e35; a constant gradient of 1e3 makes the second
    # step's hypergradient -3e6, and 1e35 * 3e6 overflows float32 (as in test_hypergrad_api's height-1 case).
    error, snapshot, w = overflow_at_the_second_step("sgd(0.1)/sgd(1e35)" + "/sgd(0.0)" * 4, on_the_float_path)
    assert error.level == 1 and error.step == 2
    assert torch.equal(snapshot, w)


def test_float32_floats_that_overflow_raise_the_finiteness_error_alone() -> None:
    """Levels above the first on floats, in float32: a value that overflows float32 when stored is inf, reported as the
    non-finite hyperparameter it is (tests turn warnings into errors, so a warning on the way would fail here)."""
    w = nn.Parameter(torch.ones(3))
    opt = hypergrad.tower("sgd(0.1)/sgd(1e35)/adam(1e-3)", [w])  # 1e35 * 3e6 overflows float32 at the second step
    with pytest.raises(hypergrad.NonFiniteHyperparameterError, match=r"hyperparameter 'lr' of level 1 became"):
        for _ in range(2):
            (1e3 * w).sum().backward()
            opt.step()
            opt.zero_grad()
            assert _scalar._kind(opt._plan) == "floats"


def test_plain_sgd_floats_read_what_was_written_between_steps(monkeypatch) -> None:
    """The floats kept between steps are never stale: a scheduler's write to param_groups, a write in place into a
    level's tensor, and a loaded checkpoint reach the next step as on the tensor path."""

    def write(opt, step: int) -> None:
        if step == 1:
            opt.param_groups[1]["lr"] *= 0.5
        if step == 2:
            with torch.no_grad():
                opt._tower.levels[4].hp[0].mul_(3.0)  # a view of what the float path wrote: the version counter
        if step == 3:
            opt.load_state_dict(opt.state_dict())

    fast = run_tall_sgd(torch.float32, write=write)
    monkeypatch.setattr(_scalar, "applies", lambda plan: False)
    assert_bitwise(fast, run_tall_sgd(torch.float32, write=write))


FLOAT_TOWERS = [
    "adam(0.01)" + "/adam(1e-4)" * 3,
    "rmsprop(0.01, gamma=0.9)/adagrad(1e-2)/rmsprop(1e-3)/sgd(1e-3)",
    TALL_SGD,  # the exact plain-SGD chain keeps its floats the same way
    *TALL_SGD_ABOVE,
]


def run_kept(spec: str, dtype, read_each_step: bool, write=None, steps: int = 6) -> list[torch.Tensor]:
    """`train_two_groups` of ``spec``; with ``read_each_step`` the optimizer's state is read after every step (which
    builds the levels' tensors, so the next step reads them), else the levels above the first stay floats between
    steps."""

    def after_step(opt, step: int) -> None:
        assert opt._live.floats is not None  # the step left the levels above as floats
        if read_each_step:
            assert len(opt._tower.levels) == opt.height + 1 and opt._live.floats is None
        if write is not None:
            write(opt, step)

    return train_two_groups(spec, dtype, steps, after_step)


@pytest.mark.parametrize("spec", FLOAT_TOWERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_levels_kept_as_floats_between_steps_train_as_their_tensors_bit_for_bit(spec, dtype) -> None:
    """Between two steps the levels above the first stay floats, rounded to the dtype: the weights, learned values
    and checkpointed state are those of a run whose state is built as tensors (and read back) after every step."""
    assert_bitwise(run_kept(spec, dtype, False), run_kept(spec, dtype, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floats_kept_between_steps_read_what_was_written(dtype) -> None:
    """A scheduler's write to param_groups, a write in place into a level's tensor and a loaded checkpoint between
    steps reach the next step as they do when the state is tensors throughout."""

    def write(opt, step: int) -> None:
        if step == 1:
            opt.param_groups[1]["lr"] *= 0.5
        if step == 2:
            with torch.no_grad():
                opt._tower.levels[2].hp[0].mul_(0.5)
        if step == 3:
            opt.load_state_dict(opt.state_dict())

    spec = FLOAT_TOWERS[0]
    assert_bitwise(run_kept(spec, dtype, False, write), run_kept(spec, dtype, True, write))


def test_a_lazy_state_sees_a_write_in_place_into_level_0() -> None:
    """core.update(..., lazy=True) keeps level 0's values as floats too, for as long as its tensors are unchanged: a
    write in place into them is read at the next step, as on a state of tensors."""
    opt, model = trained("adam(0.01)/adam(1e-3)/adam(1e-4)", 2, dtype=torch.float32)
    plan = opt._plan
    grads = [p.grad.detach().clone() for p in model.parameters()]
    _, lazy = core.update(plan, opt._tower, grads, lazy=True)
    assert lazy.floats is not None and len(lazy.levels) == 1
    full = core.materialize(lazy)
    with torch.no_grad():
        lazy.levels[0].hp[1].mul_(0.5)  # the same tensors as full's level 0
    _, a = core.update(plan, lazy, grads)
    _, b = core.update(plan, full, grads)
    assert lazy.floats is not None
    assert_bitwise(*([t for t in leaves(x) if isinstance(t, torch.Tensor)] for x in (a, b)))


def _bits(x) -> list:
    """Every number in a nested structure of lists, tuples and dicts, as its exact bits (nan as one value)."""
    if x is None:
        return [None]
    if isinstance(x, dict):
        return [b for k in sorted(x) for b in [k, *_bits(x[k])]]
    if isinstance(x, list | tuple):
        return [b for v in x for b in _bits(v)]
    return ["nan" if math.isnan(x) else float(x).hex()]


@pytest.mark.parametrize(
    "learned", [("lr",), ("beta2",), ("lr", "beta1"), ("beta1", "beta2"), ("lr", "beta1", "beta2")]
)
@pytest.mark.parametrize("transform", ["identity", "square", "half_tanh", "exp"])
def test_generated_adam_levels_compute_the_loops_numbers_bit_for_bit(learned, transform) -> None:
    """Adam levels above the first run as generated straight-line functions; the levels' values, new raw values,
    states and hypergradients are those of the loops they replace (_update, _vjp), bit for bit, including steps where
    Python floats raise and the chain is computed again in numpy float64 (lr or beta above 1: sqrt of a negative)."""
    rng = random.Random(0)
    names = ("lr", "beta1", "beta2")
    widths = [3, len(learned), len(learned), 0]  # level k's learned values; the top level (3) learns none
    fixed = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    static = [
        _scalar._Level(AdamRule(), names, ("identity", "half_tanh", "half_tanh"), fixed),
        *(_scalar._Level(AdamRule(), learned, (transform,) * len(learned), fixed) for _ in range(2)),
        _scalar._Level(AdamRule(), (), (), fixed),
    ]
    fast = [s._replace(gen=_scalar._generated(s, widths[k - 1])) if k else s for k, s in enumerate(static)]
    assert all(s.gen is not None for s in fast[1:])
    raised = 0
    for trial in range(40):
        # every fourth draw: a negative second moment, whose square root raises in Python floats (nan in numpy)
        lo_v, hi_v = (-1.0, -0.1) if trial % 4 == 3 else (1e-3, 1.0)

        def vec(n: int, lo: float = 0.1, hi: float = 1.0) -> list[float]:
            return [rng.uniform(lo, hi) for _ in range(n)]

        raw = [[vec(w, 0.2, 0.9)] for w in widths[:3]]
        states = [
            None,
            *(
                [[vec(w, -1.0), vec(w, lo_v, hi_v), vec(w, -1.0), vec(w, lo_v, hi_v), vec(w), vec(w)]]
                for w in widths[:3]
            ),
        ]
        hyper = [[vec(w, -1.0)] for w in widths[:3]]
        step = rng.choice([1, 2, 7])
        try:
            _scalar._chain(static, raw, states, hyper, step, _scalar._PY)
        except _scalar._RAISES:
            raised += 1
        assert _bits(_scalar.ieee(_scalar._chain, fast, raw, states, hyper, step)) == _bits(
            _scalar.ieee(_scalar._chain, static, raw, states, hyper, step)
        )
        r = [None, raw[1][0], raw[2][0]]
        ups = [vec(3, -1.0)]
        assert _bits(_scalar.ieee(_scalar._hyper_chain, fast, r, states[:3], ups, step)) == _bits(
            _scalar.ieee(_scalar._hyper_chain, static, r, states[:3], ups, step)
        )
    assert raised  # the numpy float64 path was compared too
    # and a tower of such levels runs them (levels 1..top of one param group)
    spec = "adam(0.01)" + f"/adam[{','.join(learned)}](1e-7)" * 2 + "/adam(1e-7)"
    opt = hypergrad.tower(spec, [torch.zeros(2, requires_grad=True)])
    assert all(level.gen is not None for level in _scalar._static(opt._plan)[1:])


ADAM_TOWERS = [
    "adam(0.01)" + "/adam(1e-7)" * 6,
    "adam[beta1,beta2](0.01)/adam[lr,beta2](1e-4)/adam[beta1](1e-5)/adam(1e-5)",
    "sgd(0.1, momentum=0.9)/adam(1e-4)/adam(1e-5)",  # level 0 of another rule: level 1's vectors are 2 long
]


def train_groups(spec: str, dtype, groups: int, parameterization: str, read_each_step: bool, steps: int = 6):
    """Weights, learned values and every state tensor after ``steps`` steps of ``spec`` on one or two param groups,
    with a scheduler's write, a write in place into a level above, a checkpoint reload and a write in place into level
    0 between steps; with ``read_each_step`` the state is read (built as tensors) after every step."""
    kinds = []

    def after_step(opt: torch.optim.Optimizer, step: int) -> None:
        kinds.append(type(opt._live.floats))
        if read_each_step:
            opt.state_dict()
        if step == 1:
            opt.param_groups[0]["lr"] *= 0.5
        if step == 2:
            with torch.no_grad():
                opt._tower.levels[opt.height - 1].hp[0].mul_(0.5)  # the values the top level learns
        if step == 3:
            opt.load_state_dict(opt.state_dict())
        if step == 4:
            with torch.no_grad():
                opt._tower.levels[0].hp[0].mul_(0.75)

    opt, model, _ = train_small_mlp(
        spec, steps, dtype, groups=groups, after_step=after_step, parameterization=parameterization
    )
    learned = [torch.tensor(v, dtype=torch.float64) for level in opt.hyperparameters() for v in level.values()]
    state = [t for t in leaves(opt.state_dict()["tower"]["state"]) if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()] + learned + state, kinds


@pytest.mark.parametrize("spec", ADAM_TOWERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parameterization", ["reference", "log"])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_tower_of_adam_levels_kept_as_one_flat_tuple_trains_as_the_level_by_level_floats(
    spec, dtype, parameterization, groups, monkeypatch
) -> None:
    """Adam levels keep their floats as one flat tuple and run as one generated function per direction: weights,
    learned values and checkpointed state are those of the level-by-level floats, bit for bit, whether the state stays
    floats between steps or is read after each, with writes between steps, on one param group or two."""
    for read_each_step in (False, True):
        fast, kinds = train_groups(spec, dtype, groups, parameterization, read_each_step)
        assert kinds == [_scalar.AdamFloats] * len(kinds)  # the flat path ran at every step
        with monkeypatch.context() as m:
            m.setattr(_scalar, "_tower", lambda plan: None)
            slow, kinds = train_groups(spec, dtype, groups, parameterization, read_each_step)
        assert kinds == [_scalar.Floats] * len(kinds)
        assert_bitwise(fast, slow)


@pytest.mark.parametrize("spec", ADAM_TOWERS)
@pytest.mark.parametrize("groups", [1, 2])
def test_the_flat_adam_tower_computes_the_loops_numbers_bit_for_bit(spec, groups) -> None:
    """The generated whole-tower functions give the numbers of the loops (_chain, _hyper_chain without generated
    levels), on random states, including steps where Python floats raise and the numpy float64 path runs."""
    opt = hypergrad.tower(spec, [{"params": [torch.zeros(3, requires_grad=True)]} for _ in range(groups)])
    plan = opt._plan
    tw = _scalar._tower(plan)
    assert tw is not None
    loops = [s._replace(gen=None) for s in _scalar._static(plan)]
    top = plan.height
    rng = random.Random(1)
    raised = 0
    for trial in range(40):
        flat = [rng.uniform(-1.0, 1.0) for _ in range(tw.size)]
        for level in tw.fields:  # second moments: positive, or every fourth draw negative (sqrt raises)
            for f in (f for vector in level for f in (vector[1], vector[3])):
                if f is not None:
                    for i in range(*f):
                        flat[i] = rng.uniform(-1.0, -0.1) if trial % 4 == 3 else rng.uniform(1e-3, 1.0)
        fl = _scalar.AdamFloats(plan, torch.float64, torch.device("cpu"), [], torch.zeros(1), 0, tuple(flat))
        hyper = [rng.uniform(-1.0, 1.0) for _ in range(sum(b - a for a, b in tw.raw))]  # levels 0..top-1
        step = rng.choice([1, 2, 7])
        raw, states = [list(r) for r in fl.raw], [None, *([list(s) for s in level] for level in fl.states[1:])]
        vectors, i = [], 0  # the hypergradients shaped as the raw values (level 0's: one vector per group)
        for level in fl.raw:
            vectors.append([hyper[i + j * len(level[0]) : i + (j + 1) * len(level[0])] for j in range(len(level))])
            i += len(level) * len(level[0])
        try:
            _scalar._chain(loops, raw, states, vectors, step, _scalar._PY)
        except _scalar._RAISES:
            raised += 1
        values, new_states, new_raw = _scalar.ieee(_scalar._chain, loops, raw, states, vectors, step)
        expected = []
        for k in range(1, top + 1):
            expected += [x for v in new_raw[k - 1] for x in v]
            expected += [x for st in new_states[k] for f in st if f is not None for x in f]
            expected += [values[k][n] for n in loops[k].learned] if k < top else []
        assert _bits(_scalar.ieee(tw.update, fl.flat, tuple(hyper), tw.consts, step)) == _bits(expected)
        upstream = vectors[0]
        expected = _scalar.ieee(
            _scalar._hyper_chain, loops, [None, *(r[0] for r in fl.raw[1:])], states, upstream, step
        )
        flat_upstream = tuple(x for v in upstream for x in v)
        assert _bits(_scalar.ieee(tw.vjp, fl.flat, flat_upstream, tw.consts, step)) == _bits(expected)
    assert raised  # the numpy float64 path was compared too
