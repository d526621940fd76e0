"""Multi-tensor (``torch._foreach_*``) versions of the built-in rules over all tensors of one param group.

A speed-up only, never a second definition: :mod:`hypergrad.rules` stays the definition, and tests compare these
functions with it.

- ``update(rule, grads, states, hp, step)`` equals ``[rule.update(g, s, hp, step) for ...]`` **bitwise**: the same
  elementwise operations in the same order, only issued as one kernel launch (or one dispatch) per operation over
  all tensors instead of one per tensor. Where a result is not kept, the operation runs in place (same values, fewer
  allocations).
- ``vjp(rule, grads_next, afters, hp, step)`` equals the sum over the group of ``rule.vjp(...)`` to
  float round-off, not bitwise: the per-tensor vjp multiplies each tensor's dot products by scalar factors and then
  sums over tensors, this one sums the dot products over tensors first and applies the factors once (the formulas
  are linear in the dots), which saves a dozen scalar operations per tensor. The tests hold it to 1e-12 in float64.

With ``compiled=True`` both run through ``torch.compile`` (opt-in, see :class:`hypergrad.HyperOptimizer`'s
``compile``): the same operations, which the compiler may fuse and reorder, so equal to the eager results to round-off.

Both return ``None`` where they do not apply (a rule that is not built in, hyperparameters with population
dimensions, tensors on different devices or of different dtypes); the caller then takes the per-tensor path.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from hypergrad.rules import (
    AdaGradRule,
    AdamRule,
    AdamState,
    AdamWRule,
    AdamWState,
    RMSPropRule,
    Rule,
    SGDRule,
    SGDState,
    SumState,
    _one_minus,
    _power_corrections,
    _power_slopes,
)

__all__ = ["BUILTIN", "applies", "update", "vjp"]

BUILTIN = (SGDRule, AdamRule, AdamWRule, AdaGradRule, RMSPropRule)

_log = logging.getLogger("hypergrad")
_told: set[str] = set()


def _tell_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        _log.info(message)


def applies(rule: Rule, tensors: Sequence[Tensor], hp: Mapping[str, Any]) -> bool:
    """Whether the multi-tensor path can run: a built-in rule, scalar hyperparameters, one device and dtype."""
    if type(rule) not in BUILTIN or not tensors:
        return False
    for v in hp.values():
        if isinstance(v, Tensor) and v.dim() != 0:
            # Population members each have their own value: the per-tensor path broadcasts them.
            _tell_once(
                "batched",
                "hypergrad: hyperparameters with population dimensions take the per-tensor path (no foreach)",
            )
            return False
    first = tensors[0]
    if any(t.device != first.device or t.dtype != first.dtype for t in tensors):
        _tell_once("mixed", "hypergrad: a param group mixes devices or dtypes; it takes the per-tensor path")
        return False
    return True


# -- torch.compile (opt-in) -----------------------------------------------------------------------------------------
# What a compiled function reads must not change with the step count, or every step would compile again: Adam's bias
# corrections (the only place a rule reads the step) are computed here and handed in as 0-dim tensors, the values the
# eager path uses (a float scalar meets a float32 tensor as its float32 rounding, which is what the tensor holds).
# Everything else a compiled function reads is a tensor or a value fixed for the life of the plan, so graphs are
# compiled only while the state's structure settles (the first two or three steps) and then reused. One process keeps
# at most torch._dynamo.config.cache_size_limit (8) graphs per function (rules, shapes, dtypes): beyond, torch says so
# once and runs that function eagerly.
_COMPILED: dict[Any, Any] = {}
_BROKEN: list[str] = []  # why torch.compile cannot run here, once found


def _corrections(
    rule: Rule, hp: Mapping[str, Any], step: int, like: Tensor, compiled: bool, slopes: bool = True
) -> Any:
    if type(rule) not in (AdamRule, AdamWRule):
        return None
    out = _power_corrections(hp, step, slopes)
    if not compiled:
        return out
    return tuple(None if c is None else torch.as_tensor(c, dtype=like.dtype, device=like.device) for c in out)


def _run(fn: Any, compiled: bool, *args: Any) -> Any:
    if not compiled or _BROKEN:
        return fn(*args)
    entry = _COMPILED.get(fn)
    if entry is None:
        entry = _COMPILED[fn] = [torch.compile(fn, dynamic=False), False]
    if entry[1]:  # compiled once already: an error now is a real one
        return entry[0](*args)
    try:
        out = entry[0](*args)
    except Exception as e:  # the first compile: no compiler, an unsupported backend, ...
        _BROKEN.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        _log.warning("hypergrad: torch.compile is unavailable here (%s); the steps run eagerly", _BROKEN[0])
        return fn(*args)
    entry[1] = True
    return out


# -- what Adam's next vjp would compute again -----------------------------------------------------------------------
# Adam's vjp at step t + 1 starts from sqrt(v_hat) and sqrt(v_hat) + eps of the states step t wrote: the operations
# the update of step t ran, on the same values. The eager update keeps them for that one vjp (three passes over the
# weights fewer; two weight-sized tensors held between steps), and with them the scalars it computed from the same
# values and step that the vjp reads again: c1, c2, 1 - beta1, 1 - beta2 (six 0-dim operations fewer). An entry is
# used once, only for the very states it was made with (identity, unchanged in place: version counters) and the same
# values and step, else the vjp computes them itself. A derived value, not state: a checkpoint or another caller
# never sees it.
class _Den(NamedTuple):
    refs: list[Any]  # weak references to the exp_avg_sq tensors written
    versions: list[int]
    hp: Mapping[str, Any]  # the values dict the update read (the core's trace keeps this very dict for the vjp)
    step: int
    den: tuple[list[Tensor], list[Tensor], Any, Any, Any, Any]  # sqrt(v_hat), + eps; c1, c2, 1 - b1, 1 - b2
    nums: _Nums | None = None  # the update's scalars as numbers, where adam_values made them


_DENS: dict[int, _Den] = {}


def _remember_den(vs: list[Tensor], hp: Mapping[str, Any], step: int, den: Any, nums: _Nums | None = None) -> None:
    for key in [k for k, e in _DENS.items() if e.refs[0]() is None] + list(_DENS)[:-3]:  # dead, or beyond 4 entries
        _DENS.pop(key, None)
    _DENS[id(vs[0])] = _Den([weakref.ref(v) for v in vs], [v._version for v in vs], hp, step, den, nums)


def _den_entry(afters: list[Any], hp: Mapping[str, Any], step: int, pop: bool = True) -> _Den | None:
    """The entry the update made for exactly these states, values and step (``pop``: used once), else None."""
    vs = [a.exp_avg_sq for a in afters]
    entry = _DENS.pop(id(vs[0]), None) if pop else _DENS.get(id(vs[0]))
    if entry is None or entry.hp is not hp or entry.step != step or len(entry.refs) != len(vs):
        return None
    if any(r() is not v or v._version != n for r, v, n in zip(entry.refs, vs, entry.versions, strict=True)):
        return None
    return entry


def _recall_den(afters: list[Any], hp: Mapping[str, Any], step: int) -> Any:
    entry = _den_entry(afters, hp, step)
    return None if entry is None else entry.den


# -- updates --------------------------------------------------------------------------------------------------------
def update(
    rule: Rule,
    grads: Sequence[Tensor],
    states: Sequence[Any],
    hp: Mapping[str, Any],
    step: int,
    compiled: bool = False,
) -> tuple[list[Tensor], list[Any]] | None:
    """The deltas and new states of ``rule`` for every tensor of a group, or None where foreach does not apply.
    ``compiled``: through ``torch.compile`` (the module docstring says when and why), equal to round-off."""
    grads = list(grads)
    if not applies(rule, grads, hp):
        return None
    nums = _take_nums(hp) if not compiled and type(rule) is AdamRule else None
    if nums is None:
        corrections = _corrections(rule, hp, step, grads[0], compiled, slopes=False)  # the update reads c1, c2 alone
    else:
        corrections = (nums.held[2], nums.held[3], None, None)  # c1, c2 as 0-dim tensors
    # Eager Adam with a learned value keeps what the next step's vjp recomputes (see _Den); compiled, it is fused.
    keep = not compiled and type(rule) in (AdamRule, AdamWRule) and any(isinstance(v, Tensor) for v in hp.values())
    out = _run(_update, compiled, rule, grads, list(states), hp, corrections, keep, nums)
    if out is None:
        return None
    deltas, states_out, den = out
    if den is not None:
        _DENS.pop(id(states[0].exp_avg_sq), None)  # the last step's entry, which no vjp will ask for now
        _remember_den([s.exp_avg_sq for s in states_out], hp, step, den, nums)
    return deltas, states_out


def _update(
    rule: Rule,
    grads: list[Tensor],
    states: list[Any],
    hp: Mapping[str, Any],
    corrections: Any,
    keep: bool = False,
    nums: _Nums | None = None,
):
    """The deltas, the new states, and (``keep``: Adam only) the ``sqrt(v_hat)`` and ``sqrt(v_hat) + eps`` used.
    ``nums``: Adam's scalars as numbers (see adam_values)."""
    kind = type(rule)
    if kind is SGDRule:
        return (*_sgd(grads, states, hp), None)
    if kind in (AdamRule, AdamWRule):
        c1, c2, _, _ = corrections
        delta, fields, den = _adam(grads, states, hp, c1, c2, keep, nums)
        if den is not None:
            den = (*den[:2], c1, c2, *den[2:])
        if kind is AdamRule:
            return delta, [AdamState(*f) for f in zip(*fields, strict=True)], den
        params = [s.param for s in states]
        # delta + (lr * wd) * param, as AdamWRule.update
        torch._foreach_add_(delta, torch._foreach_mul(params, hp["lr"] * hp["weight_decay"]))
        new_params = list(torch._foreach_sub(params, delta))
        decay = _learned(hp, "lr") or _learned(hp, "weight_decay")
        old = params if decay else [None] * len(params)
        m, v, *kept = fields
        return delta, [AdamWState(*f) for f in zip(m, v, new_params, *kept, old, strict=True)], den
    if kind is AdaGradRule:
        sums = list(torch._foreach_add([s.sum for s in states], torch._foreach_pow(grads, 2)))  # sum + square(g)
        delta = _over_root(grads, sums, hp)
        kept = grads if _learned(hp, "lr") else [None] * len(grads)
        return delta, [SumState(s, g) for s, g in zip(sums, kept, strict=True)], None
    if kind is RMSPropRule:
        gamma = hp["gamma"]
        olds = [s.sum for s in states]
        sums = list(torch._foreach_mul(olds, gamma))
        sq = torch._foreach_pow(grads, 2)
        torch._foreach_mul_(sq, 1.0 - gamma)  # (1 - gamma) * square(g): a product of two factors commutes bitwise
        torch._foreach_add_(sums, sq)
        delta = _over_root(grads, sums, hp)
        kept = grads if _learned(hp, "lr") or _learned(hp, "gamma") else [None] * len(grads)
        previous = olds if _learned(hp, "gamma") else [None] * len(grads)
        return delta, [SumState(*f) for f in zip(sums, kept, previous, strict=True)], None
    return None


