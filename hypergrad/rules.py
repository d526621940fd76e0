"""Update rules: one level of a tower, as pure functions over one tensor (the tower itself: :mod:`hypergrad.core`).

    init(param, hp) -> state
    update(grad, state, hp, step) -> (delta, new_state)        # the new parameter is param - delta
    vjp(grad_next, grad, before, after, hp, step, dot) -> {name: grad_next . d delta / d hp[name]}   # optional

``hp`` maps every hyperparameter name to its natural value: a tensor when the hyperparameter is learned, a Python
float when fixed. ``step`` counts from 1. Everything a rule remembers lives in its typed ``state``; nothing hides in
closures. A state may keep ``grad`` itself: where the gradient is borrowed (the model's), the core copies what the state
keeps.

A user-defined hyperoptimizable optimizer is one more ``Rule``: write ``update`` in torch ops and every learnable
hyperparameter gets its hypergradient from the default ``vjp``, autograd through ``update``. Example, SGD with a
learned step size and a learned decay::

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


# A closed-form vjp reads only the rule's state after the step, so each state below also keeps, while the level above
# learns the value concerned (None otherwise), the few tensors of the step that the vjp reads: tensors the update made
# anyway, or the gradient itself where nothing else will do.


class SGDState(NamedTuple):
    momentum_buffer: Tensor | None
    grad: Tensor | None = None  # the last gradient (d delta / d lr without momentum)
    previous_buffer: Tensor | None = None  # the buffer before the last step (d delta / d momentum)


class AdamState(NamedTuple):
    exp_avg: Tensor
    exp_avg_sq: Tensor
    previous_exp_avg: Tensor | None = None  # the moments before the last step (d delta / d beta)
    previous_exp_avg_sq: Tensor | None = None
    grad_term: Tensor | None = None  # the last step's share of exp_avg, (1 - beta1) * grad
    grad_sq_term: Tensor | None = None  # and of exp_avg_sq, (1 - beta2) * grad * grad


class SumState(NamedTuple):
    sum: Tensor
    grad: Tensor | None = None  # the last gradient
    previous_sum: Tensor | None = None  # the sum before the last step (RMSProp's d delta / d gamma)


class AdamWState(NamedTuple):
    exp_avg: Tensor
    exp_avg_sq: Tensor
    param: Tensor  # the rule's own copy of the weights, which the decoupled decay reads
    previous_exp_avg: Tensor | None = None
    previous_exp_avg_sq: Tensor | None = None
    grad_term: Tensor | None = None
    grad_sq_term: Tensor | None = None
    previous_param: Tensor | None = None  # the weights the last decay read (d delta / d lr, d delta / d weight_decay)


class Rule:
    """Base class of an update rule; subclasses set the class attributes and ``init`` and ``update``."""

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

    #: Whether :meth:`vjp` reads ``grad`` and ``before``. The default vjp does; a closed form that reads only
    #: ``after`` (the rule keeps what it needs in its state) sets False, and the core then keeps neither a copy of the
    #: gradient nor the older state.
    vjp_needs_inputs: ClassVar[bool] = True

    def vjp(
        self, grad_next: Tensor, grad: Tensor | None, before: Any, after: Any, hp: HP, step: int, dot: Dot
    ) -> dict[str, Tensor]:
        """``dot(grad_next, d delta / d hp[name])`` for every tensor-valued (learned) ``hp[name]``, where ``delta``,
        ``after`` are what ``update(grad, before, hp, step)`` returned. A name may be left out when its product is 0.

        The default differentiates :meth:`update` by autograd (correct for any rule written in torch ops); a rule may
        override it with a closed form, a speed-up only: the tests compare every built-in one with this default and
        with finite differences.
        """
        names = [n for n, v in hp.items() if isinstance(v, Tensor)]
        if names:
            _refuse_inference_mode(self)
        with torch.enable_grad():
            leaves = {n: hp[n].detach().requires_grad_() for n in names}
            delta, _ = self.update(grad, before, {**hp, **leaves}, step)  # type: ignore[arg-type]
            if not delta.requires_grad:
                return {}
            # Autograd sums over what each leaf was broadcast against: that is dot, per population member.
            found = torch.autograd.grad(delta, list(leaves.values()), grad_next, allow_unused=True)
        return {n: f for n, f in zip(names, found, strict=True) if f is not None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:  # rules are stateless: two instances of one class are the same rule
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def _refuse_inference_mode(rule: Rule) -> None:
    """Raise where autograd cannot differentiate ``rule``'s step: under ``torch.inference_mode()`` it records nothing,
    even inside ``torch.enable_grad()``, and the hypergradients would silently be zero."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"the hypergradients of a {type(rule).__name__} level ({rule.name}) come from autograd, which "
            "torch.inference_mode() turns off: call step() outside inference_mode (torch.no_grad() is fine)"
        )


