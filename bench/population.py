"""The stacked learner: K configurations of one model trained as one vectorized job (a ``bench.train.Learner``).

Every member is one configuration (a tower with its initial values, and a seed). The members' model parameters are
stacked along a leading member dimension (``torch.func.stack_module_state``) and the forward runs under ``torch.vmap``
over ``torch.func.functional_call``; the loss is the sum over members of each member's mean loss, so each member's
gradient is exactly its own. The towers run in hypergrad's functional core with ``batch_shape=(K,)``: every level's
hyperparameters are per-member tensors.

Members of different heights share one plan: a shorter tower is padded with levels of step size 0 that receive zero
hypergradients, so the level below them stays exactly fixed, which is what a tower's top level is. Members whose towers
cannot share a plan (different rules, or different learned subsets below their top level) are split into separate
groups (``plan_groups``), trained one after another.

Plain per-parameter baselines (sgd, momentum, adam, ...) are stacked too: the forward and backward run stacked, and
each member keeps its own torch.optim optimizer over views into the stack. Optimizers that reduce over all parameters
(Prodigy, D-Adaptation, DoG), Schedule-Free, BatchNorm running statistics, dropout and fused RNN kernels are refused
with the reason (``stacked_problem``, ``check_vectorizable``); such configs train as single runs.

A member whose loss or hyperparameters become non-finite, or whose loss exceeds ``diverge_factor`` times its first
one, is frozen from that step on (its updates masked to zero, its state kept) and recorded as diverged, as a single run
records it; members never interact, so the others are unaffected. The training loop, evaluation, history rows,
metrics.json, checkpoints and loggers are ``bench.train.Trainer``'s, the same as for a single run.

Users reach this through a sweep (``python -m bench -m ... hydra/launcher=population``, bench/launcher.py) or an
Optuna study (``tune.population_size``, bench/tune.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from bench.errors import ConfigError
from hypergrad import core
from hypergrad.spec import Tower, format_spec, parse_spec

__all__ = [
    "Member",
    "PopulationError",
    "StackedLearner",
    "check_baseline_vectorizable",
    "check_vectorizable",
    "group_members",
    "member_of",
    "plan_groups",
    "population_plan",
    "stacked_problem",
]


class PopulationError(ConfigError):
    """A population that cannot be trained as asked; the message names the reason and the way out."""


@dataclass(frozen=True)
class Member:
    """One configuration of a population: the tower it trains with and the seed of its model's initialization.

    ``baseline`` is the `optimizer` config of a plain or tuning-free baseline, used instead of a tower (``tower`` is
    then None); its step size is ``baseline.lr``.
    """

    tower: Tower | None
    seed: int
    name: str = ""
    baseline: Any = None

    @property
    def spec(self) -> str:
        return format_spec(self.tower) if self.tower is not None else str(self.baseline.name)

    @property
    def height(self) -> int:
        return self.tower.height if self.tower is not None else 0


# -- sharing one plan ----------------------------------------------------------------------------------------------
def _signature(tower: Tower) -> list[tuple[str, tuple[str, ...]]]:
    return [(lv.rule.name, lv.learned_names()) for lv in tower.levels]


def _fits(member: Tower, reference: Tower) -> bool:
    """Whether ``member`` can run inside ``reference``'s plan, padded above its top level."""
    if member.height > reference.height:
        return False
    mine, ref = _signature(member), _signature(reference)
    # Below its top, a member's levels must learn exactly what the reference's learn; its top level learns
    # nothing, so only the rule must agree there (the padding above keeps its values fixed).
    return mine[:-1] == ref[: member.height] and mine[-1][0] == ref[member.height][0]


def group_members(members: Sequence[Member]) -> list[list[int]]:
    """Partition members (by index) into groups that share one plan; the tallest member of a group comes first.

    Baseline members (each with its own optimizer) form one group of their own.
    """
    baselines = [i for i, m in enumerate(members) if m.tower is None]
    order = sorted((i for i, m in enumerate(members) if m.tower is not None), key=lambda i: -members[i].height)
    groups: list[list[int]] = [baselines] if baselines else []
    for i in order:
        for group in groups:
            if members[group[0]].tower is None:
                continue
            if _fits(members[i].tower, members[group[0]].tower):
                group.append(i)
                break
        else:
            groups.append([i])
    return [sorted(g, key=lambda i: (i != g[0], i)) for g in groups]