def _learned(hp: Mapping[str, Any], name: str) -> bool:
    return isinstance(hp[name], Tensor)


def _over_root(grads: list[Tensor], sums: list[Tensor], hp: Mapping[str, Any]) -> list[Tensor]:
    den = torch._foreach_add(sums, hp["eps"])  # (lr * g) / sqrt(sum + eps)
    torch._foreach_sqrt_(den)
    delta = torch._foreach_mul(grads, hp["lr"])
    torch._foreach_div_(delta, den)
    return list(delta)


def _sgd(grads: list[Tensor], states: Sequence[Any], hp: Mapping[str, Any]) -> tuple[list[Tensor], list[Any]]:
    momentum = hp["momentum"]
    if isinstance(momentum, float) and momentum == 0.0:
        kept = grads if _learned(hp, "lr") else [None] * len(grads)
        return list(torch._foreach_mul(grads, hp["lr"])), [SGDState(None, g) for g in kept]
    old = [i for i, s in enumerate(states) if s.momentum_buffer is not None]
    new = [i for i, s in enumerate(states) if s.momentum_buffer is None]
    bufs: list[Tensor | None] = [None] * len(grads)
    if old:
        kept = torch._foreach_mul([states[i].momentum_buffer for i in old], momentum)
        torch._foreach_add_(kept, [grads[i] for i in old])
        for i, b in zip(old, kept, strict=True):
            bufs[i] = b
    for i in new:  # the first buffer is the gradient, as in SGDRule
        bufs[i] = grads[i]
    learned = _learned(hp, "momentum")
    states_out = [SGDState(b, None, s.momentum_buffer if learned else None) for b, s in zip(bufs, states, strict=True)]
    return list(torch._foreach_mul(bufs, hp["lr"])), states_out