def _learned(hp: HP, name: str) -> bool:
    return isinstance(hp[name], Tensor)


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
            return grad * hp["lr"], SGDState(None, grad if _learned(hp, "lr") else None)
        # The first buffer is the gradient (the core copies a borrowed one: it never aliases the caller's p.grad).
        buf = grad if state.momentum_buffer is None else state.momentum_buffer * momentum + grad
        return buf * hp["lr"], SGDState(buf, None, state.momentum_buffer if _learned(hp, "momentum") else None)

    vjp_needs_inputs = False

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # delta = lr * buf, buf = momentum * buf_before + grad (or grad at the first step, or without momentum)
        out = {}
        if _learned(hp, "lr"):
            out["lr"] = dot(grad_next, after.grad if after.momentum_buffer is None else after.momentum_buffer)
        if _learned(hp, "momentum") and after.previous_buffer is not None:
            out["momentum"] = hp["lr"] * dot(grad_next, after.previous_buffer)
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
        c1, c2, _, _ = _power_corrections(hp, step, slopes=False)
        delta, fields = adam_step(grad, state, hp, c1, c2)
        return delta, AdamState(*fields)

    vjp_needs_inputs = False

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        return adam_vjp(grad_next, after, hp, *_power_corrections(hp, step), dot)


def _power_corrections(hp: HP, step: int, slopes: bool = True) -> tuple[Any, Any, Any, Any]:
    # c = 1 - beta^t, and -dc / d beta = t beta^(t - 1) (_power_slopes; with slopes=False not at all: an update reads
    # c alone)
    b1, b2, t = hp["beta1"], hp["beta2"], float(step)
    dc1, dc2 = _power_slopes(hp, step) if slopes else (None, None)
    return _one_minus(_pow(b1, t)), _one_minus(_pow(b2, t)), dc1, dc2


def _power_slopes(hp: HP, step: int) -> tuple[Any, Any]:
    # -dc / d beta = t beta^(t - 1) for c = 1 - beta^t, computed only where beta is learned
    t = float(step)
    dc1 = t * _pow(hp["beta1"], t - 1.0) if _learned(hp, "beta1") else None
    dc2 = t * _pow(hp["beta2"], t - 1.0) if _learned(hp, "beta2") else None
    return dc1, dc2


# ``1.0 - x`` and ``x ** t`` of a learned (tensor) value are the same torch.rsub and pow as these, but reach them
# through Tensor.__rsub__ and __pow__, Python wrappers that cost more than the 0-dim operation itself (and ``x ** 0.5``
# of a weight-sized tensor is ``x.pow(0.5)`` for the same reason).
def _one_minus(x: Any) -> Any:
    return torch.rsub(x, 1.0) if isinstance(x, Tensor) else 1.0 - x


def _pow(x: Any, t: float) -> Any:
    return x.pow(t) if isinstance(x, Tensor) else x**t


def adam_step(grad: Tensor, state: Any, hp: HP, c1: Any, c2: Any) -> tuple[Tensor, tuple]:
    """Adam's delta with bias corrections ``c1, c2``, and the six leading fields of :class:`AdamState` (the moments,
    and what :func:`adam_vjp` reads)."""
    beta1, beta2 = hp["beta1"], hp["beta2"]
    g1 = _one_minus(beta1) * grad
    g2 = _one_minus(beta2) * grad * grad
    m = beta1 * state.exp_avg + g1
    v = beta2 * state.exp_avg_sq + g2
    m_hat = m / c1
    v_hat = v / c2
    keep1, keep2 = _learned(hp, "beta1"), _learned(hp, "beta2")
    kept = (
        state.exp_avg if keep1 else None,
        state.exp_avg_sq if keep2 else None,
        g1 if keep1 else None,
        g2 if keep2 else None,
    )
    return hp["lr"] * (m_hat / (v_hat.pow(0.5) + hp["eps"])), (m, v, *kept)


