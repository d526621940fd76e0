"""The tower as pure functions over explicit state: ``init`` and ``update``, in the shape of the per-tensor rules.

A level's hyperparameters are the next level's parameters. Level 0 updates the model's weights; level k > 0 updates
the raw hyperparameters of level k - 1 with the hypergradients of the current loss; the top level's hyperparameters
are fixed. One call of :func:`update` is one step of the paper's method:

1. the hyperparameters are updated top-down, each level using the *new* values of the level above, and
2. the weights' update is computed with the new level-0 hyperparameters.

The hyperparameter updates are recorded by autograd, and so is the weight update, so that at the next step
:func:`hypergradients` takes one vector-Jacobian product with the new gradients: ``d loss_t / d h_(t-1)`` through one
step only, previous weights, gradients and states held constant, exactly as the reference obtains with
``loss.backward(create_graph=True)``, but without differentiating the model. When every learning level's rule has a
closed-form vector-Jacobian product (``Rule.vjp``, all built-in rules; tested against autograd and finite
differences), nothing is recorded at all: the chain rule runs level by level through the rules' vjps and the
transforms' derivatives, and the weight-sized work is a handful of dot products. A user's rule without ``vjp`` is
differentiated by autograd, which remains the reference.

Hyperparameter tensors may carry leading batch dimensions (``batch_shape``): then every model parameter carries the
same leading dimensions and each batch entry is an independent member of a population.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hypergrad.rules import Rule
from hypergrad.spec import Tower, validate_value
from hypergrad.transforms import EXP, Transform

__all__ = [
    "LevelState",
    "Plan",
    "TowerState",
    "detach",
    "hypergradients",
    "init",
    "make_plan",
    "natural_values",
    "update",
    "zero_hypergradients",
]

Value = float | Tensor


class LevelState(NamedTuple):
    hp: list[Tensor]  # raw learned hyperparameters: one tensor per param group at level 0, one above; none at the top
    rule: list[Any]  # the level's rule state, one per tensor the level updates


class TowerState(NamedTuple):
    step: int
    levels: list[LevelState]
    # What a rule's closed-form vjp needs from the last step (level 0's natural values with their graph back to
    # the raw hyperparameters, the gradients, the rule states before and after); None when autograd does it all.
    trace: Any = None


@dataclass(frozen=True)
class Plan:
    """What stays fixed for the life of an optimizer: the rules, the learned names, the fixed values."""

    rules: tuple[Rule, ...]
    learned: tuple[tuple[str, ...], ...]  # per level, in raw-vector order; () at the top
    transforms: tuple[tuple[Transform, ...], ...]  # per level, aligned with learned
    initial: tuple[tuple[Mapping[str, Value], ...], ...]  # per level, per group: every hyperparameter's initial value
    group_of: tuple[int, ...]  # level-0 tensor index -> its param group
    batch_shape: tuple[int, ...] = ()

    @property
    def height(self) -> int:
        return len(self.rules) - 1

    @property
    def closed_form(self) -> bool:
        """Whether every learning level's rule has a closed-form vjp (then the step records no autograd graph)."""
        return self.height > 0 and all(rule.has_vjp for rule in self.rules[:-1])


def make_plan(
    tower: Tower,
    group_values: Sequence[Mapping[str, Value]],
    group_sizes: Sequence[int],
    parameterization: str = "reference",
    batch_shape: Sequence[int] = (),
) -> Plan:
    """Resolve a tower for concrete param groups. ``group_values`` override level 0's initial values per group."""
    if parameterization not in ("reference", "log"):
        raise ValueError(f"parameterization must be 'reference' or 'log', but got {parameterization!r}")
    levels = tower.levels
    learned, transforms, initial = [], [], []
    for k, level in enumerate(levels):
        names = () if k == len(levels) - 1 else level.learned_names()
        per_group = [dict(level.values)] if k else [dict(level.values, **dict(v)) for v in group_values]
        for values in per_group:
            for name, value in values.items():
                if isinstance(value, float | int):
                    values[name] = validate_value(name, value, f"{level.rule.name}: ")
        trans = []
        for name in names:
            t = level.rule.transforms[name]
            if parameterization == "log" and name == "lr":
                t = EXP
                for values in per_group:
                    if isinstance(values["lr"], float) and values["lr"] <= 0.0:
                        raise ValueError(
                            f"{level.rule.name}: lr must be > 0 with parameterization='log', but got {values['lr']!r}"
                        )
            trans.append(t)
        learned.append(tuple(names))
        transforms.append(tuple(trans))
        initial.append(tuple(per_group))
    group_of = tuple(g for g, n in enumerate(group_sizes) for _ in range(n))
    return Plan(
        tuple(lv.rule for lv in levels),
        tuple(learned),
        tuple(transforms),
        tuple(initial),
        group_of,
        tuple(batch_shape),
    )


