"""Population training: a whole grid of tower configurations trained as one vectorized job.

Every member of a population is one configuration (a tower with its initial values, and a seed). The members' model
parameters are stacked along a leading member dimension (``torch.func.stack_module_state``) and the forward runs under
``torch.vmap`` over ``torch.func.functional_call``; the loss is the sum over members of each member's mean loss, so
each member's gradient is exactly its own. The towers run in hypergrad's functional core with ``batch_shape=(K,)``:
every level's hyperparameters are per-member tensors.

Members of different heights share one plan: a shorter tower is padded with levels of step size 0 that receive zero
hypergradients, so the level below them stays exactly fixed, which is what a tower's top level is. Members whose towers
cannot share a plan (different rules, or different learned subsets below their top level) are split into separate
populations, trained one after another.

Plain per-parameter baselines (sgd, momentum, adam, ...) are vectorized too: the forward and backward run stacked,
and each member keeps its own torch.optim optimizer over views into the stack. Optimizers that reduce over all
parameters (Prodigy, D-Adaptation, DoG), Schedule-Free, BatchNorm running statistics, dropout and fused RNN kernels
are refused with the reason (``mode="sequential"`` trains such members one ordinary run after another).

Batches: either one batch for all members, or (``per_member``) one per member, each drawn from the member's own seed
exactly as its harness run draws them; a member's seed also sets its model's initialization, so every member
reproduces ``python -m bench`` with its configuration. A member whose loss or hyperparameters become non-finite, or
whose loss exceeds ``diverge_factor`` times its first one, is frozen from that step on (its updates masked to zero,
its state kept) and recorded as diverged, as a single run records it; members never interact, so the others are
unaffected.

Users reach this through a sweep: ``python -m bench -m ... hydra/launcher=population`` (bench/launcher.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state
from tqdm import tqdm

import hypergrad
from bench.errors import ConfigError
from bench.schema import FINAL_KEYS, hyperparameter_columns
from hypergrad import core
from hypergrad.spec import Tower, format_spec, parse_spec

__all__ = [
    "Member",
    "MemberResult",
    "PopulationError",
    "check_baseline_vectorizable",
    "check_vectorizable",
    "evaluate_trials_as_population",
    "group_members",
    "population_plan",
    "tell_trials",
    "train_population",
]

Batches = Callable[[int], Iterator[tuple[Tensor, Tensor]]]
"""``batches(epoch)`` yields that epoch's training batches (the same for every member; epochs count from 1)."""


_VALIDATION = -1  # diverged_code of a member whose validation loss, not its training loss, went non-finite
_EXPLODED = -2  # a finite training loss above trainer.diverge_factor times the member's first one
_OVERFLOWED = -3  # torch.optim refused a baseline's step size (e.g. Adam with lr=1e38)


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


@dataclass
class MemberResult:
    """What one member's training produced, in the harness's vocabulary (see ``bench.population.write_member``)."""

    member: Member
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch
    step_losses: list[float] = field(default_factory=list)  # every step's training loss (until divergence)
    status: str = "completed"  # completed | diverged | pruned
    diverged_step: int | None = None
    diverged_reason: str | None = None
    steps: int = 0
    hyperparameters: list[dict[str, float]] = field(default_factory=list)  # final values, level 1 first
    init: dict[str, float] = field(default_factory=dict)  # the weight optimizer's initial hyperparameters


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
    """The shared plan of ``members`` (who must fit ``members[0]``'s tower) and each member's height as a tensor.

    A value that differs between members becomes a per-member tensor of shape (K,); a value all share stays a Python
    float, exactly as in a single run.
    """
    reference, like = members[0].tower, params[0]
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


def check_baseline_vectorizable(name: str) -> None:
    """Raise PopulationError for a baseline optimizer that a vectorized population cannot train exactly."""
    problem = _baseline_problem(name)
    if problem is not None:
        raise PopulationError(
            f"`optimizer={name}` cannot be trained as a vectorized population: {problem}; "
            "use population.mode=sequential"
        )


def check_vectorizable(model: nn.Module, model_name: str = "model") -> None:
    """Raise PopulationError if training ``model`` under vmap would not equal training each member alone."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise PopulationError(
                f"`model={model_name}` cannot be trained as a vectorized population: its BatchNorm layer "
                f"`{name}` updates running statistics in place, which functional_call under vmap cannot do per "
                "member; use population.mode=sequential"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise PopulationError(
                f"`model={model_name}` cannot be trained as a vectorized population: its dropout layer `{name}` "
                "draws random masks that would differ from the members' single runs; use population.mode=sequential"
            )
        if isinstance(module, nn.RNNBase):
            raise PopulationError(
                f"`model={model_name}` cannot be trained as a vectorized population: its {type(module).__name__} "
                f"layer `{name}` runs a fused kernel that torch.vmap cannot batch; use population.mode=sequential"
            )


# -- vectorized training -------------------------------------------------------------------------------------------
def _logits(out: Tensor) -> Tensor:
    # Half precision is summed in float32 (as the harness does), while float64 stays float64 (population.dtype=
    # float64 is for exactness checks).
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _loss_sums(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and number of wrong predictions, as the harness computes them (bench.train).

    A non-finite output predicts nothing: it counts as wrong, whatever argmax says.
    """
    logits, y = _logits(out.flatten(0, -2)), y.flatten()  # classification (N x C) and text (N x T x V) alike
    loss = F.cross_entropy(logits, y, reduction="sum")
    wrong = (logits.argmax(-1) != y) | ~torch.isfinite(logits).all(-1)
    return loss, wrong.sum().to(loss.dtype)


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


