"""The harness's error for bad input, and the checks that raise it.

A leaf module: each package validates its own config group with these checks (dataset keys in `bench.data`, model
keys in `bench.models`, ...) and `bench.config` only calls them in turn, so no package imports the validator.
Every message is one line: "`key` must be Y, but got Z", with an optional hint.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigError", "check_bool", "check_int", "check_known_keys", "check_number", "fail", "is_int"]


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the value."""


def fail(key: str, expected: str, got: Any, hint: str = "") -> ConfigError:
    """The error for `key`: "`key` must be `expected`, but got `got`[; `hint`]"."""
    if isinstance(got, (DictConfig, ListConfig)):
        got = OmegaConf.to_container(got)
    return ConfigError(f"`{key}` must be {expected}, but got {got!r}" + (f"; {hint}" if hint else ""))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(cfg: DictConfig, key: str, minimum: int, *, optional: bool = False, prefix: str = "") -> None:
    v = cfg.get(key)
    if optional and v is None:
        return
    if not is_int(v) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise fail(prefix + key, what + (" or null" if optional else ""), v)


def check_number(cfg: DictConfig, key: str, interval: str, *, prefix: str, optional: bool = False) -> None:
    """A finite number in `interval`, written as the message shows it ("(0, 1]"); an absent key passes."""
    if key not in cfg or (optional and cfg[key] is None):
        return
    v, (low, high) = cfg[key], map(float, interval[1:-1].split(","))
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (ok and (v > low if interval[0] == "(" else v >= low) and (v < high if interval[-1] == ")" else v <= high)):
        raise fail(prefix + key, f"a number in {interval}" + (" or null" if optional else ""), v)


def check_bool(cfg: DictConfig, key: str, prefix: str) -> None:
    if not isinstance(cfg.get(key), bool):
        raise fail(prefix + key, "true or false", cfg.get(key))


def check_known_keys(node: DictConfig, group: str, allowed: set[str]) -> None:
    """Refuse a key of `group` that no config file of the group sets: a misspelt key would change nothing."""
    unknown = sorted(set(node.keys()) - allowed)
    if unknown:
        raise fail(
            f"{group}.{unknown[0]}",
            f"absent: it is not a {group} setting here (the settings are {sorted(allowed)})",
            node[unknown[0]],
            "a misspelt or ignored key would silently change nothing",
        )