def adam_vjp(
    grad_next: Tensor, after: Any, hp: HP, c1: Any, c2: Any, dc1: Any, dc2: Any, dot: Dot
) -> dict[str, Tensor]:
    """Adam's closed-form vjp, given its bias corrections and ``dc_i = -d c_i / d beta_i``."""
    # delta = lr * m_hat / den, den = sqrt(v_hat) + eps, m_hat = m / c1, v_hat = v / c2,
    # m = b1 m0 + (1 - b1) g, v = b2 v0 + (1 - b2) g^2. Scalar factors stay outside the dots (fewer passes).
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    sqrt_v_hat = (after.exp_avg_sq / c2).pow(0.5)
    den = sqrt_v_hat + hp["eps"]
    q = grad_next / den
    out = {}
    if _learned(hp, "beta1"):
        # (1 - b1) g is kept, not g: the dot with g is recovered by one scalar division, and no gradient is copied.
        q_m0, q_g1 = dot(q, after.previous_exp_avg), dot(q, after.grad_term)
        q_m = b1 * q_m0 + q_g1
        out["beta1"] = lr * ((q_m0 - q_g1 / _one_minus(b1)) / c1 + q_m * dc1 / (c1 * c1))
    else:
        q_m = dot(q, after.exp_avg)
    if _learned(hp, "lr"):
        out["lr"] = q_m / c1
    if _learned(hp, "beta2"):
        # d sqrt(v_hat) = d v_hat / (2 sqrt(v_hat)); delta depends on it through -lr m_hat / den^2.
        w = q * after.exp_avg / (den * sqrt_v_hat)
        w_v0, w_g2 = dot(w, after.previous_exp_avg_sq), dot(w, after.grad_sq_term)
        w_v = b2 * w_v0 + w_g2
        out["beta2"] = -0.5 * lr / c1 * ((w_v0 - w_g2 / _one_minus(b2)) / c2 + w_v * dc2 / (c2 * c2))
    return out


class AdamWRule(AdamRule):
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
        c1, c2, _, _ = _power_corrections(hp, step, slopes=False)
        delta, (m, v, *kept) = adam_step(grad, state, hp, c1, c2)
        delta = delta + hp["lr"] * hp["weight_decay"] * state.param
        decay_learned = _learned(hp, "lr") or _learned(hp, "weight_decay")
        return delta, AdamWState(m, v, state.param - delta, *kept, state.param if decay_learned else None)

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        return adamw_decay_vjp(adam_vjp(grad_next, after, hp, *_power_corrections(hp, step), dot), grad_next, after,
                               hp, dot)  # fmt: skip


def adamw_decay_vjp(out: dict[str, Tensor], grad_next: Tensor, after: Any, hp: HP, dot: Dot) -> dict[str, Tensor]:
    """Adam's vjp ``out`` plus that of AdamW's decay term ``lr * wd * param_before`` (``after.previous_param``)."""
    if _learned(hp, "lr") or _learned(hp, "weight_decay"):
        decay = dot(grad_next, after.previous_param)
        if _learned(hp, "lr"):
            out["lr"] = out["lr"] + hp["weight_decay"] * decay
        if _learned(hp, "weight_decay"):
            out["weight_decay"] = hp["lr"] * decay
    return out


class AdaGradRule(Rule):
    """AdaGrad as in the reference: the accumulator starts at 0.1 and is not differentiated."""

    name = "adagrad"
    defaults: ClassVar[Mapping[str, float]] = {"lr": 0.01, "eps": 1e-10, "initial_accumulator_value": 0.1}
    transforms: ClassVar[Mapping[str, Transform]] = {"lr": IDENTITY}

    def init(self, param: Tensor, hp: HP) -> SumState:
        return SumState(torch.zeros_like(param) + hp["initial_accumulator_value"])

    def update(self, grad: Tensor, state: SumState, hp: HP, step: int) -> tuple[Tensor, SumState]:
        g_sum = state.sum + torch.square(grad)
        return hp["lr"] * grad / torch.sqrt(g_sum + hp["eps"]), SumState(g_sum, grad if _learned(hp, "lr") else None)

    vjp_needs_inputs = False

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        if not _learned(hp, "lr"):
            return {}
        return {"lr": dot(grad_next, after.grad / torch.sqrt(after.sum + hp["eps"]))}


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
        s = gamma * state.sum + _one_minus(gamma) * torch.square(grad)
        keep = _learned(hp, "lr") or _learned(hp, "gamma")
        new = SumState(s, grad if keep else None, state.sum if _learned(hp, "gamma") else None)
        return hp["lr"] * grad / torch.sqrt(s + hp["eps"]), new

    vjp_needs_inputs = False

    def vjp(self, grad_next, grad, before, after, hp, step, dot):
        # delta = lr * g / sqrt(s + eps), s = gamma s0 + (1 - gamma) g^2
        if not (_learned(hp, "lr") or _learned(hp, "gamma")):
            return {}
        g = after.grad
        r = g / torch.sqrt(after.sum + hp["eps"])
        out = {}
        if _learned(hp, "lr"):
            out["lr"] = dot(grad_next, r)
        if _learned(hp, "gamma"):
            out["gamma"] = -0.5 * hp["lr"] * dot(grad_next, r / (after.sum + hp["eps"]) * (after.previous_sum - g * g))
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
