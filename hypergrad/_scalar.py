"""The hyper levels above the first as plain Python floats: no tensor operation, hence no dispatch, per level.

A level k >= 1 updates a handful of numbers (the raw learned hyperparameters of level k - 1), so in tensors its cost
is all dispatch: tens of microseconds a level for a few flops. :func:`hypergrad.core.update` and
:func:`hypergrad.core.hypergradients` hand levels 1..top to this module when :func:`applies`: the floats are read
from the state (or, when the state is the one this module wrote at the last step, taken from what it kept), computed
here, and written back as tensors with one ``tensor`` and one ``split``. The state is the core's, field for field:
a checkpoint, or the tensor path, cannot tell which path wrote it.

The arithmetic is that of :mod:`hypergrad.rules` (the built-in rules' ``update`` and closed-form ``vjp``), operation
by operation, in float64: in a float64 tower it agrees with the tensor path to round-off (tested to 1e-12 for one
step's state, 1e-10 for hypergradients, where a difference of nearly equal terms amplifies round-off); in a float32
tower each step is computed in float64 from the stored float32 values and rounded to float32 when stored, so it is
slightly *more* accurate than the float32 tensor path and equal to it only to float32 round-off (the tests against
the reference package hold at 1e-6 either way). What is kept between steps is what was stored, rounded: a restored
checkpoint continues bit for bit. Where Python floats raise (1 / 0, sqrt(-1), exp(1000)) the step is
computed again in numpy float64, which gives IEEE's inf and nan as torch does.

One case is exact instead: a tall tower of plain SGD levels on one number each (``sgd/sgd/.../sgd``, see
:func:`_plain_sgd`). Its step is products, differences and negations of scalars, each one IEEE operation rounded once
on the tensor path; :func:`_sgd_update` and :func:`_sgd_hypergradients` do the same operations in the same order on
numpy float32 scalars (float32) or Python floats (float64), so that both paths agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from hypergrad.rules import AdaGradRule, AdamRule, AdamState, RMSPropRule, SGDRule, SGDState, SumState

if TYPE_CHECKING:
    from hypergrad.core import Plan, TowerState

__all__ = ["applies", "derivative", "forward", "hypergradients", "ieee", "supports", "update"]

Vec = list[float]
Guards = tuple[tuple[Tensor, ...], tuple[int, ...]]  # tensors, and their version counters when recorded


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


def supports(plan: Plan) -> bool:
    """Whether ``plan``'s hyper levels can run as Python floats: no population dimensions, and every level above the
    first a built-in rule (SGD, Adam, AdaGrad, RMSProp) with built-in transforms."""
    if plan.batch_shape or plan.height < 1:
        return False
    if any(type(r) not in _RULES or r.vjp_needs_inputs for r in plan.rules[1:]):
        return False  # the traces written here keep no inputs: only rules whose vjp reads the state after the step
    return all(t.name in _TRANSFORMS for level in plan.transforms[1:] for t in level)


def applies(plan: Plan) -> bool:
    """Whether the core hands ``plan``'s hyper levels to this module: where :func:`supports` and one of them is more
    than plain SGD (an Adam level is a hundred tensor operations, and the floats win), or where there are at least
    ``_SGD_FROM`` of them, all plain SGD on one number each (:func:`_plain_sgd`: computed exactly). Other plain SGD
    levels stay in tensors: a handful of tensor operations costs about what reading and writing floats costs, and a
    dot product of several numbers is summed in the BLAS library's order, which floats would not reproduce bit for
    bit."""
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
        elif not all(_plain(plan, k) for k in range(1, plan.height + 1)):
            out = "floats"
    _keep(_KIND, plan, (plan, out))
    return out


_KIND: dict[int, tuple[Plan, str | None]] = {}

# From this height on, a tower of plain SGD levels runs them as exact floats. Below, its few tensor operations per
# level cost less than reading and writing the floats (measured on the MNIST MLP, CPU, one thread, step alone,
# interleaved in one process: floats/tensors 1.14 at height 1, 1.13 at 3, 1.12 at 5, 0.98 at 8, 0.88 at 12, 0.62 at 50).
_SGD_FROM = 8


def _plain(plan: Plan, k: int) -> bool:
    return type(plan.rules[k]) is SGDRule and plan.initial[k][0]["momentum"] == 0.0


def _plain_sgd(plan: Plan) -> bool:
    """Whether levels 1..top are plain SGD (no momentum) on one number per vector: level 0 learns one value per
    group, each level above learns its ``lr`` alone, stored as itself (the reference parameterization). Then a step
    of these levels is a few products and differences of scalars, which :func:`_sgd_update` computes exactly as the
    tensor path does, bit for bit."""
    if len(plan.learned[0]) != 1:
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
        b1, b2, lr, eps, t = hp["beta1"], hp["beta2"], hp["lr"], hp["eps"], float(step)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        m0, v0 = st[0], st[1]
        g1 = [(1.0 - b1) * x for x in g]
        g2 = [(1.0 - b2) * x * x for x in g]
        m = [b1 * a + x for a, x in zip(m0, g1, strict=True)]
        v = [b2 * a + x for a, x in zip(v0, g2, strict=True)]
        delta = [lr * ((a / c1) / (ops.sqrt(b / c2) + eps)) for a, b in zip(m, v, strict=True)]
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
        lr, b1, b2, eps, t = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], float(step)
        c1, c2, dc1, dc2 = 1.0 - b1**t, 1.0 - b2**t, t * b1 ** (t - 1.0), t * b2 ** (t - 1.0)
        m, v, pm, pv, g1, g2 = after
        sq = [ops.sqrt(a / c2) for a in v]
        den = [s + eps for s in sq]
        q = [a / d for a, d in zip(u, den, strict=True)]
        if "beta1" in learned:
            q_m0, q_g1 = _dot(q, pm), _dot(q, g1)
            q_m = b1 * q_m0 + q_g1
            out["beta1"] = lr * ((q_m0 - q_g1 / (1.0 - b1)) / c1 + q_m * dc1 / (c1 * c1))
        else:
            q_m = _dot(q, m)
        if "lr" in learned:
            out["lr"] = q_m / c1
        if "beta2" in learned:
            w = [a * b / (d * s) for a, b, d, s in zip(q, m, den, sq, strict=True)]
            w_v0, w_g2 = _dot(w, pv), _dot(w, g2)
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
    if len(_STATIC) > 64:  # plans of optimizers long gone
        _STATIC.clear()
    _STATIC[id(plan)] = (plan, levels)
    return levels


# What this module wrote at the last step of each plan, as floats: the next step takes them instead of reading the
# tensors back, for every level whose state holds the very objects written (checked by identity; the core never
# writes a tensor in place, and a state changed in between, by load_state_dict or a scheduler's write, holds new
# objects). A write in place into one of these tensors is caught too: each tensor written is a view of one new tensor
# per step, and views share their base's version counter.
class _Kept(NamedTuple):
    plan: Plan
    hp0: list[Tensor]  # the list of level 0's raw tensors
    levels: list[Any]  # the LevelState objects of levels 1..top
    raw: list[list[Vec]]  # raw vectors of levels 0..top-1
    states: list[Any]  # per level 1..top: per tensor, the fields' vectors (None where the field is None)
    guards: Guards  # the tensors written or kept, and their versions then


class _Hyper(NamedTuple):
    plan: Plan
    tensors: list[Tensor]  # the hypergradients of levels 0..top-1 last handed to the core, flat
    floats: list[Vec]
    guards: Guards


_KEPT: dict[int, _Kept] = {}
_HYPER: dict[int, _Hyper] = {}


def _keep(table: dict[int, Any], plan: Plan, entry: Any) -> None:
    if len(table) > 64 and id(plan) not in table:  # plans of optimizers long gone
        table.clear()
    table[id(plan)] = entry


def _valid(table: dict[int, Any], plan: Plan) -> Any:
    entry = table.get(id(plan))
    if entry is None or entry.plan is not plan or any(t._version != v for t, v in zip(*entry.guards, strict=True)):
        return None
    return entry


def _guards(tensors: Sequence[Tensor]) -> Guards:
    # Two tuples rather than a pair per tensor: fewer objects for Python's cyclic garbage collector to track (a tall
    # tower's step writes hundreds of them, and every one that outlives a collection makes the next full one come
    # sooner: a full collection scans every object of the process, torch's included).
    tensors = tuple(tensors)
    return tensors, tuple(t._version for t in tensors)


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


def _tensor(vectors: list[Vec], like: Tensor) -> tuple[Tensor, list[Vec]]:
    """One tensor of the vectors' values in ``like``'s dtype, and the vectors as stored (rounded to that dtype): what
    the next step reads must be what a checkpoint of this state holds."""
    t = torch.tensor([x for v in vectors for x in v], dtype=like.dtype, device=like.device)
    if like.dtype == torch.float64:
        return t, [tuple(v) for v in vectors]
    flat, out, i = t.tolist(), [], 0
    for v in vectors:
        out.append(tuple(flat[i : i + len(v)]))
        i += len(v)
    return t, out


def _chain(static: list[_Level], raw: list, states: list, hyper: list, step: int, ops: _Math):
    """Levels top..1 on floats: each level's values, new rule states, and the new raw values of the level below."""
    top = len(static) - 1
    new_raw: list[Any] = [None] * (top + 1)
    new_raw[top] = []
    values: list[Any] = [None] * (top + 1)
    new_states: list[Any] = [None] * (top + 1)
    num = ops.num
    for k in range(top, 0, -1):
        rule, learned, tnames, fixed = static[k]
        vals = fixed.copy() if ops is _PY else {n: num(v) for n, v in fixed.items()}
        if learned:
            r = new_raw[k][0]
            for i, name in enumerate(learned):
                vals[name] = r[i] if tnames[i] == "identity" else forward(tnames[i], r[i], ops)
        values[k] = vals
        out = [_update(rule, g, s, vals, learned, step, ops) for g, s in zip(hyper[k - 1], states[k], strict=True)]
        new_raw[k - 1] = [[h - d for h, d in zip(r, o[0], strict=True)] for r, o in zip(raw[k - 1], out, strict=True)]
        new_states[k] = [o[1] for o in out]
    return values, new_states, new_raw