def _level_names(plan: core.Plan) -> list[tuple[int, str]]:
    return [(k, name) for k in range(len(plan.rules) - 1) for name in plan.learned[k]]


class _Vectorized:
    """K members of one model stacked along a leading dimension, each with its own tower.

    Baseline members (``make_optimizer`` given) each get their own torch.optim optimizer over views into the stacked
    parameters: the forward and backward are vectorized, the optimizer steps run member by member (exactly the
    single run's arithmetic, and nothing of one member's optimizer reaches another).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        members: Sequence[Member],
        make_optimizer: Callable[[Member, Sequence[Tensor]], SequentialOptimizer] | None = None,
        diverge_factor: float | None = None,
    ) -> None:
        self.members = list(members)
        self.diverge_factor = diverge_factor
        self.initial_loss: Tensor | None = None  # every member's first training loss (the harness's divergence rule)
        self.overflow: dict[int, str] = {}  # a baseline member's refused step, in torch.optim's words
        self.K = len(members)
        params, buffers = stack_module_state(list(models))
        self.names = list(params)
        self.params = [params[n].detach().clone().requires_grad_() for n in self.names]
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        # The skeleton only supplies the forward code; its own tensors are replaced at every call.
        self.skeleton = models[0]
        like = self.params[0]
        self.opts: list[SequentialOptimizer] | None = None
        if members[0].tower is None:
            if make_optimizer is None:
                raise PopulationError("baseline members need make_optimizer")
            # Parameters sharing storage with member k's slice: the optimizer's in-place updates land in the stack.
            self.views = [[nn.Parameter(p.data[k]) for p in self.params] for k in range(self.K)]
            self.opts = [make_optimizer(m, views) for m, views in zip(members, self.views, strict=True)]
            self.plan = core.make_plan(parse_spec("sgd"), [{}], [len(self.params)], batch_shape=(self.K,))
            self.heights = torch.zeros(self.K, dtype=torch.long, device=like.device)
        else:
            self.plan, self.heights = population_plan(members, self.params)
        self.state = core.init(self.plan, self.params)
        # Level k + 1 is padding for the members whose tower is at most k levels high.
        self._pad_rows = [(self.heights <= k).nonzero().flatten() for k in range(len(self.plan.rules) - 1)]
        self.alive = torch.ones(self.K, dtype=torch.bool, device=like.device)
        self.stopped = torch.zeros(self.K, dtype=torch.bool, device=like.device)  # pruned from outside
        self.diverged_step = torch.full((self.K,), -1, dtype=torch.long, device=like.device)
        self.diverged_code = torch.zeros(self.K, dtype=torch.long, device=like.device)
        self.diverged_value = torch.zeros(self.K, dtype=like.dtype, device=like.device)
        self.step_count = 0
        self.hp_names = _level_names(self.plan)

        def member_forward(p: Sequence[Tensor], b: Mapping[str, Tensor], x: Tensor) -> Tensor:
            tensors = dict(zip(self.names, p, strict=True))
            tensors.update(b)
            return functional_call(self.skeleton, tensors, (x,))

        self._forward = torch.vmap(member_forward, in_dims=(0, 0, None))
        self._forward_each = torch.vmap(member_forward, in_dims=(0, 0, 0))

    def outputs(self, x: Tensor, per_member: bool = False) -> Tensor:
        """Every member's model output: K x (the model's output shape).

        ``x`` is one batch for all members, or with ``per_member`` a K x (batch) stack, one batch per member.
        """
        return (self._forward_each if per_member else self._forward)(self.params, self.buffers, x)

    def _member_losses(self, logits: Tensor, y: Tensor, per_member: bool = False) -> Tensor:
        # One cross-entropy call over all K x N predictions (under vmap, against an unbatched target, the loss takes
        # a slow gather path), summed per member as the harness sums a batch.
        target = y.flatten() if per_member else y.flatten().repeat(self.K)
        per = F.cross_entropy(logits.flatten(0, 1), target, reduction="none")
        return per.view(self.K, -1).sum(1)

    def _logits(self, x: Tensor, per_member: bool = False) -> Tensor:
        """K x N x C logits (N: every prediction of a member, characters included for text)."""
        out = self.outputs(x, per_member)
        return _logits(out.reshape(self.K, -1, out.shape[-1]))

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Every member's summed loss and number of wrong predictions on a batch: two (K,) tensors."""
        logits = self._logits(x)
        wrong = (logits.argmax(-1) != y.flatten()) | ~torch.isfinite(logits).all(-1)
        return self._member_losses(logits, y), wrong.sum(1).to(logits.dtype)

    def _hp_finite(self, state: core.TowerState) -> tuple[Tensor, Tensor, Tensor]:
        """(K,): whether every hyperparameter is finite, the index (in ``hp_names``) and value of the first that
        is not."""
        cols = []
        for k in range(len(self.plan.rules) - 1):
            for values in core.natural_values(self.plan, k, state.levels[k].hp):
                cols += [values[name].detach().reshape(self.K) for name in self.plan.learned[k]]
        if not cols:
            ok = torch.ones(self.K, dtype=torch.bool, device=self.alive.device)
            return ok, torch.zeros(self.K, dtype=torch.long, device=ok.device), torch.zeros(self.K, device=ok.device)
        stacked = torch.stack(cols, dim=1)
        finite = torch.isfinite(stacked)
        first = (~finite).to(torch.uint8).argmax(1)
        return finite.all(1), first, stacked.gather(1, first[:, None])[:, 0]

    def step(self, x: Tensor, y: Tensor, per_member: bool = False) -> Tensor:
        """One training step of every live member; returns the (K,) losses (non-finite for a diverging member).

        ``per_member``: ``x`` and ``y`` hold one batch per member (leading dimension K), each member's own draw.
        Frozen members are masked by row index, and only when there are any: in the common case (nobody frozen)
        the step costs what K single runs' arithmetic costs, plus two tiny host synchronizations.
        """
        self.train_mode()
        n = y[0].numel() if per_member else y.numel()
        losses = self._member_losses(self._logits(x, per_member), y, per_member) / n
        grads = list(torch.autograd.grad(losses.sum(), self.params))
        losses = losses.detach()
        self.step_count += 1
        active = self.alive & ~self.stopped
        loss_ok = torch.isfinite(losses)
        moving = active & loss_ok
        if self.opts is not None:
            return self._baseline_step(losses, grads, active, moving)
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
        deltas, new = core.update(self.plan, self.state, grads, hyper)
        hp_ok, first_bad, bad_value = self._hp_finite(new)
        keep = moving & hp_ok
        newly = active & ~keep
        self.diverged_step = torch.where(newly, self.step_count, self.diverged_step)
        self.diverged_code = torch.where(newly, torch.where(loss_ok, 2 + first_bad, 1), self.diverged_code)
        self.diverged_value = torch.where(
            newly, torch.where(loss_ok, bad_value.to(losses.dtype), losses), self.diverged_value
        )
        self.alive = self.alive & ~newly
        # Exploded members keep this step's update (the harness checks the loss after its step), then stop.
        self._check_explosion(losses, keep)
        held = (~keep).nonzero().flatten()
        with torch.no_grad():
            for p, d in zip(self.params, deltas, strict=True):
                if d is not None:
                    p.sub_(d.index_fill(0, held, 0.0) if len(held) else d)
        if len(held):  # a held member's levels stay as they were (its hypergradients were zero, whatever the trace)
            new = new._replace(levels=_restore_rows(held, new.levels, self.state.levels))
        self.state = new
        return losses

    def _check_explosion(self, losses: Tensor, stepped: Tensor) -> None:
        """The harness's rule for finite losses: above ``diverge_factor`` times the member's first loss, it diverged."""
        if self.initial_loss is None:
            self.initial_loss = losses.double().clone()
        if self.diverge_factor is None:
            return
        over = stepped & (losses.double() > self.diverge_factor * self.initial_loss.clamp(min=1e-12))
        self.diverged_step = torch.where(over, self.step_count, self.diverged_step)
        self.diverged_code = torch.where(over, _EXPLODED, self.diverged_code)
        self.diverged_value = torch.where(over, losses, self.diverged_value)
        self.alive = self.alive & ~over

    def _padded_rows(self, frozen: Tensor) -> list[Tensor]:
        """Per hyper level k: the members whose hypergradients into level k + 1 must be zero."""
        return [torch.cat([rows, frozen]) if len(frozen) else rows for rows in self._pad_rows]

    def _baseline_step(self, losses: Tensor, grads: Sequence[Tensor], active: Tensor, moving: Tensor) -> Tensor:
        newly = active & ~moving
        self.diverged_step = torch.where(newly, self.step_count, self.diverged_step)
        self.diverged_code = torch.where(newly, 1, self.diverged_code)
        self.diverged_value = torch.where(newly, losses, self.diverged_value)
        self.alive = self.alive & ~newly
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
                    self.overflow[k] = f"optimizer step overflowed: {e}"
                    stepped[k] = False
                    self.diverged_step[k] = self.step_count
                    self.diverged_code[k] = _OVERFLOWED
                    self.alive[k] = False
        self._check_explosion(losses, stepped)
        return losses

    def train_mode(self) -> None:
        self.skeleton.train()
        for opt in self.opts or ():
            if hasattr(opt, "train_mode"):
                opt.train_mode()

    def eval_mode(self) -> None:
        self.skeleton.eval()
        for opt in self.opts or ():
            if hasattr(opt, "eval_mode"):
                opt.eval_mode()

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int) -> tuple[list[float], list[float]]:
        """Every member's mean loss and error rate over a split, in chunks of ``chunk`` examples."""
        self.eval_mode()
        loss = wrong = None
        for i in range(0, len(x), chunk):
            s, w = self.losses(x[i : i + chunk], y[i : i + chunk])
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

    def diverge_on_validation(self, i: int, value: float) -> None:
        """Member ``i``'s weights give a non-finite validation loss: diverged at its last step, as in the harness."""
        self.diverged_step[i] = self.step_count
        self.diverged_code[i] = _VALIDATION
        self.diverged_value[i] = value
        self.alive[i] = False

    def reason(self, i: int) -> str | None:
        """Why member ``i`` diverged, in the harness's words (None if it did not)."""
        code, value = int(self.diverged_code[i]), float(self.diverged_value[i])
        if code == 0:
            return None
        if code == 1:
            return f"non-finite training loss ({value})"
        if code == _VALIDATION:
            return f"non-finite validation loss ({value})"
        if code == _EXPLODED:
            initial = float(self.initial_loss[i])  # type: ignore[index]
            return (
                f"training loss {value:.4g} exceeded trainer.diverge_factor={self.diverge_factor:g} times its initial "
                f"value {initial:.4g}"
            )
        if code == _OVERFLOWED:
            return self.overflow[i]
        k, name = self.hp_names[code - 2]
        error = hypergrad.NonFiniteHyperparameterError(k + 1, name, value, int(self.diverged_step[i]))
        return f"non-finite hyperparameter: {error}"