def _padded_values(members: Sequence[Member], reference: Tower) -> list[list[dict[str, float]]]:
    """Per level, per member: every hyperparameter's initial value (padded levels take step size 0)."""
    out = []
    for k, ref_level in enumerate(reference.levels):
        row = []
        for m in members:
            if k <= m.height:
                row.append(dict(m.tower.levels[k].values))
            else:
                row.append(dict(ref_level.values, lr=0.0))
        out.append(row)
    return out


def population_plan(members: Sequence[Member], params: Sequence[Tensor]) -> tuple[core.Plan, Tensor]:
    """The shared plan of ``members`` (who must fit the tallest one's tower) and each member's height as a tensor.

    A value that differs between members becomes a per-member tensor of shape (K,); a value all share stays a Python
    float, exactly as in a single run.
    """
    reference, like = max((m.tower for m in members), key=lambda t: t.height), params[0]
    if not all(_fits(m.tower, reference) for m in members):
        raise PopulationError("members do not share one plan; split them with group_members first")
    K = len(members)
    values = _padded_values(members, reference)
    plan = core.make_plan(reference, [{}], [len(params)], batch_shape=(K,))
    initial = []
    for rows in values:
        merged: dict[str, float | Tensor] = {}
        for name in rows[0]:
            column = [row[name] for row in rows]
            if all(v == column[0] for v in column):
                merged[name] = float(column[0])
            else:
                merged[name] = torch.tensor(column, dtype=like.dtype, device=like.device)
        initial.append((merged,))
    heights = torch.tensor([m.height for m in members], device=like.device)
    return dataclasses.replace(plan, initial=tuple(initial)), heights


# -- what cannot be vectorized -------------------------------------------------------------------------------------
# Optimizers whose statistics are sums over all parameters: stacked members would share them.
_COUPLING = {
    "prodigy": "Prodigy estimates its step size from sums over all parameters",
    "dadapt_adam": "D-Adaptation estimates its step size from sums over all parameters",
    "dog": "DoG sets its step size from the distance travelled by all parameters together",
}
_SWAPPING = ("schedulefree_adamw", "schedulefree_sgd")


def _baseline_problem(name: str) -> str | None:
    if name in _COUPLING:
        return f"{_COUPLING[name]}, which would couple the members"
    if name in _SWAPPING:
        return "Schedule-Free swaps every weight between its train and eval sequences, which the stacked members do not"
    return None


def stacked_problem(cfg: Any) -> str | None:
    """Why a harness config cannot be a stacked member (one phrase, naming the key), or None when it can.

    The model's own obstacles (BatchNorm, dropout, an RNN) show once it is built: ``check_vectorizable``.
    """
    t = cfg.trainer
    if t.amp:
        return "trainer.amp=true: autocast is not applied to stacked members"
    if t.compile:
        return "trainer.compile=true: the vmapped forward is not compiled"
    if _baseline_problem(str(cfg.optimizer.name)) is not None:
        return f"optimizer={cfg.optimizer.name}: {_baseline_problem(str(cfg.optimizer.name))}"
    if cfg.optimizer.get("stable"):
        return "optimizer.stable=true: the stacked towers have no stable mode"
    if cfg.optimizer.get("compile"):
        return "optimizer.compile=true: the stacked towers are not compiled"
    return None


_WAY_OUT = "train its configs as single runs"


def check_baseline_vectorizable(name: str) -> None:
    """Raise PopulationError for a baseline optimizer that a vectorized population cannot train exactly."""
    problem = _baseline_problem(name)
    if problem is not None:
        raise PopulationError(f"`optimizer={name}` cannot be trained as a vectorized population: {problem}; {_WAY_OUT}")


def check_vectorizable(model: nn.Module, model_name: str = "model") -> None:
    """Raise PopulationError if training ``model`` under vmap would not equal training each member alone."""
    for name, module in model.named_modules():
        problem = None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            problem = (f"its BatchNorm layer `{name}` updates running statistics in place, which functional_call "
                       "under vmap cannot do per member")  # fmt: skip
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            problem = f"its dropout layer `{name}` draws random masks that would differ from the members' single runs"
        elif isinstance(module, nn.RNNBase):
            problem = f"its {type(module).__name__} layer `{name}` runs a fused kernel that torch.vmap cannot batch"
        if problem is not None:
            raise PopulationError(
                f"`model={model_name}` cannot be trained as a vectorized population: {problem}; {_WAY_OUT}"
            )


