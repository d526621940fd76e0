"""The hyper levels above the first as plain Python floats: no tensor operation, hence no dispatch, per level.

A level k >= 1 updates a handful of numbers (the raw learned hyperparameters of level k - 1), so in tensors its cost
is all dispatch: tens of microseconds a level for a few flops. :func:`hypergrad.core.update` and
:func:`hypergrad.core.hypergradients` hand levels 1..top to this module when :func:`applies`: the floats are read
from the state's tensors, or from the :class:`Floats` a lazy state holds instead of them (see
:func:`hypergrad.core.update`'s ``lazy``), computed here, rounded to the dtype, and kept as :class:`Floats`; level 0's
new raw values become tensors (one ``tensor`` and one ``split``), the levels above only where :func:`tensors` is
called. Those tensors are the core's state, field for field: a checkpoint, or the tensor path, cannot tell which path
wrote it. Keeping floats between steps also keeps the several hundred small tensors, views and NamedTuples a tall
tower's levels are made of from being built every step, and so from driving Python's cyclic garbage collector.

The arithmetic is that of :mod:`hypergrad.rules` (the built-in rules' ``update`` and closed-form ``vjp``), operation
by operation, in float64: in a float64 tower it agrees with the tensor path to round-off (tested to 1e-12 for one
step's state, 1e-10 for hypergradients, where a difference of nearly equal terms amplifies round-off); in a float32
tower each step is computed in float64 from the stored float32 values and rounded to float32 when stored, so it is
slightly *more* accurate than the float32 tensor path and equal to it only to float32 round-off (the tests against
the reference package hold at 1e-6 either way). What is kept between steps is what was stored, rounded: a restored
checkpoint continues bit for bit. Where Python floats raise (1 / 0, sqrt(-1), exp(1000)) the step is
computed again in numpy float64, which gives IEEE's inf and nan as torch does. An Adam level that updates one vector
(every level k >= 2, and level 1 of one param group; :func:`_generated`) runs as two functions written out once per
shape, a line per operation of ``_update`` and ``_vjp`` in their order on the same operands, so with the same results
bit for bit and without their loops, lists and dictionary look-ups (tested against them, Python floats and numpy float64
alike). Where every level 1..top is such an Adam level (:func:`_tower`; level 1 repeats its lines per param group and
adds its vjp's sums over the groups in their order, as the loops do), the whole chain runs as one generated update and
one generated vjp that concatenate those lines level after level, and the state is kept as :class:`AdamFloats`: one
flat tuple of exactly the numbers :class:`Floats` would hold, rounded once to the dtype. The same operations on the
same operands give the same numbers; rounding a value that is already of the dtype (a kept previous moment) returns it
unchanged; and the tensors, checkpoints and hyperparameters built from the flat tuple are those built from Floats,
field for field, so the layout cannot be observed. The generated source comes only from this module's templates:
the learned names are checked against Adam's, and every number is passed as an argument, never written as text.

One case is exact instead: a tall tower of plain SGD levels on one number each (``sgd/sgd/.../sgd``, see
:func:`_plain_sgd`). Its step is products, differences and negations of scalars, each one IEEE operation rounded once
on the tensor path; :func:`_sgd_update` and :func:`_sgd_hypergradients` do the same operations in the same order on
numpy float32 scalars (float32) or Python floats (float64), so that both paths agree bit for bit, and keep them
between steps as :class:`SgdFloats`: two flat vectors of those numbers, which build :class:`Floats`' fields where read.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from itertools import chain, groupby, islice
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from hypergrad.rules import AdaGradRule, AdamRule, AdamState, RMSPropRule, SGDRule, SGDState, SumState

if TYPE_CHECKING:
    from hypergrad.core import Plan, TowerState

__all__ = ["applies", "derivative", "forward", "hypergradients", "ieee", "supports", "update"]

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


def _value_slope(name: str, x: float, ops: _Math) -> tuple[float, float | None]:
    """``(forward(name, x), derivative(name, x))`` with the operations of both, a shared ``tanh`` or ``exp`` computed
    once (the same value either way)."""
    if name == "identity":
        return x, None
    if name == "square":
        return x * x, 2.0 * x
    if name == "half_tanh":
        th = ops.tanh(x)
        return (th + 1.0) / 2.0, (1.0 - th**2) / 2.0
    e = ops.exp(x)
    return e, e


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


def supports(plan: Plan) -> bool:
    """Whether ``plan``'s hyper levels can run as Python floats: no population dimensions, and every level above the
    first a built-in rule (SGD, Adam, AdaGrad, RMSProp) with built-in transforms."""
    if plan.batch_shape or plan.height < 1:
        return False
    if any(type(r) not in _RULES or r.vjp_needs_inputs for r in plan.rules[1:]):
        return False  # the traces written here keep no inputs: only rules whose vjp reads the state after the step
    return all(t.name in _TRANSFORMS for level in plan.transforms[1:] for t in level)


def applies(plan: Plan) -> bool:
    """Whether the core hands ``plan``'s hyper levels to this module: where :func:`supports`, there are at least
    ``_FLOATS_FROM`` of them and one is more than plain SGD (an Adam level is a hundred tensor operations, and the
    floats win), or where there are at least ``_SGD_FROM`` of them, all plain SGD on one number each
    (:func:`_plain_sgd`: computed exactly). Other towers stay in tensors: a few levels' tensor operations cost about
    what reading and writing floats costs, and a dot product of several numbers is summed in the BLAS library's
    order, which floats would not reproduce bit for bit."""
    return _kind(plan) is not None


def _kind(plan: Plan) -> str | None:
    """``"sgd"`` (exact, :func:`_sgd_update`), ``"floats"`` (float64, to round-off: :func:`update`), or None (the
    tensor path), worked out once per plan: the core asks twice per step."""
    hit = _KIND.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    out = None
    if supports(plan):
        if _plain_sgd(plan):
            out = "sgd" if plan.height >= _SGD_FROM else None
        elif plan.height >= _FLOATS_FROM and not all(_plain(plan, k) for k in range(1, plan.height + 1)):
            out = "floats"
    _keep(_KIND, plan, (plan, out))
    return out


_KIND: dict[int, tuple[Plan, str | None]] = {}

# From this height on, a tower of plain SGD levels runs them as exact floats. Below, its few tensor operations per
# level cost less than reading and writing the floats (measured on the MNIST MLP, CPU, one thread, step alone,
# interleaved in one process, with the floats kept as SgdFloats: floats/tensors 1.18 at height 1, 1.11 at 2, 1.07-1.09
# at 3, 1.02 at 4, 0.97 at 5, 0.91 at 6, 0.82 at 8; before SgdFloats, 1.12 at 5 and 0.98 at 8).
_SGD_FROM = 5
# From this height on, a tower with a level above the first that is more than plain SGD runs its levels as floats.
# With one level, the level's tensor operations cost less than reading, computing and writing the floats (measured on
# the MNIST MLP, CPU, one thread, optimizer step alone, interleaved in one process, three sittings at load 3-4:
# floats/tensors 1.03-1.06 for adam/adam, 1.10-1.13 for sgd/adam, 1.03-1.16 for adam/sgd(momentum); 0.91-0.99 for
# adam/adam/adam, and lower from there: 0.68-0.94 with three Adam levels).
_FLOATS_FROM = 2


def _plain(plan: Plan, k: int) -> bool:
    return type(plan.rules[k]) is SGDRule and plan.initial[k][0]["momentum"] == 0.0


def _plain_sgd(plan: Plan) -> bool:
    """Whether levels 1..top are plain SGD (no momentum) learning one number each: level 0 learns any values per
    group, each level above learns its ``lr`` alone, stored as itself (the reference parameterization). Then a step
    of these levels is a few products and differences of scalars, which :func:`_sgd_update` computes exactly as the
    tensor path does, bit for bit (level 1's dot products over level 0's values, where there are several, by the very
    ``torch.dot`` of the tensor path)."""
    if not plan.learned[0]:
        return False
    for k in range(1, plan.height + 1):
        if not _plain(plan, k) or not isinstance(plan.initial[k][0]["lr"], float):
            return False
        if k < plan.height and (plan.learned[k] != ("lr",) or plan.transforms[k][0].name != "identity"):
            return False
    return True


def _dot(a: Vec, b: Vec) -> float:
    out = a[0] * b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        out = out + x * y
    return out


# -- the built-in rules on vectors of floats; a state is a list of its NamedTuple's fields, None or a vector -------
def _update(rule: Any, g: Vec, st: list, hp: dict, learned: tuple, step: int, ops: _Math) -> tuple[Vec, tuple]:
    kind = type(rule)
    if kind is SGDRule:
        lr, mom = hp["lr"], hp["momentum"]
        if "momentum" not in learned and mom == 0.0:  # a fixed zero momentum keeps no buffer
            return [x * lr for x in g], [None, g if "lr" in learned else None, None]
        old = st[0]
        buf = g if old is None else [b * mom + x for b, x in zip(old, g, strict=True)]
        return [b * lr for b in buf], [buf, None, old if "momentum" in learned else None]
    if kind is AdamRule:
        # One pass over the vector, each value by the operations of AdamRule.update in their order.
        b1, b2, lr, eps, t = hp["beta1"], hp["beta2"], hp["lr"], hp["eps"], float(step)
        c1, c2, a1, a2 = 1.0 - b1**t, 1.0 - b2**t, 1.0 - b1, 1.0 - b2
        sqrt = ops.sqrt
        m0, v0 = st[0], st[1]
        g1, g2, m, v, delta = [], [], [], [], []
        for x, a, b in zip(g, m0, v0, strict=True):
            x1, x2 = a1 * x, a2 * x * x
            a, b = b1 * a + x1, b2 * b + x2
            g1.append(x1)
            g2.append(x2)
            m.append(a)
            v.append(b)
            delta.append(lr * ((a / c1) / (sqrt(b / c2) + eps)))
        k1, k2 = "beta1" in learned, "beta2" in learned
        return delta, [m, v, m0 if k1 else None, v0 if k2 else None, g1 if k1 else None, g2 if k2 else None]
    eps, s0 = hp["eps"], st[0]
    if kind is AdaGradRule:
        s = [a + x * x for a, x in zip(s0, g, strict=True)]
        kept = [s, g if "lr" in learned else None, None]
    else:  # RMSProp
        gamma = hp["gamma"]
        s = [gamma * a + (1.0 - gamma) * (x * x) for a, x in zip(s0, g, strict=True)]
        keep = "lr" in learned or "gamma" in learned
        kept = [s, g if keep else None, s0 if "gamma" in learned else None]
    return [hp["lr"] * x / ops.sqrt(a + eps) for x, a in zip(g, s, strict=True)], kept


def _vjp(rule: Any, u: Vec, after: list, hp: dict, learned: tuple, step: int, ops: _Math) -> dict[str, float]:
    """``u . d delta / d hp[name]`` for every learned name, from the state after the step (the rules' closed forms)."""
    kind = type(rule)
    out: dict[str, float] = {}
    if kind is SGDRule:
        buf, grad, previous = after
        if "lr" in learned:
            out["lr"] = _dot(u, grad if buf is None else buf)
        if "momentum" in learned and previous is not None:
            out["momentum"] = hp["lr"] * _dot(u, previous)
        return out
    if kind is AdamRule:
        # One pass over the vector; each dot product is summed in _dot's order (starting from -0.0, which adds
        # nothing, not even a sign: -0.0 + x is x for every x).
        lr, b1, b2, eps, t = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], float(step)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        sqrt = ops.sqrt
        m, v, pm, pv, g1, g2 = after
        k1, k2 = "beta1" in learned, "beta2" in learned
        q_m0 = q_g1 = q_m = w_v0 = w_g2 = -0.0
        for i, x in enumerate(u):
            s = sqrt(v[i] / c2)
            d = s + eps
            q = x / d
            if k1:
                q_m0 = q_m0 + q * pm[i]
                q_g1 = q_g1 + q * g1[i]
            else:
                q_m = q_m + q * m[i]
            if k2:
                w = q * m[i] / (d * s)
                w_v0 = w_v0 + w * pv[i]
                w_g2 = w_g2 + w * g2[i]
        if k1:
            dc1 = t * b1 ** (t - 1.0)
            q_m = b1 * q_m0 + q_g1
            out["beta1"] = lr * ((q_m0 - q_g1 / (1.0 - b1)) / c1 + q_m * dc1 / (c1 * c1))
        if "lr" in learned:
            out["lr"] = q_m / c1
        if k2:
            dc2 = t * b2 ** (t - 1.0)
            w_v = b2 * w_v0 + w_g2
            out["beta2"] = -0.5 * lr / c1 * ((w_v0 - w_g2 / (1.0 - b2)) / c2 + w_v * dc2 / (c2 * c2))
        return out
    s, g, s0 = after
    eps = hp["eps"]
    r = [x / ops.sqrt(a + eps) for x, a in zip(g, s, strict=True)] if g is not None else None
    if "lr" in learned:
        out["lr"] = _dot(u, r)
    if kind is RMSPropRule and "gamma" in learned:
        z = [ri / (a + eps) * (b - x * x) for ri, a, b, x in zip(r, s, s0, g, strict=True)]
        out["gamma"] = -0.5 * hp["lr"] * _dot(u, z)
    return out