EpochCallback = Callable[[int, int, dict[str, Any]], bool]
"""``(member_index, epoch, metrics) -> stop``: called after each epoch's evaluation of each live member; returning
True stops that member (recorded as pruned)."""


def train_population(
    make_model: Callable[[int], nn.Module],
    members: Sequence[Member],
    batches: Batches,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    *,
    epochs: int,
    max_steps: int | None = None,
    mode: str = "vectorized",
    eval_chunk: int = 1024,
    epoch_callback: EpochCallback | None = None,
    model_name: str = "model",
    make_optimizer: Callable[[Member, Sequence[Tensor]], SequentialOptimizer] | None = None,
) -> list[MemberResult]:
    """Train every member and evaluate it on ``splits["val"]`` and ``splits["test"]`` after each epoch.

    ``make_model(seed)`` returns a freshly initialized model on the training device and dtype. In ``vectorized``
    mode members that share a plan train together (see module docstring); in ``sequential`` mode each member trains
    alone with ``hypergrad.tower`` (or ``make_optimizer(member, params)``) on an ordinary module, over the same
    batches.
    """
    if mode not in ("vectorized", "sequential"):
        raise PopulationError(f"`population.mode` must be 'vectorized' or 'sequential', but got {mode!r}")
    if not members:
        raise PopulationError("the population has no members; give at least one value for each grid key")
    results: list[MemberResult | None] = [None] * len(members)
    if mode == "sequential":
        for i, m in enumerate(members):
            results[i] = _train_alone(
                make_model,
                make_optimizer or _tower_optimizer,
                i,
                m,
                batches,
                splits,
                epochs,
                max_steps,
                eval_chunk,
                epoch_callback,
            )
    else:
        for m in members:
            if m.tower is None:
                check_baseline_vectorizable(str(m.baseline.name))
                if make_optimizer is None:
                    raise PopulationError(f"member {m.name!r} is a baseline: pass make_optimizer")
        for group in group_members(members):
            models = [make_model(members[i].seed) for i in group]
            check_vectorizable(models[0], model_name)
            out = _train_vectorized(
                models,
                [members[i] for i in group],
                group,
                batches,
                splits,
                epochs,
                max_steps,
                eval_chunk,
                epoch_callback,
                make_optimizer,
                model_name,
            )
            for i, r in zip(group, out, strict=True):
                results[i] = r
    return [r for r in results if r is not None]


