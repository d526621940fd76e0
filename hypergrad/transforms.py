"""How a learned hyperparameter is stored: a raw, unconstrained tensor and its natural value.

The hyperoptimizer above a level updates the *raw* tensor; the level's update rule sees the natural value. These
are the reference implementation's choices (Chandra et al. 2022, ``gdtuo``), plus an opt-in log scale for step sizes
that can never turn negative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["EXP", "HALF_TANH", "IDENTITY", "SQUARE", "Transform", "value_and_slope"]


class Transform(NamedTuple):
    """A bijection between raw storage and natural value; ``forward`` must be differentiable."""

    name: str
    forward: Callable[[Tensor], Tensor]  # raw -> natural value
    inverse: Callable[[Tensor], Tensor]  # natural value -> raw
    derivative: Callable[[Tensor], Tensor] | None = None  # d forward / d raw at raw; None for the identity


def _half_tanh(x: Tensor) -> Tensor:
    return (x.tanh() + 1.0) / 2.0


def _half_tanh_inverse(y: Tensor) -> Tensor:
    # Written as in the reference so that initial raw values agree to the last bit.
    z = y * 2.0 - 1.0
    return ((1.0 + z) / (1.0 - z)).log() / 2.0


def _half_tanh_derivative(x: Tensor) -> Tensor:
    # (1.0 - tanh(x)^2) / 2.0, with torch.rsub called directly: Tensor.__rsub__ is a Python wrapper around it
    return torch.rsub(x.tanh().square(), 1.0) / 2.0


IDENTITY = Transform("identity", lambda x: x, lambda y: y)
SQUARE = Transform("square", torch.square, torch.sqrt, lambda x: 2.0 * x)  # reference RMSProp stores sqrt(lr)
# Reference betas and gamma live in (0, 1).
HALF_TANH = Transform("half_tanh", _half_tanh, _half_tanh_inverse, _half_tanh_derivative)
EXP = Transform("exp", torch.exp, torch.log, torch.exp)  # opt-in: a step size stored as its log stays positive


def value_and_slope(t: Transform, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(t.forward(x), t.derivative(x))`` (None for the identity) by the same operations, a shared ``tanh`` or
    ``exp`` computed once: the same numbers as calling both."""
    if t is HALF_TANH:
        th = x.tanh()
        return (th + 1.0) / 2.0, torch.rsub(th.square(), 1.0) / 2.0
    if t is EXP:
        e = torch.exp(x)
        return e, e
    return t.forward(x), None if t.derivative is None else t.derivative(x)