# -- the stacked learner -------------------------------------------------------------------------------------------
class _Linear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is ``grad_out^T @ input``, the single run's product (``AddmmBackward``).

    Under vmap, autograd's own rule for ``F.linear`` computes the weight gradient as ``input^T @ grad_out`` (the
    gradient of the transposed weight) and hands out its transpose: for 132 MNIST MLPs a slower batched product
    (784x128 outputs: 135 ms a step instead of 93 ms), and a gradient laid out across the weight's memory order, so
    every weight-sized operation of the tower that mixes it with the weight strides through memory (``p -= delta``:
    41 ms instead of 20 ms). This forward is F.linear's own ops, so the outputs are unchanged; the weight gradient
    is the same sum in the single run's order of operands, in the weight's own layout.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = flat.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class _SharedLinear(torch.autograd.Function):
    """``_Linear`` under vmap, where a batch that all members share is one wide product.

    When the members' input is the same tensor (vmapped with ``in_dims=None``: the members of a seed group, whose
    batch is one), the K products ``x @ W_k^T`` are one product of ``x`` with the K weights side by side, as are the
    weight gradients (``grad_out^T @ x``, in the weights' layout): torch.vmap's own rule would copy ``x`` once per
    member and multiply member by member. Each output and weight gradient is the single run's sum (to round-off).
    Any other input runs ``_Linear`` under vmap, as before.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        _Linear.setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return _Linear.backward(ctx, grad)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor, bias: Tensor | None
             ) -> tuple[Tensor, int]:  # fmt: skip
        x_dim, w_dim, b_dim = in_dims
        if x_dim is None and w_dim is not None and (bias is None or b_dim is not None):
            w = weight.movedim(w_dim, 0)
            members, out = w.shape[0], w.shape[1]
            b = None if bias is None else bias.movedim(b_dim, 0).reshape(members * out)
            y = _Linear.apply(x, w.reshape(members * out, w.shape[2]), b)
            return y.unflatten(-1, (members, out)).movedim(-2, 0), 0
        return torch.vmap(_Linear.apply, in_dims=in_dims)(x, weight, bias), 0


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return _SharedLinear.apply(x, self.weight, self.bias)


def _stacked_skeleton(model: nn.Module) -> nn.Module:
    """``model`` with every plain ``nn.Linear`` running ``_Linear`` (the forward code of the stacked members)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = _linear_forward.__get__(module)
    return model


def _restore_rows(rows: Tensor, new: Any, old: Any) -> Any:
    """``new`` with the given member rows taken from ``old`` (every state tensor has a leading member dimension).

    Walks LevelState and the rules' NamedTuple states alike; out of place, since the new state's tensors may be
    referenced by the step's trace."""
    if isinstance(new, Tensor):
        # A momentum buffer is created at the first step: a member frozen then has nothing older to keep.
        return new if old is None else new.index_copy(0, rows, old.index_select(0, rows))
    if isinstance(new, tuple) and hasattr(new, "_fields"):
        return type(new)(*(_restore_rows(rows, n, o) for n, o in zip(new, old, strict=True)))
    if isinstance(new, list):
        return [_restore_rows(rows, n, o) for n, o in zip(new, old, strict=True)]
    return new  # the step count


def member_of(cfg: Any, name: str = "") -> Member:
    """The member that trains a harness config: its tower (or baseline optimizer config) and its seed."""
    from bench.optim import tower_spec

    if cfg.optimizer.name == "tower":
        return Member(parse_spec(tower_spec(cfg.optimizer)), int(cfg.seed), name)
    return Member(None, int(cfg.seed), name, cfg.optimizer)


def plan_groups(cfgs: Sequence[Any]) -> list[list[int]]:
    """The configs (by index) that can be one StackedLearner: ``group_members`` of their members."""
    return group_members([member_of(c, str(i)) for i, c in enumerate(cfgs)])


