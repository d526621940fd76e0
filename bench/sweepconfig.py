"""A sweep's job configs from one Hydra composition per distinct set of config-group choices.

Hydra composes every job of a `-m` sweep from scratch (`ConfigLoader.load_sweep_config`: the defaults list, every
YAML file, the merges), and does so twice with the population launcher: the sweeper composes each job to check the
batch (`Sweeper.validate_batch_is_legal`), and the launcher composes it again for `run_job`. In a sweep such as
`experiment=sensitivity_mnist5k` (132 jobs) the jobs differ only in plain values (`optimizer.lr=...`, `seed=...`),
which Hydra applies after composing the defaults, on the finished config. So each job's config is Hydra's
composition of its other overrides (done once, then copied) with those values applied by Hydra's own function, and
the Hydra fields that name the overrides (`hydra.overrides.task`, `hydra.job.override_dirname`) rebuilt as Hydra
builds them. tests/test_sweepconfig.py checks that this equals a full composition, job by job, for every preset.

A job's overrides are split only where the result is provably the same: an override is applied to the copy only if
it sets a plain value (no `+`, `~`, `++`, no package, no sweep, no dict, not a config group, not a `hydra.` key) and
its key neither equals nor contains nor lies inside the key of any other value override of the job. Anything else,
and any error, goes to Hydra's full composition (which then raises Hydra's own error).

The sweeper's check composes every job of a batch and throws the configs away; the launcher then asks for the same
jobs again. `take` hands the launcher the config the check made for the same job (each at most once), so a job is
derived once, not twice.

Hydra has no hook for this: `use(config_loader)` replaces `load_sweep_config` on the one loader that the sweeper and
the launcher share (`hydra_context.config_loader`), for this process only.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepConfigs", "use"]


def _nested(a: str, b: str) -> bool:
    """Whether keys `a` and `b` are equal or one lies inside the other (`optimizer` and `optimizer.lr`)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or a.startswith(b + "[") or b.startswith(a + "[")


class SweepConfigs:
    """`load_sweep_config(master_config, sweep_overrides)` of one Hydra config loader, from shared compositions."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._bases: dict[tuple[Any, ...], tuple[DictConfig, DictConfig]] = {}
        self._parsed: dict[str, Any] = {}
        self._repos: dict[tuple[Any, ...], Any] = {}
        # The last config made for each (sweep config, job overrides), until `take` hands it out.
        self._made: dict[tuple[int, tuple[str, ...]], tuple[DictConfig, DictConfig]] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled with the loader (submitit): the caches stay here
        return {"loader": self.loader}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["loader"])  # type: ignore[misc]

    def compose(self, master_config: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """Hydra's own full composition."""
        return type(self.loader).load_sweep_config(self.loader, master_config, list(overrides))

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        cfg = self._load(master_config, list(sweep_overrides))
        self._made[(id(master_config), tuple(sweep_overrides))] = (master_config, cfg)
        return cfg

    def take(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """`load_sweep_config`, or the config made for this job by the last plain call (the sweeper's check of the
        batch, which throws it away), handed out once: the caller may change it."""
        made = self._made.pop((id(master_config), tuple(sweep_overrides)), None)
        if made is not None and made[0] is master_config:
            return made[1]
        return self._load(master_config, list(sweep_overrides))

    def _load(self, master_config: DictConfig, overrides: list[str]) -> DictConfig:
        try:
            split = self._split(master_config, overrides)
        except Exception:  # a malformed override, a bad search path: Hydra says why
            split = None
        if split is None:
            return self.compose(master_config, overrides)
        rest, values, parsed = split
        # Everything the composition reads besides the files: the sweep's config, the overrides, cwd, environment.
        master_hydra = tuple(OmegaConf.to_container(master_config.hydra.overrides.hydra))  # type: ignore[arg-type]
        name = master_config.hydra.job.config_name
        key = (id(master_config), name, master_hydra, tuple(rest), os.getcwd(), tuple(sorted(os.environ.items())))
        cached = self._bases.get(key)
        if cached is None or cached[0] is not master_config:
            try:
                cached = self._bases[key] = (master_config, self.compose(master_config, rest))
            except Exception:
                return self.compose(master_config, overrides)  # Hydra's own error, for the job's own overrides
        return self._derive(master_config, cached[1], values, parsed) or self.compose(master_config, overrides)

    def _parse(self, line: str) -> Any:
        if line not in self._parsed:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            self._parsed[line] = OverridesParser.create().parse_overrides([line])[0]
        return self._parsed[line]

    def _repo(self, master_config: DictConfig, hydra_lines: list[str]) -> Any:
        """The config repository Hydra composes this job from (its search path depends on hydra overrides only)."""
        name = master_config.hydra.job.config_name
        key = (name, tuple(hydra_lines))
        if key not in self._repos:
            self._repos[key] = self.loader._parse_overrides_and_create_caching_repo(name, hydra_lines)[1]
        return self._repos[key]

    def _split(self, master_config: DictConfig, overrides: list[str]) -> tuple[list[str], list[Any], list[Any]] | None:
        """(the overrides to compose, the plain value overrides to apply on a copy, every override parsed)."""
        from hydra.core.override_parser.types import OverrideType

        master_hydra = list(OmegaConf.to_container(master_config.hydra.overrides.hydra))  # type: ignore[arg-type]
        parsed = [self._parse(line) for line in master_hydra + overrides]
        repo = self._repo(master_config, [o.input_line for o in parsed if o.is_hydra_override()])
        own = parsed[len(master_hydra) :]
        group = [repo.group_exists(o.key_or_group) and not isinstance(o.value(), dict) for o in own]

        def plain(o: Any, is_group: bool) -> bool:
            return (
                o.type == OverrideType.CHANGE
                and o.package is None
                and not o.is_sweep_override()
                and not is_group
                and not o.key_or_group.startswith("hydra")
                and not isinstance(o.value(), dict)
            )

        values = [i for i, o in enumerate(own) if plain(o, group[i])]
        if not values:
            return None
        settings = [o.key_or_group for i, o in enumerate(own) if not group[i] and not own[i].is_hydra_override()]
        for i in values:
            if sum(_nested(own[i].key_or_group, k) for k in settings) != 1:  # only itself
                return None
        chosen = set(values)
        rest = [line for i, line in enumerate(overrides) if i not in chosen]
        return rest, [own[i] for i in values], parsed

    def _derive(self, master_config: DictConfig, base: DictConfig, values: list[Any], parsed: list[Any]
                ) -> DictConfig | None:  # fmt: skip
        """`base` with `values` applied and the Hydra fields that name the overrides rebuilt (None on any error)."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        cfg = copy.deepcopy(base)
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except Exception:
            return None
        app = [o for o in parsed if not o.is_hydra_override()]
        task = cfg.hydra.overrides.task
        del task[:]
        for o in app:
            task.append(o.input_line)
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys
        )
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg


def use(config_loader: Any) -> None:
    """Make `config_loader.load_sweep_config` derive job configs from shared compositions (once per loader)."""
    if not isinstance(config_loader.__dict__.get("load_sweep_config"), SweepConfigs):
        config_loader.load_sweep_config = SweepConfigs(config_loader)
