"""Multi-tensor (``torch._foreach_*``) versions of the built-in rules over all tensors of one param group.

A speed-up only, never a second definition: :mod:`hypergrad.rules` stays the definition, and tests compare these
functions with it.

- ``update(rule, grads, states, hp, step)`` equals ``[rule.update(g, s, hp, step) for ...]`` **bitwise**: the same
  elementwise operations in the same order, only issued as one kernel launch (or one dispatch) per operation over
  all tensors instead of one per tensor. Where a result is not kept, the operation runs in place (same values, fewer
  allocations).
- ``vjp(rule, grads_next, grads, befores, afters, hp, step)`` equals the sum over the group of ``rule.vjp(...)`` to
  float round-off, not bitwise: the per-tensor vjp multiplies each tensor's dot products by scalar factors and then
  sums over tensors, this one sums the dot products over tensors first and applies the factors once (the formulas
  are linear in the dots), which saves a dozen scalar operations per tensor. The tests hold it to 1e-12 in float64.

Both return ``None`` where they do not apply (a rule that is not built in, hyperparameters with population
dimensions, tensors on different devices or of different dtypes); the caller then takes the per-tensor path.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

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


# -- level 0 updates --------------------------------------------------------------------------------------------
def update(
    rule: Rule,
    grads: Sequence[Tensor],
    states: Sequence[Any],
    hp: Mapping[str, Any],
    step: int,
    learned: Collection[str] | None = None,
) -> tuple[list[Tensor], list[Any]] | None:
    """The deltas and new states of ``rule`` for every tensor of a group, or None where foreach does not apply.

    ``learned`` names the learned hyperparameters when their values are given as floats (by default: the tensors).
    """
    grads = list(grads)
    if not applies(rule, grads, hp):
        return None
    kind = type(rule)
    if kind is SGDRule:
        return _sgd(grads, states, hp, _learned(hp, learned))
    if kind is AdamRule:
        m, v, delta = _adam(grads, [s.exp_avg for s in states], [s.exp_avg_sq for s in states], hp, step)
        return list(delta), [AdamState(a, b) for a, b in zip(m, v, strict=True)]
    if kind is AdamWRule:
        params = [s.param for s in states]
        m, v, delta = _adam(grads, [s.exp_avg for s in states], [s.exp_avg_sq for s in states], hp, step)
        # delta + (lr * wd) * param, as AdamWRule.update
        torch._foreach_add_(delta, torch._foreach_mul(params, hp["lr"] * hp["weight_decay"]))
        new_params = torch._foreach_sub(params, delta)
        return list(delta), [AdamWState(*t) for t in zip(m, v, new_params, strict=True)]
    if kind is AdaGradRule:
        sums = torch._foreach_add([s.sum for s in states], torch._foreach_pow(grads, 2))  # sum + square(g)
        den = torch._foreach_add(sums, hp["eps"])
        torch._foreach_sqrt_(den)
        delta = torch._foreach_mul(grads, hp["lr"])  # (lr * g) / sqrt(sum + eps)
        torch._foreach_div_(delta, den)
        return list(delta), [SumState(s) for s in sums]
    if kind is RMSPropRule:
        gamma = hp["gamma"]
        sums = torch._foreach_mul([s.sum for s in states], gamma)
        sq = torch._foreach_pow(grads, 2)
        torch._foreach_mul_(sq, 1.0 - gamma)  # (1 - gamma) * square(g), as a product it commutes bitwise
        torch._foreach_add_(sums, sq)
        den = torch._foreach_add(sums, hp["eps"])
        torch._foreach_sqrt_(den)
        delta = torch._foreach_mul(grads, hp["lr"])
        torch._foreach_div_(delta, den)
        return list(delta), [SumState(s) for s in sums]
    return None


def _learned(hp: Mapping[str, Any], learned: Collection[str] | None) -> Collection[str]:
    return [n for n, v in hp.items() if isinstance(v, Tensor)] if learned is None else learned


def _sgd(
    grads: list[Tensor], states: Sequence[Any], hp: Mapping[str, Any], learned: Collection[str]
) -> tuple[list[Tensor], list[Any]]:
    momentum = hp["momentum"]
    if "momentum" not in learned and momentum == 0.0:  # a fixed zero momentum keeps no buffer
        return list(torch._foreach_mul(grads, hp["lr"])), list(states)
    old = [i for i, s in enumerate(states) if s.momentum_buffer is not None]
    new = [i for i, s in enumerate(states) if s.momentum_buffer is None]
    bufs: list[Tensor | None] = [None] * len(grads)
    if old:
        kept = torch._foreach_mul([states[i].momentum_buffer for i in old], momentum)
        torch._foreach_add_(kept, [grads[i] for i in old])
        for i, b in zip(old, kept, strict=True):
            bufs[i] = b
    if new:  # the first buffer is a copy of the gradient, as in SGDRule
        for i in new:
            bufs[i] = grads[i].clone()
    return list(torch._foreach_mul(bufs, hp["lr"])), [SGDState(b) for b in bufs]


def _adam(
    grads: list[Tensor], m0: list[Tensor], v0: list[Tensor], hp: Mapping[str, Any], step: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    # The operations of AdamRule.update in its order; products of two factors commute bitwise.
    beta1, beta2 = hp["beta1"], hp["beta2"]
    m = torch._foreach_mul(m0, beta1)
    torch._foreach_add_(m, torch._foreach_mul(grads, 1.0 - beta1))
    v = torch._foreach_mul(v0, beta2)
    g2 = torch._foreach_mul(grads, 1.0 - beta2)  # ((1 - b2) * g) * g
    torch._foreach_mul_(g2, grads)
    torch._foreach_add_(v, g2)
    delta = torch._foreach_div(m, 1.0 - beta1 ** float(step))  # m_hat
    den = torch._foreach_div(v, 1.0 - beta2 ** float(step))  # v_hat
    torch._foreach_sqrt_(den)  # v_hat ** 0.5, which torch computes as sqrt
    torch._foreach_add_(den, hp["eps"])
    torch._foreach_div_(delta, den)
    torch._foreach_mul_(delta, hp["lr"])
    return m, v, delta


# -- closed-form vector-Jacobian products -----------------------------------------------------------------------
def _dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """sum_i <a_i, b_i> over the group's tensors."""
    dots = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]
    return dots[0] if len(dots) == 1 else torch.stack(dots).sum()