_STATE_TYPE = {SGDRule: SGDState, AdamRule: AdamState, AdaGradRule: SumState, RMSPropRule: SumState}


class _Level(NamedTuple):
    rule: Any
    learned: tuple[str, ...]
    transforms: tuple[str, ...]
    fixed: dict[str, float]  # every hyperparameter's initial value (the learned ones are overwritten each step)
    gen: tuple[Any, Any] | None = None  # a level k >= 1's generated (update, vjp) (see _generated), if it has them


_STATIC: dict[int, tuple[Any, list[_Level]]] = {}


def _static(plan: Plan) -> list[_Level]:
    """Per level, what stays fixed (looked up once per plan, not once per step)."""
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
    for k in range(1, plan.height + 1):  # for one vector of the level below's learned values (level 1: per group)
        levels[k] = levels[k]._replace(gen=_generated(levels[k], len(levels[k - 1].learned)))
    if len(_STATIC) > 64:  # plans of optimizers long gone
        _STATIC.clear()
    _STATIC[id(plan)] = (plan, levels)
    return levels


# -- Adam levels above the first as generated straight-line functions ------------------------------------------------
# A level k >= 2 updates one short vector (the values level k - 1 learns; level 1, one per param group), and _update /
# _vjp spend most of their time on their own loops, lists and dictionary look-ups rather than on its few flops. For an
# Adam level learning some of lr, beta1, beta2 the two are written out once per shape (learned names, their
# transforms, the vector's length), from the templates below and nothing else (no user text reaches the source: the
# names index fixed tables), as one function each with a line per operation of _update / _vjp, in their order and with
# the same operands: the same IEEE operations on the same numbers, so the results are theirs bit for bit (float or
# numpy float64 alike; a step that raises is computed again in numpy float64 by ieee(), as theirs is).
_VALUE = {  # the natural value of raw x: forward()'s expressions
    "identity": "{x}",
    "square": "{x} * {x}",
    "half_tanh": "(tanh({x}) + 1.0) / 2.0",
    "exp": "exp({x})",
}
_SLOPE = {  # _value_slope()'s: lines that set the value {v} and the derivative {d} (None for the identity)
    "identity": ["{v} = {x}", "{d} = None"],
    "square": ["{v} = {x} * {x}", "{d} = 2.0 * {x}"],
    "half_tanh": ["th = tanh({x})", "{v} = (th + 1.0) / 2.0", "{d} = (1.0 - th**2) / 2.0"],
    "exp": ["{v} = exp({x})", "{d} = {v}"],
}
_ADAM_NAMES = ("lr", "beta1", "beta2")
_ADAM_LOCAL = {"lr": "lr", "beta1": "b1", "beta2": "b2"}
# Adam's update and vjp lines, written in one place for both generators (_make_adam: one level; _make_tower: a chain
# of them), so that a change to Adam's arithmetic is made once. The generators differ only in how operands are spelled
# (a level's own vectors, or fixed indices of a flat tuple), passed as at(name, i): element i of the gradient "g", the
# previous moments "m", "v" and the raw value below "r" in an update; of the upstream "u" and the kept fields "m",
# "v", "pm", "pv", "g1", "g2" in a vjp. The lines read the level's b1, b2, lr, eps, t and the c1, c2 (update: and a1,
# a2) that _ADAM_C / _ADAM_VJP_C set from them.
_ADAM_C = "    c1, c2, a1, a2 = 1.0 - b1**t, 1.0 - b2**t, 1.0 - b1, 1.0 - b2"
_ADAM_VJP_C = "    c1, c2 = 1.0 - b1**t, 1.0 - b2**t"


