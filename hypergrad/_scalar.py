"""The hyper levels above the first as plain Python floats: no tensor operation, hence no dispatch, per level.

A level k >= 1 updates a handful of numbers (the raw learned hyperparameters of level k - 1), so its cost in the
tensor path is all dispatch: 20 to 130 microseconds a level for a few flops. Here the whole chain of levels 1..top
is read from the tower state with one ``cat``/``tolist``, computed in Python floats, and written back with one
``tensor``/``split``; the same for the hypergradients of levels 1..top-1.

The arithmetic is that of :mod:`hypergrad.rules` (the built-in rules' ``update`` and closed-form ``vjp``), operation
by operation, in float64: in a float64 tower it agrees with the tensor path to round-off (tested to 1e-12); in a
float32 tower the hyper levels are computed in float64 and rounded to float32 when stored, so they are slightly
*more* accurate than the float32 tensor path, and equal to it only to float32 round-off (the tests against the
reference package hold at 1e-6 either way).

``applies(plan)`` says whether a tower can take this path: no population dimensions, and every level above the
first a built-in rule (SGD, Adam, AdaGrad, RMSProp) with built-in transforms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from hypergrad.rules import AdaGradRule, AdamRule, AdamState, RMSPropRule, SGDRule, SGDState, SumState

__all__ = [
    "ScalarTrace",
    "applies",
    "derivative",
    "forward",
    "hypergradient_floats",
    "hypergradients",
    "ieee",
    "update",
]

Vec = list[float]


class _Math(NamedTuple):
    sqrt: Any
    tanh: Any
    exp: Any
    num: Any  # the number type


# Python floats raise where IEEE arithmetic (and torch) gives inf or nan: 1 / 0, sqrt(-1), exp(1000). A step that
# raises is computed again with numpy float64 scalars, which follow IEEE, so that it ends as the tensor path does.
_PY = _Math(math.sqrt, math.tanh, math.exp, float)
_NP = _Math(np.sqrt, np.tanh, np.exp, np.float64)
_RAISES = (ArithmeticError, ValueError)


def forward(name: str, x: float, ops: _Math = _PY) -> float:
    """A transform's natural value at raw ``x`` (see hypergrad.transforms), in floats."""
    if name == "identity":
        return x
    if name == "square":
        return x * x
    if name == "half_tanh":
        return (ops.tanh(x) + 1.0) / 2.0
    return ops.exp(x)


def derivative(name: str, x: float, ops: _Math = _PY) -> float | None:
    """d forward / d raw at ``x``; None for the identity."""
    if name == "identity":
        return None
    if name == "square":
        return 2.0 * x
    if name == "half_tanh":
        return (1.0 - ops.tanh(x) ** 2) / 2.0
    return ops.exp(x)


def ieee(fn: Any, *args: Any) -> Any:
    """``fn(*args, ops)`` in Python floats, or where that raises, in numpy float64 (results as Python floats)."""
    try:
        return fn(*args, _PY)
    except _RAISES:
        with np.errstate(all="ignore"):
            return _py(fn(*_np(args), _NP))


def _np(x: Any) -> Any:
    if isinstance(x, float):
        return np.float64(x)
    if isinstance(x, list | tuple):
        return type(x)(*(_np(v) for v in x)) if hasattr(x, "_fields") else type(x)(_np(v) for v in x)
    if isinstance(x, dict):
        return {k: _np(v) for k, v in x.items()}
    return x


def _py(x: Any) -> Any:
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, list | tuple):
        return type(x)(*(_py(v) for v in x)) if hasattr(x, "_fields") else type(x)(_py(v) for v in x)
    if isinstance(x, dict):
        return {k: _py(v) for k, v in x.items()}
    return x


_TRANSFORMS = ("identity", "square", "half_tanh", "exp")
_RULES = (SGDRule, AdamRule, AdaGradRule, RMSPropRule)


def applies(plan: Any) -> bool:
    """Whether ``plan``'s hyper levels can run as Python floats."""
    if plan.batch_shape or plan.height < 1 or not plan.closed_form:
        return False
    if any(type(r) not in _RULES for r in plan.rules[1:]):
        return False
    return all(t.name in _TRANSFORMS for level in plan.transforms for t in level)


def _dot(a: Vec, b: Vec) -> float:
    out = a[0] * b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        out = out + x * y
    return out