def _adam(
    grads: list[Tensor],
    states: Sequence[Any],
    hp: Mapping[str, Any],
    c1: Any,
    c2: Any,
    keep: bool = False,
    nums: _Nums | None = None,
) -> tuple[list[Tensor], list[list[Any]], Any]:
    # The operations of rules.adam_step in its order; products and sums of two terms commute bitwise. ``nums``: 1 -
    # beta1 and 1 - beta2 as adam_values made them.
    m0, v0 = [s.exp_avg for s in states], [s.exp_avg_sq for s in states]
    beta1, beta2 = hp["beta1"], hp["beta2"]
    a1, a2 = (_one_minus(beta1), _one_minus(beta2)) if nums is None else nums.held[:2]
    g1 = torch._foreach_mul(grads, a1)
    g2 = torch._foreach_mul(grads, a2)  # ((1 - b2) * g) * g
    torch._foreach_mul_(g2, grads)
    m = torch._foreach_mul(m0, beta1)
    torch._foreach_add_(m, g1)
    v = torch._foreach_mul(v0, beta2)
    torch._foreach_add_(v, g2)
    delta = torch._foreach_div(m, c1)  # m_hat
    sq = torch._foreach_div(v, c2)  # v_hat
    torch._foreach_sqrt_(sq)  # v_hat ** 0.5, which torch computes as sqrt
    if keep:  # sqrt(v_hat) is kept too: the same sum, out of place
        den = torch._foreach_add(sq, hp["eps"])
    else:
        torch._foreach_add_(sq, hp["eps"])
        den = sq
    torch._foreach_div_(delta, den)
    torch._foreach_mul_(delta, hp["lr"])
    none = [None] * len(grads)
    keep1, keep2 = _learned(hp, "beta1"), _learned(hp, "beta2")
    fields = [list(m), list(v), m0 if keep1 else none, v0 if keep2 else none]
    fields += [list(g1) if keep1 else none, list(g2) if keep2 else none]
    return list(delta), fields, (list(sq), list(den), a1, a2) if keep else None