class StackedLearner:
    """K members of one model stacked along a leading dimension, each with its own tower (a ``bench.train.Learner``).

    ``cfgs`` are the members' harness configs: they share data, model and trainer, and differ in optimizer numbers,
    tower height and seed (their towers must fit one plan: ``plan_groups``). Baseline members each get their own
    torch.optim optimizer over views into the stacked parameters: the forward and backward are vectorized, the
    optimizer steps run member by member (exactly the single run's arithmetic, and nothing of one member's optimizer
    reaches another).
    """

    def __init__(self, cfgs: Sequence[Any], data: Any, device: torch.device, steps_per_epoch: int, total: int) -> None:
        from bench.models import build_model
        from bench.optim import build_optimizer, method_of
        from bench.train import DTYPES, Health

        t = cfgs[0].trainer
        self.members = [member_of(c, str(i)) for i, c in enumerate(cfgs)]
        self.size = K = len(cfgs)
        self.model_name = str(cfgs[0].model.name)
        # Batches: one for all (one seed: one wide product per layer), one per member, or one per group of members
        # sharing a seed (`batch_members`, below).
        self.per_member = len({m.seed for m in self.members}) > 1
        self.batch_members, self._groups = self._seed_groups()

        def make_model(seed: int) -> nn.Module:
            torch.manual_seed(seed)  # as bench.train: the seed, then the model
            return build_model(cfgs[0].model, data).to(device, DTYPES[t.dtype])

        models = [make_model(m.seed) for m in self.members]
        check_vectorizable(models[0], self.model_name)
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = [params[n].detach().clone().requires_grad_() for n in self.names]
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        # The skeleton only supplies the forward code; its own tensors are replaced at every call.
        self.skeleton = _stacked_skeleton(models[0])
        like = self.params[0]
        self.opts: list[Any] | None = None
        if self.members[0].tower is None:
            for m in self.members:
                check_baseline_vectorizable(str(m.baseline.name))
            # Parameters sharing storage with member k's slice: the optimizer's in-place updates land in the stack.
            self.views = [[nn.Parameter(p.data[k]) for p in self.params] for k in range(K)]
            self.opts = [
                build_optimizer(c.optimizer, v, steps_per_epoch, total) for c, v in zip(cfgs, self.views, strict=True)
            ]
            self.plan = core.make_plan(parse_spec("sgd"), [{}], [len(self.params)], batch_shape=(K,))
            self.heights = torch.zeros(K, dtype=torch.long, device=like.device)
        else:
            self.plan, self.heights = population_plan(self.members, self.params)
        self.state = core.init(self.plan, self.params)
        # Level k + 1 is padding for the members whose tower is at most k levels high.
        self._pad_rows = [(self.heights <= k).nonzero().flatten() for k in range(len(self.plan.rules) - 1)]
        self.health = Health(K, like.device, t.diverge_factor)
        self.health.hp_names = [(k, name) for k in range(len(self.plan.rules) - 1) for name in self.plan.learned[k]]
        # As a single run reports them: the optimizer's first reading (a baseline's before its schedule scales it).
        self.init = [o.init for o in self.opts] if self.opts else [dict(h[0]) for h in self.hyperparameters()]
        self.described = []
        for m in self.members:
            if m.tower is not None:
                self.described.append({"optimizer": m.spec, "method": method_of(m.spec), "family": "tower"})
            else:
                family = "tuning_free" if m.baseline.name in (*_COUPLING, *_SWAPPING) else "baseline"
                self.described.append({"optimizer": m.spec, "method": m.spec, "family": family})

        def member_forward(p: Sequence[Tensor], b: Mapping[str, Tensor], x: Tensor) -> Tensor:
            tensors = dict(zip(self.names, p, strict=True))
            tensors.update(b)
            return functional_call(self.skeleton, tensors, (x,))

        self._forward_shared = torch.vmap(member_forward, in_dims=(0, 0, None))
        if self._groups:  # per group of members sharing a batch, one wide product: vmap over groups of a shared vmap
            self._forward = torch.vmap(self._forward_shared, in_dims=(0, 0, 0))
        else:
            self._forward = torch.vmap(member_forward, in_dims=(0, 0, 0 if self.per_member else None))

    def _seed_groups(self) -> tuple[list[int], int]:
        """The members whose batches a step takes (stacked, in this order), and the number of seed groups.

        Members with one seed draw the same batches. When the members come as G runs of equal length, one seed each
        (`bench.launcher` orders a population by seed), a step takes one batch per run, and each run's members share
        it: the K batches are not gathered, and the first layer's product with a group's batch is one wide product
        (the single run's sums, to round-off). Otherwise one batch per member (or one for all: a single seed)."""
        seeds = [m.seed for m in self.members]
        if not self.per_member:
            return [0], 0
        groups = sum(i == 0 or seeds[i] != seeds[i - 1] for i in range(self.size))  # runs of one seed
        if groups == self.size or self.size % groups:
            return list(range(self.size)), 0
        size = self.size // groups
        runs = [seeds[s : s + size] for s in range(0, self.size, size)]
        if any(run != [run[0]] * size for run in runs) or len({run[0] for run in runs}) != groups:
            return list(range(self.size)), 0
        return list(range(0, self.size, size)), groups

    def _logits(self, x: Tensor, forward: Callable[..., Tensor]) -> Tensor:
        """K x N x C logits (N: every prediction of a member, characters included for text)."""
        if forward is self._forward and self._groups:
            grouped = [p.unflatten(0, (self._groups, -1)) for p in self.params]
            buffers = {n: b.unflatten(0, (self._groups, -1)) for n, b in self.buffers.items()}
            out = forward(grouped, buffers, x)
        else:
            out = forward(self.params, self.buffers, x)
        out = out.reshape(self.size, -1, out.shape[-1])
        # Half precision is summed in float32 (as the harness does), float64 stays float64.
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def _member_losses(self, logits: Tensor, y: Tensor, shared: bool) -> Tensor:
        # One cross-entropy call over all K x N predictions (under vmap, against an unbatched target, the loss takes
        # a slow gather path), summed per member as the harness sums a batch.
        if shared:
            target = y.flatten().repeat(self.size)
        elif self._groups and len(y) == self._groups:  # each group's batch, once per member of the group
            target = y.unsqueeze(1).expand(len(y), self.size // len(y), *y.shape[1:]).flatten()
        else:
            target = y.flatten()
        per = F.cross_entropy(logits.flatten(0, 1), target, reduction="none")
        return per.view(self.size, -1).sum(1)

    def _hp_finite(self, state: core.TowerState) -> tuple[Tensor, Tensor, Tensor]:
        """(K,): whether every hyperparameter is finite, the index (in ``health.hp_names``) and value of the first
        that is not."""
        cols = []
        for k in range(len(self.plan.rules) - 1):
            for values in core.natural_values(self.plan, k, state.levels[k].hp):
                cols += [values[name].detach().reshape(self.size) for name in self.plan.learned[k]]
        device = self.health.alive.device
        if not cols:
            ok = torch.ones(self.size, dtype=torch.bool, device=device)
            return ok, torch.zeros(self.size, dtype=torch.long, device=device), torch.zeros(self.size, device=device)
        stacked = torch.stack(cols, dim=1)
        finite = torch.isfinite(stacked)
        first = (~finite).to(torch.uint8).argmax(1)
        return finite.all(1), first, stacked.gather(1, first[:, None])[:, 0]

    def step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        """One training step of every active member; returns the (K,) losses (non-finite for a diverging member).

        Frozen members are masked by row index, and only when there are any: in the common case (nobody frozen)
        the step costs what K single runs' arithmetic costs, plus two tiny host synchronizations.
        """
        health = self.health
        n = y[0].numel() if self.per_member else y.numel()
        try:
            losses = self._member_losses(self._logits(x, self._forward), y, shared=not self.per_member) / n
            grads = list(torch.autograd.grad(losses.sum(), self.params))
        except RuntimeError as e:
            if "atching rule" not in str(e):
                raise
            # An operation torch.vmap has no batching rule for: found at the first step, before any result.
            raise PopulationError(
                f"`model={self.model_name}` cannot be trained as a vectorized population: torch.vmap cannot batch it "
                f"({str(e).splitlines()[0]}); {_WAY_OUT}"
            ) from None
        losses = losses.detach()
        active = health.active()
        loss_ok = torch.isfinite(losses)
        moving = active & loss_ok
        if self.opts is not None:
            return self._baseline_step(losses, grads, active, moving, step)
        frozen = (~moving).nonzero().flatten()
        if len(frozen):  # a frozen member's (possibly non-finite) gradients must not reach its optimizer state
            grads = [g.index_fill_(0, frozen, 0.0) for g in grads]
        hyper = core.hypergradients(self.plan, self.state, grads)
        # Padded levels (above a member's own top) see zero hypergradients: with step size 0 they then leave the
        # level below exactly as it was, as a tower's top level is.
        hyper = [
            [h.index_fill(0, rows, 0.0) if len(rows) else h for h in level]
            for level, rows in zip(hyper, self._padded_rows(frozen), strict=True)
        ]
        # The gradients are this step's own (autograd's fresh tensors): the state keeps them without a copy.
        deltas, new = core.update(self.plan, self.state, grads, hyper, donate=True)
        hp_ok, first_bad, bad_value = self._hp_finite(new)
        keep = moving & hp_ok
        code = torch.where(loss_ok, 2 + first_bad, health.LOSS)
        health.mark(active & ~keep, step, code, torch.where(loss_ok, bad_value.to(losses.dtype), losses))
        # Exploded members keep this step's update (the harness checks the loss after its step), then stop.
        health.check_explosion(losses, keep, step)
        held = (~keep).nonzero().flatten()
        with torch.no_grad():
            for p, d in zip(self.params, deltas, strict=True):
                if d is not None:
                    p.sub_(d.index_fill(0, held, 0.0) if len(held) else d)
        if len(held):  # a held member's levels stay as they were (its hypergradients were zero, whatever the trace)
            new = new._replace(levels=_restore_rows(held, new.levels, self.state.levels))
        self.state = new
        return losses

    def _padded_rows(self, frozen: Tensor) -> list[Tensor]:
        """Per hyper level k: the members whose hypergradients into level k + 1 must be zero."""
        return [torch.cat([rows, frozen]) if len(frozen) else rows for rows in self._pad_rows]

    def _baseline_step(
        self, losses: Tensor, grads: Sequence[Tensor], active: Tensor, moving: Tensor, step: int
    ) -> Tensor:
        health = self.health
        health.mark(active & ~moving, step, health.LOSS, losses)
        stepped = moving.clone()
        for k, go in enumerate(moving.tolist()):  # one Python step per member anyway, so one sync costs nothing
            if go:
                for view, g in zip(self.views[k], grads, strict=True):
                    view.grad = g[k]
                try:
                    self.opts[k].step()  # type: ignore[index]
                except RuntimeError as e:
                    # torch.optim refuses a step size that overflows the parameters' dtype: diverged, not crashed.
                    if "without overflow" not in str(e):
                        raise
                    health.note(k, step, f"optimizer step overflowed: {e}")
                    stepped[k] = False
        health.check_explosion(losses, stepped, step)
        return losses

    def train_mode(self) -> None:
        self.skeleton.train()
        for opt in self.opts or ():
            opt.train_mode()

    def eval_mode(self) -> None:
        self.skeleton.eval()
        for opt in self.opts or ():
            opt.eval_mode()

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int) -> tuple[list[float], list[float]]:
        """Every member's mean loss and error rate over a split, in chunks of ``chunk`` examples."""
        loss = wrong = None
        for i in range(0, len(x), chunk):
            xs, ys = x[i : i + chunk], y[i : i + chunk]
            logits = self._logits(xs, self._forward_shared)
            w = ((logits.argmax(-1) != ys.flatten()) | ~torch.isfinite(logits).all(-1)).sum(1).to(logits.dtype)
            s = self._member_losses(logits, ys, shared=True)
            loss, wrong = (s, w) if loss is None else (loss + s, wrong + w)
        n = y.numel()  # divided in Python, as the harness does
        return [v / n for v in loss.tolist()], [v / n for v in wrong.tolist()]

    def hyperparameters(self) -> list[list[dict[str, float]]]:
        """Every member's current hyperparameters, natural scale, level 1 first, only its own tower's levels."""
        if self.opts is not None:
            return [opt.hyperparameters() for opt in self.opts]
        levels = []
        for k in range(len(self.plan.rules)):
            values = core.natural_values(self.plan, k, self.state.levels[k].hp)[0]
            levels.append({n: v.tolist() if isinstance(v, Tensor) else float(v) for n, v in values.items()})
        out = []
        for i, member in enumerate(self.members):
            rows = []
            for k, level in enumerate(member.tower.levels):
                shown = level.rule.learnable(level.values)
                if k == member.height:  # a member's top level is fixed: its own values, not a padded copy
                    rows.append({n: level.values[n] for n in shown})
                    continue
                rows.append({n: levels[k][n][i] if isinstance(levels[k][n], list) else levels[k][n] for n in shown})
            out.append(rows)
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [
            {**d, "height": m.height, "init": init}
            for d, m, init in zip(self.described, self.members, self.init, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {"params": [p.detach() for p in self.params], "buffers": self.buffers},
            "optimizer": {
                "tower": self.state,
                "opts": None if self.opts is None else [o.state_dict() for o in self.opts],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["model"]["params"], strict=True):
                p.copy_(saved)  # in place: the baseline optimizers' views share this storage
        self.buffers = state["model"]["buffers"]
        self.state = state["optimizer"]["tower"]  # its trace is all the next hypergradient needs (hypergrad.core)
        for opt, saved in zip(self.opts or (), state["optimizer"]["opts"] or (), strict=True):
            opt.load_state_dict(saved)
