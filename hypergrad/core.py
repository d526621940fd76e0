"""The contract of the library, in one file: a tower is two pure functions over explicit state.

    plan = make_plan(tower, group_values, group_sizes)   # what stays fixed: rules, learned names, initial values
    state = init(plan, params)                           # -> TowerState
    deltas, state = update(plan, state, grads)           # one step; the new weights are  param - delta

This is optax's shape (``init(params) -> state``, ``update(grads, state) -> (updates, state)``), and
:class:`hypergrad.HyperOptimizer` is a thin ``torch.optim.Optimizer`` shell over it. Minimizing ``|w - 1|^2``:

    >>> import torch, hypergrad
    >>> from hypergrad import core
    >>> plan = core.make_plan(hypergrad.parse_spec("sgd(0.1)/sgd(0.01)"), [{}], [1])
    >>> w = torch.zeros(3)
    >>> state = core.init(plan, [w])
    >>> for _ in range(3):
    ...     deltas, state = core.update(plan, state, [2 * (w - 1.0)])
    ...     w = w - deltas[0]
    >>> round(float(core.natural_values(plan, 0, state.levels[0].hp)[0]["lr"]), 4)  # learned from 0.1
    0.2427

**The tower.** A level's hyperparameters are the next level's parameters. Level 0 updates the model's weights with
the gradients; level k > 0 updates the raw hyperparameters of level k - 1 with their hypergradients; the top level's
hyperparameters are fixed. One :func:`update` is one step of the paper's method:

1. the hypergradients ``d loss_t / d h_(t-1)`` of every learned level, from the new ``grads`` and what the last step
   left in ``state`` (:func:`hypergradients`, also public for inspection and tests);
2. the hyperparameters, updated top-down, each level using the *new* values of the level above;
3. the weights' update ``deltas``, with the new level-0 hyperparameters.

**One chain rule.** The weights moved by ``-delta_0(h_0)`` and level k's raw hyperparameters ``x_k`` moved by
``-delta_(k+1)(h_(k+1))``, with ``h_k = T_k(x_k)`` (a transform of :mod:`hypergrad.transforms`). So, level by level from
the weights up, with ``u_0 = grads``::

    u_(k+1) = d loss / d x_k = -(u_k . d delta_k / d h_k) * T_k'(x_k)

through the last step only, holding the previous weights, gradients and states constant: exactly what the reference
(``gdtuo``) gets from ``loss.backward(create_graph=True)``, without differentiating the model. The vector-Jacobian
product ``u . d delta / d h`` is :meth:`Rule.vjp <hypergrad.rules.Rule.vjp>`: by default autograd through the rule's
own ``update``, replayed on what the core kept of the last step (its gradient and state before); a built-in rule
overrides it with a closed form that reads only its own state (tests compare every closed form with the default and
with finite differences). Nothing is recorded between steps: the state is plain tensors (or plain floats, below).

**State.** Everything lives in :class:`TowerState`: the step count, each level's raw hyperparameters and rule states,
and per learning level a :class:`Trace` of the last step (the values used and their transforms' derivatives, and the
gradient and earlier state where the rule's vjp reads them). A checkpoint is the state (without the derivatives, which
a restored state computes again, by the same operations); a restored state continues bit for bit. Where levels 1..top
run as Python floats (below), ``update(..., lazy=True)`` may leave them as floats: the state's ``levels`` and ``trace``
then hold level 0's entries alone and ``floats`` holds the rest, rounded to the dtype, i.e. exactly the values their
tensors would hold. :func:`materialize` builds those tensors (a checkpoint, a reader of the hyperparameters);
:func:`update` and :func:`hypergradients` take either form and compute the same results bit for bit.
:class:`hypergrad.HyperOptimizer` steps lazily and builds the tensors only when its state is read.

**Ownership.** :func:`update` keeps no reference to ``grads``: where a rule's state (or the trace) keeps a gradient, the
core keeps a copy, so a caller may zero or reuse gradient buffers in place (``zero_grad(set_to_none=False)``, DDP bucket
views), unless the caller hands them over with ``donate=True``. ``grads`` must be in the hyperparameters' dtype; a
parameter without a gradient (None) is left alone. ``hypergrads`` passed to :func:`update` may be kept as they are: do
not change them in place afterwards.

**Populations.** With ``make_plan(..., batch_shape=(K,))`` every hyperparameter and every parameter carry a leading
dimension of K independent members (a value differing between members is a (K,) tensor in ``plan.initial``): each
member follows exactly the path it would follow alone, and the hypergradients are (K,) per learned value. A caller
that masks members passes its own ``hypergrads`` to :func:`update` (e.g. zeros for a frozen member).

**Speed, same results.** Without population dimensions, a built-in rule at level 0 other than plain SGD runs as one
multi-tensor (``torch._foreach_*``) operation per param group (:mod:`hypergrad._foreach`: updates bitwise those of
the rule, vjps to round-off), and levels 1..top run as Python floats (:mod:`hypergrad._scalar`) when there are two or
more and one of them is more than plain SGD (to round-off), or when they are many levels of plain SGD on one number
each (bit for bit). Both write exactly this module's state (or its floats, with ``lazy=True``); anything else takes
the per-tensor path below. ``make_plan(..., compile=True)``
(opt-in) runs level 0's multi-tensor update and vjp through ``torch.compile`` (to round-off; :mod:`hypergrad._foreach`
says why no step compiles again once the state has settled). On the CPU, eagerly, a level 0 of Adam learning ``lr``,
``beta1`` and ``beta2`` computes its scalars (values, bias corrections, the hypergradient's scalar part) as numpy
numbers of the dtype: the 0-dim tensor operations' IEEE operations, bit for bit (``Plan.numbers``,
:func:`hypergrad._foreach.adam_values`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hypergrad import _foreach, _scalar
from hypergrad.rules import Rule, SGDRule, SGDState
from hypergrad.spec import Tower, validate_value
from hypergrad.transforms import EXP, Transform, value_and_slope

__all__ = [
    "LevelState",
    "Plan",
    "TowerState",
    "Trace",
    "apply_rule",
    "hypergradients",
    "init",
    "make_plan",
    "materialize",
    "natural_values",
    "rule_vjp",
    "update",
]

Value = float | Tensor


class LevelState(NamedTuple):
    hp: list[Tensor]  # raw learned hyperparameters: one (..., n_learned) tensor per param group at level 0, one above
    rule: list[Any]  # the level's rule state after the last step, one per tensor the level updates


class Trace(NamedTuple):
    """What the next hypergradient reads about the last step of one learning level."""

    hp: list[Tensor]  # the raw hyperparameters the level used
    values: list[dict[str, Value]]  # their natural values, per group
    moved: list[bool] | None  # per tensor: whether it received a gradient (None: all did)
    grads: list[Tensor | None] | None  # per tensor: a copy of the gradient; None if the rule's vjp does not read it
    before: list[Any] | None  # per tensor: the rule state before the step; None if the rule's vjp does not read it
    # Level 0's, per group, per learned value: the transform's derivative at hp (None for the identity), computed with
    # the values from one tanh or exp; None where not kept (levels above, a restored checkpoint): the hypergradient
    # computes it then, by the same operations.
    slopes: list[list[Tensor | None]] | None = None


class TowerState(NamedTuple):
    step: int
    levels: list[LevelState]  # level 0 (the weights' optimizer) first; the top level's hp is empty
    trace: list[Trace] = []  # noqa: RUF012 -- never mutated; one per learning level, empty before the first step
    # Levels 1..top as floats (hypergrad._scalar.Floats), only in a state from update(..., lazy=True): then levels
    # and trace hold level 0's entries alone, and materialize() gives the state with every level in tensors.
    floats: Any = None


@dataclass(frozen=True)
class Plan:
    """What stays fixed for the life of an optimizer: the rules, the learned names, the fixed values."""

    rules: tuple[Rule, ...]
    learned: tuple[tuple[str, ...], ...]  # per level, in raw-vector order; () at the top
    transforms: tuple[tuple[Transform, ...], ...]  # per level, aligned with learned
    initial: tuple[tuple[Mapping[str, Value], ...], ...]  # per level, per group: every hyperparameter's initial value
    group_of: tuple[int, ...]  # level-0 tensor index -> its param group
    batch_shape: tuple[int, ...] = ()
    compile: bool = False  # level 0's multi-tensor update and vjp through torch.compile (to round-off; see _foreach)

    @property
    def height(self) -> int:
        return len(self.rules) - 1

    # What follows from the fields, worked out once per plan rather than once per step (a plan never changes).
    @functools.cached_property
    def fused(self) -> tuple[bool, ...]:
        """Per level: whether it runs as one multi-tensor call per group (see :func:`_fused`)."""
        return tuple(_fused(self, k) for k in range(len(self.rules)))

    @functools.cached_property
    def plain(self) -> tuple[bool, ...]:
        """Per level: whether it is SGD without momentum (see :func:`_plain_sgd`)."""
        return tuple(_plain_sgd(self, k) for k in range(len(self.rules)))

    @functools.cached_property
    def numbers(self) -> bool:
        """Whether level 0's Adam scalars run as numbers of the dtype (hypergrad._foreach.adam_values)."""
        names = tuple(t.name for t in self.transforms[0])
        return (
            self.height > 0
            and self.fused[0]
            and _foreach.numbers_apply(self.rules[0], self.learned[0], names, bool(self.batch_shape), self.compile)
        )

    @functools.cached_property
    def builtin(self) -> tuple[bool, ...]:
        """Per level: whether its rule is built in, so that a state keeps the gradient itself, never a view of it."""
        return tuple(type(r) in _foreach.BUILTIN for r in self.rules)