# -- closed-form vector-Jacobian products -----------------------------------------------------------------------
def _flat(x: Tensor) -> Tensor:
    return x if x.dim() == 1 else x.reshape(-1)  # a reshape is one more dispatch: not for vectors


def _dots(a: Sequence[Tensor], b: Sequence[Tensor], flat: bool = False) -> Tensor:
    """sum_i <a_i, b_i> over the group's tensors (``flat``: the a_i are flat already)."""
    dots = [torch.dot(x if flat else _flat(x), _flat(y)) for x, y in zip(a, b, strict=True)]
    return dots[0] if len(dots) == 1 else torch.stack(dots).sum()


def vjp(
    rule: Rule,
    grads_next: Sequence[Tensor],
    afters: Sequence[Any],
    hp: Mapping[str, Any],
    step: int,
    compiled: bool = False,
) -> dict[str, Tensor] | None:
    """``sum over the group of grad_next . d delta / d hp[name]`` for every learned (tensor) hyperparameter, from the
    rule states after the step; None where foreach does not apply. Equal to summing :meth:`Rule.vjp` over the
    tensors, to round-off."""
    grads_next = list(grads_next)
    if type(rule) not in BUILTIN or not applies(rule, grads_next, hp):
        return None
    afters = list(afters)
    den = None if compiled or type(rule) not in (AdamRule, AdamWRule) else _recall_den(afters, hp, step)
    if den is None:
        corrections = _corrections(rule, hp, step, grads_next[0], compiled)
    else:  # c1 and c2 as the update computed them; their slopes, which it did not compute
        corrections = (den[2], den[3], *_power_slopes(hp, step))
    return _run(_vjp, compiled, rule, grads_next, afters, hp, corrections, den)


