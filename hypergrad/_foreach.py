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


_DENS: dict[int, _Den] = {}


def _remember_den(vs: list[Tensor], hp: Mapping[str, Any], step: int, den: Any) -> None:
    for key in [k for k, e in _DENS.items() if e.refs[0]() is None] + list(_DENS)[:-3]:  # dead, or beyond 4 entries
        _DENS.pop(key, None)
    _DENS[id(vs[0])] = _Den([weakref.ref(v) for v in vs], [v._version for v in vs], hp, step, den)


def _recall_den(afters: list[Any], hp: Mapping[str, Any], step: int) -> Any:
    vs = [a.exp_avg_sq for a in afters]
    entry = _DENS.pop(id(vs[0]), None)
    if entry is None or entry.hp is not hp or entry.step != step or len(entry.refs) != len(vs):
        return None
    if any(r() is not v or v._version != n for r, v, n in zip(entry.refs, vs, entry.versions, strict=True)):
        return None
    return entry.den


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
    corrections = _corrections(rule, hp, step, grads[0], compiled, slopes=False)  # the update reads c1, c2 alone
    # Eager Adam with a learned value keeps what the next step's vjp recomputes (see _Den); compiled, it is fused.
    keep = not compiled and type(rule) in (AdamRule, AdamWRule) and any(isinstance(v, Tensor) for v in hp.values())
    out = _run(_update, compiled, rule, grads, list(states), hp, corrections, keep)
    if out is None:
        return None
    deltas, states_out, den = out
    if den is not None:
        _DENS.pop(id(states[0].exp_avg_sq), None)  # the last step's entry, which no vjp will ask for now
        _remember_den([s.exp_avg_sq for s in states_out], hp, step, den)
    return deltas, states_out


def _update(
    rule: Rule, grads: list[Tensor], states: list[Any], hp: Mapping[str, Any], corrections: Any, keep: bool = False
):
    """The deltas, the new states, and (``keep``: Adam only) the ``sqrt(v_hat)`` and ``sqrt(v_hat) + eps`` used."""
    kind = type(rule)
    if kind is SGDRule:
        return (*_sgd(grads, states, hp), None)
    if kind in (AdamRule, AdamWRule):
        c1, c2, _, _ = corrections
        delta, fields, den = _adam(grads, states, hp, c1, c2, keep)
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
    grads: list[Tensor], states: Sequence[Any], hp: Mapping[str, Any], c1: Any, c2: Any, keep: bool = False
) -> tuple[list[Tensor], list[list[Any]], Any]:
    # The operations of rules.adam_step in its order; products and sums of two terms commute bitwise.
    beta1, beta2 = hp["beta1"], hp["beta2"]
    m0, v0 = [s.exp_avg for s in states], [s.exp_avg_sq for s in states]
    a1, a2 = _one_minus(beta1), _one_minus(beta2)
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
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    m_after = [a.exp_avg for a in afters]
    if kept is None:
        sqrt_v_hat = torch._foreach_div([a.exp_avg_sq for a in afters], c2)
        torch._foreach_sqrt_(sqrt_v_hat)
        den = torch._foreach_add(sqrt_v_hat, hp["eps"])
        a1 = a2 = None
    else:
        sqrt_v_hat, den, _, _, a1, a2 = kept
    q = torch._foreach_div(grads_next, den)
    out: dict[str, Tensor] = {}
    if _learned(hp, "beta1"):
        qf = [_flat(x) for x in q]  # flattened once for both dots
        q_m0 = _dots(qf, [a.previous_exp_avg for a in afters], flat=True)
        q_g1 = _dots(qf, [a.grad_term for a in afters], flat=True)
        q_m = b1 * q_m0 + q_g1
        out["beta1"] = lr * ((q_m0 - q_g1 / (_one_minus(b1) if a1 is None else a1)) / c1 + q_m * dc1 / (c1 * c1))
    else:
        q_m = _dots(q, m_after)
    if _learned(hp, "lr"):
        out["lr"] = q_m / c1
    if _learned(hp, "beta2"):
        w = torch._foreach_mul(q, m_after)  # q * m / (den * sqrt(v_hat))
        torch._foreach_mul_(den, sqrt_v_hat)
        torch._foreach_div_(w, den)
        wf = [_flat(x) for x in w]
        w_v0 = _dots(wf, [a.previous_exp_avg_sq for a in afters], flat=True)
        w_g2 = _dots(wf, [a.grad_sq_term for a in afters], flat=True)
        w_v = b2 * w_v0 + w_g2
        # -0.5 lr / c1 (...), with the division last: lr and c1 may be floats, and 1.0 / 0.0 raises in Python.
        out["beta2"] = (
            -0.5 * lr * ((w_v0 - w_g2 / (_one_minus(b2) if a2 is None else a2)) / c2 + w_v * dc2 / (c2 * c2)) / c1
        )
    return out