def _read_levels(state: TowerState, reader: _Reader, kept: _Kept | None, raw_ks: range, state_ks: range):
    """Per level in ``raw_ks`` its raw vectors, per level in ``state_ks`` its rule states' field vectors: the floats
    kept at the last step where the level is the one written then, else slots of ``reader``."""
    levels = state.levels

    def is_kept(k: int) -> bool:
        return kept is not None and (levels[0].hp is kept.hp0 if k == 0 else levels[k] is kept.levels[k - 1])

    raw = [kept.raw[k] if is_kept(k) else _Slots(reader.add(h) for h in levels[k].hp) for k in raw_ks]  # type: ignore[union-attr]
    states = [
        kept.states[k]
        if is_kept(k)
        else _Slots([None if f is None else reader.add(f) for f in s] for s in levels[k].rule)  # type: ignore[union-attr]
        for k in state_ks
    ]
    return raw, states


def update(plan: Plan, state: TowerState, hypergrads: Sequence[Sequence[Tensor]], step: int):
    """Levels top..1 of one step of :func:`hypergrad.core.update`: ``(new raw hyperparameters of level 0, new level
    states of levels 1..top, traces of levels top-1..1)``, exactly the core's fields."""
    if _kind(plan) == "sgd":
        num = _number(state.levels[0].hp[0].dtype)
        if num is not None:
            return _sgd_update(plan, state, hypergrads, num)
    from hypergrad.core import LevelState, Trace

    static = _static(plan)
    top = plan.height
    reader = _Reader()
    raw, states = _read_levels(state, reader, _valid(_KEPT, plan), range(top), range(1, top + 1))
    states = [None, *states]
    flat_hyper = [h for level in hypergrads for h in level]
    known = _valid(_HYPER, plan)
    if (
        known is not None
        and len(known.tensors) == len(flat_hyper)
        and all(a is b for a, b in zip(known.tensors, flat_hyper, strict=True))
    ):
        hyper_flat: list[Any] = known.floats
    else:
        hyper_flat = _Slots(reader.add(h) for h in flat_hyper)
    reader.read()
    raw, states, hyper_flat = reader.fill(raw), reader.fill(states), reader.fill([hyper_flat])[0]
    it = iter(hyper_flat)
    hyper = [[next(it) for _ in level] for level in hypergrads]

    values, new_states, new_raw = ieee(_chain, static, raw, states, hyper, step)

    # Write: the new vectors and scalars go into one tensor, whose views become the new fields. A vector kept
    # unchanged (a moment before the step, a hypergradient a rule keeps) is written as the tensor it was read from,
    # as the rules keep the tensor itself.
    sources = {
        id(v): t for level, vecs in zip(hypergrads, hyper, strict=True) for t, v in zip(level, vecs, strict=True)
    }
    for k in range(1, top + 1):
        for s_t, s_f in zip(state.levels[k].rule, states[k], strict=True):
            for t, f in zip(s_t, s_f, strict=True):
                if f is not None:
                    sources[id(f)] = t
    new: list[Vec] = []  # the vectors to write, in order; a field refers to one by its index
    scalars: list[float] = []
    reused: list[Tensor] = []
    hp_ix = []
    for k in range(top):
        hp_ix.append(list(range(len(new), len(new) + len(new_raw[k]))))
        new += new_raw[k]
    st_ix: list[Any] = [None]
    for k in range(1, top + 1):
        level = []
        for s in new_states[k]:
            fields: list[Any] = []
            for f in s:
                t = None if f is None else sources.get(id(f))
                if t is not None:
                    fields.append((t, f))
                    reused.append(t)
                elif f is None:
                    fields.append(None)
                else:
                    fields.append(len(new))
                    new.append(f)
            level.append(fields)
        st_ix.append(level)
    val_ix: list[Any] = [None]
    for k in range(1, top):
        learned = static[k].learned
        val_ix.append({n: (len(scalars), scalars.append(v))[0] if n in learned else v for n, v in values[k].items()})
    base, stored = _tensor([*new, scalars], state.levels[0].hp[0])
    parts = base.split([len(v) for v in stored])
    made = parts[-1].unbind() if scalars else ()

    def tensor(x: Any) -> Any:
        return None if x is None else parts[x] if type(x) is int else x[0]

    def floats(x: Any) -> Any:
        return None if x is None else stored[x] if type(x) is int else x[1]

    new_hp = [[parts[i] for i in hp_ix[k]] for k in range(top)]
    out_levels = []
    for k in range(1, top + 1):
        kind = _STATE_TYPE[type(plan.rules[k])]
        rule_states = [kind(*[tensor(x) for x in fields]) for fields in st_ix[k]]
        out_levels.append(LevelState(new_hp[k] if k < top else [], rule_states))
    traces = []
    for k in range(top - 1, 0, -1):
        vals = {n: made[x] if n in static[k].learned else x for n, x in val_ix[k].items()}
        # Built-in rules' vjps read only the state after the step (vjp_needs_inputs is False): nothing else to keep.
        traces.append(Trace(new_hp[k], [vals], None, None, None))
    # What the next step reads: the floats as stored, level by level.
    kept_raw = [tuple(stored[i] for i in hp_ix[k]) for k in range(top)]
    kept_states = [None] + [tuple(tuple(floats(x) for x in fields) for fields in st_ix[k]) for k in range(1, top + 1)]
    guards = _guards([base, *reused])
    _keep(_KEPT, plan, _Kept(plan, new_hp[0], out_levels, kept_raw, kept_states, guards))
    return new_hp[0], out_levels, traces