def _vjp(
    rule: Rule,
    grads_next: list[Tensor],
    afters: list[Any],
    hp: Mapping[str, Any],
    corrections: Any,
    den: Any = None,
):
    kind = type(rule)
    out: dict[str, Tensor] = {}
    if kind is SGDRule:
        if _learned(hp, "lr"):
            out["lr"] = _dots(grads_next, [a.grad if a.momentum_buffer is None else a.momentum_buffer for a in afters])
        pairs = [(u, a.previous_buffer) for u, a in zip(grads_next, afters, strict=True)]
        pairs = [(u, b) for u, b in pairs if b is not None]
        if _learned(hp, "momentum") and pairs:
            out["momentum"] = hp["lr"] * _dots([u for u, _ in pairs], [b for _, b in pairs])
        return out
    if kind in (AdamRule, AdamWRule):
        out = _adam_vjp(grads_next, afters, hp, *corrections, den)
        if kind is AdamWRule and (_learned(hp, "lr") or _learned(hp, "weight_decay")):
            decay = _dots(grads_next, [a.previous_param for a in afters])  # the decay term lr * wd * param_before
            if _learned(hp, "lr"):
                out["lr"] = out["lr"] + hp["weight_decay"] * decay
            if _learned(hp, "weight_decay"):
                out["weight_decay"] = hp["lr"] * decay
        return out
    lr_learned = _learned(hp, "lr")
    gamma_learned = kind is RMSPropRule and _learned(hp, "gamma")
    if not (lr_learned or gamma_learned):
        return out
    sums = [a.sum for a in afters]
    g = [a.grad for a in afters]
    den = torch._foreach_add(sums, hp["eps"])  # s + eps, kept for the gamma term
    r = torch._foreach_sqrt(den)
    r = torch._foreach_div(g, r)  # g / sqrt(s + eps)
    if lr_learned:
        out["lr"] = _dots(grads_next, r)
    if gamma_learned:
        torch._foreach_div_(r, den)  # r / (s + eps) * (s0 - g * g)
        torch._foreach_mul_(r, torch._foreach_sub([a.previous_sum for a in afters], torch._foreach_mul(g, g)))
        out["gamma"] = -0.5 * hp["lr"] * _dots(grads_next, r)
    return out


def _adam_vjp(grads_next, afters, hp, c1, c2, dc1, dc2, kept=None) -> dict[str, Tensor]:
    # The formulas of rules.adam_vjp with the dots summed over the group before the scalar factors. ``kept``: the
    # update's sqrt(v_hat) and sqrt(v_hat) + eps for these states, the very values the next three lines compute, and
    # its 1 - beta1, 1 - beta2 (see _Den).
    q_m0, q_g1, q_m, w_v0, w_g2 = _adam_dots(grads_next, afters, hp, c2, kept)
    a1, a2 = (None, None) if kept is None else kept[4:6]
    b1, b2 = hp["beta1"], hp["beta2"]
    a1 = _one_minus(b1) if a1 is None and _learned(hp, "beta1") else a1
    a2 = _one_minus(b2) if a2 is None and _learned(hp, "beta2") else a2
    names = tuple(n for n in ("lr", "beta1", "beta2") if _learned(hp, n))
    return _adam_sums(names, q_m0, q_g1, q_m, w_v0, w_g2, hp["lr"], b1, b2, c1, c2, dc1, dc2, a1, a2)


def _adam_dots(grads_next, afters, hp, c2, kept=None) -> tuple[Any, Any, Any, Any, Any]:
    """The dot products of Adam's vjp summed over the group: q . m0, q . g1 (beta1 learned) or q . m (not), and
    w . v0, w . g2 (beta2 learned); None where not computed."""
    m_after = [a.exp_avg for a in afters]
    if kept is None:
        sqrt_v_hat = torch._foreach_div([a.exp_avg_sq for a in afters], c2)
        torch._foreach_sqrt_(sqrt_v_hat)
        den = torch._foreach_add(sqrt_v_hat, hp["eps"])
    else:
        sqrt_v_hat, den = kept[0], kept[1]
    q = torch._foreach_div(grads_next, den)
    q_m0 = q_g1 = q_m = w_v0 = w_g2 = None
    if _learned(hp, "beta1"):
        qf = [_flat(x) for x in q]  # flattened once for both dots
        q_m0 = _dots(qf, [a.previous_exp_avg for a in afters], flat=True)
        q_g1 = _dots(qf, [a.grad_term for a in afters], flat=True)
    else:
        q_m = _dots(q, m_after)
    if _learned(hp, "beta2"):
        w = torch._foreach_mul(q, m_after)  # q * m / (den * sqrt(v_hat))
        torch._foreach_mul_(den, sqrt_v_hat)
        torch._foreach_div_(w, den)
        wf = [_flat(x) for x in w]
        w_v0 = _dots(wf, [a.previous_exp_avg_sq for a in afters], flat=True)
        w_g2 = _dots(wf, [a.grad_sq_term for a in afters], flat=True)
    return q_m0, q_g1, q_m, w_v0, w_g2


