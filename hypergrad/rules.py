"""The functional contract: an update rule is a pair of pure functions over one tensor.

    init(param, hp) -> state
    update(grad, state, hp, step) -> (delta, new_state)        # the new parameter is param - delta

``hp`` maps every hyperparameter name to its natural value: a tensor when the hyperparameter is learned (it carries
the autograd graph back to the raw value, which is how hypergradients come for free), a Python float when fixed.
``step`` counts from 1. Everything a rule remembers lives in its typed ``state``; nothing hides in closures.

A user-defined hyperoptimizable optimizer is one more ``Rule``: write ``update`` in torch ops and every learnable
hyperparameter gets its hypergradient from autograd. Example, SGD with a learned step size and a learned decay::

    class DecayedSGD(Rule):
        name = "dsgd"
        defaults = {"lr": 0.01, "decay": 0.0}
        transforms = {"lr": IDENTITY, "decay": IDENTITY}

        def init(self, param, hp):
            return EmptyState()

        def update(self, grad, state, hp, step):
            return grad * hp["lr"] / (1.0 + hp["decay"] * step), state

    register(DecayedSGD())
    opt = hypergrad.tower("dsgd(0.1, decay=0.01)/sgd(1e-4)", model.parameters())

The rules below follow the paper's reference implementation (``gdtuo``) operation by operation, so that a tower
reproduces it to float round-off; comments mark where that differs from ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from hypergrad.transforms import HALF_TANH, IDENTITY, SQUARE, Transform

__all__ = [
    "AdaGradRule",
    "AdamRule",
    "AdamState",
    "AdamWRule",
    "AdamWState",
    "EmptyState",
    "RMSPropRule",
    "Rule",
    "SGDRule",
    "SGDState",
    "SumState",
    "register",
    "rules",
]

HP = Mapping[str, Any]  # natural values: Tensor (learned) or float (fixed)
Dot = Callable[[Tensor, Tensor], Tensor]  # sum of the elementwise product (per population member)


class EmptyState(NamedTuple):
    pass


class SGDState(NamedTuple):
    momentum_buffer: Tensor | None


class AdamState(NamedTuple):
    exp_avg: Tensor
    exp_avg_sq: Tensor


class SumState(NamedTuple):
    sum: Tensor


class AdamWState(NamedTuple):
    exp_avg: Tensor
    exp_avg_sq: Tensor
    param: Tensor  # the rule's own copy of the weights, which the decoupled decay reads


class Rule:
    """Base class of an update rule; subclasses set the class attributes and the two functions."""

    name: ClassVar[str]
    defaults: ClassVar[Mapping[str, float]]  # every hyperparameter with its default natural value
    transforms: ClassVar[Mapping[str, Transform]]  # the learnable ones and how each is stored

    def init(self, param: Tensor, hp: HP) -> NamedTuple:
        raise NotImplementedError

    def update(self, grad: Tensor, state: Any, hp: HP, step: int) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        """The hyperparameters a level above can learn, given the initial values (in canonical order)."""
        return tuple(self.transforms)

    #: Whether :meth:`vjp` is implemented. Without it, autograd differentiates ``update`` (always correct, slower).
    has_vjp: ClassVar[bool] = False

    def vjp(
        self, grad_next: Tensor, grad: Tensor, before: Any, after: Any, hp: HP, step: int, dot: Dot
    ) -> dict[str, Tensor]:
        """Optional closed form: ``dot(grad_next, d delta / d hp[name])`` for every learned (tensor) ``hp[name]``.

        ``grad``, ``before``, ``after``, ``hp`` and ``step`` are those of the update being differentiated. A speed-up
        only: the tests check every built-in closed form against autograd and finite differences.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:  # rules are stateless: two instances of one class are the same rule
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class SGDRule(Rule):
    """``p -= lr * buf`` with ``buf = momentum * buf + g``; the buffer starts at the first gradient, as in torch."""

    name = "sgd"
    defaults: ClassVar[Mapping[str, float]] = {"lr": 0.01, "momentum": 0.0}
    transforms: ClassVar[Mapping[str, Transform]] = {"lr": IDENTITY, "momentum": IDENTITY}

    def learnable(self, values: Mapping[str, float]) -> tuple[str, ...]:
        # As in the reference, momentum exists only if it starts non-zero; otherwise it would learn nothing.
        return ("lr", "momentum") if values["momentum"] != 0.0 else ("lr",)

    def init(self, param: Tensor, hp: HP) -> SGDState:
        return SGDState(None)

    def update(self, grad: Tensor, state: SGDState, hp: HP, step: int) -> tuple[Tensor, SGDState]:
        momentum = hp["momentum"]
        if isinstance(momentum, float) and momentum == 0.0:
            return grad * hp["lr"], state
        # The first buffer is a copy, never the gradient itself, which its owner may zero or reuse in place.
        buf = grad.clone() if state.momentum_buffer is None else state.momentum_buffer * momentum + grad
        return buf * hp["lr"], SGDState(buf)

    has_vjp = True

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # delta = lr * buf, buf = momentum * buf_before + grad (or grad at the first step)
        buf = grad if after.momentum_buffer is None else after.momentum_buffer
        out = {}
        if isinstance(hp["lr"], Tensor):
            out["lr"] = dot(grad_next, buf)
        if isinstance(hp["momentum"], Tensor):
            b0 = before.momentum_buffer
            out["momentum"] = hp["lr"] * dot(grad_next, b0 if b0 is not None else torch.zeros_like(grad))
        return out