def make_plan(
    tower: Tower,
    group_values: Sequence[Mapping[str, Value]],
    group_sizes: Sequence[int],
    parameterization: str = "reference",
    batch_shape: Sequence[int] = (),
    compile: bool = False,
) -> Plan:
    """Resolve a tower for concrete param groups. ``group_values`` override level 0's initial values per group."""
    if parameterization not in ("reference", "log"):
        raise ValueError(f"parameterization must be 'reference' or 'log', but got {parameterization!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, but got {compile!r}")
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
            for values in per_group if t == EXP else ():  # stored as its log: log(0) does not exist
                if isinstance(values[name], float) and values[name] <= 0.0:
                    how = "with parameterization='log'" if name == "lr" else "while learned (stored as its log)"
                    raise ValueError(f"{level.rule.name}: {name} must be > 0 {how}, but got {values[name]!r}")
            trans.append(t)
        learned.append(tuple(names))
        transforms.append(tuple(trans))
        initial.append(tuple(per_group))
    group_of = tuple(g for g, n in enumerate(group_sizes) for _ in range(n))
    rules = tuple(lv.rule for lv in levels)
    return Plan(rules, tuple(learned), tuple(transforms), tuple(initial), group_of, tuple(batch_shape), compile)


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
        targets, groups = (list(params), plan.group_of) if k == 0 else (hp_below, (0,) * len(hp_below))
        states = [rule.init(t.detach(), _broadcast(plan, values[g], t)) for t, g in zip(targets, groups, strict=True)]
        levels.append(LevelState(hp, states))
        hp_below = hp
    return TowerState(0, levels)