def _adam_sums(names, q_m0, q_g1, q_m, w_v0, w_g2, lr, b1, b2, c1, c2, dc1, dc2, a1, a2) -> dict[str, Any]:
    """The scalar part of Adam's vjp for the learned ``names``, from the summed dots: written once for 0-dim tensors
    (and floats where a value is fixed) and for numbers of the dtype (see adam_values), the same operations in the
    same order either way."""
    out = {}
    if "beta1" in names:
        q_m = b1 * q_m0 + q_g1
        out["beta1"] = lr * ((q_m0 - q_g1 / a1) / c1 + q_m * dc1 / (c1 * c1))
    if "lr" in names:
        out["lr"] = q_m / c1
    if "beta2" in names:
        w_v = b2 * w_v0 + w_g2
        # -0.5 lr / c1 (...), with the division last: lr and c1 may be floats, and 1.0 / 0.0 raises in Python.
        out["beta2"] = -0.5 * lr * ((w_v0 - w_g2 / a2) / c2 + w_v * dc2 / (c2 * c2)) / c1
    return out


# -- Adam's scalars as numbers of the dtype -------------------------------------------------------------------------
# Level 0's Adam learning lr, beta1 and beta2 (the reference's transforms) spends some fifty 0-dim tensor operations
# a step on scalars: the natural values and their slopes, the bias corrections and 1 - beta that the update reads, and
# the scalar part of the vjp. Each is one IEEE operation of the dtype (a sum, difference, product, quotient or
# negation, rounded once), and numpy's float32 and float64 scalars compute exactly those: adam_values and
# adam_hypergradient do them as numbers, in the same order on the same operands, so that every result is the tensor
# path's bit for bit. Only tanh and pow, whose results depend on the library that computes them, stay torch's, over a
# group's few values at once (elementwise: each element gets what the 0-dim operation gives it). What the state holds
# and the multi-tensor operations read stays 0-dim tensors, made from the numbers with one torch.tensor each (a Python
# float scalar costs a multi-tensor operation more than the 0-dim tensor: it is wrapped once per tensor). CPU only
# (numbers read from a GPU tensor would wait for it), eager only (the compiled path takes its own 0-dim tensors).
_NUMBER = {torch.float32: np.float32, torch.float64: np.float64}
_ADAM = ("lr", "beta1", "beta2")


class _Nums(NamedTuple):
    """One group's Adam scalars at one step, numbers of the dtype: the natural values, 1 - beta, the bias corrections
    c = 1 - beta^t and dc = t beta^(t - 1), and the half_tanh slopes of the betas."""

    lr: Any
    b1: Any
    b2: Any
    a1: Any
    a2: Any
    c1: Any
    c2: Any
    dc1: Any
    dc2: Any
    d1: Any
    d2: Any
    held: tuple[Tensor, ...] = ()  # a1, a2, c1, c2 as 0-dim tensors, for the update
    # The tensors of the values that the state holds (lr's a view of the raw hyperparameters; the betas' and the
    # slopes' views of one tensor), with their version counters then: after a write in place into one, the tensor path
    # reads the value written, and so the hypergradient takes that path (see adam_numbers_ready).
    tensors: tuple[Tensor, ...] = ()
    versions: tuple[int, ...] = ()


def numbers_apply(rule: Rule, learned: Sequence[str], transforms: Sequence[str], batched: bool, compiled: bool) -> bool:
    """Whether level 0 (``rule``, its learned names and their transforms' names) takes the numbers path."""
    return (
        type(rule) is AdamRule
        and tuple(learned) == _ADAM
        and tuple(transforms) == ("identity", "half_tanh", "half_tanh")
        and not batched
        and not compiled
    )


_NUMS: dict[int, tuple[Mapping[str, Any], _Nums]] = {}