class AdamRule(Rule):
    """Adam with the reference's choices: the second moment starts at eps (sqrt is not differentiable at 0) and the
    update is ``lr * m_hat / (sqrt(v_hat) + eps)`` with bias correction counted from the first step."""

    name = "adam"
    defaults: ClassVar[Mapping[str, float]] = {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    transforms: ClassVar[Mapping[str, Transform]] = {"lr": IDENTITY, "beta1": HALF_TANH, "beta2": HALF_TANH}

    def init(self, param: Tensor, hp: HP) -> AdamState:
        return AdamState(torch.zeros_like(param), torch.zeros_like(param) + hp["eps"])

    def update(self, grad: Tensor, state: AdamState, hp: HP, step: int) -> tuple[Tensor, AdamState]:
        beta1, beta2 = hp["beta1"], hp["beta2"]
        m = beta1 * state.exp_avg + (1.0 - beta1) * grad
        v = beta2 * state.exp_avg_sq + (1.0 - beta2) * grad * grad
        m_hat = m / (1.0 - beta1 ** float(step))
        v_hat = v / (1.0 - beta2 ** float(step))
        return hp["lr"] * (m_hat / (v_hat**0.5 + hp["eps"])), AdamState(m, v)

    has_vjp = True

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # delta = lr * m_hat / den, den = sqrt(v_hat) + eps, m_hat = m / c1, v_hat = v / c2, c_i = 1 - b_i^t,
        # m = b1 m0 + (1 - b1) g, v = b2 v0 + (1 - b2) g^2. Scalar factors stay outside the dots (fewer passes).
        lr, b1, b2, t = hp["lr"], hp["beta1"], hp["beta2"], float(step)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        sqrt_v_hat = (after.exp_avg_sq / c2) ** 0.5
        den = sqrt_v_hat + hp["eps"]
        q = grad_next / den
        out = {}
        if isinstance(b1, Tensor):
            q_m0, q_g = dot(q, before.exp_avg), dot(q, grad)
            q_m = b1 * q_m0 + (1.0 - b1) * q_g
            out["beta1"] = lr * ((q_m0 - q_g) / c1 + q_m * t * b1 ** (t - 1.0) / (c1 * c1))
        else:
            q_m = dot(q, after.exp_avg)
        if isinstance(lr, Tensor):
            out["lr"] = q_m / c1
        if isinstance(b2, Tensor):
            # d sqrt(v_hat) = d v_hat / (2 sqrt(v_hat)); delta depends on it through -lr m_hat / den^2.
            w = q * after.exp_avg / (den * sqrt_v_hat)
            w_v0, w_g2 = dot(w, before.exp_avg_sq), dot(w * grad, grad)
            w_v = b2 * w_v0 + (1.0 - b2) * w_g2
            out["beta2"] = -0.5 * lr / c1 * ((w_v0 - w_g2) / c2 + w_v * t * b2 ** (t - 1.0) / (c2 * c2))
        return out


class AdamWRule(Rule):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``delta = lr * wd * param + lr * m_hat / (sqrt(v_hat)
    + eps)``, as ``torch.optim.AdamW``; ``weight_decay`` is learnable like the rest. The second moment starts at eps,
    as in :class:`AdamRule`.

    The update rule sees only gradients, so the state keeps its own copy of the weights (updated with the same delta
    the optimizer applies; one weight-sized tensor). Weights changed outside ``step()`` after the optimizer was built
    are not seen by the decay: load them before building it, or with ``load_state_dict``.
    """

    name = "adamw"
    defaults: ClassVar[Mapping[str, float]] = {
        "lr": 0.001,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
    }
    transforms: ClassVar[Mapping[str, Transform]] = {
        "lr": IDENTITY,
        "beta1": HALF_TANH,
        "beta2": HALF_TANH,
        "weight_decay": IDENTITY,
    }

    def init(self, param: Tensor, hp: HP) -> AdamWState:
        return AdamWState(torch.zeros_like(param), torch.zeros_like(param) + hp["eps"], param.detach().clone())

    def update(self, grad: Tensor, state: AdamWState, hp: HP, step: int) -> tuple[Tensor, AdamWState]:
        delta, adam = AdamRule.update(self, grad, AdamState(state.exp_avg, state.exp_avg_sq), hp, step)  # type: ignore[arg-type]
        delta = delta + hp["lr"] * hp["weight_decay"] * state.param
        return delta, AdamWState(adam.exp_avg, adam.exp_avg_sq, state.param - delta)


class AdaGradRule(Rule):
    """AdaGrad as in the reference: the accumulator starts at 0.1 and is not differentiated."""

    name = "adagrad"
    defaults: ClassVar[Mapping[str, float]] = {"lr": 0.01, "eps": 1e-10, "initial_accumulator_value": 0.1}
    transforms: ClassVar[Mapping[str, Transform]] = {"lr": IDENTITY}

    def init(self, param: Tensor, hp: HP) -> SumState:
        return SumState(torch.zeros_like(param) + hp["initial_accumulator_value"])

    def update(self, grad: Tensor, state: SumState, hp: HP, step: int) -> tuple[Tensor, SumState]:
        g_sum = state.sum + torch.square(grad)
        return hp["lr"] * grad / torch.sqrt(g_sum + hp["eps"]), SumState(g_sum)

    has_vjp = True

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        return {"lr": dot(grad_next, grad / torch.sqrt(after.sum + hp["eps"]))} if isinstance(hp["lr"], Tensor) else {}


class RMSPropRule(Rule):
    """RMSProp as in the reference: lr is stored as sqrt(lr), gamma as (tanh(x)+1)/2, and the running average
    stays in the graph through gamma."""

    name = "rmsprop"
    defaults: ClassVar[Mapping[str, float]] = {"lr": 0.01, "gamma": 0.99, "eps": 1e-8}
    transforms: ClassVar[Mapping[str, Transform]] = {"lr": SQUARE, "gamma": HALF_TANH}

    def init(self, param: Tensor, hp: HP) -> SumState:
        return SumState(torch.zeros_like(param))

    def update(self, grad: Tensor, state: SumState, hp: HP, step: int) -> tuple[Tensor, SumState]:
        gamma = hp["gamma"]
        s = gamma * state.sum + (1.0 - gamma) * torch.square(grad)
        return hp["lr"] * grad / torch.sqrt(s + hp["eps"]), SumState(s)

    has_vjp = True

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # delta = lr * g / sqrt(s + eps), s = gamma s0 + (1 - gamma) g^2
        r = grad / torch.sqrt(after.sum + hp["eps"])
        out = {}
        if isinstance(hp["lr"], Tensor):
            out["lr"] = dot(grad_next, r)
        if isinstance(hp["gamma"], Tensor):
            out["gamma"] = -0.5 * hp["lr"] * dot(grad_next, r / (after.sum + hp["eps"]) * (before.sum - grad * grad))
        return out


_RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Make ``rule`` available by its name in tower specs."""
    if not rule.name.isidentifier():
        raise ValueError(f"rule name must be an identifier, but got {rule.name!r}")
    _RULES[rule.name] = rule
    return rule


def rules() -> Mapping[str, Rule]:
    """The registered rules by name."""
    return dict(_RULES)


for _rule in (SGDRule(), AdamRule(), AdamWRule(), AdaGradRule(), RMSPropRule()):
    register(_rule)
