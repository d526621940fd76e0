"""``HyperOptimizer``: a ``torch.optim.Optimizer`` shell over the functional core in :mod:`hypergrad.core`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from hypergrad import _scalar, core
from hypergrad.errors import NonFiniteGradientError, NonFiniteHyperparameterError
from hypergrad.rules import AdaGradRule, AdamRule, AdamWRule, RMSPropRule, SGDRule
from hypergrad.spec import Level, Tower, format_spec, parse_spec, validate_value
from hypergrad.stable import stabilize

_log = logging.getLogger("hypergrad")

__all__ = ["SGD", "AdaGrad", "Adam", "AdamW", "HyperOptimizer", "RMSProp", "tower"]


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

    Arguments (spec first, as in :func:`tower`; the torch.optim order ``HyperOptimizer(params, spec)`` is accepted
    too):

    - ``spec``: the tower, a string in the paper's notation (grammar in :func:`tower`), a :class:`Tower` or a
      :class:`Level` (``hypergrad.Adam(1e-3) / hypergrad.SGD(1e-5)``).
    - ``params``: tensors or param groups, as for any ``torch.optim`` optimizer. A group may override level 1's
      initial values (``{"params": ..., "lr": 0.1}``) and then learns its own. Floating-point tensors only, with
      dense gradients (a sparse one, from ``nn.Embedding(sparse=True)``, is refused at the step that meets it).
    - ``parameterization``: ``"reference"`` (default) stores learned values as the paper's reference does;
      ``"log"`` stores step sizes as their logarithm so that they can never turn negative.
    - ``check_finite`` (default True): a step whose new hyperparameters are not finite raises
      :class:`NonFiniteHyperparameterError` (or :class:`NonFiniteGradientError` when a gradient was the cause) and
      leaves weights and state untouched.
    - ``per_tensor`` (default False): every parameter tensor gets its own param group, so that each learns its own
      step size (the reference's ``SGDPerParam``); ``param_groups[i]`` is then tensor ``i``.
    - ``stable`` (default False): the opt-in mode of docs/stable.md (log step sizes, hyper-updates bounded per
      step); False follows the paper's reference exactly.
    - ``compile`` (default False): run the weights' update and its hypergradient (the work the size of the weights)
      through ``torch.compile``, which fuses their passes over memory. Opt-in because the first steps compile (about ten
      seconds on a CPU with an empty inductor cache, two with a warm one) and the results equal the eager ones only to
      float round-off (the compiler reorders arithmetic); later steps do not compile again. Plain SGD (no momentum)
      stays eager: two operations per tensor, less than the compiled call's own overhead; so does a stable tower (its
      guarded base has no multi-tensor path) and a rule that is not built in: for these, one warning at construction
      says that nothing is compiled. Where ``torch.compile`` cannot run, one warning is logged (logger ``hypergrad``)
      and the steps run eagerly.

    **param_groups and schedulers.** After every step, ``param_groups[i][key]`` holds the current learned value of
    every level-1 hyperparameter (what LR monitors log). A write to it, by a ``torch.optim.lr_scheduler`` or by hand,
    *sets* that hyperparameter at the next step; a learned one goes on learning from the written value. So a
    chainable scheduler (``StepLR``, ``ExponentialLR``, ``LinearLR``, ``ReduceLROnPlateau``) multiplies the learned
    step size, exactly as it multiplies torch.optim.SGD's; a warmup that leaves the tower free afterwards::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = hypergrad.tower("adam(0.01)/sgd(1e-4)", model.parameters())
        >>> warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        >>> for _ in range(5):
        ...     model(torch.ones(4, 3)).pow(2).mean().backward(); opt.step(); opt.zero_grad(); warmup.step()
        >>> opt.param_groups[0]["lr"] == opt.hyperparameters()[0]["lr"]
        True

    ``LambdaLR`` and ``OneCycleLR`` write ``initial_lr * factor`` at each of their steps, so they dictate the step
    size while they run (learning happens only between their writes). A written value is validated like a spec's.

    Precision: the learned hyperparameters, the towers' state and the gradients the rules read are float32
    (float64 when a parameter is float64), whatever the parameters' dtype; bfloat16 and float16 weights
    receive the update cast to their dtype.
    """

    def __init__(
        self,
        spec: str | Tower | Level,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        parameterization: str = "reference",
        check_finite: bool = True,
        stable: bool = False,
        per_tensor: bool = False,
        compile: bool = False,
    ) -> None:
        if not _is_spec(spec) and _is_spec(params):
            spec, params = params, spec  # the torch.optim order, HyperOptimizer(params, spec), kept working
        self.spec = parse_spec(spec)
        if stable:  # docs/stable.md: log step sizes, scale-free and bounded hyper-updates
            if parameterization not in ("reference", "log"):
                raise ValueError(f"parameterization must be 'reference' or 'log', but got {parameterization!r}")
            self.spec, parameterization = stabilize(self.spec), "log"
        self.stable = stable
        self.parameterization = parameterization
        self.check_finite = check_finite
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, but got {compile!r}")
        self.compile = compile
        self._live: core.TowerState | None = None  # None until the first step or hyperparameters() call
        self._published: list[dict[str, float]] = []
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be True or False, but got {per_tensor!r}")
        self.per_tensor = per_tensor
        if per_tensor:
            params = _split_per_tensor(params)
        super().__init__(params, dict(self.spec.levels[0].values))
        self._plan = self._make_plan()  # validates every group's values now, not at the first step
        self._published = [self._group_values(g) for g in self.param_groups]
        self._compute_dtype = self._dtype()
        if compile and not any(self._plan.fused):
            _log.warning(
                "hypergrad: compile=True compiles nothing for %r (%s); its steps run eagerly",
                str(self),
                "a stable tower's guarded base has no multi-tensor path"
                if self.stable
                else "only a built-in base other than plain SGD has a compiled path",
            )

    # -- torch.optim plumbing -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        tower = getattr(self, "_live", None)
        if tower is not None and tower.step > 0:
            raise ValueError("add_param_group must be called before the first step of a HyperOptimizer")
        self._tower = None  # a state made before any step (e.g. by hyperparameters()) is rebuilt with the new group
        rule = self.spec.levels[0].rule
        unknown = sorted(set(param_group) - {"params", *rule.defaults})
        if unknown:
            raise ValueError(
                f"param group key {unknown[0]!r} is not a hyperparameter of {rule.name}; "
                f"allowed: {', '.join(rule.defaults)}"
            )
        param_group = dict(param_group)
        for name in rule.defaults:
            if name in param_group:
                param_group[name] = validate_value(name, param_group[name], f"param group {name!r}: ")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise TypeError(
                    f"params[{i}] must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                    f"but got dtype {p.dtype}"
                )
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if seen.setdefault(id(p), i) != i:
                # torch.optim only warns; a tower would apply the step, and count the hypergradient, twice
                raise ValueError(
                    f"params[{i}] is params[{seen[id(p)]}] again: each tensor must appear once in a param group"
                )
        param_group["params"] = params
        super().add_param_group(param_group)
        if hasattr(self, "_plan"):
            self._plan = self._make_plan()
            self._published = [self._group_values(g) for g in self.param_groups]
            self._compute_dtype = self._dtype()

    def _make_plan(self) -> core.Plan:
        names = self.spec.levels[0].rule.defaults
        plan = core.make_plan(
            self.spec,
            [{k: v for k, v in g.items() if k in names} for g in self.param_groups],
            [len(g["params"]) for g in self.param_groups],
            self.parameterization,
            compile=self.compile,
        )
        # A value that overflows the dtype the hyperparameters live in would make the first step non-finite.
        dtype = self._dtype()
        for k, per_group in enumerate(plan.initial):
            for values in per_group:
                for name, v in values.items():
                    if isinstance(v, float) and not math.isfinite(float(torch.tensor(v, dtype=dtype))):
                        raise ValueError(
                            f"{plan.rules[k].name}: {name} must be finite in {dtype} (the dtype of the learned "
                            f"hyperparameters), but got {v!r}"
                        )
        return plan

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _dtype(self) -> torch.dtype:
        """The dtype of the hyperparameters, the towers' state and the gradients the rules read: float64 when any
        parameter is float64, else float32 (bfloat16 and float16 cannot hold betas such as 0.999)."""
        params = self._params()
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    @property
    def _tower(self) -> core.TowerState | None:
        """The tower's state with every level in tensors. Between steps the levels above the first may be held as
        floats (``core.update(..., lazy=True)``); reading the state here builds their tensors, once."""
        live = self._live
        if live is not None and live.floats is not None:
            live = self._live = core.materialize(live)
        return live

    @_tower.setter
    def _tower(self, state: core.TowerState | None) -> None:
        self._live = state

    def _ensure_state(self) -> core.TowerState:
        """The state as it is (levels above the first possibly floats), made on first use."""
        if self._live is None:
            dtype = self._dtype()
            self._live = core.init(self._plan, [p.detach().to(dtype) for p in self._params()])
        return self._live

    def _group_values(self, group: Mapping[str, Any]) -> dict[str, float]:
        return {n: group[n] for n in self.spec.levels[0].rule.defaults}

    @property
    def height(self) -> int:
        """Number of hyper levels above the weights' optimizer (0: a plain, fixed optimizer)."""
        return self.spec.height

    def __str__(self) -> str:
        return format_spec(self.spec)

    def __repr__(self) -> str:
        learned = self._plan.learned[0]
        options = "".join(
            f", {k}={v!r}"
            for k, v in (("stable", self.stable), ("parameterization", self.parameterization))
            if v != {"stable": False, "parameterization": "reference"}[k]
            and not (k == "parameterization" and self.stable)
        )
        lines = [f"HyperOptimizer {format_spec(self.spec)!r}{options} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for name in self.spec.levels[0].rule.defaults:
                lines.append(f"    {name}: {group[name]:.6g}" + (" (learned)" if name in learned else ""))
        if self.height:
            for k, values in enumerate(self.hyperparameters()[1:], start=2):
                shown = ", ".join(f"{n}={v:.6g}" for n, v in values.items())
                lines.append(f"Level {k} ({self._plan.rules[k - 1].name}): {shown}")
        lines.append(")")
        return "\n".join(lines)

    # -- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    @core.outside_inference_mode
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._take_writes()
        state = self._ensure_state()
        params = self._params()
        dtype = self._compute_dtype
        # Passed as they are (cast where the parameters are half precision): core.update copies what it keeps.
        grads = [_grad(p, dtype) for p in params]
        deltas, new = core.update(self._plan, state, grads, lazy=True)
        if self.check_finite:
            self._raise_if_not_finite(new, grads)
        updated = [(p, d) for p, d in zip(params, deltas, strict=True) if d is not None]
        if updated:
            torch._foreach_sub_([p for p, _ in updated], [_as(d, p.dtype) for p, d in updated])
        self._live = new
        self._publish()
        return loss

    def _publish(self) -> None:
        """Write the learned level-1 values into ``param_groups`` (what LR monitors and schedulers read)."""
        learned = self._plan.learned[0]
        if not learned or self._live is None:
            return
        tower = self._live  # level 0 and its trace: in tensors either way
        # the level-0 values the last step used are its current ones: no need to transform them again
        values = tower.trace[0].values if tower.trace else core.natural_values(self._plan, 0, tower.levels[0].hp)
        current = [values[g][n] for g in range(len(values)) for n in learned]
        flat = [current[0].item()] if len(current) == 1 else torch.stack(current).tolist()  # one value: no stack
        for g, group in enumerate(self.param_groups):
            for i, name in enumerate(learned):
                group[name] = flat[g * len(learned) + i]
            self._published[g] = self._group_values(group)

    def _take_writes(self) -> None:
        """A value written into ``param_groups`` (by a scheduler or by hand) since the last step becomes the
        hyperparameter's current value; a learned one then goes on learning from there."""
        learned = self._plan.learned[0]
        rebuild = written = False
        for g, group in enumerate(self.param_groups):
            for name, old in self._published[g].items():
                new = group[name]
                if new is old or (isinstance(new, float) and new == old):
                    continue
                written = True
                new = group[name] = validate_value(name, new, f"param_groups[{g}][{name!r}]: ")
                if name not in learned or self._live is None:
                    rebuild = True
                    continue
                i = learned.index(name)
                raw = self._plan.transforms[0][i].inverse(torch.tensor(new, dtype=self._dtype()))
                if not bool(torch.isfinite(raw)):
                    raise ValueError(
                        f"param_groups[{g}][{name!r}] must be > 0 with parameterization="
                        f"{self.parameterization!r}, but got {new!r}"
                    )
                live = self._live  # a new level-0 list: the levels above, floats or not, read it afresh
                hp = list(live.levels[0].hp)
                hp[g] = hp[g].detach().clone()
                hp[g][..., i] = raw.to(hp[g].device)
                self._live = live._replace(levels=[live.levels[0]._replace(hp=hp), *live.levels[1:]])
        if rebuild:
            self._plan = self._make_plan()
        if written:  # else every published value is still the group's
            self._published = [self._group_values(g) for g in self.param_groups]

    def _raise_if_not_finite(self, live: core.TowerState, grads: list[Tensor | None]) -> None:
        if live.floats is not None and not _scalar.finite(live.floats):
            live = core.materialize(live)  # the levels above as tensors, to name the first non-finite value
        hps = [h.detach().reshape(-1) for lv in live.levels for h in lv.hp]
        if not hps or bool(torch.isfinite(torch.cat(hps)).all()):
            return
        # A non-finite gradient makes every hypergradient non-finite: name the cause, not its consequence.
        for i, g in enumerate(grads):
            if g is not None and not bool(torch.isfinite(g).all()):
                raise NonFiniteGradientError(i, tuple(g.shape), live.step)
        for k, lv in enumerate(live.levels):
            for raw in lv.hp:
                for i, name in enumerate(self._plan.learned[k]):
                    value = float(self._plan.transforms[k][i].forward(raw[..., i].detach()))
                    if not math.isfinite(value):
                        raise NonFiniteHyperparameterError(k + 1, name, value, live.step)
        raise NonFiniteHyperparameterError(0, "?", float("nan"), live.step)  # unreachable: some value was non-finite

    # -- inspection -------------------------------------------------------------------------------------------
    def hyperparameters(self, group: int = 0) -> list[dict[str, float]]:
        """Current hyperparameters in their natural scale, level 1 (the weights' optimizer) first.

        Level 1 is reported for param group ``group``; levels above are shared by all groups.
        """
        self._take_writes()
        self._ensure_state()
        state = self._tower
        out = []
        for k, level in enumerate(state.levels):
            values = core.natural_values(self._plan, k, level.hp)[group if k == 0 else 0]
            rule = self._plan.rules[k]
            shown = rule.learnable(self.spec.levels[k].values)
            out.append({n: float(values[n]) for n in shown})
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["tower"] = {
            "spec": format_spec(self.spec),
            "parameterization": self.parameterization,
            "state": None if self._tower is None else _pack(self._tower),
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("tower", None)
        if not isinstance(saved, Mapping):
            raise ValueError("state_dict has no 'tower' entry: it was not saved by a HyperOptimizer")
        missing = [k for k in ("spec", "parameterization", "state") if k not in saved]
        if missing:
            raise ValueError(
                f"state_dict['tower'] must have the keys spec, parameterization and state, but {missing[0]!r} is "
                "missing"
            )
        if saved["spec"] != format_spec(self.spec) or saved["parameterization"] != self.parameterization:
            raise ValueError(
                f"state_dict is for tower {saved['spec']!r} ({saved['parameterization']}), "
                f"but this optimizer is {format_spec(self.spec)!r} ({self.parameterization})"
            )
        packed = saved["state"]
        if packed is not None and "trace" not in packed:
            raise ValueError(
                "state_dict['tower']['state'] has no 'trace': it was saved by an older hypergrad, whose checkpoints "
                "this version cannot continue exactly"
            )
        params = self._params()
        dtype = self._dtype()
        self._plan = self._make_plan()
        fresh = core.init(self._plan, [p.detach().to(dtype) for p in params])
        if packed is not None:
            _check_shapes(packed, fresh, params)
        super().load_state_dict(state_dict)
        self._plan = self._make_plan()
        self._tower = None if packed is None else _unpack(self._plan, packed, fresh, params[0])
        self._published = [self._group_values(g) for g in self.param_groups]


_STRIDED = torch.strided


def _grad(p: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``p.grad`` outside any graph, in ``dtype``; a dispatch only where something changes."""
    g = p.grad
    if g is None:
        return None
    if g.layout is not _STRIDED:
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} has a {g.layout} gradient (as nn.Embedding(sparse=True) makes), "
            "but a tower needs dense gradients (torch.strided): build the module with sparse=False"
        )
    if g.requires_grad:  # a gradient from backward(create_graph=True)
        g = g.detach()
    return g if g.dtype == dtype else g.to(dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # .to is a dispatch even where it returns t itself


def _split_per_tensor(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One param group per tensor, each with its group's values: each tensor then learns its own step size."""
    if isinstance(params, Tensor):
        params = [params]
    out = []
    for item in params:
        if isinstance(item, dict):
            tensors = item["params"]
            tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
            out += [{**item, "params": [p]} for p in tensors]
        else:
            out.append({"params": [item]})
    return out


def _is_spec(x: object) -> bool:
    return isinstance(x, str | Tower | Level)


def _plain(x: Any) -> Any:
    """A rule state as plain containers (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {k: _plain(v) for k, v in x._asdict().items()}
    return x.detach() if isinstance(x, Tensor) else x


def _typed(saved: Any, like: Any, device: torch.device) -> Any:
    """The inverse of :func:`_plain`, with the types of ``like`` (a freshly initialized state)."""
    if isinstance(saved, Mapping) and isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(**{k: _typed(v, getattr(like, k), device) for k, v in saved.items()})
    return saved.to(device) if isinstance(saved, Tensor) else saved


def _pack(state: core.TowerState) -> dict[str, Any]:
    return {
        "step": state.step,
        "levels": [{"hp": [h.detach() for h in lv.hp], "rule": [_plain(s) for s in lv.rule]} for lv in state.levels],
        "trace": [
            {
                "hp": [h.detach() for h in tr.hp],
                "moved": None if tr.moved is None else list(tr.moved),
                "grads": None if tr.grads is None else list(tr.grads),
                "before": None if tr.before is None else [_plain(s) for s in tr.before],
            }
            for tr in state.trace
        ],
    }


def _unpack(plan: core.Plan, packed: dict[str, Any], fresh: core.TowerState, like: Tensor) -> core.TowerState:
    device = like.device
    levels = []
    for saved, lv in zip(packed["levels"], fresh.levels, strict=True):
        rule = [_typed(d, s, device) for d, s in zip(saved["rule"], lv.rule, strict=True)]
        levels.append(core.LevelState([h.to(device) for h in saved["hp"]], rule))
    trace = []
    for k, (saved, lv) in enumerate(zip(packed["trace"], fresh.levels, strict=False)):
        hp = [h.to(device) for h in saved["hp"]]
        trace.append(
            core.Trace(
                hp,
                core.natural_values(plan, k, hp),
                None if saved["moved"] is None else list(saved["moved"]),
                None if saved["grads"] is None else [None if g is None else g.to(device) for g in saved["grads"]],
                None
                if saved["before"] is None
                else [
                    None if d is None else _typed(d, s, device) for d, s in zip(saved["before"], lv.rule, strict=True)
                ],
            )
        )
    return core.TowerState(int(packed["step"]), levels, trace)


def _check_shapes(packed: dict[str, Any], fresh: core.TowerState, params: list[Tensor]) -> None:
    """A state saved for another model is refused at load, not at the next step."""
    saved = packed["levels"][0]["rule"]
    if len(saved) != len(params):
        raise ValueError(f"state_dict is for {len(saved)} parameters, but this optimizer has {len(params)}")

    def tensors(x: Any) -> list[Tensor | None]:
        if isinstance(x, Mapping):
            return [t for v in x.values() for t in tensors(v)]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return [t for v in x for t in tensors(v)]
        return [x] if isinstance(x, Tensor) else [None]

    for i, (d, s, p) in enumerate(zip(saved, fresh.levels[0].rule, params, strict=True)):
        for a, b in zip(tensors(d), tensors(s), strict=False):
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(
                    f"state_dict parameter {i} has shape {tuple(a.shape)}, but this optimizer's parameter {i} "
                    f"has shape {tuple(p.shape)}: was it saved for another model?"
                )


# -- building towers in code ----------------------------------------------------------------------------------
def _level_factory(rule_cls: type, doc: str) -> Callable[..., Level]:
    rule = rule_cls()

    def make(*args: float, learn: Iterable[str] | None = None, **values: float) -> Level:
        # *args, not lr=None: Adam(model.parameters(), lr=1e-3) must reach the clear error below.
        lr = args[0] if args else values.pop("lr", None)
        if len(args) > 1 or (args and "lr" in values) or (lr is not None and not isinstance(lr, int | float)):
            raise TypeError(
                f"{make.__name__}(...) builds one level of a tower, not an optimizer, so its first argument is the "
                f"step size, but got {type(args[0] if args else lr).__name__}; build the optimizer with "
                f"hypergrad.tower(hypergrad.{make.__name__}(1e-3) / hypergrad.SGD(1e-5), model.parameters())"
            )
        if lr is not None:
            values["lr"] = lr
        if isinstance(learn, str):
            raise TypeError(f"learn must be a list of hyperparameter names, e.g. learn=['lr'], but got {learn!r}")
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
AdamW = _level_factory(
    AdamWRule,
    """A level of AdamW (decoupled weight decay, learnable too): ``AdamW(1e-3, weight_decay=0.01)``.""",
)
AdaGrad = _level_factory(AdaGradRule, """A level of AdaGrad: ``AdaGrad(0.01)``.""")
RMSProp = _level_factory(
    RMSPropRule,
    """A level of RMSProp: ``RMSProp(0.01, gamma=0.99)``; ``RMSProp(learn=["lr"])`` is RMSProp^alpha.""",
)


def tower(spec: str | Tower | Level, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kw: Any) -> HyperOptimizer:
    """A hyperoptimizer for ``params`` from a tower in the paper's notation.

    Grammar of ``spec`` (spaces allowed anywhere, names case-insensitive, numbers ASCII)::

        tower   := level ("/" level)*
        level   := NAME ["[" HP ("," HP)* "]"] ["(" [args] ")"]
        args    := NUMBER ("," HP "=" NUMBER)* | HP "=" NUMBER ("," HP "=" NUMBER)*
        NAME    := sgd | adam | adamw | adagrad | rmsprop | a name given to hypergrad.register

    The leftmost level updates the weights; each level to its right updates the hyperparameters of the one on its
    left by gradient descent on the loss (the paper's hypergradient); the rightmost level is fixed. A positional
    number is the step size ``lr``; keywords set the others (sgd: lr, momentum; adam: lr, beta1, beta2, eps; adamw:
    those and weight_decay; adagrad: lr, eps, initial_accumulator_value; rmsprop: lr, gamma, eps); unspecified ones
    take PyTorch's defaults. Brackets choose which hyperparameters the level above learns (all learnable ones when
    absent): ``adam[lr]/sgd(1e-5)`` is the paper's Adam^alpha. Every value is checked against its range here.

    Keywords (``**kw``) go to :class:`HyperOptimizer`: ``parameterization``, ``check_finite``, ``per_tensor``,
    ``stable``, ``compile``.

    >>> import torch, hypergrad
    >>> opt = hypergrad.tower("sgd(0.1)/sgd(1e-3)", torch.nn.Linear(2, 1).parameters())
    >>> str(opt), opt.height
    ('sgd(0.1)/sgd(0.001)', 1)
    """
    if not _is_spec(spec) and _is_spec(params):
        spec, params = params, spec
    return HyperOptimizer(spec, params, **kw)
