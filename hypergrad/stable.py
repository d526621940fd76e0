"""The opt-in stable tower mode (``hypergrad.tower(spec, params, stable=True)``; docs/stable.md).

Changes to the paper's method, all outside the functional core:

1. **Log step sizes.** Every learned step size is stored as its logarithm (the ``"log"`` parameterization), so no
   step size of any level can turn negative, and a hyper-update changes a step size by a *factor*.
2. **An adaptive trust region on the paper's own hyper-update** (:class:`TrustRegionRule`, the default): every level
   above the weights' optimizer computes the reference's update ``u`` in the reference's coordinates and moves the
   stored value (a log step size, a beta's raw value) by ``r * tanh(c * u / r)``. The radius ``r`` (0.1 at first,
   at most 1: a factor e on a step size per step) and the gain ``c >= 1`` grow while the update keeps its sign and
   shrink when it flips, as Rprop adapts its step sizes.
3. **A guard on the weights' step** (:class:`GuardedRule`): one base step moves a tensor by at most ``GUARD`` times
   its initial norm, so a step size far too large (Adam at 10) cannot ruin the network before the tower reacts; and,
   for every base but Adam and AdamW, a step-size hypergradient over a horizon of ~1/(1 - HORIZON) steps (SGD with
   momentum and RMSProp: the "adaptive" trail, forgotten as fast as the step size falls).
4. **Hyperparameters kept in their domain:** a learned step size stays in ``[e^-MAX_LOG_LR, e^MAX_LOG_LR]`` (where
   float32 represents it), a learned SGD momentum is stored as ``(tanh(x)+1)/2`` and limited to
   ``[1 - MAX_MOMENTUM, MAX_MOMENTUM]``, an Adam or AdamW base bias-corrects with the product of the betas it used,
   and a learned AdamW weight decay is stored as its logarithm, like a step size, so it stays > 0 (a zero one is
   not learned) (:class:`StableSGDRule`, :class:`StableAdamRule`, :class:`StableAdamWRule`).
5. **SGD with momentum averages its gradients** (:class:`StableMomentumRule`): the step is ``lr * D_t / (1 - mu_0)``
   with ``D_t`` an exponential average of the gradients and ``mu_0`` the initial momentum, the reference's steps while
   the momentum stays ``mu_0``; a learned momentum then sets how long the average is, not how large the step is.

``stabilize(tower, method="normalized")`` is the measured alternative (:class:`StableRule`: Adam-style normalized
hypergradients under the same bound); it is safe too but learns nothing at small top hyper-steps. The paper's
reference (``stable=False``) is left untouched.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from hypergrad.rules import (
    HP,
    AdamRule,
    AdamWRule,
    RMSPropRule,
    Rule,
    SGDRule,
    _learned,
    _one_minus,
    adam_step,
    adam_vjp,
    adamw_decay_vjp,
)
from hypergrad.spec import Level, Tower
from hypergrad.transforms import EXP, HALF_TANH, IDENTITY, Transform

__all__ = [
    "RADIUS",
    "GuardState",
    "GuardedRule",
    "StableAdamRule",
    "StableAdamState",
    "StableAdamWRule",
    "StableAdamWState",
    "StableMomentumRule",
    "StableMomentumState",
    "StableRule",
    "StableSGDRule",
    "StableState",
    "TrustRegionRule",
    "TrustState",
    "stabilize",
]

#: Initial trust radius: the largest first change of a raw hyperparameter (a step size by a factor e^0.1 ~ 1.105).
RADIUS = 0.1
#: Rprop's factors: the radius grows by GROW per step while the region binds and the step keeps its sign, and
#: shrinks by SHRINK when the sign flips.
GROW, SHRINK = 1.2, 0.5
#: The radius stays in [MIN_RADIUS, MAX_RADIUS]: a step size changes by at most a factor e per step.
MIN_RADIUS, MAX_RADIUS = 1e-3, 1.0
#: The gain on the reference's update stays in [1, MAX_GAIN]: a top hyper-step up to 12 decades too small still
#: learns, and the stable mode never moves slower than the reference inside the region.
MAX_GAIN = 1e12
#: The weight guard (:class:`GuardedRule`, the stable mode's level 0): one base step moves a tensor by at most GUARD
#: times its initial norm (measured on the MNIST MLP: a healthy Adam or SGD step moves a tensor by 1-5% of it, the
#: steps that ruin a network at step size 10 by 10-500 times it).
GUARD = 0.3
#: The horizon of the step-size hypergradient of SGD, AdaGrad and RMSProp: the level above sees
#: ``d loss_t / d log lr`` as if the step size had scaled every earlier step, decayed by HORIZON per step (0: the
#: paper's one-step hypergradient). Adam and AdamW keep 0; SGD with momentum takes MOMENTUM_HORIZON.
HORIZON = 0.99
#: The horizon of an SGD-with-momentum base (:class:`StableMomentumRule`): ~33 steps. With 0.99 the tower raised the
#: effective step size past where the weight guard binds (to 30 on mnist5k, best fixed 10) and stayed there.
MOMENTUM_HORIZON = 0.97
#: A learned SGD momentum stays in [1 - MAX_MOMENTUM, MAX_MOMENTUM]: its stored value x (momentum = (tanh x + 1)/2)
#: is clamped to |x| <= atanh(2 MAX_MOMENTUM - 1). Unclamped, a run of "larger" took x past 9, where tanh is 1 in
#: float32: momentum exactly 1 (the buffer a plain sum of every gradient) with a zero hypergradient, for good.
MAX_MOMENTUM = 0.99
#: A learned step size stays in [e^-MAX_LOG_LR, e^MAX_LOG_LR] (about [2e-35, 6e34]), where float32 represents it as a
#: normal number: its stored log is clamped to |x| <= MAX_LOG_LR. Unclamped, a tower trained long past convergence
#: (digits CNN, 60 epochs) kept lowering its step size on a vanishing "smaller", by up to a factor e per step, to a
#: denormal ~1e-41, where the hypergradient became NaN and the run stopped (5 of 210 towers; docs/stable.md).
MAX_LOG_LR = 80.0
#: What the horizon's trail sums: "steps" (the steps taken, ``delta_t``) or "directions" (the steps per unit step
#: size, ``delta_t / lr_t``).
TRAILS = ("steps", "directions", "adaptive")


class StableState(NamedTuple):
    inner: Any  # the wrapped rule's state
    sq: Tensor  # running mean of the squared hypergradient, per hyperparameter


class _HyperLevel(Rule):
    """What both stable hyper levels share: they wrap a plain rule, keep its spelling (name, defaults, learnable
    hyperparameters), store a momentum below them in (0, 1) and bound each update by a trust radius."""

    def __init__(self, inner: Rule, radius: float) -> None:
        if isinstance(inner, _HyperLevel):
            raise ValueError(f"{type(self).__name__} must wrap a plain rule, but got {type(inner).__name__}")
        _check_positive("radius", radius)
        self.inner, self.radius = inner, radius
        self.name = inner.name  # type: ignore[misc]
        self.defaults = inner.defaults  # type: ignore[misc]
        self.transforms = _bounded(inner.transforms)  # type: ignore[misc]

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        return self.inner.learnable(values)


def _check_positive(key: str, value: float) -> None:
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{key} must be a finite number > 0, but got {value!r}")


def trust(update: Tensor, radius: Tensor | float) -> Tensor:
    """The trust region of every stable hyper-update: ``radius * tanh(update / radius)``, the update itself to first
    order, never more than ``radius`` in size, and differentiable (the level above still gets an exact
    hypergradient)."""
    return radius * torch.tanh(update / radius)


class StableRule(_HyperLevel):
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
        super().__init__(inner, radius)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), but got {beta!r}")
        self.beta, self.eps = beta, eps

    def init(self, param: Tensor, hp: HP) -> StableState:
        return StableState(self.inner.init(param, hp), torch.zeros_like(param))

    def update(self, grad: Tensor, state: StableState, hp: HP, step: int) -> tuple[Tensor, StableState]:
        # The hypergradient can be 1e-30 or 1e30: square it in float64 so that neither underflows nor overflows.
        g64 = grad.detach().double()
        sq = self.beta * state.sq.double() + (1.0 - self.beta) * g64 * g64
        scale = (sq / (1.0 - self.beta ** float(step))).sqrt() + self.eps
        normalized = (g64 / scale).to(grad.dtype)
        delta, inner = self.inner.update(normalized, state.inner, hp, step)
        return trust(delta, self.radius), StableState(inner, sq.to(state.sq.dtype))

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


class StableMomentumState(NamedTuple):
    average: Tensor  # the gradients' exponential average, D_t = mu_t D_(t-1) + (1 - mu_t) g_t, D_0 = 0
    scale: Tensor  # 1 / (1 - mu_0), mu_0 the initial momentum: the reference's step at mu_0 is lr * scale * D_t
    grad: Tensor | None = None  # the last gradient and the average before it (d delta / d momentum)
    previous_average: Tensor | None = None


class StableMomentumRule(SGDRule):
    """SGD with momentum as the stable mode runs it: the buffer is an exponential average of the gradients and the
    step ``lr * D_t / (1 - mu_0)``, so that the momentum no longer scales the step (docs/stable.md, point 9).

    ``D_t = mu_t D_(t-1) + (1 - mu_t) g_t`` from ``D_0 = 0`` and ``delta_t = lr_t D_t / (1 - mu_0)``, with ``mu_0``
    the momentum the tower starts with. While the momentum stays ``mu_0`` this is the reference's
    ``buf_t = mu_0 buf_(t-1) + g_t``, ``delta_t = lr_t buf_t`` (``D_t = (1 - mu_0) buf_t``: the same steps, to
    round-off), and ``lr`` keeps its meaning. When the level above changes the momentum, the effective step size
    ``lr / (1 - mu_0)`` does not move: the momentum's hypergradient ``lr / (1 - mu_0) * grad_next . (D_(t-1) - g_t)``
    measures only whether a longer average would have helped, where the reference's ``lr * grad_next . buf_(t-1)``
    also says "a larger step" (raising the momentum from 0.9 to 0.99 multiplies the reference's effective step
    ``lr / (1 - mu)`` by 10). The momentum is stored as ``(tanh(x) + 1) / 2``, as in :class:`StableSGDRule`.

    >>> import torch
    >>> rule, hp = StableMomentumRule(), {"lr": 0.1, "momentum": 0.9}
    >>> state = rule.init(torch.zeros(1), hp)
    >>> steps = []
    >>> for g in (1.0, 1.0, 1.0):
    ...     delta, state = rule.update(torch.tensor([g]), state, hp, 1)
    ...     steps.append(round(delta.item(), 6))
    >>> steps  # the reference's 0.1 * (1, 1.9, 2.71)
    [0.1, 0.19, 0.271]
    """

    transforms: ClassVar[Mapping[str, Transform]] = {"lr": IDENTITY, "momentum": HALF_TANH}

    def init(self, param: Tensor, hp: HP) -> StableMomentumState:
        # 1 / (1 - mu_0) in float64 on the CPU (a float32 0.9 would give 9.9999976), then in the weights' dtype
        momentum = hp["momentum"]
        momentum = (
            momentum.detach().cpu().double()
            if isinstance(momentum, Tensor)
            else torch.tensor(float(momentum), dtype=torch.float64)
        )
        if not bool((momentum < 1.0).all()):
            raise ValueError(f"momentum must be < 1 in the stable mode, but got {hp['momentum']!r}")
        scale = (1.0 / (1.0 - momentum.double())).to(device=param.device, dtype=param.dtype)
        return StableMomentumState(torch.zeros_like(param), scale)

    def update(self, grad: Tensor, state: StableMomentumState, hp: HP, step: int) -> tuple[Tensor, StableMomentumState]:
        momentum = hp["momentum"]
        average = state.average * momentum + grad * _one_minus(momentum)
        keep = _learned(hp, "momentum")  # what the closed-form vjp reads
        kept = (grad, state.average) if keep else (None, None)
        return average * (hp["lr"] * state.scale), StableMomentumState(average, state.scale, *kept)

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # delta = lr * scale * D, D = momentum * D_before + (1 - momentum) * grad
        out = {}
        if _learned(hp, "lr"):
            out["lr"] = after.scale * dot(grad_next, after.average)
        if _learned(hp, "momentum"):
            out["momentum"] = hp["lr"] * after.scale * dot(grad_next, after.previous_average - after.grad)
        return out


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
        delta, fields = adam_step(grad, state, hp, _one_minus(prod1), _one_minus(prod2))
        # The products are kept without history: the next step differentiates only its own betas' factor.
        prods = (torch.as_tensor(prod1).detach(), torch.as_tensor(prod2).detach())
        return delta, StableAdamState(*fields[:2], *prods, *fields[2:], state.prod1, state.prod2)

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # c_i = 1 - prod_i(before) * beta_i, so -d c_i / d beta_i = prod_i(before)
        c1, c2 = _one_minus(after.prod1), _one_minus(after.prod2)
        return adam_vjp(grad_next, after, hp, c1, c2, after.previous_prod1, after.previous_prod2, dot)


class StableAdamWState(NamedTuple):
    exp_avg: Tensor
    exp_avg_sq: Tensor
    param: Tensor  # the rule's own copy of the weights, as in AdamWState
    prod1: Tensor  # product of every beta1 used so far, as in StableAdamState
    prod2: Tensor
    previous_exp_avg: Tensor | None = None
    previous_exp_avg_sq: Tensor | None = None
    grad_term: Tensor | None = None
    grad_sq_term: Tensor | None = None
    previous_param: Tensor | None = None
    previous_prod1: Tensor | None = None
    previous_prod2: Tensor | None = None


class StableAdamWRule(AdamWRule):
    """AdamW as the stable mode runs it: bias-corrected with the products of its betas (:class:`StableAdamRule`), and
    a learned weight decay stored as its logarithm (``EXP``), as the stable mode stores step sizes.

    Stored as itself, the weight decay was walked below 0 in 154 of 180 stable AdamW towers on mnist5k (median
    -0.69; a negative decay inflates the weights; those towers ended 3-4 points above the best fixed AdamW). Stored
    as its log, the level above changes it by a factor (at most e per step under the trust region): it stays > 0.
    With ``1 - beta1^t``, a learned beta1 reached 1.0 in float32 and the step divided by 0 (a linear regression
    whose weights must grow, 50 steps); the products keep the correction of a late step ~1, as for Adam.

    A weight decay that starts at 0 is not learned (log 0 does not exist, and a decay stored as its log could only
    scale 0): it stays 0, as SGD's momentum does when it starts at 0.
    """

    transforms: ClassVar[Mapping[str, Transform]] = {**AdamWRule.transforms, "weight_decay": EXP}

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        names = tuple(self.transforms)
        return names if values["weight_decay"] != 0.0 else tuple(n for n in names if n != "weight_decay")

    def init(self, param: Tensor, hp: HP) -> StableAdamWState:
        one = torch.ones((), dtype=param.dtype, device=param.device)
        zeros = torch.zeros_like(param)
        return StableAdamWState(zeros, zeros + hp["eps"], param.detach().clone(), one, one)

    def update(self, grad: Tensor, state: StableAdamWState, hp: HP, step: int) -> tuple[Tensor, StableAdamWState]:
        prod1, prod2 = state.prod1 * hp["beta1"], state.prod2 * hp["beta2"]
        delta, (m, v, *kept) = adam_step(grad, state, hp, _one_minus(prod1), _one_minus(prod2))
        delta = delta + hp["lr"] * hp["weight_decay"] * state.param
        decayed = state.param if isinstance(hp["lr"], Tensor) or isinstance(hp["weight_decay"], Tensor) else None
        prods = (torch.as_tensor(prod1).detach(), torch.as_tensor(prod2).detach())
        return delta, StableAdamWState(m, v, state.param - delta, *prods, *kept, decayed, state.prod1, state.prod2)

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        c1, c2 = _one_minus(after.prod1), _one_minus(after.prod2)
        out = adam_vjp(grad_next, after, hp, c1, c2, after.previous_prod1, after.previous_prod2, dot)
        return adamw_decay_vjp(out, grad_next, after, hp, dot)


class GuardState(NamedTuple):
    inner: Any  # the wrapped rule's state
    bound: Tensor  # the largest norm of one step of this tensor: rho times its initial norm
    scale: Tensor  # the factor the last step was scaled by (1: the guard did not bind)
    trail: Tensor | None = None  # horizon > 0: the decayed sum of the steps taken, sum_j horizon^j delta_(t-j)
    lr: Tensor | None = None  # trail "adaptive": the step size of the last step


class GuardedRule(Rule):
    """The weights' optimizer of the stable mode: the wrapped base's step, shrunk where it would move a tensor by more
    than ``rho`` times the tensor's initial norm in one step, and (``horizon > 0``) a step-size hypergradient that
    looks further back than one step.

    **The guard.** ``delta = s * delta_base`` with ``s = min(1, bound / |delta_base|)`` and
    ``bound = rho * max(|w_0|, 1e-3 sqrt(n))``, per tensor. The factor is a constant of the step: the level above
    receives the hypergradient of the step actually taken (``s`` times the base's), with one exception: while the
    guard binds, a larger step size would not move the weights further, so a step-size hypergradient saying "larger"
    is dropped (0) and one saying "smaller" is kept, and the tower brings the step size back to where the guard no
    longer binds. Where the guard does not bind (``s = 1``), the step and every hypergradient are the base's exactly.

    **The horizon.** With ``horizon = b > 0`` the step size's hypergradient is ``d loss_t / d log lr = grad_t . T_t``
    with the trail ``T_t = sum_j b^j delta_(t-j)``: the first-order effect on ``loss_t`` of scaling the step size of
    the last ~1/(1-b) steps, not only the last one (``b = 0`` is the paper's ``grad_t . delta_(t-1)``). Every
    built-in step is linear in lr. The one-step hypergradient is greedy: it stops raising the step size where the
    next loss stops falling, below the step size that trains best over many steps (short-horizon bias).

    ``trail="adaptive"`` (SGD with momentum) sums the steps per unit step size instead, ``U_t = b_t U_(t-1) +
    delta_t / lr_t``, and forgets them as fast as the step size falls, ``b_t = b min(1, lr_t / lr_(t-1))``;
    then ``d loss_t / d log lr = lr_t grad_t . U_t``, the effect of the current step size over the recent steps.
    A trail of the steps taken keeps, after a fall of the step size, the large steps of before, which point back
    uphill: it says "smaller" for ~1/(1-b) steps while the level above lowers the step size by up to a factor e
    per step (measured: collapsed to ~1e-41). The adaptive trail drops them in proportion to the fall.
    """

    def __init__(self, inner: Rule, rho: float = 1.0, horizon: float = 0.0, trail: str = "steps") -> None:
        if isinstance(inner, GuardedRule | _HyperLevel):
            raise ValueError(f"GuardedRule must wrap a plain rule, but got {type(inner).__name__}")
        _check_positive("rho", rho)
        if not 0.0 <= horizon < 1.0:
            raise ValueError(f"horizon must be in [0, 1), but got {horizon!r}")
        if trail not in TRAILS:
            raise ValueError(f"trail must be one of {', '.join(map(repr, TRAILS))}, but got {trail!r}")
        self.inner, self.rho, self.horizon, self.trail = inner, rho, horizon, trail
        self.name = inner.name  # type: ignore[misc]
        self.defaults = inner.defaults  # type: ignore[misc]
        self.transforms = inner.transforms  # type: ignore[misc]
        self.vjp_needs_inputs = inner.vjp_needs_inputs  # type: ignore[misc]

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        return self.inner.learnable(values)

    def init(self, param: Tensor, hp: HP) -> GuardState:
        norm = param.detach().norm()
        bound = self.rho * torch.clamp(norm, min=1e-3 * math.sqrt(max(param.numel(), 1)))
        return GuardState(self.inner.init(param, hp), bound, torch.ones_like(norm))

    def update(self, grad: Tensor, state: GuardState, hp: HP, step: int) -> tuple[Tensor, GuardState]:
        delta, inner = self.inner.update(grad, state.inner, hp, step)
        with torch.no_grad():
            size = delta.detach().norm()
            scale = torch.where(size > state.bound, state.bound / size, torch.ones_like(size))
        delta = delta * scale
        trail = None
        if self.horizon > 0.0 and isinstance(hp["lr"], Tensor):  # only a learned step size reads it
            # "directions": the step per unit step size (every built-in step is linear in lr)
            lr = hp["lr"].detach()
            taken = delta.detach() if self.trail == "steps" else delta.detach() / lr
            decay = self.horizon
            if self.trail == "adaptive" and state.lr is not None:
                decay = decay * torch.exp((lr.log() - state.lr.log()).clamp(max=0.0))
            trail = taken if state.trail is None else decay * state.trail + taken
            return delta, GuardState(inner, state.bound, scale, trail, lr if self.trail == "adaptive" else None)
        return delta, GuardState(inner, state.bound, scale, trail)

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        found = self.inner.vjp(grad_next, grad, None if before is None else before.inner, after.inner, hp, step, dot)
        out = {n: v * after.scale for n, v in found.items()}
        if "lr" in out and after.trail is not None:  # every built-in step is linear in lr: d delta / d lr = delta / lr
            out["lr"] = dot(grad_next, after.trail) / (hp["lr"] if self.trail == "steps" else 1.0)
        if "lr" in out:  # binding: keep only "smaller" (d loss / d lr = -out["lr"] > 0)
            out["lr"] = torch.where(after.scale < 1.0, out["lr"].clamp(max=0.0), out["lr"])
        return out

    def __repr__(self) -> str:
        return f"GuardedRule({self.inner!r}, rho={self.rho}, horizon={self.horizon}, trail={self.trail!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GuardedRule) and (other.inner, other.rho, other.horizon, other.trail) == (
            self.inner,
            self.rho,
            self.horizon,
            self.trail,
        )

    def __hash__(self) -> int:
        return hash((GuardedRule, self.inner, self.rho, self.horizon, self.trail))


# -- a stable hyper level's graph, kept for its one vjp -------------------------------------------------------------
# Rule.vjp (the default, for a rule without a closed form) differentiates update() by running it again under autograd
# at the next step: for a stable hyper level, some 40 operations on a few numbers each, so the level's update ran
# twice per step. A TrustRegionRule whose values are learned (tensors, one per value: not a population's) instead runs
# its update under autograd once, at the step itself, and keeps the graph for the next step's vjp: the same operations
# on the same values, so bitwise the same hypergradients (tested). An entry is used once, and only for the very state
# it made (the stored values' tensor, unchanged in place) with the same values dict and step; otherwise the vjp runs the
# update again as before (a restored checkpoint, a replayed or copied state). Keyed by that tensor's identity, held
# weakly: an entry goes when its state does.
class _Graph(NamedTuple):
    ref: weakref.ref  # the stored values (TrustState.raw) the step made
    version: int  # their version counter then
    hp: HP  # the values dict the step read (the core's trace keeps this very dict for the vjp)
    step: int
    delta: Tensor  # the step, attached to the graph
    leaves: dict[str, Tensor]  # the learned values the graph starts from, in hp's order


_GRAPHS: dict[int, _Graph] = {}


def _keep_graph(raw: Tensor, hp: HP, step: int, delta: Tensor, leaves: dict[str, Tensor]) -> None:
    key = id(raw)

    def forget(ref: weakref.ref, key: int = key) -> None:  # raw is gone, so is its entry (unless a newer one's)
        entry = _GRAPHS.get(key)
        if entry is not None and entry.ref is ref:
            del _GRAPHS[key]

    _GRAPHS[key] = _Graph(weakref.ref(raw, forget), raw._version, hp, step, delta, leaves)


def _detached(x: Any) -> Any:
    """``x`` (a tensor or a rule state of tensors) detached from any graph: what a state keeps between steps."""
    if isinstance(x, Tensor):
        return x.detach() if x.requires_grad else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*[_detached(f) for f in x])
    return x


class TrustState(NamedTuple):
    inner: Any  # the wrapped rule's state
    raw: Tensor  # the stored (raw) values of the hyperparameters this level updates: it is their only updater
    radius: Tensor  # the trust radius of each stored value
    gain: Tensor  # the factor (>= 1) on the reference's update of each stored value
    last: Tensor  # the sign of each value's previous bounded step; 0 right after a sign change (iRprop-)


class TrustRegionRule(_HyperLevel):
    """A hyper level that takes the paper's step, measured in the reference's parameterization, but moves each stored
    value (a log step size, a beta's raw value) by at most its trust radius per step.

    For the hyperparameter ``y`` below, stored as ``x`` (``y = S(x)``, e.g. ``exp``) where the reference stores
    ``z`` (``y = R(z)``, e.g. the identity), the wrapped rule receives the reference's hypergradient
    ``g_z = g_x R'(z) / S'(x)`` and returns the reference's update ``u_z``; the stored value moves by
    ``r * tanh(u / r)`` with ``u = u_z R'(z) / S'(x)``: to first order the reference's step, never more than ``r``.
    Since this level is the only one that updates ``x``, its state tracks ``x`` exactly.

    Both the step and its bound adapt per value, by the sign agreement of consecutive steps (Rprop's rule, Riedmiller
    and Braun 1993, applied to the hyper level): the stored value moves by ``r * tanh(c * u / r)``. While ``u`` keeps
    its sign, the gain ``c`` grows by ``grow`` per step as long as the region is loose (``|c u| <= r``: a top
    hyper-step that is decades too small still learns, in ``log(1/k) / log(grow)`` steps), and the radius ``r``
    grows by ``grow`` once it binds (a step size crosses decades in a few steps, at most a factor
    ``e^max_radius`` per step). A sign flip shrinks both by ``shrink``, and the next step neither grows nor shrinks
    them (iRprop-). ``c`` stays in ``[1, max_gain]``, so the stable step is never smaller than the reference's inside
    the region; ``grow = shrink = 1`` is the plain trust region ``r * tanh(u / r)`` with a fixed radius.

    >>> import torch
    >>> from hypergrad.rules import SGDRule
    >>> from hypergrad.transforms import EXP, IDENTITY
    >>> rule = TrustRegionRule(SGDRule(), ((EXP, IDENTITY),))
    >>> hp = {"lr": 1.0, "momentum": 0.0}
    >>> state = rule.init(torch.zeros(1), hp)  # a step size of e^0 = 1
    >>> for _ in range(3):  # the hypergradient says "larger" three times: the region widens by 1.2 twice
    ...     delta, state = rule.update(torch.tensor([-1e6]), state, hp, 1)
    >>> round(state.radius.item(), 3), round(state.raw.item(), 3)  # log step size up by 0.1 + 0.12 + 0.144
    (0.144, 0.364)
    """

    def __init__(
        self,
        inner: Rule,
        below: tuple[tuple[Transform, Transform], ...],
        *,
        radius: float = RADIUS,
        grow: float = GROW,
        shrink: float = SHRINK,
        max_radius: float = MAX_RADIUS,
        max_gain: float = MAX_GAIN,
        min_radius: float = MIN_RADIUS,
        limits: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(inner, radius)
        if limits is not None and (len(limits) != len(below) or not all(v > 0.0 for v in limits)):
            raise ValueError(f"limits must be one number > 0 (or inf) per value below, but got {limits!r}")
        for key, value in (("max_radius", max_radius), ("min_radius", min_radius)):
            _check_positive(key, value)
        if not (max_gain >= 1.0 and math.isfinite(max_gain)):
            raise ValueError(f"max_gain must be a finite number >= 1, but got {max_gain!r}")
        if not min_radius <= radius <= max_radius:
            raise ValueError(
                f"radius must lie in [min_radius, max_radius] = [{min_radius}, {max_radius}], but got {radius!r}"
            )
        if not (grow >= 1.0 and math.isfinite(grow)):
            raise ValueError(f"grow must be a finite number >= 1, but got {grow!r}")
        if not 0.0 < shrink <= 1.0:
            raise ValueError(f"shrink must be in (0, 1], but got {shrink!r}")
        self.below, self.grow, self.shrink = below, grow, shrink
        self.max_radius, self.min_radius, self.max_gain = max_radius, min_radius, max_gain
        self.limits = limits
        self._limits: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # limits as a tensor, per dtype and device

    def _limit(self, like: Tensor) -> Tensor:
        """``limits`` as a tensor like ``like``, made once per dtype and device (this runs every step)."""
        key = (like.dtype, like.device)
        if key not in self._limits:
            self._limits[key] = torch.tensor(self.limits, dtype=like.dtype, device=like.device)
        return self._limits[key]

    def init(self, param: Tensor, hp: HP) -> TrustState:
        raw = param.detach().clone()
        radius, gain = torch.full_like(raw, self.radius), torch.ones_like(raw)
        return TrustState(self.inner.init(param, hp), raw, radius, gain, torch.zeros_like(raw))

    def _ratio(self, x: Tensor) -> Tensor:
        # dz/dx = S'(x) / R'(z), per stored column, held constant (it is a function of what this level updated).
        cols = []
        for i, (stored, ref) in enumerate(self.below):
            xi = x[..., i]
            s = torch.ones_like(xi) if stored.derivative is None else stored.derivative(xi)
            if ref.derivative is None:  # R' = 1: s / 1 is s, bit for bit
                cols.append(s)
                continue
            z = ref.inverse(stored.forward(xi))
            cols.append(s / ref.derivative(z))
        return cols[0].unsqueeze(-1) if len(cols) == 1 else torch.stack(cols, dim=-1)

    def update(self, grad: Tensor, state: TrustState, hp: HP, step: int) -> tuple[Tensor, TrustState]:
        names = [n for n, v in hp.items() if isinstance(v, Tensor)]
        if not names or torch.is_grad_enabled() or any(hp[n].dim() for n in names):
            return self._update(grad, state, hp, step)
        # Learned by the level above: the step runs under autograd once, here, and keeps its graph for the next
        # step's vjp (see _Graph), instead of running again there.
        with torch.enable_grad():
            leaves = {n: hp[n].detach().requires_grad_() for n in names}
            delta, after = self._update(grad, state, {**hp, **leaves}, step)
        after = after._replace(inner=_detached(after.inner))
        if delta.requires_grad:
            _keep_graph(after.raw, hp, step, delta, leaves)
        return delta.detach(), after

    def vjp(
        self, grad_next: Tensor, grad: Tensor | None, before: Any, after: Any, hp: HP, step: int, dot: Any
    ) -> dict[str, Tensor]:
        graph = _GRAPHS.pop(id(after.raw), None)
        if (
            graph is None
            or graph.ref() is not after.raw
            or graph.version != after.raw._version
            or graph.hp is not hp
            or graph.step != step
        ):
            return super().vjp(grad_next, grad, before, after, hp, step, dot)
        with torch.enable_grad():  # Rule.vjp's autograd.grad, on the graph it would have built again
            found = torch.autograd.grad(graph.delta, list(graph.leaves.values()), grad_next, allow_unused=True)
        return {n: f for n, f in zip(graph.leaves, found, strict=True) if f is not None}

    def _update(self, grad: Tensor, state: TrustState, hp: HP, step: int) -> tuple[Tensor, TrustState]:
        with torch.no_grad():
            dz_dx = self._ratio(state.raw).clamp_min(1e-300 if state.raw.dtype == torch.float64 else 1e-37)
            g_ref = grad / dz_dx
        u_ref, inner = self.inner.update(g_ref, state.inner, hp, step)
        u = u_ref / dz_dx
        with torch.no_grad():
            sign = torch.sign(u)
            signs = sign * state.last
            agree, flip = signs > 0, signs < 0
            binds = (state.gain * u).abs() > state.radius
            # Consistent steps grow the gain while the region is loose, the radius once it binds; a flip shrinks both.
            shrunk = torch.where(flip, self.shrink, 1.0)
            radius = state.radius * torch.where(agree & binds, self.grow, shrunk)
            gain = state.gain * torch.where(agree & ~binds, self.grow, shrunk)
            radius = radius.clamp(self.min_radius, self.max_radius)
            gain = gain.clamp(1.0, self.max_gain)
            last = torch.where(flip, torch.zeros_like(sign), sign)
        delta = trust(gain * u, radius)
        if self.limits is not None:  # a stored value past its limit stops there (no hypergradient through the stop)
            limit = self._limit(state.raw)
            moved = state.raw - delta.detach()
            stop = moved.clamp(-limit, limit)
            delta = torch.where(stop != moved, state.raw - stop, delta)
        return delta, TrustState(inner, (state.raw - delta).detach(), radius, gain, last)

    def __repr__(self) -> str:
        return (
            f"TrustRegionRule({self.inner!r}, radius={self.radius}, grow={self.grow}, shrink={self.shrink}, "
            f"max_radius={self.max_radius}, max_gain={self.max_gain}"
            + ("" if self.limits is None else f", limits={self.limits}")
            + ")"
        )

    def _key(self) -> tuple[Any, ...]:
        return (
            self.inner,
            self.below,
            self.radius,
            self.grow,
            self.shrink,
            self.max_radius,
            self.min_radius,
            self.max_gain,
            self.limits,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustRegionRule) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash((TrustRegionRule, self.inner, self.radius, self.grow, self.shrink, self.max_radius))


_STABLE_BASES: dict[type, type] = {AdamRule: StableAdamRule, AdamWRule: StableAdamWRule, SGDRule: StableSGDRule}


def stabilize(
    tower: Tower,
    method: str = "trust",
    *,
    guard: float | None = GUARD,
    horizon: float | None = None,
    trail: str | None = None,
    **kw: float,
) -> Tower:
    """The same tower with every level above the weights' optimizer wrapped in a :class:`TrustRegionRule` (``method=
    "trust"``, the default; ``kw`` sets its radius, grow, shrink, max_radius, min_radius, max_gain) or a
    :class:`StableRule` (``"normalized"``), an Adam base bias-corrected with the products of its betas
    (:class:`StableAdamRule`; AdamW too, with its weight decay stored as its log: :class:`StableAdamWRule`), an SGD
    base's momentum kept in (0, 1) (:class:`StableSGDRule`; with a momentum > 0, the averaged buffer of
    :class:`StableMomentumRule`), and the base wrapped in a :class:`GuardedRule` with ``rho=guard`` (None: no guard,
    and no horizon), ``horizon`` (None: 0 for Adam and AdamW, MOMENTUM_HORIZON for SGD with momentum, HORIZON for the
    others) and ``trail`` (None: "adaptive" for SGD with momentum and RMSProp, "steps" for the others)."""
    if method not in ("trust", "normalized"):
        raise ValueError(f"method must be 'trust' or 'normalized', but got {method!r}")
    base = tower.levels[0]
    if type(base.rule) is SGDRule and base.values["momentum"] != 0.0:
        base = Level(StableMomentumRule(), dict(base.values), base.learned)
    elif type(base.rule) in _STABLE_BASES:
        base = Level(_STABLE_BASES[type(base.rule)](), dict(base.values), base.learned)
    if guard is not None and not isinstance(base.rule, GuardedRule):
        sgd_momentum = _has_momentum(base) and not isinstance(base.rule, AdamRule)
        if horizon is None:
            horizon = MOMENTUM_HORIZON if sgd_momentum else (0.0 if _has_momentum(base) else HORIZON)
        if trail is None:
            # SGD with momentum and RMSProp: the adaptive trail (measured better for both; docs/stable.md, point 7).
            # SGD and AdaGrad keep the trail of steps they were measured with.
            trail = "adaptive" if sgd_momentum or isinstance(base.rule, RMSPropRule) else "steps"
        base = Level(GuardedRule(base.rule, guard, horizon, trail), dict(base.values), base.learned)
    levels = [base]
    for level in tower.levels[1:]:
        below = levels[-1]
        if isinstance(level.rule, StableRule | TrustRegionRule):
            rule = level.rule
        elif method == "normalized":
            rule = StableRule(level.rule, **kw)
        else:
            stored = _bounded(below.rule.transforms)
            names = below.learned_names()
            # Step sizes are stored as their log (the "log" parameterization), and so is an AdamW weight decay.
            pairs = tuple((EXP if n == "lr" else stored[n], _reference_transform(below.rule, n)) for n in names)
            bounds = {"lr": MAX_LOG_LR, "momentum": math.atanh(2.0 * MAX_MOMENTUM - 1.0)}
            limits = tuple(bounds.get(n, math.inf) for n in names) if set(bounds) & set(names) else None
            rule = TrustRegionRule(level.rule, pairs, limits=limits, **kw)
        levels.append(Level(rule, dict(level.values), level.learned))
    return Tower(tuple(levels))


def _has_momentum(level: Level) -> bool:
    # Adam's first moment and SGD's buffer already sum ~1/(1 - beta) past gradients into each step: a trail on top
    # double counts them (measured on mnist5k: the step size collapsed to ~1e-41 in 8 to 9 of 18 momentum and Adam
    # runs at each horizon from 0.9 to 0.99).
    if isinstance(level.rule, AdamRule):
        return True
    return "momentum" in level.rule.defaults and level.values.get("momentum", 0.0) != 0.0


def _reference_transform(rule: Rule, name: str) -> Transform:
    inner = rule.inner if isinstance(rule, StableRule | TrustRegionRule | GuardedRule) else rule
    for cls in type(inner).__mro__:  # the stable bases subclass the reference rules: use the reference's storage
        if cls in _STABLE_BASES and name in cls.transforms:
            return cls.transforms[name]
    return inner.transforms[name]