def _raw(plan: Plan, k: int, values: Mapping[str, Value], like: Tensor) -> Tensor:
    cols = [
        t.inverse(torch.as_tensor(values[n], dtype=like.dtype, device=like.device).expand(plan.batch_shape))
        for n, t in zip(plan.learned[k], plan.transforms[k], strict=True)
    ]
    return torch.stack(cols, dim=-1)


def init(plan: Plan, params: Sequence[Tensor]) -> TowerState:
    """The state before the first step; hyperparameters take the dtype and device of the first parameter."""
    if not params:
        raise ValueError("params must contain at least one tensor, but got an empty list")
    like = params[0]
    levels: list[LevelState] = []
    hp_below: list[Tensor] = []
    for k, rule in enumerate(plan.rules):
        hp = [_raw(plan, k, v, like) for v in plan.initial[k]] if plan.learned[k] else []
        values = natural_values(plan, k, hp)
        if k == 0:
            targets, groups = list(params), plan.group_of
        else:
            targets, groups = hp_below, (0,) * len(hp_below)
        states = [rule.init(t.detach(), _broadcast(plan, values[g], t)) for t, g in zip(targets, groups, strict=True)]
        levels.append(LevelState(hp, states))
        hp_below = hp
    return TowerState(0, levels)


def natural_values(plan: Plan, k: int, hp: Sequence[Tensor]) -> list[dict[str, Value]]:
    """Level ``k``'s hyperparameters per group in their natural scale (learned ones differentiable)."""
    out = []
    for g, initial in enumerate(plan.initial[k]):
        values = dict(initial)
        if hp:
            raw = hp[g]
            for i, (name, t) in enumerate(zip(plan.learned[k], plan.transforms[k], strict=True)):
                values[name] = t.forward(raw[..., i])
        out.append(values)
    return out


def _broadcast(plan: Plan, values: dict[str, Value], target: Tensor) -> dict[str, Value]:
    # A member's scalar hyperparameter of shape batch_shape must line up with the member's slice of the tensor.
    if not plan.batch_shape:
        return values
    extra = target.dim() - len(plan.batch_shape)
    shape = plan.batch_shape + (1,) * extra
    return {k: v.reshape(shape) if isinstance(v, Tensor) else v for k, v in values.items()}


def _apply(
    plan: Plan,
    k: int,
    grads: Sequence[Tensor | None],
    states: Sequence[Any],
    values: list[dict[str, Value]],
    groups: Sequence[int],
    step: int,
) -> tuple[list[Tensor | None], list[Any]]:
    rule = plan.rules[k]
    deltas: list[Tensor | None] = []
    new_states = []
    for grad, state, g in zip(grads, states, groups, strict=True):
        if grad is None:  # a parameter without a gradient is left alone, as in torch.optim
            deltas.append(None)
            new_states.append(state)
            continue
        delta, state = rule.update(grad, state, _broadcast(plan, values[g], grad), step)
        deltas.append(delta)
        new_states.append(state)
    return deltas, new_states