def _adam_update_lines(width: int, at: Callable[[str, int], str], out: Callable[[str, int], str]) -> list[str]:
    """_update's Adam branch for one vector, a line per operation; out(name, i) names the locals that hold element
    i's "x1", "x2" (the kept g1, g2), "m", "v" (the new moments) and "n" (the new raw value below)."""
    lines = []
    for i in range(width):
        g, x1, x2, m, v = at("g", i), out("x1", i), out("x2", i), out("m", i), out("v", i)
        lines += [
            f"    {x1}, {x2} = a1 * {g}, a2 * {g} * {g}",
            f"    {m}, {v} = b1 * {at('m', i)} + {x1}, b2 * {at('v', i)} + {x2}",
            f"    {out('n', i)} = {at('r', i)} - lr * (({m} / c1) / (sqrt({v} / c2) + eps))",
        ]
    return lines


def _adam_vjp_lines(learned: tuple[str, ...], width: int, at: Callable[[str, int], str], group: int = 0) -> list[str]:
    """_vjp's Adam branch for one vector: each dot product summed from -0.0 in _vjp's order, then the sums s_lr,
    s_beta1, s_beta2 of the learned names; for group > 0 they are added to the groups' before it (s = s + (...)),
    the same left fold as _hyper_chain's."""
    k1, k2 = "beta1" in learned, "beta2" in learned
    lines = ["    q_m0 = q_g1 = q_m = w_v0 = w_g2 = -0.0"]
    for i in range(width):
        lines += [f"    s = sqrt({at('v', i)} / c2)", "    d = s + eps", f"    q = {at('u', i)} / d"]
        if k1:
            lines += [f"    q_m0 = q_m0 + q * {at('pm', i)}", f"    q_g1 = q_g1 + q * {at('g1', i)}"]
        else:
            lines.append(f"    q_m = q_m + q * {at('m', i)}")
        if k2:
            lines += [
                f"    w = q * {at('m', i)} / (d * s)",
                f"    w_v0 = w_v0 + w * {at('pv', i)}",
                f"    w_g2 = w_g2 + w * {at('g2', i)}",
            ]

    def add(name: str, expr: str) -> str:
        return f"    s_{name} = {expr}" if group == 0 else f"    s_{name} = s_{name} + ({expr})"

    if k1:
        lines += [
            "    dc1 = t * b1 ** (t - 1.0)",
            "    q_m = b1 * q_m0 + q_g1",
            add("beta1", "lr * ((q_m0 - q_g1 / (1.0 - b1)) / c1 + q_m * dc1 / (c1 * c1))"),
        ]
    if "lr" in learned:
        lines.append(add("lr", "q_m / c1"))
    if k2:
        lines += [
            "    dc2 = t * b2 ** (t - 1.0)",
            "    w_v = b2 * w_v0 + w_g2",
            add("beta2", "-0.5 * lr / c1 * ((w_v0 - w_g2 / (1.0 - b2)) / c2 + w_v * dc2 / (c2 * c2))"),
        ]
    return lines


def _adam_hyper(learned: tuple[str, ...], tnames: tuple[str, ...]) -> list[str]:
    """The hypergradient of each learned raw value: what the level updated moved by -delta, so d loss / d value =
    -(upstream . d delta / d value), times the transform's derivative d_i (none for the identity)."""
    return [f"-s_{n}" if tnames[i] == "identity" else f"-s_{n} * d_{i}" for i, n in enumerate(learned)]


_GENERATED: dict[tuple, tuple[Any, Any]] = {}


def _generated(level: _Level, width: int) -> tuple[Any, Any] | None:
    """The generated ``(update, vjp)`` of an Adam level updating one vector of ``width`` values; None for another
    level (which runs through _update and _vjp)."""
    rule, learned, tnames = level.rule, level.learned, level.transforms
    if type(rule) is not AdamRule or not set(learned) <= set(_ADAM_NAMES) or width < 1:
        return None
    key = (learned, tnames, width)
    if key not in _GENERATED:
        _GENERATED[key] = _make_adam(learned, tnames, width)
    return _GENERATED[key]


def _make_adam(learned: tuple[str, ...], tnames: tuple[str, ...], width: int) -> tuple[Any, Any]:
    k1, k2 = "beta1" in learned, "beta2" in learned
    ix = range(width)
    spelled = {"g": "g", "m": "m0", "v": "v0", "r": "below"}

    def loc(name: str, i: int) -> str:  # element i's local of an update line
        return f"{name}_{i}"

    # update(r, g, st, below, fixed, step, ops) -> (values, new raw vector of the level below, new state's fields):
    # _chain's body for one level and _update's Adam branch, with delta[i] subtracted from below[i] as _chain does.
    up = [
        "def update(r, g, st, below, fixed, step, ops):",
        "    vals = fixed.copy() if ops is _PY else {n: ops.num(v) for n, v in fixed.items()}",
        "    tanh, exp, sqrt = ops.tanh, ops.exp, ops.sqrt",
    ]
    up += [f"    vals[{n!r}] = " + _VALUE[tnames[i]].format(x=f"r[{i}]") for i, n in enumerate(learned)]
    up += [
        '    b1, b2, lr, eps, t = vals["beta1"], vals["beta2"], vals["lr"], vals["eps"], float(step)',
        _ADAM_C,
        "    m0, v0 = st[0], st[1]",
    ]
    up += _adam_update_lines(width, lambda name, i: f"{spelled[name]}[{i}]", loc)

    def vec(name: str) -> str:
        return "[" + ", ".join(loc(name, i) for i in ix) + "]"

    up.append(
        f"    return vals, {vec('n')}, [{vec('m')}, {vec('v')}, {'m0' if k1 else 'None'}, {'v0' if k2 else 'None'}, "
        f"{vec('x1') if k1 else 'None'}, {vec('x2') if k2 else 'None'}]"
    )
    # vjp(r, u, after, fixed, step, ops) -> the hypergradients of the level below's raw values: _hyper_chain's body
    # for one level and _vjp's Adam branch (each dot product summed from -0.0 in _vjp's order).
    vj = [
        "def vjp(r, u, after, fixed, step, ops):",
        "    tanh, exp, sqrt, num = ops.tanh, ops.exp, ops.sqrt, ops.num",
        '    lr, b1, b2, eps = num(fixed["lr"]), num(fixed["beta1"]), num(fixed["beta2"]), num(fixed["eps"])',
        "    t = float(step)",
    ]
    for i, n in enumerate(learned):
        vj += ["    " + line.format(v=_ADAM_LOCAL[n], d=f"d_{i}", x=f"r[{i}]") for line in _SLOPE[tnames[i]]]
    vj += [_ADAM_VJP_C, "    m, v, pm, pv, g1, g2 = after"]
    vj += _adam_vjp_lines(learned, width, lambda name, i: f"{name}[{i}]")
    vj.append("    return [" + ", ".join(_adam_hyper(learned, tnames)) + "]")
    scope: dict[str, Any] = {"_PY": _PY}
    exec(compile("\n".join(up) + "\n\n" + "\n".join(vj) + "\n", "<hypergrad._scalar: Adam level>", "exec"), scope)
    return scope["update"], scope["vjp"]