def hypergradients(plan: Plan, state: TowerState, level0: Sequence[Tensor]) -> list[list[Tensor]]:
    """The hypergradients of levels 1..top-1 (one vector each) of :func:`hypergrad.core.hypergradients`, from
    level 0's (``level0``: one per param group)."""
    if _kind(plan) == "sgd":
        num = _number(level0[0].dtype)
        if num is not None:
            return _sgd_hypergradients(plan, state, level0, num)
    top = plan.height
    reader = _Reader()
    slots = _Slots(reader.add(h) for h in level0)
    if top < 2:
        reader.read()
        _keep(_HYPER, plan, _Hyper(plan, list(level0), reader.fill([slots])[0], _guards(level0)))
        return []
    static = _static(plan)
    raw, after = _read_levels(state, reader, _valid(_KEPT, plan), range(1, top), range(1, top))
    traces = state.trace
    for k in range(1, top):  # the values level k used: its current ones, unless the trace holds others
        if traces[k].hp is not state.levels[k].hp:
            raw[k - 1] = _Slots(reader.add(h) for h in traces[k].hp)
    reader.read()
    upstream = reader.fill([slots])[0]
    raw, after = reader.fill(raw), reader.fill(after)
    raw, after = [None, *(r[0] for r in raw)], [None, *after]
    out = ieee(_hyper_chain, static, raw, after, upstream, state.step)
    flat, out = _tensor(out, level0[0])
    t = list(flat.split([len(v) for v in out]))
    _keep(_HYPER, plan, _Hyper(plan, [*level0, *t], (*upstream, *out), _guards([flat, *level0])))
    return [[v] for v in t]


