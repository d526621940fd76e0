"""Optimizers selected by `optimizer=NAME`: hypergradient towers and the baselines they are compared with.

- `optimizer=tower`: a `hypergrad` tower, from the sweep-friendly keys (base, lr, momentum, height,
  hyper, hyper_lr) or from `optimizer.spec` in the paper's notation.
- plain baselines from torch.optim (sgd, momentum, adam, adamw, rmsprop, adagrad), with an optional
  learning-rate schedule (constant, cosine, warmup_cosine, step), stepped every training step.
- tuning-free baselines from their authors' packages: prodigy, dadapt_adam, schedulefree_adamw,
  schedulefree_sgd, dog.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from bench.conf import group_defaults
from bench.errors import check_int, check_known_keys, check_number, fail, is_int

__all__ = [
    "BASELINES",
    "SCHEDULES",
    "TOWER_BASES",
    "TUNING_FREE",
    "BuiltOptimizer",
    "build_optimizer",
    "method_of",
    "schedule_factor",
    "tower_spec",
    "validate",
]

TOWER_BASES = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
BASELINES = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad")
TUNING_FREE = ("prodigy", "dadapt_adam", "schedulefree_adamw", "schedulefree_sgd", "dog")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")
# Group keys worth reporting as a baseline's hyperparameters (Prodigy and D-Adaptation keep their
# estimated distance `d` in the group; the effective step size is d * lr).
_REPORTED = ("lr", "momentum", "alpha", "weight_decay", "d")


def tower_spec(cfg: DictConfig) -> str:
    """The tower spec in the paper's notation: `optimizer.spec` if set, else built from the sweep keys.

    >>> from omegaconf import OmegaConf
    >>> tower_spec(OmegaConf.create(
    ...     {"spec": None, "base": "sgd", "lr": 0.01, "momentum": 0.9, "height": 2, "hyper": "sgd", "hyper_lr": 1e-5}))
    'sgd(0.01, momentum=0.9)/sgd(1e-05)/sgd(1e-05)'
    >>> tower_spec(OmegaConf.create(
    ...     {"spec": None, "base": "adamw", "lr": 0.001, "weight_decay": 0.1, "height": 1, "hyper": "sgd",
    ...      "hyper_lr": 1e-5}))
    'adamw(0.001, weight_decay=0.1)/sgd(1e-05)'
    """
    if cfg.get("spec"):
        return str(cfg.spec)
    args = f"{cfg.lr}"
    for key in ("momentum", "weight_decay"):  # each set only for the one base that has it (validate checks)
        if cfg.get(key) is not None:
            args += f", {key}={cfg[key]}"
    return f"{cfg.base}({args})" + f"/{cfg.hyper}({cfg.hyper_lr})" * cfg.height


def method_of(spec: str) -> str:
    """The tower without its weight optimizer's initial values: `adam(0.001)/sgd(1e-05)` -> `adam/sgd(1e-05)`.

    Runs that differ only in where they start share a method, which is what a sensitivity analysis groups by.
    """
    base, *rest = spec.split("/")
    return "/".join([re.sub(r"\(.*\)$", "", base.strip()), *rest])


def schedule_factor(cfg: DictConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the initial learning rate at each step, for `optimizer.schedule`."""
    name = cfg.get("schedule", "constant")
    if name == "constant":
        return lambda step: 1.0
    if name == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if name == "warmup_cosine":
        warmup = max(1, round(cfg.warmup_fraction * total_steps))

        def warmup_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            decay = max(1, total_steps - warmup)  # a run no longer than its warmup has nothing left to decay
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))

        return warmup_cosine
    if name == "step":
        # He et al.'s schedule: divide by 1/gamma at each milestone epoch.
        milestones = sorted(int(m) for m in cfg.milestones)
        return lambda step: cfg.gamma ** sum(step // steps_per_epoch >= m for m in milestones)
    raise ValueError(f"`optimizer.schedule` must be one of {list(SCHEDULES)}, but got {name!r}")


def validate(cfg: DictConfig) -> None:
    """Check the run config's `optimizer` group (a tower's spec is parsed); raise `ConfigError` with one line."""
    o = cfg.optimizer
    names = ["tower", *BASELINES, *TUNING_FREE]
    if o.get("name") not in names:
        raise fail("optimizer.name", f"one of {names}", o.get("name"))
    presets = group_defaults("optimizer", o.name)
    if presets:
        check_known_keys(o, "optimizer", set().union(*(p.keys() for p in presets)))
    if o.name == "tower" and o.get("spec") and presets:
        # The spec gives every level's optimizer and values; the separate keys would be ignored without a word.
        defaults = presets[0]
        for key in ("base", "hyper", "lr", "hyper_lr", "height", "momentum", "weight_decay"):
            if key in o and key in defaults and o[key] != defaults[key]:
                raise fail(
                    f"optimizer.{key}",
                    f"left at its default {defaults[key]!r} when optimizer.spec is set (the spec decides it)",
                    o[key],
                    "put the value into optimizer.spec instead",
                )
    if o.name == "tower":
        _validate_tower(o)
        return
    p = "optimizer."
    check_number(o, "lr", "(0, inf)", prefix=p)
    check_number(o, "weight_decay", "[0, inf)", prefix=p)
    check_number(o, "momentum", "[0, 1]", prefix=p)
    for key in ("beta1", "beta2", "alpha"):
        check_number(o, key, "[0, 1)", prefix=p)  # torch requires < 1 (a moment that never decays)
    for key in ("eps", "d_coef", "reps_rel"):
        check_number(o, key, "(0, inf)", prefix=p)
    if "warmup_steps" in o:
        check_int(o, "warmup_steps", 0, prefix=p)
    schedule = o.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise fail("optimizer.schedule", f"one of {list(SCHEDULES)}", schedule)
    if o.name.startswith("schedulefree") and schedule != "constant":
        raise fail("optimizer.schedule", f"'constant' for {o.name} (it replaces the schedule)", schedule)
    if schedule == "warmup_cosine":
        check_number(o, "warmup_fraction", "[0, 1]", prefix=p)
    if schedule == "step":
        check_number(o, "gamma", "(0, 1]", prefix=p)
        if not all(is_int(m) and m > 0 for m in o.get("milestones", [])):
            raise fail("optimizer.milestones", "a list of positive epoch numbers", o.get("milestones"))


def _validate_tower(o: DictConfig) -> None:
    for key in ("stable", "compile"):
        if not isinstance(o.get(key, False), bool):
            raise fail(f"optimizer.{key}", "true or false", o.get(key))
    if not o.get("spec"):
        for key in ("base", "hyper"):
            if o.get(key) not in TOWER_BASES:
                raise fail(f"optimizer.{key}", f"one of {list(TOWER_BASES)}", o.get(key))
        check_number(o, "lr", "(0, inf)", prefix="optimizer.")
        check_number(o, "hyper_lr", "[0, inf)", prefix="optimizer.")
        check_int(o, "height", 0, prefix="optimizer.")
        if o.get("momentum") is not None:
            if o.base != "sgd":
                raise fail("optimizer.momentum", f"null for base {o.base!r} (only sgd has momentum)", o.momentum)
            check_number(o, "momentum", "[0, 1]", prefix="optimizer.")
        if o.get("weight_decay") is not None:
            if o.base != "adamw":
                raise fail(
                    "optimizer.weight_decay", f"null for base {o.base!r} (only adamw has weight decay)", o.weight_decay
                )
            check_number(o, "weight_decay", "[0, inf)", prefix="optimizer.")
    elif not isinstance(o.spec, str):
        raise fail("optimizer.spec", "a string in the paper's notation, e.g. 'adam(0.001)/sgd(1e-05)'", o.spec)
    import hypergrad

    spec = tower_spec(o)
    try:
        hypergrad.parse_spec(spec)
    except ValueError as e:
        first_line = str(e).splitlines()[0]
        raise fail(
            "optimizer.spec", "a tower in the paper's notation such as 'adam(0.001)/sgd(1e-05)'", spec, first_line
        ) from None


@dataclass
class BuiltOptimizer:
    """An optimizer with what the harness records about it.

    `name` is the normalized spec (towers) or the baseline's name; `method` the tower without the base's
    initial values; `family` is "tower", "baseline" or "tuning_free"; `height` the number of hyper levels;
    `init` the weight optimizer's initial hyperparameters (before any schedule or learning moves them).
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    family: str
    name: str
    method: str
    height: int
    init: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.init = self.init or self.hyperparameters()[0]

    def hyperparameters(self) -> list[dict[str, float]]:
        """Current hyperparameters per level, weight optimizer first, in natural scale."""
        if self.family == "tower":
            return [dict(level) for level in self.optimizer.hyperparameters()]
        group = self.optimizer.param_groups[0]
        values: dict[str, float] = {}
        for key in _REPORTED:
            if isinstance(group.get(key), (int, float, torch.Tensor)) and not isinstance(group[key], bool):
                values[key] = float(group[key])
        if isinstance(group.get("betas"), (tuple, list)):
            values["beta1"], values["beta2"] = (float(b) for b in group["betas"])
        if isinstance(group.get("eta"), list) and group["eta"]:
            values["eta"] = float(group["eta"][0])  # DoG's step size, the same for every tensor of the group
        return [values]

    def train_mode(self) -> None:
        """Schedule-Free keeps two weight sequences and must be told which one the model should hold."""
        if self.name.startswith("schedulefree"):
            self.optimizer.train()

    def eval_mode(self) -> None:
        """Switch Schedule-Free to its averaged weights for evaluation (and checkpoints)."""
        if self.name.startswith("schedulefree"):
            self.optimizer.eval()

    def step(self) -> None:
        """One optimizer step, then one schedule step."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def _baseline(cfg: DictConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    name, wd = cfg.name, cfg.get("weight_decay", 0.0)
    betas = (cfg.get("beta1", 0.9), cfg.get("beta2", 0.999))
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=wd)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, betas=betas, weight_decay=wd, d_coef=cfg.d_coef)
    if name == "dadapt_adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=cfg.lr, betas=betas, weight_decay=wd, decouple=True)
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=cfg.lr, betas=betas, weight_decay=wd, warmup_steps=cfg.warmup_steps)
    if name == "schedulefree_sgd":
        from schedulefree import SGDScheduleFree

        return SGDScheduleFree(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, warmup_steps=cfg.warmup_steps)
    if name == "dog":
        from dog import DoG

        return DoG(params, lr=cfg.lr, reps_rel=cfg.reps_rel, weight_decay=wd)
    raise ValueError(f"`optimizer.name` must be one of {['tower', *BASELINES, *TUNING_FREE]}, but got {name!r}")


def build_optimizer(
    cfg: DictConfig, params: Iterable[torch.nn.Parameter], steps_per_epoch: int, total_steps: int
) -> BuiltOptimizer:
    """Build the optimizer of the `optimizer` config group over `params`."""
    params = list(params)
    if cfg.name == "tower":
        import hypergrad

        opt = hypergrad.tower(
            tower_spec(cfg), params, stable=bool(cfg.get("stable", False)), compile=bool(cfg.get("compile", False))
        )
        return BuiltOptimizer(opt, None, "tower", str(opt), method_of(str(opt)), opt.height)
    family = "tuning_free" if cfg.name in TUNING_FREE else "baseline"
    built = BuiltOptimizer(_baseline(cfg, params), None, family, cfg.name, cfg.name, 0)
    if cfg.get("schedule", "constant") != "constant":
        # Created after `init` was read: LambdaLR scales the group's lr at construction (warm-up starts low).
        factor = schedule_factor(cfg, steps_per_epoch, total_steps)
        built.scheduler = torch.optim.lr_scheduler.LambdaLR(built.optimizer, factor)
    return built