class Floats(NamedTuple):
    """Levels 1..top of a state as the floats :func:`update` computed, rounded to the tower's dtype: what a state
    holds in ``TowerState.floats`` between steps instead of their tensors (``core.update(..., lazy=True)``).
    :func:`tensors` builds those tensors, field for field the ones the tensor path writes, when something reads them.
    Tuples of floats only: Python's cyclic garbage collector stops tracking them at their first collection."""

    plan: Plan
    dtype: torch.dtype
    device: torch.device
    hp0: list[Tensor]  # the level-0 raw tensors written with these floats (their values are raw[0])
    base: Tensor  # the tensor those are views of, and its version counter then: an in-place write is seen
    version: int
    raw: tuple[tuple[tuple[float, ...], ...], ...]  # per level 0..top-1, per vector: the raw values
    states: tuple[Any, ...]  # per level 1..top (None at 0), per tensor: the fields' vectors (None where None)
    values: tuple[Any, ...]  # per level 1..top-1 (None at 0): the natural values the level used, as floats


class SgdFloats(NamedTuple):
    """:class:`Floats` of the exact plain-SGD tower (:func:`_sgd_update`), held as the two flat vectors its step reads
    and writes, numbers of the dtype; ``raw``, ``states`` and ``values`` build Floats' fields from them where read
    (:func:`tensors`), so that a step builds no tuple or dict per level."""

    plan: Plan
    dtype: torch.dtype
    device: torch.device
    hp0: list[Tensor]
    base: Tensor
    version: int
    new: tuple[Any, ...]  # the raw values after the step, in _sgd_hyper's flat layout (level 0's per group first)
    received: tuple[Any, ...]  # the hypergradient each of those received: what SGDRule's state keeps (levels < top)
    counts: tuple[int, ...]  # per level 1..top, how many vectors it updated (level 1: one per group)
    kept0: list[Tensor]  # level 1's received hypergradients as the tensors they were (its dots read them)

    def _width(self) -> int:
        """How many values level 0 learns per group."""
        return (len(self.new) - len(self.counts) + 1) // self.counts[0]

    @property
    def raw(self) -> tuple[tuple[tuple[float, ...], ...], ...]:
        m = self._width()
        n0 = m * self.counts[0]
        values = [float(x) for x in self.new]
        return (tuple(tuple(values[i : i + m]) for i in range(0, n0, m)), *(((v,),) for v in values[n0:]))

    @property
    def states(self) -> tuple[Any, ...]:
        top = len(self.counts)
        received = [float(h) for h in self.received]
        states: list[Any] = [None]
        offset = 0
        for k in range(1, top + 1):
            m = self._width() if k == 1 else 1
            keep = k < top
            states.append(
                tuple(
                    (None, tuple(received[offset + i * m : offset + (i + 1) * m]) if keep else None, None)
                    for i in range(self.counts[k - 1])
                )
            )
            offset += m * self.counts[k - 1]
        return tuple(states)

    @property
    def values(self) -> tuple[Any, ...]:
        n0 = len(self.new) - len(self.counts) + 1
        out: list[Any] = [None]
        for k in range(1, len(self.counts)):
            vals = dict(self.plan.initial[k][0])
            vals["lr"] = float(self.new[n0 + k - 1])
            out.append(vals)
        return tuple(out)


# -- a tower of such Adam levels, kept as one flat tuple --------------------------------------------------------------
# Where every level 1..top is an Adam level with generated functions, the state's floats are a fixed number of
# numbers in a fixed order (_Tower's layout). The step keeps them as one flat tuple (AdamFloats), and the whole chain
# runs as two functions written out once per tower shape, the same Adam lines as _make_adam's (_adam_update_lines,
# _adam_vjp_lines) for every level in turn, reading the numbers at fixed indices of the flat tuple and returning the
# next one as a single list: the same operations on the same operands as the per-level functions (hence as _update
# and _vjp), with no vector, tuple or dictionary built per level and one rounding for the whole state. Level 1 updates
# one vector per param group: its lines are repeated per group, and its vjp's sums are added over the groups in their
# order, as _hyper_chain adds _vjp's. Floats' fields are built from the flat tuple where read (:func:`tensors`).
class _Tower(NamedTuple):
    update: Any  # update(F, H, C, step, ops) -> the next flat state, unrounded (a list)
    vjp: Any  # vjp(F, U, C, step, ops) -> the hypergradients of levels 1..top-1, one list, unrounded
    consts: tuple[float, ...]  # every level's fixed values that it does not learn, as the functions index them
    size: int  # how many numbers the flat state holds
    groups: int  # level 0's param groups: level 1 updates one vector per group
    raw: tuple[tuple[int, int], ...]  # per level 0..top-1: where its raw values lie in the flat state (start, end)
    fields: tuple[Any, ...]  # per level 1..top, per vector it updates: each AdamState field's (start, end), or None
    values: tuple[tuple[int, int], ...]  # per level 1..top-1: where the natural values it used lie
    read: tuple[int, ...]  # the indices that the next update reads: raw values, moments (the rest it writes anew)


_TOWERS: dict[int, tuple[Plan, _Tower | None]] = {}
_TOWER_CODE: dict[tuple, _Tower] = {}


def _tower(plan: Plan) -> _Tower | None:
    """The flat form of ``plan``'s levels 1..top, where it has one (see above); None for another plan."""
    hit = _TOWERS.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    out = None
    static = _static(plan)
    if _kind(plan) == "floats" and all(s.gen is not None for s in static[1:]):
        shape = tuple((s.learned, s.transforms) for s in static[1:])
        widths = (len(static[0].learned), *(len(s.learned) for s in static[1:-1]))
        key = (shape, widths, len(plan.initial[0]))
        if key not in _TOWER_CODE:
            _TOWER_CODE[key] = _make_tower(*key)
        code = _TOWER_CODE[key]
        consts = tuple(static[k].fixed[n] for k in range(1, plan.height + 1) for n in (*_ADAM_NAMES, "eps"))
        out = code._replace(consts=consts)
    _keep(_TOWERS, plan, (plan, out))
    return out