def _hyper_chain(static: list[_Level], raw: list, after: list, upstream: list[Vec], step: int, ops: _Math) -> list:
    top = len(static) - 1
    out: list[Vec] = []
    ups = upstream
    for k in range(1, top):
        rule, learned, tnames, fixed = static[k]
        r = raw[k]
        vals = fixed.copy() if ops is _PY else {n: ops.num(v) for n, v in fixed.items()}
        for i, name in enumerate(learned):
            vals[name] = forward(tnames[i], r[i], ops)
        sums: dict[str, float] = {}
        for u, a in zip(ups, after[k], strict=True):
            for name, v in _vjp(rule, u, a, vals, learned, step, ops).items():
                sums[name] = v if name not in sums else sums[name] + v
        cols = []
        for j, name in enumerate(learned):
            s = sums.get(name)
            if s is None:  # this hyperparameter has not acted yet (e.g. momentum at the first step)
                cols.append(0.0)
                continue
            d = derivative(tnames[j], r[j], ops)
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
# agree bit for bit; any other dtype takes the float64 path above. What is kept between steps is checked as for
# _Kept: identity of the state's objects, version counters of the tensors written.
class _SGDKept(NamedTuple):
    plan: Plan
    hp0: list[Tensor]  # the list of level 0's raw tensors
    levels: list[Any]  # the LevelState objects of levels 1..top
    raw: tuple[Any, ...]  # the raw values of levels 0..top-1 (one per group at level 0), numbers of the dtype
    grads: tuple[Any, ...]  # the hypergradients the states of levels 1..top-1 keep (SGDState.grad), in that order
    guards: Guards


