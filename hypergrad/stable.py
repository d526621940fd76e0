"""The opt-in stable tower mode (``hypergrad.tower(spec, params, stable=True)``; docs/stable.md).

Changes to the paper's method, all outside the functional core:

1. **Log step sizes.** Every learned step size is stored as its logarithm (the ``"log"`` parameterization), so no
   step size of any level can turn negative, and a hyper-update changes a step size by a *factor*.
2. **A trust region on the paper's own hyper-update** (:class:`TrustRegionRule`, the default): every level above the
   weights' optimizer computes the reference's update in the reference's coordinates and moves the stored value (a
   log step size, a beta's raw value) by ``radius * tanh(update / radius)``: to first order the paper's step, never
   more than ``radius`` (a factor e^0.1 on a step size) per step.
3. **Hyperparameters kept in their domain:** a learned SGD momentum is stored as ``(tanh(x)+1)/2`` and an Adam base
   bias-corrects with the product of the betas it used (:class:`StableSGDRule`, :class:`StableAdamRule`).

``stabilize(tower, method="normalized")`` is the measured alternative (:class:`StableRule`: Adam-style normalized
hypergradients under the same bound); it is safe too but learns nothing at small top hyper-steps. The paper's
reference (``stable=False``) is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from hypergrad.rules import HP, AdamRule, Rule, SGDRule, adam_step, adam_vjp
from hypergrad.spec import Level, Tower
from hypergrad.transforms import EXP, HALF_TANH, IDENTITY, Transform

__all__ = [
    "RADIUS",
    "StableAdamRule",
    "StableAdamState",
    "StableRule",
    "StableSGDRule",
    "StableState",
    "TrustRegionRule",
    "TrustState",
    "stabilize",
]

#: Largest change of a raw hyperparameter per step: a step size changes by at most a factor e^0.1 ~ 1.105 per step.
RADIUS = 0.1


class StableState(NamedTuple):
    inner: Any  # the wrapped rule's state
    sq: Tensor  # running mean of the squared hypergradient, per hyperparameter


class StableRule(Rule):
    """A hyper level's rule, fed normalized hypergradients and with each update bounded to ``(-radius, radius)``.

    ``update(g) = radius * tanh(inner.update(g / (sqrt(v_hat) + eps)) / radius)`` with
    ``v = beta v + (1 - beta) g^2`` and ``v_hat = v / (1 - beta^t)``. The name, defaults, transforms and learnable
    hyperparameters are those of the wrapped rule, so a stable tower is spelled as the plain one. It has no
    closed-form ``vjp``: the tensors it updates are hyperparameter vectors of a few entries, which the default vjp
    (autograd through ``update``) differentiates at negligible cost.

    >>> import torch
    >>> from hypergrad.rules import SGDRule
    >>> rule = StableRule(SGDRule())
    >>> state = rule.init(torch.zeros(2), {"lr": 1e-3, "momentum": 0.0})
    >>> delta, state = rule.update(torch.tensor([1e-30, -1e30]), state, {"lr": 1e-3, "momentum": 0.0}, 1)
    >>> [round(x, 6) for x in delta.tolist()]  # the same step for hypergradients sixty decades apart
    [0.001, -0.001]
    """

    def __init__(self, inner: Rule, *, beta: float = 0.99, eps: float = 1e-300, radius: float = RADIUS) -> None:
        if isinstance(inner, StableRule):
            raise ValueError("StableRule must wrap a plain rule, but got another StableRule")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), but got {beta!r}")
        if not (radius > 0.0 and math.isfinite(radius)):
            raise ValueError(f"radius must be a finite number > 0, but got {radius!r}")
        self.inner, self.beta, self.eps, self.radius = inner, beta, eps, radius
        self.name = inner.name  # type: ignore[misc]
        self.defaults = inner.defaults  # type: ignore[misc]
        self.transforms = _bounded(inner.transforms)  # type: ignore[misc]

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        return self.inner.learnable(values)

    def init(self, param: Tensor, hp: HP) -> StableState:
        return StableState(self.inner.init(param, hp), torch.zeros_like(param))

    def update(self, grad: Tensor, state: StableState, hp: HP, step: int) -> tuple[Tensor, StableState]:
        # The hypergradient can be 1e-30 or 1e30: square it in float64 so that neither underflows nor overflows.
        g64 = grad.detach().double()
        sq = self.beta * state.sq.double() + (1.0 - self.beta) * g64 * g64
        scale = (sq / (1.0 - self.beta ** float(step))).sqrt() + self.eps
        normalized = (g64 / scale).to(grad.dtype)
        delta, inner = self.inner.update(normalized, state.inner, hp, step)
        return self.radius * torch.tanh(delta / self.radius), StableState(inner, sq.to(state.sq.dtype))

    def __repr__(self) -> str:
        return f"StableRule({self.inner!r}, beta={self.beta}, radius={self.radius})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StableRule)
            and other.inner == self.inner
            and (other.beta, other.eps, other.radius) == (self.beta, self.eps, self.radius)
        )

    def __hash__(self) -> int:
        return hash((StableRule, self.inner, self.beta, self.eps, self.radius))


def _bounded(transforms: Mapping[str, Transform]) -> dict[str, Transform]:
    # Momentum is stored raw in the reference: a bounded hyper-update still walks it past 1 (measured: loss 1e4 in
    # 40 steps at hyper-step 0.1). Stored as (tanh(x) + 1) / 2, like Adam's betas, it stays in (0, 1).
    return {n: HALF_TANH if n == "momentum" else t for n, t in transforms.items()}


class StableSGDRule(SGDRule):
    """SGD whose learned momentum stays in (0, 1): stored as ``(tanh(x) + 1) / 2`` (the update is SGD's)."""

    transforms: ClassVar[Mapping[str, Transform]] = {"lr": IDENTITY, "momentum": HALF_TANH}


class StableAdamState(NamedTuple):
    exp_avg: Tensor
    exp_avg_sq: Tensor
    prod1: Tensor  # product of every beta1 used so far
    prod2: Tensor  # product of every beta2 used so far
    previous_exp_avg: Tensor | None = None  # what the closed-form vjp reads, as in AdamState
    previous_exp_avg_sq: Tensor | None = None
    grad_term: Tensor | None = None
    grad_sq_term: Tensor | None = None
    previous_prod1: Tensor | None = None  # the products before the last step: -d(1 - prod) / d beta
    previous_prod2: Tensor | None = None


class StableAdamRule(AdamRule):
    """Adam whose bias correction divides by ``1 - prod_s beta_s`` (the betas actually used) instead of
    ``1 - beta^t``.

    With constant betas the two are equal, and so is the update. With learned betas, ``1 - beta1^t`` turns the
    bias correction into a step-size amplifier: raising beta1 late in training shrinks ``1 - beta1^t`` and
    inflates ``m_hat`` although ``m`` was averaged with the earlier betas, and a greedy hypergradient finds this
    (beta1 -> 0.9999 in 300 steps, measured). With the products, the correction of a late step is ~1 whatever
    beta1 becomes, and the hypergradient sees only beta1's real effect on the average.
    """

    def init(self, param: Tensor, hp: HP) -> StableAdamState:
        one = torch.ones((), dtype=param.dtype, device=param.device)
        return StableAdamState(torch.zeros_like(param), torch.zeros_like(param) + hp["eps"], one, one)

    def update(self, grad: Tensor, state: StableAdamState, hp: HP, step: int) -> tuple[Tensor, StableAdamState]:
        prod1, prod2 = state.prod1 * hp["beta1"], state.prod2 * hp["beta2"]
        delta, fields = adam_step(grad, state, hp, 1.0 - prod1, 1.0 - prod2)
        # The products are kept without history: the next step differentiates only its own betas' factor.
        prods = (torch.as_tensor(prod1).detach(), torch.as_tensor(prod2).detach())
        return delta, StableAdamState(*fields[:2], *prods, *fields[2:], state.prod1, state.prod2)

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # c_i = 1 - prod_i(before) * beta_i, so -d c_i / d beta_i = prod_i(before)
        c1, c2 = 1.0 - after.prod1, 1.0 - after.prod2
        return adam_vjp(grad_next, after, hp, c1, c2, after.previous_prod1, after.previous_prod2, dot)


class TrustState(NamedTuple):
    inner: Any  # the wrapped rule's state
    raw: Tensor  # the stored (raw) values of the hyperparameters this level updates: it is their only updater


class TrustRegionRule(Rule):
    """A hyper level that takes the paper's step, measured in the reference's parameterization, but moves each stored
    value (a log step size, a beta's raw value) by at most ``radius`` per step.

    For the hyperparameter ``y`` below, stored as ``x`` (``y = S(x)``, e.g. ``exp``) where the reference stores
    ``z`` (``y = R(z)``, e.g. the identity), the wrapped rule receives the reference's hypergradient
    ``g_z = g_x R'(z) / S'(x)`` and returns the reference's update ``u_z``; the stored value moves by
    ``radius * tanh(u_z S'(x)^-1 R'(z) / radius)``: to first order the reference's step, never more than
    ``radius``. Since this level is the only one that updates ``x``, its state tracks ``x`` exactly.
    """

    def __init__(self, inner: Rule, below: tuple[tuple[Transform, Transform], ...], *, radius: float = RADIUS) -> None:
        if not (radius > 0.0 and math.isfinite(radius)):
            raise ValueError(f"radius must be a finite number > 0, but got {radius!r}")
        self.inner, self.below, self.radius = inner, below, radius
        self.name = inner.name  # type: ignore[misc]
        self.defaults = inner.defaults  # type: ignore[misc]
        self.transforms = _bounded(inner.transforms)  # type: ignore[misc]

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        return self.inner.learnable(values)

    def init(self, param: Tensor, hp: HP) -> TrustState:
        return TrustState(self.inner.init(param, hp), param.detach().clone())

    def _ratio(self, x: Tensor) -> Tensor:
        # dz/dx = S'(x) / R'(z), per stored column, held constant (it is a function of what this level updated).
        cols = []
        for i, (stored, ref) in enumerate(self.below):
            xi = x[..., i]
            s = torch.ones_like(xi) if stored.derivative is None else stored.derivative(xi)
            z = ref.inverse(stored.forward(xi))
            r = torch.ones_like(xi) if ref.derivative is None else ref.derivative(z)
            cols.append(s / r)
        return torch.stack(cols, dim=-1)

    def update(self, grad: Tensor, state: TrustState, hp: HP, step: int) -> tuple[Tensor, TrustState]:
        with torch.no_grad():
            dz_dx = self._ratio(state.raw).clamp_min(1e-300 if state.raw.dtype == torch.float64 else 1e-37)
            g_ref = grad / dz_dx
        u_ref, inner = self.inner.update(g_ref, state.inner, hp, step)
        delta = self.radius * torch.tanh(u_ref / dz_dx / self.radius)
        return delta, TrustState(inner, (state.raw - delta).detach())

    def __repr__(self) -> str:
        return f"TrustRegionRule({self.inner!r}, radius={self.radius})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustRegionRule) and (other.inner, other.below, other.radius) == (
            self.inner,
            self.below,
            self.radius,
        )

    def __hash__(self) -> int:
        return hash((TrustRegionRule, self.inner, self.radius))


