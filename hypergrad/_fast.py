"""The fast closed-form step: level 0 with multi-tensor ops (:mod:`hypergrad._foreach`), the levels above as Python
floats (:mod:`hypergrad._scalar`). Same state, same results as the tensor path of :mod:`hypergrad.core`, to
round-off (see those two modules for exactly how close).

Taken by :func:`hypergrad.core.update` whenever :func:`applies` says so: built-in rules with closed-form vjps (or a
tower of height 0 with a built-in rule), built-in transforms, no population dimensions. Anything else (a user's
rule, AdamW's autograd vjp, the stable mode's wrapped rules, a population) takes the tensor path, which stays the
reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hypergrad import _foreach, _scalar

__all__ = ["FastTrace", "applies", "hypergradients", "update"]

_log = logging.getLogger("hypergrad")


class FastTrace(NamedTuple):
    """What the next hypergradient needs from the last step."""

    values: list[dict[str, float]]  # level 0's natural values per group
    raw: list[list[float]]  # level 0's raw learned values per group (the transforms' derivatives read them)
    grads: list[Tensor | None]
    before: list[Any]  # level 0's rule states before and after the step
    after: list[Any]
    chain: _scalar.ScalarTrace | None  # levels 1..top


def applies(plan: Any) -> bool:
    """Whether ``plan`` can take the fast path."""
    if plan.batch_shape:
        _foreach._tell_once(
            "batched-plan", "hypergrad: a population (batched hyperparameters) takes the per-tensor tensor path"
        )
        return False
    if type(plan.rules[0]) not in _foreach.BUILTIN:
        return False
    if plan.height == 0:
        return True
    return bool(plan.learned[0]) and _scalar.applies(plan)


def _natural(plan: Any, raw0: list[list[float]], m: Any) -> list[dict[str, float]]:
    values = []
    for g, initial in enumerate(plan.initial[0]):
        v = {n: float(x) for n, x in initial.items()}
        for i, (name, t) in enumerate(zip(plan.learned[0], plan.transforms[0], strict=True)):
            v[name] = _scalar.forward(t.name, raw0[g][i], m)
        values.append(v)
    return values


def _groups(plan: Any) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in plan.initial[0]]
    for i, g in enumerate(plan.group_of):
        out[g].append(i)
    return out


def update(plan: Any, state: Any, grads: Sequence[Tensor | None], hypergrads: Sequence[Sequence[Tensor]]):
    """One step, as :func:`hypergrad.core.update`: ``(new state, deltas)``."""
    from hypergrad.core import LevelState, TowerState

    step = state.step + 1
    top = plan.height
    rule = plan.rules[0]
    if top:
        hp_out, rule_out, chain = _scalar.update(plan, state.levels, hypergrads, step)
        raw0 = chain.level0
    else:
        hp_out, rule_out, chain, raw0 = [[]], [], None, [[] for _ in plan.initial[0]]
    values = _scalar.ieee(_natural, plan, raw0)
    before = state.levels[0].rule
    deltas: list[Tensor | None] = [None] * len(grads)
    after = list(before)
    for g, idx in enumerate(_groups(plan)):
        idx = [i for i in idx if grads[i] is not None]  # a parameter without a gradient is left alone
        if not idx:
            continue
        gs, ss = [grads[i] for i in idx], [before[i] for i in idx]
        out = _foreach.update(rule, gs, ss, values[g], step, plan.learned[0])
        if out is None:  # tensors of different devices or dtypes in one group (logged once by _foreach)
            out = tuple(zip(*(rule.update(x, s, values[g], step) for x, s in zip(gs, ss, strict=True)), strict=True))
        for i, d, s in zip(idx, out[0], out[1], strict=True):
            deltas[i], after[i] = d, s
    levels = [LevelState(hp_out[0] if top else [], after)]
    levels += [LevelState(hp_out[k] if k < top else [], rule_out[k - 1]) for k in range(1, top + 1)]
    trace = FastTrace(values, raw0, list(grads), list(before), after, chain) if top else None
    return TowerState(step, levels, trace), deltas


def hypergradients(plan: Any, live: Any, grads: Sequence[Tensor | None]) -> list[list[Tensor]]:
    """As :func:`hypergrad.core.hypergradients`, for a state made by :func:`update`."""
    trace: FastTrace = live.trace
    rule, learned = plan.rules[0], plan.learned[0]
    entries: list[tuple[int, str, Tensor]] = []
    like = None
    for g, idx in enumerate(_groups(plan)):
        idx = [i for i in idx if grads[i] is not None and trace.grads[i] is not None]
        if not idx:
            continue
        args = ([grads[i] for i in idx], [trace.grads[i] for i in idx], [trace.before[i] for i in idx])
        args += ([trace.after[i] for i in idx],)
        like = args[0][0]
        sums = _foreach.vjp(rule, *args, trace.values[g], live.step, learned)
        if sums is None:  # mixed devices or dtypes: the rule's own vjp, tensor by tensor
            sums = _per_tensor_vjp(rule, *args, trace.values[g], live.step, learned)
        entries += [(g, n, s) for n, s in sums.items()]
    flat = torch.stack([s for _, _, s in entries]).tolist() if entries else []
    level0 = _scalar.ieee(_level0, plan, entries, flat, trace.raw)
    upper = _scalar.hypergradient_floats(plan, trace.chain, level0) if plan.height >= 2 else []
    vectors = level0 + upper
    ref = live.levels[0].hp[0] if like is None else like
    dtype = live.levels[0].hp[0].dtype
    out = torch.tensor([x for v in vectors for x in v], dtype=dtype, device=ref.device).split([len(v) for v in vectors])
    _scalar.remember(plan, zip(out, vectors, strict=True))
    return [list(out[: len(level0)])] + [[v] for v in out[len(level0) :]]


def _level0(plan: Any, entries: list, flat: list[float], raw: list[list[float]], m: Any) -> list[list[float]]:
    learned = plan.learned[0]
    level0 = [[0.0] * len(learned) for _ in plan.initial[0]]  # a value that has not acted yet has a zero hypergradient
    for (g, name, _), s in zip(entries, flat, strict=True):
        j = learned.index(name)
        d = _scalar.derivative(plan.transforms[0][j].name, raw[g][j], m)
        # The weights moved by -delta, so d loss / d value = -(g . d delta / d value).
        level0[g][j] = -s if d is None else -s * d
    return level0


def _per_tensor_vjp(rule, grads_next, grads, befores, afters, values, step, learned) -> dict[str, Tensor]:
    sums: dict[str, Tensor] = {}
    for u, g, b, a in zip(grads_next, grads, befores, afters, strict=True):
        hp = {n: torch.tensor(v, dtype=g.dtype, device=g.device) if n in learned else v for n, v in values.items()}
        for n, v in rule.vjp(u, g, b, a, hp, step, lambda x, y: torch.dot(x.reshape(-1), y.reshape(-1))).items():
            sums[n] = v if n not in sums else sums[n] + v
    return sums