def update(
    plan: Plan,
    state: TowerState,
    grads: Sequence[Tensor | None],
    hypergrads: Sequence[Sequence[Tensor]],
) -> tuple[TowerState, list[Tensor | None]]:
    """One step: returns the new state and the weight updates (``param -= delta``).

    What the next :func:`hypergradients` needs rides along in the returned state: the rules' closed-form inputs
    (``trace``) or, for a rule without ``vjp``, the autograd graph of this step.

    ``grads`` are the model gradients (None for a parameter without one); ``hypergrads[k]`` the gradients of the loss
    with respect to level k's raw hyperparameters, as returned by :func:`hypergradients`.
    """
    step = state.step + 1
    top = len(plan.rules) - 1
    levels: list[LevelState | None] = [None] * (top + 1)
    new_hp: list[list[Tensor]] = [[] for _ in range(top + 1)]
    if plan.closed_form:
        # Every learning level has a closed-form vjp: nothing needs recording; each level keeps what its vjp reads.
        trace: list[Any] = [None] * top
        with torch.no_grad():
            for k in range(top, -1, -1):
                values = natural_values(plan, k, new_hp[k])
                received = grads if k == 0 else hypergrads[k - 1]
                groups = plan.group_of if k == 0 else (0,) * len(received)
                deltas, rule_states = _apply(plan, k, received, state.levels[k].rule, values, groups, step)
                if k > 0:
                    new_hp[k - 1] = [h - d for h, d in zip(state.levels[k - 1].hp, deltas, strict=True)]
                if k < top:
                    trace[k] = (values, list(received), state.levels[k].rule, rule_states)
                levels[k] = LevelState(new_hp[k], rule_states)
        return TowerState(step, levels, _ClosedTrace(trace)), deltas  # type: ignore[arg-type]
    with torch.enable_grad():
        for k in range(top, 0, -1):
            below = state.levels[k - 1].hp
            values = natural_values(plan, k, new_hp[k])
            deltas, rule_states = _apply(
                plan, k, hypergrads[k - 1], state.levels[k].rule, values, (0,) * len(below), step
            )
            fresh = [h.detach() - d for h, d in zip(below, deltas, strict=True)]
            # The top learned level depends on nothing learned: it is where the hypergradient chain starts.
            new_hp[k - 1] = [h if h.requires_grad else h.requires_grad_() for h in fresh]
            levels[k] = LevelState(new_hp[k], rule_states)
        values = natural_values(plan, 0, new_hp[0])
    rule = plan.rules[0]
    if rule.has_vjp and plan.learned[0]:
        # The weight update itself needs no graph: its hypergradient comes from the rule's closed form.
        plain = [{k: v.detach() if isinstance(v, Tensor) else v for k, v in vs.items()} for vs in values]
        with torch.no_grad():
            deltas, rule_states = _apply(plan, 0, grads, state.levels[0].rule, plain, plan.group_of, step)
        trace = (values, plain, list(grads), state.levels[0].rule, rule_states)
    else:
        with torch.enable_grad():
            deltas, rule_states = _apply(plan, 0, grads, state.levels[0].rule, values, plan.group_of, step)
        trace = None
    levels[0] = LevelState(new_hp[0], rule_states)
    return TowerState(step, levels, trace), deltas  # type: ignore[arg-type]


def _reducer(plan: Plan):
    if not plan.batch_shape:
        return lambda a, b: torch.dot(a.reshape(-1), b.reshape(-1))
    n = len(plan.batch_shape)
    # keepdim: the result lines up with the member's hyperparameters, broadcast as (members, 1, ..., 1)
    return lambda a, b: (a * b).sum(dim=tuple(range(n, a.dim())), keepdim=True) if a.dim() > n else a * b


def _vjp_level0(plan: Plan, live: TowerState, grads: Sequence[Tensor | None]) -> list[tuple[Tensor, Tensor]]:
    """(natural value with graph, sum over the group of grad_next . d delta / d value) for every learned value."""
    values, plain, prev_grads, before, after = live.trace
    rule, dot = plan.rules[0], _reducer(plan)
    sums: list[dict[str, Tensor]] = [{} for _ in values]
    for i, (g_next, g) in enumerate(zip(grads, prev_grads, strict=True)):
        if g_next is None or g is None:
            continue
        group = plan.group_of[i]
        hp = _broadcast(plan, plain[group], g)
        for name, v in rule.vjp(g_next, g, before[i], after[i], hp, live.step, dot).items():
            v = v.reshape(plan.batch_shape)
            acc = sums[group]
            acc[name] = v if name not in acc else acc[name] + v
    return [(values[g][n], s) for g, acc in enumerate(sums) for n, s in acc.items()]


