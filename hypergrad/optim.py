"""``HyperOptimizer``: a ``torch.optim.Optimizer`` shell over the functional core in :mod:`hypergrad.core`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from hypergrad import core
from hypergrad.errors import NonFiniteHyperparameterError
from hypergrad.rules import AdaGradRule, AdamRule, RMSPropRule, SGDRule
from hypergrad.spec import Level, Tower, format_spec, parse_spec
from hypergrad.stable import stabilize

__all__ = ["SGD", "AdaGrad", "Adam", "HyperOptimizer", "RMSProp", "tower"]


class HyperOptimizer(torch.optim.Optimizer):
    """Trains the weights with a tower of optimizers, each learning the hyperparameters of the one below it.

    The loop is the usual one (no ``create_graph``, no wrapper around the model)::

        >>> import torch, hypergrad
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = hypergrad.tower("adam(0.01)/sgd(1e-4)", model.parameters())
        >>> for _ in range(3):
        ...     loss = model(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward(); opt.step(); opt.zero_grad()
        >>> sorted(opt.hyperparameters()[0])
        ['beta1', 'beta2', 'lr']

    Param groups may override level 1's initial values (``{"params": ..., "lr": 0.1}``); each group then learns its
    own. ``parameterization="log"`` stores step sizes as their logarithm so they can never turn negative (the paper's
    reference stores them raw, the default here). ``stable=True`` is the opt-in mode of docs/stable.md (log step
    sizes, hyper-updates bounded per step). With ``check_finite`` (default) a step whose new
    hyperparameters are not finite raises :class:`NonFiniteHyperparameterError` and leaves weights and state
    untouched.

    Memory: besides its rule's state, the optimizer keeps one copy of the gradients and of the previous state (the
    inputs of the last step, replayed by ``load_state_dict`` so that the next hypergradient is exact).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        spec: str | Tower | Level,
        *,
        parameterization: str = "reference",
        check_finite: bool = True,
        stable: bool = False,
    ) -> None:
        self.spec = parse_spec(spec)
        if stable:  # docs/stable.md: log step sizes, scale-free and bounded hyper-updates
            if parameterization not in ("reference", "log"):
                raise ValueError(f"parameterization must be 'reference' or 'log', but got {parameterization!r}")
            self.spec, parameterization = stabilize(self.spec), "log"
        self.stable = stable
        self.parameterization = parameterization
        self.check_finite = check_finite
        self._tower: core.TowerState | None = None
        self._live: core.TowerState | None = None
        self._deltas: list[Tensor | None] = []
        self._prev: tuple[core.TowerState, list[Tensor | None], list[list[Tensor]]] | None = None
        self._grad_versions: list[int | None] = []
        super().__init__(params, dict(self.spec.levels[0].values))
        self._plan = self._make_plan()  # validates every group's values now, not at the first step

    # -- torch.optim plumbing -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_tower", None) is not None:
            raise ValueError("add_param_group must be called before the first step of a HyperOptimizer")
        rule = self.spec.levels[0].rule
        unknown = sorted(set(param_group) - {"params", *rule.defaults})
        if unknown:
            raise ValueError(
                f"param group key {unknown[0]!r} is not a hyperparameter of {rule.name}; "
                f"allowed: {', '.join(rule.defaults)}"
            )
        super().add_param_group(param_group)
        if hasattr(self, "_plan"):
            self._plan = self._make_plan()

    def _make_plan(self) -> core.Plan:
        names = self.spec.levels[0].rule.defaults
        return core.make_plan(
            self.spec,
            [{k: v for k, v in g.items() if k in names} for g in self.param_groups],
            [len(g["params"]) for g in self.param_groups],
            self.parameterization,
        )

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _ensure_state(self) -> core.TowerState:
        if self._tower is None:
            self._tower = core.init(self._plan, self._params())
        return self._tower

    @property
    def height(self) -> int:
        """Number of hyper levels above the weights' optimizer (0: a plain, fixed optimizer)."""
        return self.spec.height

    def __str__(self) -> str:
        return format_spec(self.spec)

    def __repr__(self) -> str:
        return f"HyperOptimizer({format_spec(self.spec)!r})"

    # -- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = self._ensure_state()
        params = self._params()
        # Not copied: autograd's version counter catches a gradient zeroed in place before the next step uses it.
        grads = [None if p.grad is None else p.grad.detach() for p in params]
        if self._live is None:
            hyper = core.zero_hypergradients(before)
        else:
            try:
                hyper = core.hypergradients(self._plan, self._live, self._deltas, grads)
            except RuntimeError as e:
                if "modified by an inplace operation" not in str(e):
                    raise
                raise RuntimeError(
                    "the previous step's gradients were modified in place (zero_grad(set_to_none=False)?); a "
                    "HyperOptimizer needs them for the next hypergradient: use zero_grad() with set_to_none=True"
                ) from None
        live, deltas = core.update(self._plan, before, grads, hyper)
        if self.check_finite:
            self._raise_if_not_finite(live)
        updated = [(p, d) for p, d in zip(params, deltas, strict=True) if d is not None]
        if updated:
            torch._foreach_sub_([p for p, _ in updated], [d.detach() if d.requires_grad else d for _, d in updated])
        self._live, self._deltas = live, deltas
        # The closed-form path records no graph: its state needs no detaching, only dropping the vjp's trace.
        self._tower = live._replace(trace=None) if self._plan.closed_form else core.detach(live)
        self._prev = (before, grads, hyper)
        self._grad_versions = [None if g is None else g._version for g in grads]
        return loss

    def _raise_if_not_finite(self, live: core.TowerState) -> None:
        hps = [h.detach().reshape(-1) for lv in live.levels for h in lv.hp]
        if not hps or bool(torch.isfinite(torch.cat(hps)).all()):
            return
        for k, lv in enumerate(live.levels):
            for raw in lv.hp:
                for i, name in enumerate(self._plan.learned[k]):
                    value = float(self._plan.transforms[k][i].forward(raw[..., i].detach()))
                    if not torch.isfinite(torch.tensor(value)):
                        raise NonFiniteHyperparameterError(k + 1, name, value, live.step)
        raise NonFiniteHyperparameterError(0, "?", float("nan"), live.step)  # unreachable: some value was non-finite

    # -- inspection -------------------------------------------------------------------------------------------
    def hyperparameters(self, group: int = 0) -> list[dict[str, float]]:
        """Current hyperparameters in their natural scale, level 1 (the weights' optimizer) first.

        Level 1 is reported for param group ``group``; levels above are shared by all groups.
        """
        state = self._ensure_state()
        out = []
        for k, level in enumerate(state.levels):
            values = core.natural_values(self._plan, k, level.hp)[group if k == 0 else 0]
            rule = self._plan.rules[k]
            shown = rule.learnable(self.spec.levels[k].values)
            out.append({n: float(values[n]) for n in shown})
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._prev is not None and any(
            g is not None and g._version != v for g, v in zip(self._prev[1], self._grad_versions, strict=True)
        ):
            raise RuntimeError(
                "the last step's gradients were modified in place (zero_grad(set_to_none=False)?), so this state "
                "cannot be continued exactly; use zero_grad() with set_to_none=True"
            )
        sd = super().state_dict()
        sd["tower"] = {
            "spec": format_spec(self.spec),
            "parameterization": self.parameterization,
            "state": None if self._tower is None else _pack(self._tower),
            "prev": None
            if self._prev is None
            else {"state": _pack(self._prev[0]), "grads": list(self._prev[1]), "hyper": self._prev[2]},
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("tower", None)
        if saved is None:
            raise ValueError("state_dict has no 'tower' entry: it was not saved by a HyperOptimizer")
        if saved["spec"] != format_spec(self.spec) or saved["parameterization"] != self.parameterization:
            raise ValueError(
                f"state_dict is for tower {saved['spec']!r} ({saved['parameterization']}), "
                f"but this optimizer is {format_spec(self.spec)!r} ({self.parameterization})"
            )
        super().load_state_dict(state_dict)
        self._plan = self._make_plan()
        fresh = core.init(self._plan, self._params())
        like = self._params()[0]
        self._tower = None if saved["state"] is None else _unpack(saved["state"], fresh, like)
        self._live, self._deltas, self._prev = None, [], None
        if saved["prev"] is not None:
            before = _unpack(saved["prev"]["state"], fresh, like)
            grads = [
                None if g is None else g.to(p.device, p.dtype)
                for g, p in zip(saved["prev"]["grads"], self._params(), strict=True)
            ]
            hyper = [[h.to(like.device, like.dtype) for h in lv] for lv in saved["prev"]["hyper"]]
            # Replaying the last step rebuilds the graph that the next hypergradient differentiates.
            self._live, self._deltas = core.update(self._plan, before, grads, hyper)
            self._prev = (before, grads, hyper)
            self._grad_versions = [None if g is None else g._version for g in grads]


def _pack(state: core.TowerState) -> dict[str, Any]:
    return {
        "step": state.step,
        "levels": [
            {
                "hp": [h.detach() for h in lv.hp],
                "rule": [None if s is None else dict(s._asdict()) for s in lv.rule],
            }
            for lv in state.levels
        ],
    }


def _unpack(packed: dict[str, Any], fresh: core.TowerState, like: Tensor) -> core.TowerState:
    def cast(x: Any) -> Any:
        return x.to(like.device) if isinstance(x, Tensor) else x

    levels = []
    for saved, lv in zip(packed["levels"], fresh.levels, strict=True):
        hp = [cast(h) for h in saved["hp"]]
        rule = [type(s)(**{k: cast(v) for k, v in d.items()}) for s, d in zip(lv.rule, saved["rule"], strict=True)]
        levels.append(core.LevelState(hp, rule))
    return core.TowerState(int(packed["step"]), levels)


# -- building towers in code ----------------------------------------------------------------------------------
def _level_factory(rule_cls: type, doc: str) -> Callable[..., Level]:
    rule = rule_cls()

    def make(lr: float | None = None, *, learn: Iterable[str] | None = None, **values: float) -> Level:
        if lr is not None:
            values["lr"] = lr
        return Level(rule, values, None if learn is None else tuple(learn))

    make.__name__ = make.__qualname__ = rule_cls.__name__.removesuffix("Rule")
    make.__doc__ = doc
    return make


SGD = _level_factory(
    SGDRule,
    """A level of SGD: ``SGD(0.01, momentum=0.9)``. Compose with ``/``: ``SGD(0.1) / SGD(1e-4)``.""",
)
Adam = _level_factory(
    AdamRule,
    """A level of Adam: ``Adam(1e-3, beta1=0.9, beta2=0.999)``; ``Adam(learn=["lr"])`` is the paper's Adam^alpha.""",
)
AdaGrad = _level_factory(AdaGradRule, """A level of AdaGrad: ``AdaGrad(0.01)``.""")
RMSProp = _level_factory(
    RMSPropRule,
    """A level of RMSProp: ``RMSProp(0.01, gamma=0.99)``; ``RMSProp(learn=["lr"])`` is RMSProp^alpha.""",
)


def tower(spec: str | Tower | Level, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kw: Any) -> HyperOptimizer:
    """A hyperoptimizer for ``params`` from a tower in the paper's notation.

    >>> import torch, hypergrad
    >>> opt = hypergrad.tower("sgd(0.1)/sgd(1e-3)", torch.nn.Linear(2, 1).parameters())
    >>> str(opt), opt.height
    ('sgd(0.1)/sgd(0.001)', 1)
    """
    return HyperOptimizer(params, spec, **kw)