_STABLE_BASES: dict[type, type] = {AdamRule: StableAdamRule, SGDRule: StableSGDRule}


def stabilize(tower: Tower, method: str = "trust", **kw: float) -> Tower:
    """The same tower with every level above the weights' optimizer wrapped in a :class:`StableRule`, an Adam
    base bias-corrected with the products of its betas (:class:`StableAdamRule`) and an SGD base's momentum kept
    in (0, 1) (:class:`StableSGDRule`)."""
    if method not in ("trust", "normalized"):
        raise ValueError(f"method must be 'trust' or 'normalized', but got {method!r}")
    base = tower.levels[0]
    if type(base.rule) in _STABLE_BASES:
        base = Level(_STABLE_BASES[type(base.rule)](), dict(base.values), base.learned)
    levels = [base]
    for level in tower.levels[1:]:
        below = levels[-1]
        if isinstance(level.rule, StableRule | TrustRegionRule):
            rule = level.rule
        elif method == "normalized":
            rule = StableRule(level.rule, **kw)
        else:
            stored = _bounded(below.rule.transforms)
            pairs = tuple(
                (EXP if n == "lr" else stored[n], _reference_transform(below.rule, n)) for n in below.learned_names()
            )
            rule = TrustRegionRule(level.rule, pairs, **kw)
        levels.append(Level(rule, dict(level.values), level.learned))
    return Tower(tuple(levels))


def _reference_transform(rule: Rule, name: str) -> Transform:
    inner = rule.inner if isinstance(rule, StableRule | TrustRegionRule) else rule
    for cls in type(inner).__mro__:  # the stable bases subclass the reference rules: use the reference's storage
        if cls in _STABLE_BASES and name in cls.transforms:
            return cls.transforms[name]
    return inner.transforms[name]