def outside_inference_mode(fn: Any) -> Any:
    """``fn`` run outside ``torch.inference_mode()`` (and in no-grad mode) whoever calls it: a step's state outlives
    the call, and tensors made under the mode can be neither updated in place nor differentiated once it ends, while
    autograd (the vjp of a rule without a closed form) records nothing under it. The results are those outside it."""

    @functools.wraps(fn)
    def outside(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():  # leaving inference_mode turns grad mode back on
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return outside


@outside_inference_mode
def update(
    plan: Plan,
    state: TowerState,
    grads: Sequence[Tensor | None],
    hypergrads: Sequence[Sequence[Tensor]] | None = None,
    *,
    lazy: bool = False,
    donate: bool = False,
) -> tuple[list[Tensor | None], TowerState]:
    """One step: the weight updates (``param -= delta``; None where ``grads`` has None) and the new state.

    ``hypergrads`` defaults to :func:`hypergradients` of ``state`` and ``grads``; pass them to mask or replay a step.
    With ``lazy=True`` the levels above the first may be returned as floats (see **State**). With ``donate=True`` the
    caller hands ``grads`` over and never changes them afterwards: the state keeps them without a copy (see
    **Ownership**; a population's fresh gradients from ``torch.autograd.grad`` are weight-sized, and so is a copy).
    """
    if not _scalar.readable(plan, state):
        state = materialize(state)
    floats_path = _scalar.applies(plan) and _scalar.readable(plan, state)
    hyper: Any = hypergrads
    if hyper is None:
        hyper = _hypergradients(plan, state, grads, floats=lazy and floats_path and _scalar.lazy(plan))
    step, top = state.step + 1, plan.height
    levels: list[Any] = [None] * (top + 1)
    trace: list[Any] = [None] * top
    above: list[LevelState] | None = None
    above_trace: list[Trace] = []
    floats = None
    if floats_path:  # levels top..1 are a few numbers each: Python floats, no dispatch per level
        hp, above, above_trace, floats = _scalar.update(plan, state, hyper, step)
        if above is None and not lazy:
            above, above_trace = _scalar.tensors(floats)
            floats = None
        first = 0
    else:
        hp, first = state.levels[top].hp, top
    with _no_grad():
        for k in range(first, -1, -1):
            # Level 0's trace keeps its slopes; above, the float path (hypergrad._scalar) writes traces without them,
            # and the tensor path must write the same state.
            if k == 0 < top:
                fast = _foreach.adam_values(plan.initial[0], hp, step) if plan.numbers else None
                values, slopes = _values_slopes(plan, k, hp) if fast is None else fast
            else:
                values, slopes = natural_values(plan, k, hp), None
            received = grads if k == 0 else hyper[k - 1]
            groups = plan.group_of if k == 0 else (0,) * len(received)
            before = state.levels[k].rule
            deltas, rule_states = apply_rule(plan, k, received, before, values, groups, step)
            if k == 0 and not donate:  # the model's gradients are borrowed; the hypergradients above are our own
                rule_states = _owned(plan, rule_states, received)
            levels[k] = LevelState(hp, rule_states)
            if k < top:
                if not plan.rules[k].vjp_needs_inputs:  # the rule's state after the step holds all its vjp reads
                    kept, kept_before = None, None
                else:  # the caller may zero or reuse its gradient buffers before the next step: keep a copy
                    kept = list(received) if k or donate else [None if g is None else g.clone() for g in received]
                    kept_before = list(before)
                # hypergradients are never None; a None gradient is recorded (None: every tensor moved)
                moved = [g is not None for g in received] if k == 0 and any(g is None for g in received) else None
                trace[k] = Trace(hp, values, moved, kept, kept_before, slopes)
            if k > 0:
                hp = [h - d for h, d in zip(state.levels[k - 1].hp, deltas, strict=True)]
    if first == 0:
        levels = [levels[0]] if above is None else [levels[0], *above]
        trace = [trace[0], *(above_trace or [])] if top else []
    return deltas, TowerState(step, levels, trace, floats)


def materialize(state: TowerState) -> TowerState:
    """``state`` with every level in tensors: itself, unless :func:`update` (``lazy=True``) left levels 1..top as
    floats."""
    if state.floats is None:
        return state
    levels, traces = _scalar.tensors(state.floats)
    return TowerState(state.step, [state.levels[0], *levels], [state.trace[0], *traces])


@outside_inference_mode
def hypergradients(plan: Plan, state: TowerState, grads: Sequence[Tensor | None]) -> list[list[Tensor]]:
    """``d loss / d raw hyperparameters`` of every learned level (level 0 first, one tensor per group), where the
    loss's gradients with respect to the weights are ``grads``: zero before the first step, when no hyperparameter
    has acted on the loss yet."""
    if not _scalar.readable(plan, state):
        state = materialize(state)
    return _hypergradients(plan, state, grads, floats=False)


def _hypergradients(plan: Plan, state: TowerState, grads: Sequence[Tensor | None], floats: bool) -> Any:
    """:func:`hypergradients`; with ``floats``, where the levels above the first run as floats, those of levels
    0..top-1 as :class:`hypergrad._scalar.Hyper` (what :func:`hypergrad._scalar.update` reads without a tensor)."""
    if not state.trace:
        return [[torch.zeros_like(h) for h in level.hp] for level in state.levels[:-1]]
    upstream: Sequence[Tensor | None] = grads
    out = []
    with _no_grad():
        for k, trace in enumerate(state.trace):
            level = _numbers_hypergradients(plan, upstream, trace, state.levels[0].rule, state.step) if k == 0 else None
            if level is None:
                level = _level_hypergradients(plan, k, upstream, trace, state.levels[k].rule, state.step)
            out.append(level)
            upstream = level
            if k == 0 and _scalar.applies(plan):
                if floats:
                    return _scalar.hyper_floats(plan, state, level)
                return out + _scalar.hypergradients(plan, state, level)
    return out


def _level_hypergradients(
    plan: Plan, k: int, upstream: Sequence[Tensor | None], trace: Trace, after: Sequence[Any], step: int
) -> list[Tensor]:
    """Level ``k``'s hypergradients, one tensor per group, from the vjps of its rule."""
    sums = rule_vjp(plan, k, upstream, trace, after, step)
    level = []
    for g, raw in enumerate(trace.hp):
        cols = []
        for j, (name, t) in enumerate(zip(plan.learned[k], plan.transforms[k], strict=True)):
            s = sums[g].get(name)
            if s is None:  # this hyperparameter has not acted yet (e.g. momentum at the first step)
                cols.append(torch.zeros_like(raw.select(-1, j)))
                continue
            # What level k updated moved by -delta, so d loss / d value = -(upstream . d delta / d value).
            if trace.slopes is not None:
                cols.append(-s if t.derivative is None else -s * trace.slopes[g][j])
            else:
                cols.append(-s if t.derivative is None else -s * t.derivative(raw.select(-1, j)))
        # one value: the same (..., 1) tensor as a stack of it, as a view
        level.append(cols[0].unsqueeze(-1) if len(cols) == 1 else torch.stack(cols, dim=-1))
    return level


def _numbers_hypergradients(
    plan: Plan, upstream: Sequence[Tensor | None], trace: Trace, after: Sequence[Any], step: int
) -> list[Tensor] | None:
    """Level 0's hypergradients per group by hypergrad._foreach.adam_hypergradient (bit for bit those of the loop in
    :func:`_hypergradients`), where its update left the numbers for every group; else None."""
    if not plan.numbers:
        return None
    keep = [u is not None and (trace.moved is None or trace.moved[i]) for i, u in enumerate(upstream)]
    parts = []
    for g, idx in enumerate(_by_group(plan.group_of, keep, len(trace.values))):
        afters = [after[i] for i in idx]
        if not idx or not _foreach.adam_numbers_ready(afters, trace.values[g], step):
            return None
        parts.append(([upstream[i] for i in idx], afters))
    return [
        _foreach.adam_hypergradient(grads, afters, trace.values[g], step) for g, (grads, afters) in enumerate(parts)
    ]


def natural_values(plan: Plan, k: int, hp: Sequence[Tensor]) -> list[dict[str, Value]]:
    """Level ``k``'s hyperparameters per group in their natural scale (fixed ones as in ``plan.initial``)."""
    out = []
    for g, initial in enumerate(plan.initial[k]):
        values = dict(initial)
        if hp:
            raw = hp[g]
            for i, (name, t) in enumerate(zip(plan.learned[k], plan.transforms[k], strict=True)):
                values[name] = t.forward(raw.select(-1, i))
        out.append(values)
    return out


def _values_slopes(plan: Plan, k: int, hp: Sequence[Tensor]) -> tuple[list[dict[str, Value]], list[list[Any]]]:
    """:func:`natural_values` and, per group, each learned value's transform derivative at its raw value (what the
    next hypergradient multiplies by), from one tanh or exp each (:func:`hypergrad.transforms.value_and_slope`)."""
    out, slopes = [], []
    for g, initial in enumerate(plan.initial[k]):
        values = dict(initial)
        row = []
        if hp:
            raw = hp[g]
            for i, (name, t) in enumerate(zip(plan.learned[k], plan.transforms[k], strict=True)):
                values[name], d = value_and_slope(t, raw.select(-1, i))
                row.append(d)
        out.append(values)
        slopes.append(row)
    return out, slopes


# -- the two places a rule is called, per level (what a fused multi-tensor kernel replaces) ------------------------
def apply_rule(
    plan: Plan,
    k: int,
    grads: Sequence[Tensor | None],
    states: Sequence[Any],
    values: list[dict[str, Value]],
    groups: Sequence[int],
    step: int,
) -> tuple[list[Tensor | None], list[Any]]:
    """Level ``k``'s rule on every tensor it updates: the deltas and the new rule states."""
    rule = plan.rules[k]
    if plan.fused[k]:
        fused = _apply_foreach(rule, grads, states, values, groups, step, plan.compile)
        if fused is not None:
            return fused
    deltas: list[Tensor | None] = []
    new_states = []
    batched = bool(plan.batch_shape)
    if plan.plain[k] and not batched:
        # SGDRule.update without momentum, inline: grad * lr, and the gradient kept where lr is learned (a tensor).
        # This loop runs per tensor and level at every step; the call and its checks cost more than the product.
        for grad, state, g in zip(grads, states, groups, strict=True):
            if grad is None:
                deltas.append(None)
                new_states.append(state)
            else:
                lr = values[g]["lr"]
                deltas.append(grad * lr)
                new_states.append(SGDState(None, grad if isinstance(lr, Tensor) else None))
        return deltas, new_states
    update = rule.update
    for grad, state, g in zip(grads, states, groups, strict=True):
        if grad is None:  # a parameter without a gradient is left alone, as in torch.optim
            deltas.append(None)
            new_states.append(state)
            continue
        delta, state = update(grad, state, _broadcast(plan, values[g], grad) if batched else values[g], step)
        deltas.append(delta)
        new_states.append(state)
    return deltas, new_states


def rule_vjp(
    plan: Plan, k: int, upstream: Sequence[Tensor | None], trace: Trace, after: Sequence[Any], step: int
) -> list[dict[str, Tensor]]:
    """Per group of level ``k``: ``sum over its tensors of upstream . d delta / d value`` for every learned value."""
    rule, dot = plan.rules[k], _reducer(plan.batch_shape)
    groups = plan.group_of if k == 0 else (0,) * len(after)
    if plan.fused[k]:
        fused = _vjp_foreach(rule, upstream, trace, after, groups, step, plan.compile)
        if fused is not None:
            return fused
    sums: list[dict[str, Tensor]] = [{} for _ in trace.values]
    if plan.plain[k] and plan.learned[k] and not plan.batch_shape:
        # SGDRule.vjp without momentum inline: upstream . grad per tensor, added in the tensors' order per group
        for i, u in enumerate(upstream):
            if u is None or (trace.moved is not None and not trace.moved[i]):
                continue
            acc = sums[groups[i]]
            v = dot(u, after[i].grad)
            acc["lr"] = v if "lr" not in acc else acc["lr"] + v
        return sums
    kept = trace.grads is not None
    for i, u in enumerate(upstream):
        if u is None or (trace.moved is not None and not trace.moved[i]):
            continue
        g = groups[i]
        hp = _broadcast(plan, trace.values[g], u) if plan.batch_shape else trace.values[g]
        grad, before = (trace.grads[i], trace.before[i]) if kept else (None, None)
        acc = sums[g]
        for name, v in rule.vjp(u, grad, before, after[i], hp, step, dot).items():
            if plan.batch_shape:
                v = v.reshape(plan.batch_shape)
            acc[name] = v if name not in acc else acc[name] + v
    return sums


def _fused(plan: Plan, k: int) -> bool:
    """Whether level ``k`` runs as one multi-tensor call per group (hypergrad._foreach). Level 0 only: a level above
    updates one small vector per group, where grouping costs more than it saves. Not plain SGD either (two operations
    per tensor): there the multi-tensor call costs more than it saves (measured on the MNIST MLP, CPU, one thread:
    460 against 432 us per ``sgd/sgd`` step; with momentum, AdaGrad or Adam it is as fast or faster), nor compiled
    (``plan.compile``: its update and hypergradient over the MLP's four tensors took 61-65 against 36-40 us eager,
    the compiled call's own overhead)."""
    rule = plan.rules[k]
    if k or plan.batch_shape or type(rule) not in _foreach.BUILTIN:
        return False
    plain_sgd = (
        type(rule) is SGDRule
        and "momentum" not in plan.learned[0]
        and all(g.get("momentum", 0.0) == 0.0 for g in plan.initial[0])
    )
    return not plain_sgd


def _plain_sgd(plan: Plan, k: int) -> bool:
    """Whether level ``k`` is SGD without momentum: none learned (so ``lr`` alone, if anything), every group's a float
    zero (the branch SGDRule.update takes)."""
    return (
        type(plan.rules[k]) is SGDRule
        and "momentum" not in plan.learned[k]
        and all(isinstance(m := g["momentum"], float) and m == 0.0 for g in plan.initial[k])
    )


def _by_group(groups: Sequence[int], keep: Sequence[bool], n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for i, (g, kept) in enumerate(zip(groups, keep, strict=True)):
        if kept:
            out[g].append(i)
    return out


def _apply_foreach(rule, grads, states, values, groups, step, compiled):
    """apply_rule with one multi-tensor operation per group (hypergrad._foreach: bitwise the same results)."""
    deltas: list[Tensor | None] = [None] * len(grads)
    new_states = list(states)
    for g, idx in enumerate(_by_group(groups, [x is not None for x in grads], len(values))):
        if not idx:
            continue
        out = _foreach.update(rule, [grads[i] for i in idx], [states[i] for i in idx], values[g], step, compiled)
        if out is None:
            return None
        for i, d, st in zip(idx, *out, strict=True):
            deltas[i], new_states[i] = d, st
    return deltas, new_states


def _vjp_foreach(rule, upstream, trace, after, groups, step, compiled):
    """rule_vjp with one multi-tensor operation per group (hypergrad._foreach: the same to round-off)."""
    keep = [u is not None and (trace.moved is None or trace.moved[i]) for i, u in enumerate(upstream)]
    sums: list[dict[str, Tensor]] = [{} for _ in trace.values]
    for g, idx in enumerate(_by_group(groups, keep, len(trace.values))):
        if not idx:
            continue
        out = _foreach.vjp(rule, [upstream[i] for i in idx], [after[i] for i in idx], trace.values[g], step, compiled)
        if out is None:
            return None
        sums[g] = out
    return sums


# -- helpers ---------------------------------------------------------------------------------------------------------
def _owned(plan: Plan, states: list[Any], grads: Sequence[Tensor | None]) -> list[Any]:
    """``states`` with a copy of every tensor that shares a gradient's memory (a rule may keep the gradient it got).
    A built-in rule keeps the gradient tensor itself if anything (never a view of it): an identity check suffices."""
    if plan.builtin[0]:
        return [s if g is None else _copy_same(s, g) for s, g in zip(states, grads, strict=True)]
    return [
        s if g is None else _copy_shared(s, g.untyped_storage().data_ptr()) for s, g in zip(states, grads, strict=True)
    ]


def _copy_same(x: Any, grad: Tensor) -> Any:
    for f in x:
        if f is grad:
            return type(x)(*[grad.clone() if f is grad else f for f in x])
    return x


def _copy_shared(x: Any, ptr: int) -> Any:
    if isinstance(x, Tensor):
        return x.clone() if x.untyped_storage().data_ptr() == ptr else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        fields = [_copy_shared(f, ptr) for f in x]
        return x if all(a is b for a, b in zip(fields, x, strict=True)) else type(x)(*fields)
    return x


def _raw(plan: Plan, k: int, values: Mapping[str, Value], like: Tensor) -> Tensor:
    cols = [
        t.inverse(torch.as_tensor(values[n], dtype=like.dtype, device=like.device).expand(plan.batch_shape))
        for n, t in zip(plan.learned[k], plan.transforms[k], strict=True)
    ]
    return torch.stack(cols, dim=-1)


def _broadcast(plan: Plan, values: dict[str, Value], target: Tensor) -> dict[str, Value]:
    # A member's scalar hyperparameter of shape batch_shape must line up with the member's slice of the tensor.
    if not plan.batch_shape:
        return values
    extra = target.dim() - len(plan.batch_shape)
    shape = plan.batch_shape + (1,) * extra
    return {k: v.reshape(shape) if isinstance(v, Tensor) else v for k, v in values.items()}


_NULL = contextlib.nullcontext()


def _no_grad() -> Any:
    """``torch.no_grad()``, or nothing where grad mode is off already (``HyperOptimizer.step`` turns it off): entering
    it costs more than a microsecond, twice a step."""
    return torch.no_grad() if torch.is_grad_enabled() else _NULL


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.dim() == 1 and b.dim() == 1:  # a reshape is one more dispatch: not for vectors (every level above 0)
        return torch.dot(a, b)
    return torch.dot(a.reshape(-1), b.reshape(-1))


# Per member, above this many elements a CPU dot runs member by member: one BLAS dot per member reads both tensors once,
# where multiply-then-sum also writes and reads back a product as large as both (132 MNIST MLPs' first-layer weights,
# float32, one thread: 32 against 58 ms). Below it, or on a GPU, the one multiply-then-sum costs fewer dispatches.
_DOT_PER_MEMBER = 2**14


@functools.cache
def _reducer(batch_shape: tuple[int, ...]):
    if not batch_shape:
        return _dot
    n = len(batch_shape)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        if a.dim() == n:
            return a * b
        # keepdim: the result lines up with the member's hyperparameters, broadcast as (members, 1, ..., 1)
        size = math.prod(a.shape[n:])
        if a.device.type == "cpu" and a.shape == b.shape and size >= _DOT_PER_MEMBER:
            rows = zip(a.reshape(-1, size), b.reshape(-1, size), strict=True)
            return torch.stack([torch.dot(x, y) for x, y in rows]).reshape(a.shape[:n] + (1,) * (a.dim() - n))
        return (a * b).sum(dim=tuple(range(n, a.dim())), keepdim=True)

    return dot