def vjp(
    rule: Rule,
    grads_next: Sequence[Tensor],
    grads: Sequence[Tensor],
    befores: Sequence[Any],
    afters: Sequence[Any],
    hp: Mapping[str, Any],
    step: int,
    learned: Collection[str] | None = None,
) -> dict[str, Tensor] | None:
    """``sum over the group of grad_next . d delta / d hp[name]`` for every learned hyperparameter (``learned``, by
    default the tensors of ``hp``), or None where foreach does not apply; equal to summing :meth:`Rule.vjp` over the
    tensors, to round-off."""
    grads_next, grads = list(grads_next), list(grads)
    if not rule.has_vjp or not applies(rule, grads, hp):
        return None
    learned = _learned(hp, learned)
    kind = type(rule)
    out: dict[str, Tensor] = {}
    if kind is SGDRule:
        bufs = [g if a.momentum_buffer is None else a.momentum_buffer for g, a in zip(grads, afters, strict=True)]
        if "lr" in learned:
            out["lr"] = _dots(grads_next, bufs)
        if "momentum" in learned:
            pairs = [
                (u, b.momentum_buffer)
                for u, b in zip(grads_next, befores, strict=True)
                if b.momentum_buffer is not None
            ]
            if pairs:
                out["momentum"] = hp["lr"] * _dots([u for u, _ in pairs], [b for _, b in pairs])
            else:  # the first step: no buffer before, so the momentum had nothing to act on
                out["momentum"] = hp["lr"] * torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        return out
    if kind is AdamRule:
        return _adam_vjp(grads_next, grads, befores, afters, hp, step, learned)
    if kind in (AdaGradRule, RMSPropRule):
        sums = [a.sum for a in afters]
        den = torch._foreach_add(sums, hp["eps"])  # s + eps, kept for the gamma term
        root = torch._foreach_sqrt(den)
        r = torch._foreach_div(grads, root)  # g / sqrt(s + eps)
        if "lr" in learned:
            out["lr"] = _dots(grads_next, r)
        if kind is RMSPropRule and "gamma" in learned:
            torch._foreach_div_(r, den)  # r / (s + eps) * (s0 - g * g)
            torch._foreach_mul_(r, torch._foreach_sub([b.sum for b in befores], torch._foreach_mul(grads, grads)))
            out["gamma"] = -0.5 * hp["lr"] * _dots(grads_next, r)
        return out
    return None


def _adam_vjp(grads_next, grads, befores, afters, hp, step, learned) -> dict[str, Tensor]:
    # The formulas of AdamRule.vjp with the dots summed over the group before the scalar factors.
    lr, b1, b2, t = hp["lr"], hp["beta1"], hp["beta2"], float(step)
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t
    m_after = [a.exp_avg for a in afters]
    sqrt_v_hat = torch._foreach_div([a.exp_avg_sq for a in afters], c2)
    torch._foreach_sqrt_(sqrt_v_hat)
    den = torch._foreach_add(sqrt_v_hat, hp["eps"])
    q = torch._foreach_div(grads_next, den)
    out: dict[str, Tensor] = {}
    if "beta1" in learned:
        q_m0, q_g = _dots(q, [b.exp_avg for b in befores]), _dots(q, grads)
        q_m = b1 * q_m0 + (1.0 - b1) * q_g
        out["beta1"] = lr * ((q_m0 - q_g) / c1 + q_m * t * b1 ** (t - 1.0) / (c1 * c1))
    else:
        q_m = _dots(q, m_after)
    if "lr" in learned:
        out["lr"] = q_m / c1
    if "beta2" in learned:
        w = torch._foreach_mul(q, m_after)  # q * m / (den * sqrt(v_hat))
        torch._foreach_mul_(den, sqrt_v_hat)
        torch._foreach_div_(w, den)
        w_v0 = _dots(w, [b.exp_avg_sq for b in befores])
        torch._foreach_mul_(w, grads)
        w_g2 = _dots(w, grads)
        w_v = b2 * w_v0 + (1.0 - b2) * w_g2
        # -0.5 lr / c1 (...), with the division last: lr and c1 may be floats, and 1.0 / 0.0 raises in Python.
        out["beta2"] = -0.5 * lr * ((w_v0 - w_g2) / c2 + w_v * t * b2 ** (t - 1.0) / (c2 * c2)) / c1
    return out