def _epoch_row(
    epoch: int,
    steps: int,
    train_loss: float,
    val: tuple[float, float],
    test: tuple[float, float],
    wall: float,
    hps: Sequence[Mapping[str, float]],
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "steps": steps,
        "train_loss": train_loss,
        "val_loss": val[0],
        "val_error": val[1],
        "test_loss": test[0],
        "test_error": test[1],
        "wall_time_s": wall,
        **hyperparameter_columns(list(hps)),
    }


class PopulationStopped(Exception):
    """A stop was requested (SIGTERM, SIGINT, SLURM's warning): the checkpoint is saved; rerunning resumes it."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"population stopped after step {steps}; its checkpoint is saved, rerun to resume")
        self.steps = steps


_COUNTERS = ("alive", "stopped", "diverged_step", "diverged_code", "diverged_value")


def _state_classes() -> list[type]:
    """The NamedTuple types a population's optimizer state is made of (allowed when a checkpoint is read)."""
    import hypergrad.rules
    import hypergrad.stable

    found = []
    for module in (core, hypergrad.rules, hypergrad.stable):
        found += [
            v for v in vars(module).values() if isinstance(v, type) and issubclass(v, tuple) and hasattr(v, "_fields")
        ]
    return found


def _save_checkpoint(path: Path, pop: _Vectorized, progress: dict[str, Any]) -> None:
    from bench.io import atomic_save_torch

    state = {
        "names": [m.name for m in pop.members],
        "params": [p.detach() for p in pop.params],
        "buffers": pop.buffers,
        "tower": pop.state,
        "opts": None if pop.opts is None else [o.state_dict() for o in pop.opts],  # type: ignore[attr-defined]
        "counters": {k: getattr(pop, k) for k in _COUNTERS},
        "initial_loss": pop.initial_loss,
        "step_count": pop.step_count,
        "overflow": dict(pop.overflow),
        "progress": progress,
    }
    atomic_save_torch(path, state)