class _SGDHyper(NamedTuple):
    plan: Plan
    tensors: list[Tensor]  # the hypergradients of levels 0..top-1 last handed to the core, flat
    values: tuple[Any, ...]  # their values, numbers of the dtype
    guards: Guards


_SGD_KEPT: dict[int, _SGDKept] = {}
_SGD_HYPER: dict[int, _SGDHyper] = {}


def _number(dtype: torch.dtype) -> Any:
    """The scalar type whose arithmetic is the dtype's (IEEE, rounded once per operation); None for another."""
    return np.float32 if dtype == torch.float32 else float if dtype == torch.float64 else None


def _read(tensors: list[Tensor], num: Any) -> tuple[Any, ...]:
    """The values of one-number tensors (of any shape: a caller may pass its own hypergradients), with one ``cat``
    and one ``tolist``."""
    tensors = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]
    flat = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).tolist()
    return tuple(flat) if num is float else tuple(num(x) for x in flat)


def _same_levels(kept: _SGDKept | None, levels: Sequence[Any], top: int) -> bool:
    """Whether levels 1..top-1 are the very ones written at the last step (then their kept numbers are theirs)."""
    if kept is None:
        return False
    written = kept.levels
    return all(levels[k] is written[k - 1] for k in range(1, top))


# One flat layout for every vector here: level 0's values, one per param group, then one value per level 1..top-1.
# The raw values, the hypergradients and what the states keep all line up in it: the hypergradient at index i is that
# of the raw value at index i, and the gradient level k keeps is the hypergradient it received at the last step.
def _sgd_hypergradients(plan: Plan, state: TowerState, level0: Sequence[Tensor], num: Any) -> list[list[Tensor]]:
    top = plan.height
    ups = _read(list(level0), num)
    if top < 2:
        _keep(_SGD_HYPER, plan, _SGDHyper(plan, list(level0), ups, _guards(level0)))
        return []
    kept = _valid(_SGD_KEPT, plan)
    levels = state.levels
    if _same_levels(kept, levels, top):
        grads = kept.grads  # type: ignore[union-attr]
    else:
        grads = _read([s.grad for k in range(1, top) for s in levels[k].rule], num)
    n0 = len(ups)
    with np.errstate(all="ignore"):  # overflow is inf, as in torch, not a warning
        s = ups[0] * grads[0]  # level 1: the sum over param groups of u . d (g * lr) / d lr, in their order
        for i in range(1, n0):
            s = s + ups[i] * grads[i]
        h = -s  # what level k updated moved by -delta (identity transform: no derivative factor)
        out = [h]
        for i in range(n0, n0 + top - 2):  # levels 2..top-1: one term each
            h = -(h * grads[i])
            out.append(h)
    like = level0[0]
    flat = torch.tensor([float(h) for h in out], dtype=like.dtype, device=like.device)
    views = flat.view(-1, 1).unbind()  # (1,) views, as torch.stack([-s]) makes on the tensor path
    _keep(_SGD_HYPER, plan, _SGDHyper(plan, [*level0, *views], (*ups, *out), _guards([flat, *level0])))
    return [[v] for v in views]