def _make_tower(shape: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...], widths: tuple[int, ...], groups: int):
    top = len(shape)
    # The layout, level by level: the raw values of the level below (per group, at level 1), the AdamState fields the
    # level keeps (per vector it updates), the natural values it used (below the top).
    size = 0
    raw: list[tuple[int, int]] = []
    fields: list[Any] = []
    values: list[tuple[int, int]] = []

    def place(n: int) -> tuple[int, int]:
        nonlocal size
        size += n
        return size - n, size

    for k in range(1, top + 1):
        learned, w = shape[k - 1][0], widths[k - 1]
        k1, k2 = "beta1" in learned, "beta2" in learned
        raw.append(place(w * (groups if k == 1 else 1)))
        per = []
        for _ in range(groups if k == 1 else 1):
            m, v = place(w), place(w)
            pm, pv = place(w) if k1 else None, place(w) if k2 else None
            g1, g2 = place(w) if k1 else None, place(w) if k2 else None
            per.append((m, v, pm, pv, g1, g2))
        fields.append(tuple(per))
        if k < top:
            values.append(place(len(learned)))
    read = tuple(
        i for k in range(top) for part in (raw[k], *(f for vec in fields[k] for f in vec[:2])) for i in range(*part)
    )

    def const(k: int, name: str) -> str:  # level k's fixed value of name, in consts
        return f"C[{4 * (k - 1) + (*_ADAM_NAMES, 'eps').index(name)}]"

    local = {"lr": "lr", "beta1": "b1", "beta2": "b2", "eps": "eps"}

    def name(k: int, g: int) -> Callable[[str, int], str]:  # level k's locals for group g's element i
        # x1/x2 take an underscore before the level (x1_1_0_0), so that they cannot read as x11_...
        return lambda p, i: f"{p}_{k}_{g}_{i}" if p[0] == "x" else f"{p}{k}_{g}_{i}"

    def spelled(table: dict[str, tuple[str, int]]) -> Callable[[str, int], str]:
        # operand op's element i: table[op] is its spelling with {} for an index, and element 0's index
        return lambda op, i: table[op][0].format(table[op][1] + i)

    # update: levels top..1, as _make_adam's update for each vector (its g[i] is H[...], its st and below index F)
    up = ["def update(F, H, C, step, ops):", "    tanh, exp, sqrt = ops.tanh, ops.exp, ops.sqrt", "    t = float(step)"]
    hstart = [0]
    for k in range(1, top):
        hstart.append(hstart[-1] + raw[k - 1][1] - raw[k - 1][0])
    out: dict[int, list[str]] = {}
    for k in range(top, 0, -1):
        learned, tnames = shape[k - 1]
        w = widths[k - 1]
        up.append(f"    # level {k}")
        for n in (*_ADAM_NAMES, "eps"):
            if n in learned:
                i = learned.index(n)
                up.append(f"    {local[n]} = " + _VALUE[tnames[i]].format(x=name(k + 1, 0)("n", i)))
                up.append(f"    val{k}_{i} = {local[n]}")
            else:
                up.append(f"    {local[n]} = {const(k, n)}")
        up.append(_ADAM_C)
        k1, k2 = "beta1" in learned, "beta2" in learned
        news, kept = [], []
        for g, vec in enumerate(fields[k - 1]):
            r0, m0, v0 = raw[k - 1][0] + g * w, vec[0][0], vec[1][0]
            h0 = hstart[k - 1] + g * w
            loc = name(k, g)
            up += _adam_update_lines(
                w, spelled({"g": ("H[{}]", h0), "m": ("F[{}]", m0), "v": ("F[{}]", v0), "r": ("F[{}]", r0)}), loc
            )
            ix = range(w)
            news += [loc("n", i) for i in ix]
            kept += [loc("m", i) for i in ix] + [loc("v", i) for i in ix]
            kept += [f"F[{m0 + i}]" for i in ix] if k1 else []
            kept += [f"F[{v0 + i}]" for i in ix] if k2 else []
            kept += [loc("x1", i) for i in ix] if k1 else []
            kept += [loc("x2", i) for i in ix] if k2 else []
        out[k] = news + kept + ([f"val{k}_{i}" for i in range(len(learned))] if k < top else [])
    up.append("    return [" + ", ".join(x for k in range(1, top + 1) for x in out[k]) + "]")
    # vjp: levels 1..top-1, as _make_adam's vjp for each vector (its r is level k + 1's raw vector, its u the level
    # below's hypergradients: U for level 1, else the locals the level below just computed)
    vj = ["def vjp(F, U, C, step, ops):", "    tanh, exp, sqrt = ops.tanh, ops.exp, ops.sqrt", "    t = float(step)"]
    hyper = []
    for k in range(1, top):
        learned, tnames = shape[k - 1]
        w = widths[k - 1]
        r0 = raw[k][0]
        vj.append(f"    # level {k}")
        for n in (*_ADAM_NAMES, "eps"):
            if n not in learned:
                vj.append(f"    {local[n]} = {const(k, n)}")
        for i, n in enumerate(learned):
            vj += ["    " + line.format(v=local[n], d=f"d_{i}", x=f"F[{r0 + i}]") for line in _SLOPE[tnames[i]]]
        vj.append(_ADAM_VJP_C)
        for g, vec in enumerate(fields[k - 1]):
            table = {op: ("F[{}]", f[0]) for op, f in zip(("m", "v", "pm", "pv", "g1", "g2"), vec, strict=True) if f}
            table["u"] = ("U[{}]", g * w) if k == 1 else (f"h{k - 1}_{{}}", 0)
            vj += _adam_vjp_lines(learned, w, spelled(table), g)
        for i, col in enumerate(_adam_hyper(learned, tnames)):
            vj.append(f"    h{k}_{i} = {col}")
            hyper.append(f"h{k}_{i}")
    vj.append("    return [" + ", ".join(hyper) + "]")
    scope: dict[str, Any] = {}
    exec(compile("\n".join(up) + "\n\n" + "\n".join(vj) + "\n", "<hypergrad._scalar: Adam tower>", "exec"), scope)
    return _Tower(scope["update"], scope["vjp"], (), size, groups, tuple(raw), tuple(fields), tuple(values), read)


class AdamFloats(NamedTuple):
    """:class:`Floats` of a tower of generated Adam levels (:func:`_tower`), held as one flat
    tuple of the numbers Floats' fields hold, rounded to the dtype, in the tower's layout; ``raw``, ``states`` and
    ``values`` build Floats' fields from it where read (:func:`tensors`), so that a step builds no tuple or dict per
    level."""

    plan: Plan
    dtype: torch.dtype
    device: torch.device
    hp0: list[Tensor]
    base: Tensor
    version: int
    flat: tuple[float, ...]

    @property
    def raw(self) -> tuple[tuple[tuple[float, ...], ...], ...]:
        flat, tw = self.flat, _tower_of(self.plan)
        (a, b), *above = tw.raw
        w = (b - a) // tw.groups
        return (tuple(flat[i : i + w] for i in range(a, b, w)), *((flat[a:b],) for a, b in above))

    @property
    def states(self) -> tuple[Any, ...]:
        flat = self.flat
        fields = _tower_of(self.plan).fields
        return (None, *(tuple(tuple(None if f is None else flat[f[0] : f[1]] for f in v) for v in k) for k in fields))

    @property
    def values(self) -> tuple[Any, ...]:
        out: list[Any] = [None]
        static = _static(self.plan)
        for k, (a, _) in enumerate(_tower_of(self.plan).values, start=1):
            vals = static[k].fixed.copy()
            for i, name in enumerate(static[k].learned):
                vals[name] = self.flat[a + i]
            out.append(vals)
        return tuple(out)


def _tower_of(plan: Plan) -> _Tower:
    tw = _tower(plan)
    if tw is None:
        raise RuntimeError("hypergrad internal error: AdamFloats of a plan without a flat tower")
    return tw


def _tower_update(plan: Plan, state: TowerState, hypergrads: Sequence[Sequence[Tensor]] | Hyper, step: int, tw: _Tower):
    """:func:`update` for a tower with a flat form: the new state as :class:`AdamFloats`."""
    like = state.levels[0].hp[0]
    fl = _floats(plan, state)
    hp = state.levels[0].hp
    w0 = tw.raw[0][1]  # level 0's values, all groups
    if type(fl) is AdamFloats:
        flat = fl.flat
        if not _level0_kept(fl, state):  # level 0's values changed since: read them again
            flat = (*torch.cat([h.reshape(-1) for h in hp]).tolist(), *flat[w0:])
    else:  # the state's tensors (or Floats): the numbers the update reads, at their places; the rest it writes
        reader = _Reader()
        raw, states = _read_levels(state, reader, range(plan.height), range(1, plan.height + 1))
        reader.read()
        raw, states = reader.fill(raw), reader.fill(states)
        values = [
            x for k in range(plan.height) for part in (*raw[k], *(f for v in states[k] for f in v[:2])) for x in part
        ]
        filled = [0.0] * tw.size
        for i, x in zip(tw.read, values, strict=True):
            filled[i] = x
        flat = tuple(filled)
    if isinstance(hypergrads, Hyper):
        hyper = (
            hypergrads.flat
            if hypergrads.flat is not None
            else tuple(x for level in hypergrads.vectors for v in level for x in v)
        )
    else:
        hyper = tuple(torch.cat([h.reshape(-1) for level in hypergrads for h in level]).tolist())
    stored = tuple(_rounded(ieee(tw.update, flat, hyper, tw.consts, step), like.dtype))
    base = torch.tensor(stored[:w0], dtype=like.dtype, device=like.device)
    hp0 = list(base.split([len(h) for h in hp]))
    return hp0, None, None, AdamFloats(plan, like.dtype, like.device, hp0, base, base._version, stored)