def _load_checkpoint(path: Path, pop: _Vectorized) -> dict[str, Any] | None:
    """Restore ``pop`` from ``path``; return the loop's progress, or None when the file is another population's."""
    with torch.serialization.safe_globals(_state_classes()):
        state = torch.load(path, map_location=pop.params[0].device, weights_only=True)
    if state.get("names") != [m.name for m in pop.members]:
        return None
    with torch.no_grad():
        for p, saved in zip(pop.params, state["params"], strict=True):
            p.copy_(saved)  # in place: the baseline optimizers' views share this storage
    pop.buffers = state["buffers"]
    pop.state = state["tower"]  # its trace is all the next hypergradient needs (hypergrad.core)
    if pop.opts is not None:
        for opt, saved in zip(pop.opts, state["opts"], strict=True):
            opt.load_state_dict(saved)  # type: ignore[attr-defined]
    for k in _COUNTERS:
        setattr(pop, k, state["counters"][k])
    pop.initial_loss, pop.step_count, pop.overflow = state["initial_loss"], state["step_count"], state["overflow"]
    return state["progress"]


def _stop_requested() -> bool:
    import bench.train

    return bench.train._checkpoint_requested


def _train_vectorized(
    models: Sequence[nn.Module],
    members: Sequence[Member],
    indices: Sequence[int],
    batches: Batches,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    epochs: int,
    max_steps: int | None,
    eval_chunk: int,
    epoch_callback: EpochCallback | None,
    make_optimizer: Callable[[Member, Sequence[Tensor]], SequentialOptimizer] | None = None,
    model_name: str = "model",
    per_member: bool = False,
    diverge_factor: float | None = None,
    on_step: Callable[[], None] | None = None,
    checkpoint: Path | None = None,
) -> list[MemberResult]:
    """``per_member``: ``batches`` yields one batch per member, stacked (each member's own seed draws its batches).

    ``checkpoint``: saved after every epoch and when a stop is requested (``bench.train.request_checkpoint``, which
    SIGTERM, SIGINT and SLURM's warning signal call; then ``PopulationStopped`` is raised); a population that finds
    its own checkpoint there resumes from it, mid-epoch included, to the same results.
    """
    pop = _Vectorized(models, members, make_optimizer, diverge_factor)
    K = pop.K
    results = [MemberResult(m, init=dict(hps[0])) for m, hps in zip(members, pop.hyperparameters(), strict=True)]
    step_losses: list[Tensor] = []
    elapsed = 0.0
    steps = 0
    reported = [False] * K  # a diverged member gets one last row, as a single run does
    first_epoch, skip, partial = 1, 0, None
    if checkpoint is not None and checkpoint.is_file():
        progress = _load_checkpoint(checkpoint, pop)
        if progress is not None:
            first_epoch, skip, partial = progress["epoch"], progress["batch"], progress["sums"]
            steps, elapsed, reported = progress["steps"], progress["elapsed"], progress["reported"]
            step_losses = list(progress["step_losses"])
            for r, history, status in zip(results, progress["history"], progress["status"], strict=True):
                r.history, r.status = history, status
    start = time.perf_counter() - elapsed

    def save(epoch: int, batch: int, sums: Any) -> None:
        if checkpoint is None:
            return
        progress = {
            "epoch": epoch,
            "batch": batch,
            "sums": sums,
            "steps": steps,
            "elapsed": time.perf_counter() - start,
            "reported": list(reported),
            "step_losses": torch.stack(step_losses) if step_losses else [],
            "history": [r.history for r in results],
            "status": [r.status for r in results],
        }
        _save_checkpoint(checkpoint, pop, progress)

    for epoch in range(first_epoch, epochs + 1):
        if max_steps is not None and steps >= max_steps:  # the cap fell on an epoch's end: nothing more to record
            break
        total = torch.zeros(K, dtype=torch.float64, device=pop.alive.device)
        count = torch.zeros_like(total)
        if partial is not None:
            total, count = partial
            partial = None
        complete = True
        for b, (x, y) in enumerate(batches(epoch)):
            if b < skip:  # done before the checkpoint this run resumed from
                continue
            if max_steps is not None and steps >= max_steps:
                complete = False
                break
            was_moving = pop.alive & ~pop.stopped
            try:
                losses = pop.step(x, y, per_member)
            except RuntimeError as e:
                if steps or "atching rule" not in str(e):
                    raise
                # An operation torch.vmap has no batching rule for, found at the first step, before any result.
                raise PopulationError(
                    f"`model={model_name}` cannot be trained as a vectorized population: torch.vmap cannot batch it "
                    f"({str(e).splitlines()[0]}); use population.mode=sequential"
                ) from None
            steps += 1
            if on_step is not None:
                on_step()
            step_losses.append(losses)
            counted = was_moving & pop.alive
            # Weighted by batch size, as the harness's epoch mean: a short last batch counts less.
            size = y.shape[1] if per_member else len(y)
            total += torch.where(counted, losses.double() * size, 0.0)
            count += counted.double() * size
            if _stop_requested():
                save(epoch, b + 1, (total, count))
                raise PopulationStopped(steps)
        skip = 0
        val_l, val_e = pop.evaluate(*splits["val"], eval_chunk)
        test_l, test_e = pop.evaluate(*splits["test"], eval_chunk)
        wall = time.perf_counter() - start
        moving = (pop.alive & ~pop.stopped).tolist()  # one synchronization per epoch, not per step
        diverged_step = pop.diverged_step.tolist()
        train_loss = torch.where(count > 0, total / count.clamp(min=1), math.nan).tolist()
        hps = pop.hyperparameters()
        for i, r in enumerate(results):
            if r.status == "pruned" or reported[i]:
                continue
            own_steps = steps if diverged_step[i] < 0 else diverged_step[i] - 1
            if diverged_step[i] >= 0 and r.history and r.history[-1]["steps"] == own_steps:
                reported[i] = True  # it diverged at its epoch's first step: that epoch's row is the last one
                continue
            row = _epoch_row(
                epoch, own_steps, train_loss[i], (val_l[i], val_e[i]), (test_l[i], test_e[i]), wall, hps[i]
            )
            r.history.append(row)
            if moving[i] and not math.isfinite(val_l[i]):
                # Finite training losses, yet weights that give non-finite outputs: diverged (the harness's rule).
                pop.diverge_on_validation(i, val_l[i])
                moving[i] = False
            if not moving[i]:
                reported[i] = True
                continue
            if complete and epoch_callback is not None and epoch_callback(indices[i], epoch, row):
                pop.stopped[i] = True
                r.status = "pruned"
        save(epoch + 1, 0, None)
        if not bool((pop.alive & ~pop.stopped).any()) or not complete:
            break
    all_losses = torch.stack(step_losses).T.tolist() if step_losses else [[] for _ in range(K)]
    diverged_step = pop.diverged_step.tolist()
    hps = pop.hyperparameters()
    for i, r in enumerate(results):
        if diverged_step[i] >= 0:
            r.status, r.diverged_step, r.diverged_reason = "diverged", diverged_step[i], pop.reason(i)
            # The diverging step's loss is kept: it is the non-finite value (or the last one) that stopped it.
            r.step_losses = all_losses[i][: diverged_step[i]]
            # A training-loss divergence happens in step diverged_step, which is not counted; a validation one
            # after it, which is.
            r.steps = diverged_step[i] - (0 if int(pop.diverged_code[i]) == _VALIDATION else 1)
        else:
            r.steps = r.history[-1]["steps"]
            r.step_losses = all_losses[i][: r.steps]
        r.hyperparameters = hps[i]
    return results