class _ClosedTrace(NamedTuple):
    levels: list[Any]  # per learning level: (natural values per group, gradients received, states before, after)


def _closed_form_hypergradients(plan: Plan, live: TowerState, grads: Sequence[Tensor | None]) -> list[list[Tensor]]:
    """The chain rule level by level: the loss's gradient with respect to what level k updated (level 0: the
    weights), through level k's closed-form vjp and its transforms, is the gradient with respect to level k's raw
    hyperparameters, which level k + 1 updated."""
    dot = _reducer(plan)
    upstream: Sequence[Tensor | None] = grads
    out = []
    for k, (values, received, before, after) in enumerate(live.trace.levels):
        groups = plan.group_of if k == 0 else (0,) * len(received)
        sums: list[dict[str, Tensor]] = [{} for _ in values]
        for i, (u, g) in enumerate(zip(upstream, received, strict=True)):
            if u is None or g is None:
                continue
            hp = _broadcast(plan, values[groups[i]], g)
            for name, v in plan.rules[k].vjp(u, g, before[i], after[i], hp, live.step, dot).items():
                if plan.batch_shape:
                    v = v.reshape(plan.batch_shape)
                sums[groups[i]][name] = v if name not in sums[groups[i]] else sums[groups[i]][name] + v
        level = []
        for g, raw in enumerate(live.levels[k].hp):
            cols = []
            for j, (name, t) in enumerate(zip(plan.learned[k], plan.transforms[k], strict=True)):
                s = sums[g].get(name)
                if s is None:  # this hyperparameter has not acted yet (e.g. momentum at the first step)
                    cols.append(torch.zeros_like(raw[..., j]))
                    continue
                # What level k updated moved by -delta, so d loss / d value = -(upstream . d delta / d value).
                cols.append(-s if t.derivative is None else -s * t.derivative(raw[..., j]))
            level.append(torch.stack(cols, dim=-1))
        out.append(level)
        upstream = level
    return out


def hypergradients(
    plan: Plan, live: TowerState | None, deltas: Sequence[Tensor | None], grads: Sequence[Tensor | None]
) -> list[list[Tensor]]:
    """``d loss / d raw hyperparameters`` of every learned level, from the last step and the new gradients.

    ``live`` and ``deltas`` are what the previous :func:`update` returned (None before the first step, when every
    hypergradient is zero); ``grads`` the gradients of the current loss with respect to the weights.
    """
    if live is None:
        raise ValueError("live must be the state returned by the previous update")
    if isinstance(live.trace, _ClosedTrace):
        return _closed_form_hypergradients(plan, live, grads)
    inputs = [h for level in live.levels[:-1] for h in level.hp]
    if live.trace is not None:
        pairs = _vjp_level0(plan, live, grads)
    else:
        pairs = [
            (d, g) for d, g in zip(deltas, grads, strict=True) if d is not None and g is not None and d.requires_grad
        ]
    if pairs:
        # The weights moved by -delta, so d loss / d h = -(g . d delta / d h).
        found = torch.autograd.grad([d for d, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    else:
        found = (None,) * len(inputs)
    flat = [torch.zeros_like(h) if f is None else -f for h, f in zip(inputs, found, strict=True)]
    out, i = [], 0
    for level in live.levels[:-1]:
        out.append(flat[i : i + len(level.hp)])
        i += len(level.hp)
    return out


def zero_hypergradients(state: TowerState) -> list[list[Tensor]]:
    """The hypergradients of the first step: zero, since no hyperparameter has acted on the loss yet."""
    return [[torch.zeros_like(h) for h in level.hp] for level in state.levels[:-1]]


def detach(state: TowerState) -> TowerState:
    """The same values with no autograd history (what a checkpoint stores)."""
    return TowerState(
        state.step,
        [LevelState([h.detach() for h in lv.hp], [_detach_any(s) for s in lv.rule]) for lv in state.levels],
    )


def _detach_any(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_detach_any(v) for v in x))
    return x