# -- the rules, on vectors of floats (state: a tuple of vectors, or None for SGD's buffer before the first step) --
def _update(
    rule: Any, g: Vec, state: Any, hp: Mapping[str, float], learned: Sequence[str], step: int, ops: _Math
) -> tuple[Vec, Any]:
    kind = type(rule)
    if kind is SGDRule:
        lr, mom = hp["lr"], hp["momentum"]
        if mom == 0.0 and "momentum" not in learned:  # a fixed zero momentum keeps no buffer, as SGDRule
            return [x * lr for x in g], state
        buf = list(g) if state is None else [b * mom + x for b, x in zip(state, g, strict=True)]
        return [b * lr for b in buf], buf
    if kind is AdamRule:
        b1, b2, lr, eps, t = hp["beta1"], hp["beta2"], hp["lr"], hp["eps"], float(step)
        m0, v0 = state
        m = [b1 * a + (1.0 - b1) * x for a, x in zip(m0, g, strict=True)]
        v = [b2 * a + (1.0 - b2) * x * x for a, x in zip(v0, g, strict=True)]
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        return [lr * ((a / c1) / (ops.sqrt(b / c2) + eps)) for a, b in zip(m, v, strict=True)], (m, v)
    if kind is AdaGradRule:
        s = [a + x * x for a, x in zip(state, g, strict=True)]
        return [hp["lr"] * x / ops.sqrt(a + hp["eps"]) for x, a in zip(g, s, strict=True)], s
    gamma = hp["gamma"]  # RMSProp
    s = [gamma * a + (1.0 - gamma) * (x * x) for a, x in zip(state, g, strict=True)]
    return [hp["lr"] * x / ops.sqrt(a + hp["eps"]) for x, a in zip(g, s, strict=True)], s


def _vjp(
    rule: Any,
    u: Vec,
    g: Vec,
    before: Any,
    after: Any,
    hp: Mapping[str, float],
    learned: Sequence[str],
    step: int,
    ops: _Math,
) -> dict[str, float]:
    """``u . d delta / d hp[name]`` for every learned name (the formulas of the rules' ``vjp``)."""
    kind = type(rule)
    out: dict[str, float] = {}
    if kind is SGDRule:
        if "lr" in learned:
            out["lr"] = _dot(u, g if after is None else after)
        if "momentum" in learned:
            out["momentum"] = hp["lr"] * (_dot(u, before) if before is not None else 0.0)
        return out
    if kind is AdamRule:
        lr, b1, b2, eps, t = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], float(step)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        m0, v0 = before
        m, v = after
        sq = [ops.sqrt(a / c2) for a in v]
        den = [s + eps for s in sq]
        q = [a / d for a, d in zip(u, den, strict=True)]
        if "beta1" in learned:
            q_m0, q_g = _dot(q, m0), _dot(q, g)
            q_m = b1 * q_m0 + (1.0 - b1) * q_g
            out["beta1"] = lr * ((q_m0 - q_g) / c1 + q_m * t * b1 ** (t - 1.0) / (c1 * c1))
        else:
            q_m = _dot(q, m)
        if "lr" in learned:
            out["lr"] = q_m / c1
        if "beta2" in learned:
            w = [a * b / (d * s) for a, b, d, s in zip(q, m, den, sq, strict=True)]
            w_v0, w_g2 = _dot(w, v0), _dot([a * x for a, x in zip(w, g, strict=True)], g)
            w_v = b2 * w_v0 + (1.0 - b2) * w_g2
            out["beta2"] = -0.5 * lr / c1 * ((w_v0 - w_g2) / c2 + w_v * t * b2 ** (t - 1.0) / (c2 * c2))
        return out
    eps = hp["eps"]
    r = [x / ops.sqrt(a + eps) for x, a in zip(g, after, strict=True)]
    if "lr" in learned:
        out["lr"] = _dot(u, r)
    if kind is RMSPropRule and "gamma" in learned:
        z = [ri / (a + eps) * (b - x * x) for ri, a, b, x in zip(r, after, before, g, strict=True)]
        out["gamma"] = -0.5 * hp["lr"] * _dot(u, z)
    return out


# -- the tower state <-> floats -----------------------------------------------------------------------------------
def _wrap_state(rule: Any, vecs: Any, views) -> Any:
    kind = type(rule)
    if kind is SGDRule:
        return SGDState(None if vecs is None else next(views))
    if kind is AdamRule:
        return AdamState(next(views), next(views))
    return SumState(next(views))