def adam_values(
    initial: Sequence[Mapping[str, Any]], raws: Sequence[Tensor], step: int
) -> tuple[list[dict[str, Any]], list[list[Any]]] | None:
    """Level 0's natural values and slopes per group, as ``hypergrad.core._values_slopes`` computes them, with the
    scalars the group's update and next vjp read kept as numbers for them; None off the CPU or in another dtype."""
    first = raws[0]
    dtype, num = first.dtype, _NUMBER.get(first.dtype)
    if num is None or first.device.type != "cpu" or any(r.shape != (3,) for r in raws):
        return None
    one, two, t = num(1.0), num(2.0), float(step)
    values, slopes = [], []
    for initial_g, raw in zip(initial, raws, strict=True):
        lr = num(raw.tolist()[0])
        _, th1, th2 = (num(x) for x in torch.tanh(raw).tolist())  # lr's tanh is not read
        with np.errstate(all="ignore"):  # inf and nan, as torch gives them, without a warning
            b1, b2 = (th1 + one) / two, (th2 + one) / two  # HALF_TANH: (tanh(x) + 1) / 2
            d1, d2 = (one - th1 * th1) / two, (one - th2 * th2) / two  # its slope: rsub(square(tanh(x)), 1) / 2
        held = torch.tensor([float(b1), float(b2), float(d1), float(d2)], dtype=dtype)
        p1, p2, _, _ = (num(x) for x in held.pow(t).tolist())  # beta^t (the slopes' powers are not read)
        q1, q2, _, _ = (num(x) for x in held.pow(t - 1.0).tolist())
        with np.errstate(all="ignore"):
            a1, a2, c1, c2 = one - b1, one - b2, one - p1, one - p2
            nums = _Nums(lr, b1, b2, a1, a2, c1, c2, num(t) * q1, num(t) * q2, d1, d2)
        scalars = torch.tensor([float(a1), float(a2), float(c1), float(c2)], dtype=dtype).unbind()
        lr_t = raw.unbind()[0]  # the natural value of the identity is the raw value, a view, as natural_values'
        b1_t, b2_t, d1_t, d2_t = held.unbind()
        nums = nums._replace(held=scalars, tensors=(lr_t, b1_t), versions=(lr_t._version, b1_t._version))
        group = dict(initial_g)
        group.update(lr=lr_t, beta1=b1_t, beta2=b2_t)
        values.append(group)
        slopes.append([None, d1_t, d2_t])
        for key in list(_NUMS)[: -2 * len(raws)]:  # values no update read (a group without gradients)
            del _NUMS[key]
        _NUMS[id(group)] = (group, nums)
    return values, slopes


def _take_nums(hp: Mapping[str, Any]) -> _Nums | None:
    """The numbers adam_values kept for this very values dict (once), else None."""
    entry = _NUMS.pop(id(hp), None)
    return None if entry is None or entry[0] is not hp else entry[1]


def adam_numbers_ready(afters: Sequence[Any], hp: Mapping[str, Any], step: int) -> bool:
    """Whether :func:`adam_hypergradient` can run: the update of these very states left its numbers."""
    entry = _den_entry(list(afters), hp, step, pop=False)
    if entry is None or entry.nums is None:
        return False
    return all(x._version == n for x, n in zip(entry.nums.tensors, entry.nums.versions, strict=True))


def adam_hypergradient(grads_next: Sequence[Tensor], afters: Sequence[Any], hp: Mapping[str, Any], step: int) -> Tensor:
    """``d loss / d raw (lr, beta1, beta2)`` of one group, as ``hypergrad.core.hypergradients`` computes it from
    :func:`vjp` (bit for bit), where :func:`adam_numbers_ready`."""
    entry = _den_entry(list(afters), hp, step)
    assert entry is not None and entry.nums is not None
    n = entry.nums
    sums = _adam_dots(list(grads_next), list(afters), hp, None, entry.den)
    num = type(n.lr)
    q_m0, q_g1, w_v0, w_g2 = (num(x) for x in torch.stack([sums[0], sums[1], sums[3], sums[4]]).tolist())
    with np.errstate(all="ignore"):
        out = _adam_sums(_ADAM, q_m0, q_g1, None, w_v0, w_g2, n.lr, n.b1, n.b2, n.c1, n.c2, n.dc1, n.dc2, n.a1, n.a2)
        # what level 0 updated moved by -delta: -(upstream . d delta / d value) times the transform's slope
        cols = [-out["lr"], -out["beta1"] * n.d1, -out["beta2"] * n.d2]
    return torch.tensor([float(c) for c in cols], dtype=grads_next[0].dtype)