class Hyper(NamedTuple):
    """The hypergradients of levels 0..top-1 as floats (what :func:`update` reads; see :func:`hyper_floats`)."""

    vectors: list[list[Any]]  # per level, per vector it updates (empty where ``flat`` holds them)
    # The exact plain-SGD chain's instead: all of them in one flat tuple, how many vectors per level, and level 0's
    # as the tensors they are (its state keeps them).
    flat: tuple[Any, ...] | None = None
    counts: tuple[int, ...] = ()
    level0: list[Tensor] | None = None


def _keep(table: dict[int, Any], plan: Plan, entry: Any) -> None:
    if len(table) > 64 and id(plan) not in table:  # plans of optimizers long gone
        table.clear()
    table[id(plan)] = entry


class _Reader:
    """Collects the tensors whose values are not kept, then reads them all with one ``cat`` and one ``tolist``."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.values: list[Vec] = []

    def add(self, t: Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def read(self) -> None:
        if not self.tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in self.tensors]).tolist()
        i = 0
        for t in self.tensors:
            n = t.numel()
            self.values.append(tuple(flat[i : i + n]))
            i += n

    def fill(self, items: list[Any]) -> list[Any]:
        """``items`` with each :class:`_Slots` in it holding the values read instead of slots."""
        return [self._fill(x) if type(x) is _Slots else x for x in items]

    def _fill(self, x: Any) -> Any:
        if type(x) is int:
            return self.values[x]
        return None if x is None else [self._fill(v) for v in x]


class _Slots(list):
    """A structure of slots of a :class:`_Reader` (ints, as ``add`` returned), to fill once it has read."""


def _rounded(flat: list[float], dtype: torch.dtype) -> list[float]:
    """The numbers as the dtype stores them (float32: each value rounded once to nearest, as ``torch.tensor`` does):
    what the next step reads must be what a checkpoint of this state holds."""
    if dtype == torch.float64:
        return flat
    # float32: C's double-to-float conversion, as numpy's cast and torch.tensor; numpy would warn where a value
    # overflows to inf, which the finiteness check reports instead
    return array("f", flat).tolist() if dtype == torch.float32 else torch.tensor(flat, dtype=dtype).tolist()


def _round(vectors: list[Vec], dtype: torch.dtype) -> list[tuple[float, ...]]:
    """The vectors as the dtype stores them (:func:`_rounded`)."""
    if dtype == torch.float64:
        return [tuple(v) for v in vectors]
    flat = _rounded(list(chain.from_iterable(vectors)), dtype)
    # Split again, a run of vectors of one length at a time (the tuples built by zip, without a slice each).
    out: list[tuple[float, ...]] = []
    values = iter(flat)
    for n, run in groupby(map(len, vectors)):
        count = len(list(run))
        out.extend(islice(zip(*[values] * n, strict=False), count) if n else [()] * count)
    return out


def _chain(static: list[_Level], raw: list, states: list, hyper: list, step: int, ops: _Math):
    """Levels top..1 on floats: each level's values, new rule states, and the new raw values of the level below."""
    top = len(static) - 1
    new_raw: list[Any] = [None] * (top + 1)
    new_raw[top] = []
    values: list[Any] = [None] * (top + 1)
    new_states: list[Any] = [None] * (top + 1)
    num = ops.num
    for k in range(top, 0, -1):
        rule, learned, tnames, fixed, gen = static[k]
        if gen is not None and len(hyper[k - 1]) == 1:  # one vector, by the level's generated function
            vals, below, st = gen[0](
                new_raw[k][0] if learned else None, hyper[k - 1][0], states[k][0], raw[k - 1][0], fixed, step, ops
            )
            values[k], new_raw[k - 1], new_states[k] = vals, [below], [st]
            continue
        vals = fixed.copy() if ops is _PY else {n: num(v) for n, v in fixed.items()}
        if learned:
            r = new_raw[k][0]
            for i, name in enumerate(learned):
                vals[name] = r[i] if tnames[i] == "identity" else forward(tnames[i], r[i], ops)
        values[k] = vals
        grads, below = hyper[k - 1], raw[k - 1]
        if len(grads) == 1:  # every level above the first updates one vector
            delta, st = _update(rule, grads[0], states[k][0], vals, learned, step, ops)
            new_raw[k - 1] = [[h - d for h, d in zip(below[0], delta, strict=True)]]
            new_states[k] = [st]
            continue
        out = [_update(rule, g, s, vals, learned, step, ops) for g, s in zip(grads, states[k], strict=True)]
        new_raw[k - 1] = [[h - d for h, d in zip(r, o[0], strict=True)] for r, o in zip(below, out, strict=True)]
        new_states[k] = [o[1] for o in out]
    return values, new_states, new_raw


def _floats(plan: Plan, state: TowerState) -> Floats | None:
    """The state's levels 1..top as floats, where it holds them for this plan."""
    fl = state.floats
    return fl if fl is not None and fl.plan is plan else None


def lazy(plan: Plan) -> bool:
    """Whether the core may keep ``plan``'s levels 1..top as :class:`Floats` between steps: wherever it hands them to
    this module."""
    return applies(plan)


def readable(plan: Plan, state: TowerState) -> bool:
    """Whether this module reads ``state`` for ``plan`` as it is: a state whose levels 1..top are tensors, or floats
    that :func:`update` wrote for this very plan."""
    return state.floats is None or (state.floats.plan is plan and lazy(plan))


def _read_levels(state: TowerState, reader: _Reader, raw_ks: range, state_ks: range):
    """Per level in ``raw_ks`` its raw vectors, per level in ``state_ks`` its rule states' field vectors: the state's
    floats where it holds them (level 0's only while its tensors are the ones written with them, unchanged), else
    slots of ``reader``."""
    levels = state.levels
    fl = state.floats
    raw: list[Any] = []
    for k in raw_ks:
        if fl is not None and (k or _level0_kept(fl, state)):
            raw.append(fl.raw[k])
        else:
            raw.append(_Slots(reader.add(h) for h in levels[k].hp))
    if fl is not None:
        return raw, [fl.states[k] for k in state_ks]
    states = [_Slots([None if f is None else reader.add(f) for f in s] for s in levels[k].rule) for k in state_ks]
    return raw, states


