"""Hydra configs of the harness (a package so that `pkg://bench.conf` finds them when installed).

`CONF_DIR` is this directory; `group_defaults` reads what the files of one config group may set, for the validators.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["CONF_DIR", "group_defaults", "load_yaml"]

CONF_DIR = Path(__file__).resolve().parent
"""The config directory, `bench/conf/`: shipped inside the package, so an installed wheel finds it."""


@functools.cache
def _load_yaml_cached(path: str, mtime: float) -> Any:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def load_yaml(path: Path) -> Any:
    """A packaged config file as plain data, read once per process (a sweep validates every job)."""
    return copy.deepcopy(_load_yaml_cached(str(path), path.stat().st_mtime))


def group_defaults(group: str, name: str) -> list[dict[str, Any]]:
    """The bench/conf/<group>/*.yaml files whose `name` is `name`, as plain dicts (what that choice may set)."""
    found = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        data = load_yaml(path)
        if isinstance(data, dict) and data.get("name") == name:
            found.append(data)
    return found