class SequentialOptimizer:
    """What sequential mode needs of an optimizer (``hypergrad.HyperOptimizer`` has all of it)."""

    def step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def hyperparameters(self) -> list[dict[str, float]]: ...


def _tower_optimizer(member: Member, params: Sequence[Tensor]) -> SequentialOptimizer:
    if member.tower is None:
        raise PopulationError(f"member {member.name!r} has no tower; pass make_optimizer for baselines")
    return hypergrad.tower(member.tower, params)  # type: ignore[return-value]


def _train_alone(
    make_model: Callable[[int], nn.Module],
    make_optimizer: Callable[[Member, Sequence[Tensor]], SequentialOptimizer],
    index: int,
    member: Member,
    batches: Batches,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    epochs: int,
    max_steps: int | None,
    eval_chunk: int,
    epoch_callback: EpochCallback | None,
) -> MemberResult:
    """One member as an ordinary run: an ``nn.Module`` and ``hypergrad.tower``, over the population's batches."""
    model = make_model(member.seed)
    opt = make_optimizer(member, list(model.parameters()))
    result = MemberResult(member, init=dict(opt.hyperparameters()[0]))
    train_mode, eval_mode = getattr(opt, "train_mode", None), getattr(opt, "eval_mode", None)
    start = time.perf_counter()
    steps = 0

    @torch.no_grad()
    def evaluate(x: Tensor, y: Tensor) -> tuple[float, float]:
        model.eval()
        if eval_mode is not None:  # Schedule-Free evaluates its averaged weights
            eval_mode()
        loss = wrong = torch.zeros((), dtype=x.dtype if x.is_floating_point() else torch.float32)
        for i in range(0, len(x), eval_chunk):
            s, w = _loss_sums(model(x[i : i + eval_chunk]), y[i : i + eval_chunk])
            loss, wrong = loss + s, wrong + w
        return loss.item() / y.numel(), wrong.item() / y.numel()

    for epoch in range(1, epochs + 1):
        if max_steps is not None and steps >= max_steps:  # the cap fell on an epoch's end: nothing more to record
            break
        total, count, complete = 0.0, 0, True
        for x, y in batches(epoch):
            if max_steps is not None and steps >= max_steps:
                complete = False
                break
            model.train()
            if train_mode is not None:
                train_mode()
            loss = _loss_sums(model(x), y)[0] / y.numel()
            value = loss.item()
            result.step_losses.append(value)
            if not math.isfinite(value):
                result.status, result.diverged_step = "diverged", steps + 1
                result.diverged_reason = f"non-finite training loss ({value})"
                break
            loss.backward()
            try:
                opt.step()
            except hypergrad.NonFiniteHyperparameterError as e:
                result.status, result.diverged_step = "diverged", steps + 1
                result.diverged_reason = f"non-finite hyperparameter: {e}"
                break
            opt.zero_grad()
            steps += 1
            total += value * len(y)
            count += len(y)
        row = _epoch_row(
            epoch,
            steps,
            total / count if count else math.nan,
            evaluate(*splits["val"]),
            evaluate(*splits["test"]),
            time.perf_counter() - start,
            opt.hyperparameters(),
        )
        result.history.append(row)
        if result.status != "diverged" and not math.isfinite(row["val_loss"]):
            result.status, result.diverged_step = "diverged", steps
            result.diverged_reason = f"non-finite validation loss ({row['val_loss']})"
        if result.status == "diverged" or not complete:
            break
        if epoch_callback is not None and epoch_callback(index, epoch, row):
            result.status = "pruned"
            break
    result.steps = steps
    result.hyperparameters = opt.hyperparameters()
    return result