def _flat_state(rule: Any, vecs: Any) -> list[Vec]:
    if vecs is None:
        return []
    if type(rule) is AdamRule:
        return list(vecs)
    return [vecs]


class ScalarTrace(NamedTuple):
    """What the hypergradients of levels 1..top-1 need from the last step, as floats (per level k >= 1)."""

    levels: list[Any]  # per level k >= 1: (values, learned names, received, before, after, new raw of level k)
    step: int
    level0: list[Vec]  # the new raw hyperparameters of level 0, per param group


class _Level(NamedTuple):
    rule: Any
    learned: tuple[str, ...]
    transforms: tuple[str, ...]
    fixed: dict[str, float]  # every hyperparameter's initial value (the learned ones are overwritten each step)


_STATIC: dict[int, tuple[Any, list[_Level]]] = {}


def _static(plan: Any) -> list[_Level]:
    """Per level k >= 1, what stays fixed (looked up once per plan, not once per step)."""
    hit = _STATIC.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    levels = [
        _Level(
            plan.rules[k],
            tuple(plan.learned[k]),
            tuple(t.name for t in plan.transforms[k]),
            {n: float(v) for n, v in plan.initial[k][0].items()},
        )
        for k in range(plan.height + 1)
    ]
    if len(_STATIC) > 64:  # plans of optimizers long gone
        _STATIC.clear()
    _STATIC[id(plan)] = (plan, levels)
    return levels


# The floats behind the tensors this module made at the last step of each plan: the next step reads them back
# without a gather when it is handed the very same tensors (checked by identity, so a state changed in between,
# by load_state_dict or a scheduler's write, is read from its tensors).
_KNOWN: dict[int, dict[int, tuple[Tensor, Vec]]] = {}


def remember(plan: Any, pairs: Sequence[tuple[Tensor, Vec]], fresh: bool = False) -> None:
    known = {} if fresh or id(plan) not in _KNOWN else _KNOWN[id(plan)]
    for t, v in pairs:
        known[id(t)] = (t, v)
    _KNOWN[id(plan)] = known


def _chain(plan: Any, raw: list, states: list, hyper: list, step: int, ops: _Math) -> tuple[list, list, list]:
    """Levels top..1 on floats: new raw values of levels 0..top-1, new rule states, and each level's trace."""
    static = _static(plan)
    top = plan.height
    new_raw: list[list[Vec]] = [[] for _ in range(top + 1)]
    new_states: list[list[Any]] = [[] for _ in range(top + 1)]
    trace: list[Any] = [None] * (top + 1)
    num = ops.num
    for k in range(top, 0, -1):
        rule, learned, tnames, fixed = static[k]
        values = fixed.copy() if ops is _PY else {n: num(v) for n, v in fixed.items()}
        if learned:
            r = new_raw[k][0]
            for i, name in enumerate(learned):
                t = tnames[i]
                values[name] = r[i] if t == "identity" else forward(t, r[i], ops)
        received = hyper[k - 1]
        below = raw[k - 1]
        if type(rule) is SGDRule and values["momentum"] == 0.0 and "momentum" not in learned:
            lr = values["lr"]  # the commonest level: plain SGD on the level below, no state
            new_raw[k - 1] = [
                [h - x * lr for h, x in zip(r, g, strict=True)] for r, g in zip(below, received, strict=True)
            ]
            new_states[k] = states[k]
        else:
            out = [_update(rule, g, s, values, learned, step, ops) for g, s in zip(received, states[k], strict=True)]
            new_raw[k - 1] = [[h - d for h, d in zip(r, o[0], strict=True)] for r, o in zip(below, out, strict=True)]
            new_states[k] = [o[1] for o in out]
        if k < top:
            trace[k] = (values, learned, received, states[k], new_states[k], new_raw[k][0])
    return new_raw, new_states, trace


def _state_parts(rule: Any, state: Any) -> tuple[Tensor, ...]:
    if isinstance(state, SGDState):
        return () if state.momentum_buffer is None else (state.momentum_buffer,)
    return tuple(state)


def _state_vecs(rule: Any, state: Any, vecs: list[Vec]) -> Any:
    if isinstance(state, SGDState):
        return vecs[0] if vecs else None
    return (vecs[0], vecs[1]) if isinstance(state, AdamState) else vecs[0]