def _sgd_update(plan: Plan, state: TowerState, hypergrads: Sequence[Sequence[Tensor]], num: Any):
    from hypergrad.core import LevelState, Trace

    top = plan.height
    levels = state.levels
    flat_hyper = [h for level in hypergrads for h in level]
    known = _valid(_SGD_HYPER, plan)
    if (
        known is not None
        and len(known.tensors) == len(flat_hyper)
        and all(a is b for a, b in zip(known.tensors, flat_hyper, strict=True))
    ):
        hyper = known.values
    else:
        hyper = _read(flat_hyper, num)
    kept = _valid(_SGD_KEPT, plan)
    hp0 = levels[0].hp
    n0 = len(hp0)
    if _same_levels(kept, levels, top):
        above = kept.raw[n0:]  # type: ignore[union-attr]
        raw = (*(kept.raw[:n0] if hp0 is kept.hp0 else _read(hp0, num)), *above)  # type: ignore[union-attr]
    else:
        raw = _read([*hp0, *(levels[k].hp[0] for k in range(1, top))], num)

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
    base = torch.tensor([float(x) for x in new], dtype=like.dtype, device=like.device)
    views = base.view(-1, 1).unbind()  # one (1,) view per raw vector
    scalars = base.unbind()  # the natural values the traces hold (identity: the raw value itself)
    new_hp0 = list(views[:n0])
    out_levels = []
    traces = []
    for k in range(1, top):  # the state keeps the hypergradient it received (d delta / d lr), as SGDRule.update does
        hp = [views[n0 + k - 1]]
        received = hypergrads[k - 1]
        out_levels.append(LevelState(hp, [SGDState(None, g) for g in received]))
        values = dict(plan.initial[k][0])
        values["lr"] = scalars[n0 + k - 1]
        traces.append(Trace(hp, [values], None, None, None))
    out_levels.append(LevelState([], [SGDState(None) for _ in hypergrads[top - 1]]))
    n_kept = n0 + top - 2 if top > 1 else 0  # what levels 1..top-1 keep: the hypergradients they received
    guards = _guards([base, *flat_hyper[:n_kept]])
    _keep(_SGD_KEPT, plan, _SGDKept(plan, new_hp0, out_levels, tuple(new), tuple(hyper[:n_kept]), guards))
    return new_hp0, out_levels, traces[::-1]