# -- the harness entry point: `python -m bench +population=NAME` ------------------------------------------------------
def _fail(key: str, expected: str, got: Any) -> ValueError:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from bench.errors import ConfigError

    if isinstance(got, (DictConfig, ListConfig)):
        got = OmegaConf.to_container(got)
    return ConfigError(f"`{key}` must be {expected}, but got {got!r}")


def _check_run_settings(cfg: Any) -> None:
    """Refuse the run settings a population does not honour (each would silently differ from a single run)."""
    for key, why in (
        ("amp", "autocast is not applied to the stacked members"),
        ("compile", "the vmapped forward is not compiled"),
    ):
        if cfg.trainer.get(key):
            raise _fail(f"trainer.{key}", f"false for a population ({why})", cfg.trainer.get(key))
    if cfg.trainer.get("checkpoint_every"):
        raise _fail("trainer.checkpoint_every", "0 for a population (populations are not checkpointed)",
                    cfg.trainer.checkpoint_every)  # fmt: skip
    if cfg.logger.get("name", "none") != "none":
        raise _fail("logger", "none for a population (members write run directories, not W&B runs)", cfg.logger.name)


def _epoch_batches(data: Any, batch_size: int, seed: int) -> Batches:
    """Every member's batches, drawn exactly as a harness run with this seed draws them (bench.train)."""
    from bench.train import epoch_batch, epoch_permutation

    x_all = data.train[0]

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        e = epoch - 1  # the harness counts completed epochs
        perm = epoch_permutation(len(x_all), seed, e, x_all.device)
        for b in range(-(-len(perm) // batch_size)):
            yield epoch_batch(data, perm, b, batch_size, seed, e)

    return batches


def member_metrics(cfg: Any, result: MemberResult, wall_time_s: float, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A member's metrics.json, in the harness's schema (plus a ``population`` entry)."""
    from bench.optim import method_of

    m = result.member
    last = result.history[-1] if result.history else {}
    init = dict(result.init)  # as the harness reports it: the optimizer's own first reading, in its dtype
    if m.tower is not None:
        family, method = "tower", method_of(m.spec)
    else:
        family = "tuning_free" if m.baseline.name in (*_COUPLING, *_SWAPPING) else "baseline"
        method = str(m.baseline.name)
    return {
        **{key: last.get(key, math.nan) for key in FINAL_KEYS},
        "diverged": result.status == "diverged",
        "diverged_step": result.diverged_step,
        "diverged_reason": result.diverged_reason,
        "epochs": len(result.history),
        "steps": result.steps,
        "wall_time_s": wall_time_s,
        "optimizer": m.spec,
        "method": method,
        "family": family,
        "height": m.height,
        "init": init,
        "hyperparameters": result.hyperparameters,
        "seed": m.seed,
        "model": str(cfg.model.name),
        "dataset": str(cfg.dataset.name),
        "status": result.status,
        "population": dict(extra),
    }


def write_member(member_cfg: Any, directory: Path, result: MemberResult, metrics: Mapping[str, Any]) -> None:
    """A member's run directory: .hydra/config.yaml (its own config), history.csv, then metrics.json."""
    from omegaconf import OmegaConf

    from bench.io import atomic_write, atomic_write_csv, atomic_write_json

    text = OmegaConf.to_yaml(member_cfg, resolve=False)
    atomic_write(directory / ".hydra" / "config.yaml", lambda f: f.write(text))
    atomic_write_csv(directory / "history.csv", result.history)
    atomic_write_json(directory / "metrics.json", metrics)


def _train_members(
    cfg: Any, members: Sequence[Member], mode: str, dtype: torch.dtype, epoch_callback: EpochCallback | None
) -> tuple[list[MemberResult], float, torch.device]:
    """Train ``members`` on the data, model and trainer of ``cfg``; returns the results, wall time and device."""
    from bench.data import build_dataset
    from bench.models import build_model
    from bench.train import _device

    device = _device(cfg.trainer.device)
    if cfg.trainer.get("num_threads") is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    data = build_dataset(cfg.dataset, device)
    if data.kind != "text":  # token ids stay integers
        for split in ("train", "val", "test"):
            x, y = getattr(data, split)
            setattr(data, split, (x.to(dtype), y))

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(cfg.model, data).to(device=device, dtype=dtype)

    # As the harness counts them (schedules are stretched over the total).
    steps_per_epoch = math.ceil(len(data.train[0]) / cfg.trainer.batch_size)
    total = min(steps_per_epoch * cfg.trainer.epochs, cfg.trainer.get("max_steps") or math.inf)
    make_optimizer = None
    if any(m.tower is None for m in members):
        from bench.optim import build_optimizer

        def make_optimizer(member: Member, params: Sequence[Tensor]) -> SequentialOptimizer:
            built = build_optimizer(member.baseline, params, steps_per_epoch, total)
            built.zero_grad = built.optimizer.zero_grad  # type: ignore[attr-defined]
            return built  # type: ignore[return-value]

    batches = _epoch_batches(data, cfg.trainer.batch_size, int(cfg.seed))
    passes = len(members) if mode == "sequential" else len(group_members(members))
    bar = tqdm(
        total=total * passes,
        disable=not cfg.trainer.get("progress", True),
        desc=f"{cfg.model.name}/{cfg.dataset.name} population of {len(members)} ({mode})",
        unit="step",
        dynamic_ncols=True,
    )

    def counted(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in batches(epoch):
            yield batch
            bar.update()

    start = time.perf_counter()
    with bar:
        results = train_population(
            make_model,
            members,
            counted,
            {"val": data.val, "test": data.test},
            epochs=cfg.trainer.epochs,
            max_steps=cfg.trainer.get("max_steps"),
            mode=mode,
            eval_chunk=cfg.trainer.eval_batch_size,
            epoch_callback=epoch_callback,
            model_name=str(cfg.model.name),
            make_optimizer=make_optimizer,
        )
    return results, time.perf_counter() - start, device


# -- Optuna: a batch of trials as one population ------------------------------------------------------------------
def evaluate_trials_as_population(
    trials: Sequence[Any],
    run_cfgs: Sequence[Any],
    run_dirs: Sequence[str | Path],
    *,
    mode: str = "vectorized",
) -> list[dict[str, Any]]:
    """Train several asked Optuna trials together as one population; return each trial's metrics.

    ``run_cfgs[i]`` is trial i's harness config (what ``bench.train.run`` would get) and ``run_dirs[i]`` its run
    directory, which receives the harness's files. The configs may differ only in ``optimizer``: the members share
    the data, the model architecture, the trainer and the seed (initialization and batches), so each member equals
    the harness run of its own config. After every epoch each trial reports its validation error; a trial that its
    pruner stops is frozen there and returned with status "pruned". Telling the study is the caller's (see
    :func:`tell_trials`): trials of one batch are sampled before any of them is told, which changes what the
    sampler knows when it samples, so say so wherever the study is summarized.
    """
    from omegaconf import OmegaConf

    from bench.config import ConfigError, validate

    if not (len(trials) == len(run_cfgs) == len(run_dirs)) or not trials:
        raise ValueError(
            f"trials, run_cfgs and run_dirs must be non-empty and of one length, but got "
            f"{len(trials)}, {len(run_cfgs)} and {len(run_dirs)}"
        )
    if mode not in ("vectorized", "sequential"):
        raise ConfigError(f"`tune.population_mode` must be one of ['vectorized', 'sequential'], but got {mode!r}")

    def shared(cfg: Any) -> Any:
        return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("optimizer", "paths", "logger")}

    first = shared(run_cfgs[0])
    members = []
    for trial, cfg in zip(trials, run_cfgs, strict=True):
        validate(cfg)
        _check_run_settings(cfg)
        if shared(cfg) != first:
            diff = sorted(k for k in set(first) | set(shared(cfg)) if first.get(k) != shared(cfg).get(k))
            raise ConfigError(
                f"`{diff[0]}` must be the same for every trial of a population, but trial {trial.number} has "
                f"{OmegaConf.to_container(cfg).get(diff[0])!r}"
            )
        if cfg.optimizer.name == "tower":
            from bench.optim import tower_spec

            members.append(Member(parse_spec(tower_spec(cfg.optimizer)), int(cfg.seed), str(trial.number)))
        else:
            if mode == "vectorized":
                problem = _baseline_problem(str(cfg.optimizer.name))
                if problem is not None:
                    raise ConfigError(
                        f"`optimizer` must be a per-parameter optimizer for a vectorized population ({problem}; "
                        f"use tune.population_mode=sequential), but got {cfg.optimizer.name!r}"
                    )
            members.append(Member(None, int(cfg.seed), str(trial.number), cfg.optimizer))

    def report(index: int, epoch: int, row: dict[str, Any]) -> bool:
        trial = trials[index]
        value = row["val_error"]
        if value is None or not math.isfinite(value):
            return False
        trial.report(value, epoch)
        return bool(trial.should_prune())

    results, wall, _ = _train_members(run_cfgs[0], members, mode, torch.float32, report)
    out = []
    for i, (r, cfg, directory) in enumerate(zip(results, run_cfgs, run_dirs, strict=True)):
        extra = {
            "mode": mode,
            "size": len(members),
            "index": i,
            "data_seed": int(cfg.seed),
            "dtype": "float32",
            "wall_time_s": wall,
        }
        metrics = member_metrics(cfg, r, wall / len(members), extra)
        write_member(cfg, Path(directory), r, metrics)
        out.append(metrics)
    return out


def tell_trials(study: Any, trials: Sequence[Any], metrics: Sequence[Mapping[str, Any]]) -> None:
    """Tell ``study`` how each trial of a population ended: its validation error, pruned, or failed (diverged)."""
    from optuna.trial import TrialState

    for trial, m in zip(trials, metrics, strict=True):
        trial.set_user_attr("epochs", m["epochs"])
        trial.set_user_attr("steps", m["steps"])
        trial.set_user_attr("population_size", m["population"]["size"])
        if m["status"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif m["status"] == "diverged":
            reason = f"diverged at step {m['diverged_step']}: {m['diverged_reason']}"
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, m["val_error"])