def update(plan: Any, levels: Sequence[Any], hypergrads: Sequence[Sequence[Tensor]], step: int):
    """Levels top..1 of one step: ``(new raw hyperparameters of levels 0..top-1, new rule states of levels 1..top,
    trace)``; tensors of the hyperparameters' dtype and device (level 0 then runs in tensors, as before)."""
    top = plan.height
    like = levels[0].hp[0]
    # Raw values of levels 0..top-1, rule states of levels 1..top, hypergradients of levels 0..top-1: read from
    # the floats this module kept, or else with one gather.
    hp_parts = [list(levels[k].hp) for k in range(top)]
    state_parts = [[]] + [[_state_parts(plan.rules[k], s) for s in levels[k].rule] for k in range(1, top + 1)]
    parts = [h for lv in hp_parts for h in lv]
    parts += [t for lv in state_parts for st in lv for t in st]
    parts += [h for level in hypergrads for h in level]
    known = _KNOWN.get(id(plan), {})
    hits = [known.get(id(t)) for t in parts]
    if all(h is not None and h[0] is t for h, t in zip(hits, parts, strict=True)):
        vecs = [h[1] for h in hits]  # type: ignore[index]
    else:  # something was not ours: one gather of everything
        flat = torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in parts]).tolist()
        vecs, i = [], 0
        for p in parts:
            n = p.numel()
            vecs.append(flat[i : i + n])
            i += n
    it = iter(vecs)
    raw = [[next(it) for _ in lv] for lv in hp_parts]
    states = [None] + [
        [
            _state_vecs(plan.rules[k], s, [next(it) for _ in st])
            for s, st in zip(levels[k].rule, state_parts[k], strict=True)
        ]
        for k in range(1, top + 1)
    ]
    hyper = [[next(it) for _ in level] for level in hypergrads]

    new_raw, new_states, trace = ieee(_chain, plan, raw, states, hyper, step)
    # One scatter back into tensors.
    vectors: list[Vec] = [v for k in range(top) for v in new_raw[k]]
    for k in range(1, top + 1):
        for s in new_states[k]:
            vectors += _flat_state(plan.rules[k], s)
    sizes = [len(v) for v in vectors]
    out_t = torch.tensor([x for v in vectors for x in v], dtype=like.dtype, device=like.device).split(sizes)
    remember(plan, zip(out_t, vectors, strict=True), fresh=True)
    views = iter(out_t)
    hp_out = [[next(views) for _ in range(len(levels[k].hp))] for k in range(top)]
    rule_out = [[_wrap_state(plan.rules[k], s, views) for s in new_states[k]] for k in range(1, top + 1)]
    return hp_out, rule_out, ScalarTrace(trace, step, new_raw[0])


def hypergradients(plan: Any, trace: ScalarTrace, level0: Sequence[Tensor]) -> list[list[Tensor]]:
    """The hypergradients of levels 1..top-1 (one vector each), from level 0's (``level0``: one per param group)."""
    if plan.height < 2:
        return []
    upstream = torch.stack(list(level0)).tolist() if len(level0) > 1 else [level0[0].tolist()]
    out = hypergradient_floats(plan, trace, upstream)
    like = level0[0]
    t_out = torch.tensor([x for v in out for x in v], dtype=like.dtype, device=like.device).split([len(v) for v in out])
    remember(plan, zip(t_out, out, strict=True))
    return [[v] for v in t_out]


def hypergradient_floats(plan: Any, trace: ScalarTrace, upstream: list[Vec]) -> list[Vec]:
    """As :func:`hypergradients`, on floats: ``upstream`` is level 0's hypergradient per group."""
    return ieee(_hyper_chain, plan, trace, upstream)


def _hyper_chain(plan: Any, trace: ScalarTrace, upstream: list[Vec], ops: _Math) -> list[Vec]:
    top = plan.height
    out: list[Vec] = []
    for k in range(1, top):
        values, learned, received, before, after, raw = trace.levels[k]
        sums: dict[str, float] = {}
        for u, g, b, a in zip(upstream, received, before, after, strict=True):
            for name, v in _vjp(plan.rules[k], u, g, b, a, values, learned, trace.step, ops).items():
                sums[name] = sums.get(name, 0.0) + v
        cols = []
        for j, (name, t) in enumerate(zip(learned, plan.transforms[k], strict=True)):
            s = sums.get(name)
            if s is None:
                cols.append(0.0)
                continue
            d = derivative(t.name, raw[j], ops)
            cols.append(-s if d is None else -s * d)
        out.append(cols)
        upstream = [cols]
    return out