def update(plan: Plan, state: TowerState, hypergrads: Sequence[Sequence[Tensor]] | Hyper, step: int):
    """Levels top..1 of one step of :func:`hypergrad.core.update`: ``(new raw hyperparameters of level 0, new level
    states of levels 1..top, traces of levels 1..top-1, None)``, exactly the core's fields; or, for every tower but
    the exact plain-SGD one, ``(new raw hyperparameters of level 0, None, None, Floats)``: levels 1..top as floats,
    whose tensors :func:`tensors` builds."""
    if _kind(plan) == "sgd":
        num = _number(state.levels[0].hp[0].dtype)
        if num is not None:
            fl = _sgd_update(plan, state, hypergrads, num)
            return fl.hp0, None, None, fl
    tw = _tower(plan)
    if tw is not None:
        return _tower_update(plan, state, hypergrads, step, tw)
    static = _static(plan)
    top = plan.height
    reader = _Reader()
    raw, states = _read_levels(state, reader, range(top), range(1, top + 1))
    states = [None, *states]
    hyper: Any
    if isinstance(hypergrads, Hyper):
        hyper = [list(level) for level in hypergrads.vectors]
    else:
        hyper = _Slots(_Slots(reader.add(h) for h in level) for level in hypergrads)
    reader.read()
    raw, states, hyper = reader.fill(raw), reader.fill(states), reader.fill([hyper])[0]

    values, new_states, new_raw = ieee(_chain, static, raw, states, hyper, step)

    # Everything stored, rounded to the dtype in one pass, in this order: the raw vectors, the rule states' fields,
    # the learned values each level used (the traces' values). A field that is a tuple was stored already (what the
    # state or a hypergradient held, in the dtype: Adam's previous moments, a kept gradient) and stays as it is; the
    # chain computes lists. One flat list, rounded, then cut into the same vectors again, in the same order.
    like = state.levels[0].hp[0]
    flat: list[float] = []
    add = flat.extend
    for k in range(top):
        for v in new_raw[k]:
            add(v)
    for k in range(1, top + 1):
        for fields in new_states[k]:
            for f in fields:
                if type(f) is list:
                    add(f)
    for k in range(1, top):
        vals = values[k]
        add([vals[n] for n in static[k].learned])
    stored = _rounded(flat, like.dtype)
    i = 0  # where the next vector starts in stored
    raw_out: list[Any] = []
    for k in range(top):
        level = []
        for v in new_raw[k]:
            j = i + len(v)
            level.append(tuple(stored[i:j]))
            i = j
        raw_out.append(tuple(level))
    states_out: list[Any] = [None]
    for k in range(1, top + 1):
        per_tensor = []
        for fields in new_states[k]:
            out = []
            for f in fields:
                if type(f) is list:
                    j = i + len(f)
                    out.append(tuple(stored[i:j]))
                    i = j
                else:
                    out.append(f)
            per_tensor.append(tuple(out))
        states_out.append(tuple(per_tensor))
    kept_values: list[Any] = [None]
    for k in range(1, top):  # values[k] is _chain's own dict: the stored learned values replace the computed ones
        vals = values[k]
        for n in static[k].learned:
            vals[n] = stored[i]
            i += 1
        kept_values.append(vals)
    base = torch.tensor([x for v in raw_out[0] for x in v], dtype=like.dtype, device=like.device)
    hp0 = list(base.split([len(v) for v in raw_out[0]]))
    floats = Floats(
        plan, like.dtype, like.device, hp0, base, base._version, tuple(raw_out), tuple(states_out), tuple(kept_values)
    )
    return hp0, None, None, floats


def tensors(fl: Floats) -> tuple[list[Any], list[Any]]:
    """The tensors of levels 1..top that ``fl`` holds as floats: their :class:`~hypergrad.core.LevelState` s and
    the :class:`~hypergrad.core.Trace` s of levels 1..top-1, as the core's tensor path writes them (one tensor of
    every value, whose views are the fields; the learned values are 0-dim views)."""
    from hypergrad.core import LevelState, Trace

    plan = fl.plan
    static = _static(plan)
    top = plan.height
    vectors: list[Any] = []

    def put(v: Any) -> int | None:
        if v is None:
            return None
        vectors.append(v)
        return len(vectors) - 1

    raw, states, kept_values = fl.raw, fl.states, fl.values  # each built once where fl is an SgdFloats
    hp_ix = [put(raw[k][0]) for k in range(1, top)]
    state_ix = [[[put(f) for f in fields] for fields in states[k]] for k in range(1, top + 1)]
    scalars = [kept_values[k][n] for k in range(1, top) for n in static[k].learned]
    flat = torch.tensor([x for v in vectors for x in v] + scalars, dtype=fl.dtype, device=fl.device)
    parts = flat.split([len(v) for v in vectors] + [len(scalars)])
    made = iter(parts[-1].unbind())
    levels, traces = [], []
    for k in range(1, top + 1):
        hp = [parts[hp_ix[k - 1]]] if k < top else []  # type: ignore[index]
        kind = _STATE_TYPE[type(plan.rules[k])]
        rule_states = [kind(*[None if i is None else parts[i] for i in fields]) for fields in state_ix[k - 1]]
        levels.append(LevelState(hp, rule_states))
        if k < top:
            learned = static[k].learned
            vals = {n: next(made) if n in learned else v for n, v in kept_values[k].items()}
            # Built-in rules' vjps read only the state after the step (vjp_needs_inputs is False): nothing else kept.
            traces.append(Trace(hp, [vals], None, None, None))
    return levels, traces


def finite(fl: Floats) -> bool:
    """Whether every raw hyperparameter ``fl`` holds is finite."""
    if type(fl) is SgdFloats:
        return all(math.isfinite(x) for x in fl.new)
    if type(fl) is AdamFloats:
        return all(math.isfinite(x) for a, b in _tower_of(fl.plan).raw for x in fl.flat[a:b])
    return all(math.isfinite(x) for level in fl.raw for v in level for x in v)


def hyper_floats(plan: Plan, state: TowerState, level0: Sequence[Tensor]) -> Hyper:
    """The hypergradients of levels 0..top-1 as floats, from level 0's (``level0``: one per param group)."""
    if _kind(plan) == "sgd":
        num = _number(level0[0].dtype)
        if num is not None:
            ups, out = _sgd_hyper(plan, state, level0, num)  # numbers of the dtype, which _sgd_update reads as such
            return Hyper([], (*ups, *out), (len(level0), *(1 for _ in out)), list(level0))
    top = plan.height
    tw = _tower(plan)
    fl = _floats(plan, state)
    if tw is not None and type(fl) is AdamFloats:  # one flat tuple in, one out
        upstream = tuple(torch.cat([h.reshape(-1) for h in level0]).tolist())
        out = ieee(tw.vjp, fl.flat, upstream, tw.consts, state.step)
        return Hyper([], (*upstream, *_rounded(out, level0[0].dtype)))
    reader = _Reader()
    slots = _Slots(reader.add(h) for h in level0)
    if top < 2:
        reader.read()
        return Hyper([reader.fill([slots])[0]])
    static = _static(plan)
    raw, after = _read_levels(state, reader, range(1, top), range(1, top))
    if state.floats is None:
        traces = state.trace
        for k in range(1, top):  # the values level k used: its current ones, unless the trace holds others
            if traces[k].hp is not state.levels[k].hp:
                raw[k - 1] = _Slots(reader.add(h) for h in traces[k].hp)
    reader.read()
    upstream = reader.fill([slots])[0]
    raw, after = reader.fill(raw), reader.fill(after)
    raw, after = [None, *(r[0] for r in raw)], [None, *after]
    out = ieee(_hyper_chain, static, raw, after, upstream, state.step)
    return Hyper([list(upstream), *([v] for v in _round(out, level0[0].dtype))])


def hypergradients(plan: Plan, state: TowerState, level0: Sequence[Tensor]) -> list[list[Tensor]]:
    """The hypergradients of levels 1..top-1 (one vector each) of :func:`hypergrad.core.hypergradients`, from
    level 0's (``level0``: one per param group)."""
    if _kind(plan) == "sgd":
        num = _number(level0[0].dtype)
        if num is not None:
            return _sgd_hypergradients(plan, state, level0, num)
    hyper = hyper_floats(plan, state, level0)
    if hyper.flat is None:
        out = [v[0] for v in hyper.vectors[1:]]
    else:  # a flat tower's: level k's hypergradients as long as its raw vector, one level after another
        out, i = [], 0
        for a, b in _tower_of(plan).raw:
            out.append(hyper.flat[i : i + b - a])
            i += b - a
        out = out[1:]
    if not out:
        return []
    like = level0[0]
    flat = torch.tensor([x for v in out for x in v], dtype=like.dtype, device=like.device)
    return [[v] for v in flat.split([len(v) for v in out])]


def _hyper_chain(static: list[_Level], raw: list, after: list, upstream: list[Vec], step: int, ops: _Math) -> list:
    top = len(static) - 1
    out: list[Vec] = []
    ups = upstream
    for k in range(1, top):
        rule, learned, tnames, fixed, gen = static[k]
        r = raw[k]
        if gen is not None and len(ups) == 1:  # one vector, by the level's generated function
            ups = [gen[1](r, ups[0], after[k][0], fixed, step, ops)]
            out.append(ups[0])
            continue
        vals = fixed.copy() if ops is _PY else {n: ops.num(v) for n, v in fixed.items()}
        slopes = []
        for i, name in enumerate(learned):
            vals[name], d = _value_slope(tnames[i], r[i], ops)
            slopes.append(d)
        if len(ups) == 1:  # every level above the first updates one vector
            sums = _vjp(rule, ups[0], after[k][0], vals, learned, step, ops)
        else:
            sums = {}
            for u, a in zip(ups, after[k], strict=True):
                for name, v in _vjp(rule, u, a, vals, learned, step, ops).items():
                    sums[name] = v if name not in sums else sums[name] + v
        cols = []
        for j, name in enumerate(learned):
            s = sums.get(name)
            if s is None:  # this hyperparameter has not acted yet (e.g. momentum at the first step)
                cols.append(0.0)
                continue
            d = slopes[j]
            # What level k updated moved by -delta, so d loss / d value = -(upstream . d delta / d value).
            cols.append(-s if d is None else -s * d)
        out.append(cols)
        ups = [cols]
    return out


# -- plain SGD levels, exactly --------------------------------------------------------------------------------------
# Levels 1..top of plain SGD on one number each (see _plain_sgd): a step multiplies and subtracts scalars. On the
# tensor path each of these is one IEEE operation in the tensors' dtype, rounded once: the product h * lr, the
# difference raw - h * lr, the one-term dot product u . g (summed over param groups in their order) and its negation.
# Here each is the same IEEE operation on numpy float32 scalars (float32) or Python floats (float64), so both paths
# agree bit for bit; any other dtype takes the float64 path above. The state is written as Floats, as there: the
# numbers of the dtype as Python floats (exact: a float32 number is a float64 one).
def _number(dtype: torch.dtype) -> Any:
    """The scalar type whose arithmetic is the dtype's (IEEE, rounded once per operation); None for another."""
    return np.float32 if dtype == torch.float32 else float if dtype == torch.float64 else None


def _read(tensors: list[Tensor], num: Any) -> tuple[Any, ...]:
    """The values of one-number tensors (of any shape: a caller may pass its own hypergradients), with one ``cat``
    and one ``tolist``."""
    tensors = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]
    flat = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).tolist()
    return tuple(flat) if num is float else tuple(num(x) for x in flat)


def _level0_kept(fl: Floats | None, state: TowerState) -> bool:
    """Whether ``fl`` holds level 0's raw values: its tensors are the ones written with them, unchanged since."""
    return fl is not None and state.levels[0].hp is fl.hp0 and fl.base._version == fl.version


# One flat layout for every vector here: level 0's values, one per param group, then one value per level 1..top-1.
# The raw values, the hypergradients and what the states keep all line up in it: the hypergradient at index i is that
# of the raw value at index i, and the gradient level k keeps is the hypergradient it received at the last step.
def _sgd_hyper(plan: Plan, state: TowerState, level0: Sequence[Tensor], num: Any) -> tuple[tuple, list]:
    """Level 0's hypergradients (one per group) and those of levels 1..top-1, numbers of the dtype."""
    top = plan.height
    ups = _read(list(level0), num)
    if top < 2:
        return ups, []
    fl = _floats(plan, state)
    if type(fl) is SgdFloats:
        grads = fl.received  # levels 1..top-1 first, then level top's, which is not read
        kept0 = fl.kept0
    elif fl is not None:
        grads = tuple(num(x) for k in range(1, top) for s in fl.states[k] for x in s[1])
        kept0 = None
    else:
        grads = _read([s.grad for k in range(1, top) for s in state.levels[k].rule], num)
        kept0 = [s.grad for s in state.levels[1].rule]
    n0 = len(ups)
    with np.errstate(all="ignore"):  # overflow is inf, as in torch, not a warning
        # level 1: the sum over param groups of u . d (g * lr) / d lr, in their order
        if n0 == len(level0):  # one value per group: a product, as torch.dot of two one-element vectors
            s = ups[0] * grads[0]
            for i in range(1, n0):
                s = s + ups[i] * grads[i]
        else:  # several: the tensor path's torch.dot, on the very tensors it would read (BLAS sums in its own order)
            if kept0 is None:
                raise RuntimeError("hypergrad internal error: the exact SGD chain lost level 1's kept tensors")
            dots = [num(torch.dot(u, g).item()) for u, g in zip(level0, kept0, strict=True)]
            s = dots[0]
            for d in dots[1:]:
                s = s + d
        h = -s  # what level k updated moved by -delta (identity transform: no derivative factor)
        out = [h]
        for i in range(n0, n0 + top - 2):  # levels 2..top-1: one term each
            h = -(h * grads[i])
            out.append(h)
    return ups, out


def _sgd_hypergradients(plan: Plan, state: TowerState, level0: Sequence[Tensor], num: Any) -> list[list[Tensor]]:
    _, out = _sgd_hyper(plan, state, level0, num)
    if not out:
        return []
    like = level0[0]
    flat = torch.tensor([float(h) for h in out], dtype=like.dtype, device=like.device)
    return [[v] for v in flat.view(-1, 1).unbind()]  # (1,) views, as torch.stack([-s]) makes on the tensor path


def _sgd_update(plan: Plan, state: TowerState, hypergrads: Sequence[Sequence[Tensor]] | Hyper, num: Any) -> SgdFloats:
    top = plan.height
    levels = state.levels
    if isinstance(hypergrads, Hyper):  # from hyper_floats: numbers of the dtype already
        hyper, counts, kept0 = hypergrads.flat, hypergrads.counts, hypergrads.level0
    else:
        hyper = _read([h for level in hypergrads for h in level], num)
        counts = tuple(len(level) for level in hypergrads)
        kept0 = list(hypergrads[0])
    fl = _floats(plan, state)
    hp0 = levels[0].hp
    if type(fl) is SgdFloats:
        if _level0_kept(fl, state):
            raw = fl.new
        else:
            below = _read(hp0, num)
            raw = (*below, *fl.new[len(below) :])
    elif fl is not None:
        above = tuple(num(fl.raw[k][0][0]) for k in range(1, top))
        below = tuple(num(x) for v in fl.raw[0] for x in v) if _level0_kept(fl, state) else _read(hp0, num)
        raw = (*below, *above)
    else:
        raw = _read([*hp0, *(levels[k].hp[0] for k in range(1, top))], num)

    n0 = len(raw) - top + 1  # level 0's values, all groups
    new: list[Any] = [None] * len(raw)
    lr = num(plan.initial[top][0]["lr"])  # the top level's fixed step size, rounded to the dtype as torch does
    with np.errstate(all="ignore"):
        # Level j updates the raw values at index i = n0 + j - 2 (j = top..2), then level 1 those of level 0, each with
        # the step size just updated above it: SGDRule.update's delta = grad * lr, then the core's raw - delta.
        for i in range(n0 + top - 2, n0 - 1, -1):
            lr = new[i] = raw[i] - hyper[i] * lr
        for i in range(n0):
            new[i] = raw[i] - hyper[i] * lr

    like = hp0[0]
    base = torch.tensor([float(x) for x in new[:n0]], dtype=like.dtype, device=like.device)
    hp = list(base.view(len(hp0), -1).unbind())  # one view per group, of its values
    # Each level k < top keeps the hypergradient it received (d delta / d lr, SGDRule.update): ``hyper`` itself.
    return SgdFloats(plan, like.dtype, like.device, hp, base, base._version, tuple(new), hyper, counts, kept0)
