"""Towers in the paper's notation: ``adam/sgd(1e-5)``, ``sgd(0.01, momentum=0.9)/sgd``, ``adam[lr]/sgd(1e-5)``.

The leftmost level updates the model's weights; each level to its right updates the hyperparameters of the one on its
left; the rightmost level's hyperparameters are fixed. A positional argument is the step size, keywords name the
others, brackets choose the learned subset (all learnable ones when absent), and anything unspecified takes PyTorch's
default. ``format_spec(parse_spec(s))`` is the normalized spelling of ``s``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hypergrad.rules import Rule, rules

__all__ = ["Level", "Tower", "format_spec", "parse_spec", "validate_value"]

# Natural ranges, as (low, high, low inclusive, high inclusive).
_RANGES = {
    "lr": (0.0, math.inf, True, False),
    "momentum": (0.0, 1.0, True, False),
    "beta1": (0.0, 1.0, False, False),
    "beta2": (0.0, 1.0, False, False),
    "gamma": (0.0, 1.0, False, False),
    "eps": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False),
}


def validate_value(name: str, value: object, where: str = "") -> float:
    """Return ``value`` as float, or raise ValueError naming the key, the value and the allowed range."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name} must be a number, but got {value!r}")
    value = float(value)
    low, high, low_in, high_in = _RANGES.get(name, (-math.inf, math.inf, False, False))
    ok = math.isfinite(value) and (value > low or (low_in and value == low)) and (value < high or high_in)
    if not ok:
        allowed = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
        raise ValueError(f"{where}{name} must be in {allowed}, but got {value!r}")
    return value


@dataclass(frozen=True)
class Level:
    """One level of a tower: an update rule, its initial hyperparameters and which of them are learned.

    ``learned`` is None for "every learnable one"; the tower resolves it (the top level learns nothing).
    """

    rule: Rule
    values: Mapping[str, float] = field(default_factory=dict)
    learned: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"{self.rule.name}: "
        unknown = sorted(set(self.values) - set(self.rule.defaults))
        if unknown:
            raise ValueError(f"{where}unknown hyperparameter {unknown[0]!r}; allowed: {', '.join(self.rule.defaults)}")
        merged = {k: validate_value(k, self.values.get(k, d), where) for k, d in self.rule.defaults.items()}
        object.__setattr__(self, "values", merged)
        if self.learned is not None:
            if isinstance(self.learned, str) or not all(isinstance(n, str) for n in self.learned):
                raise TypeError(
                    f"{where}learn must be a list of hyperparameter names, e.g. ['lr'], but got {self.learned!r}"
                )
            twice = sorted({n for n in self.learned if self.learned.count(n) > 1})
            if twice:
                raise ValueError(f"{where}{twice[0]!r} is named twice in the learned subset {list(self.learned)!r}")
            learnable = self.rule.learnable(merged)
            for name in self.learned:
                if name not in learnable:
                    raise ValueError(
                        f"{where}cannot learn {name!r}; learnable here: {', '.join(learnable)}"
                        + (" (momentum is learnable only when it starts non-zero)" if name == "momentum" else "")
                    )
            ordered = tuple(n for n in learnable if n in self.learned)
            object.__setattr__(self, "learned", None if ordered == learnable else ordered)

    def learned_names(self) -> tuple[str, ...]:
        return self.rule.learnable(self.values) if self.learned is None else self.learned

    def __truediv__(self, other: Level | Tower) -> Tower:
        return Tower((self, *((other,) if isinstance(other, Level) else other.levels)))

    def __str__(self) -> str:
        return format_spec(Tower((self,)))


@dataclass(frozen=True)
class Tower:
    """A sequence of levels, weights' optimizer first. Compose in code with ``/``: ``Adam() / SGD(1e-5)``."""

    levels: tuple[Level, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a tower needs at least one level")
        top = self.levels[-1]
        if top.learned is not None:
            raise ValueError(
                f"spec level {len(self.levels)} ({top.rule.name}) has a learned subset in brackets, but nothing "
                "above it learns it; add a level on its right, e.g. '/sgd(1e-5)'"
            )

    @property
    def height(self) -> int:
        return len(self.levels) - 1

    def __truediv__(self, other: Level | Tower) -> Tower:
        other_levels = (other,) if isinstance(other, Level) else other.levels
        return Tower(self.levels + other_levels)

    def __str__(self) -> str:
        return format_spec(self)


def _fmt(x: float) -> str:
    return repr(float(x))  # shortest text that parses back to the same float


def format_spec(tower: Tower) -> str:
    """The normalized spelling: every step size explicit, other values only where they differ from the default."""
    parts = []
    for i, level in enumerate(tower.levels):
        rule, values = level.rule, level.values
        text = rule.name
        is_top = i == len(tower.levels) - 1
        if not is_top and level.learned is not None:
            text += "[" + ",".join(level.learned) + "]"
        args = [_fmt(values["lr"])] if "lr" in values else []
        args += [f"{k}={_fmt(v)}" for k, v in values.items() if k != "lr" and v != rule.defaults[k]]
        parts.append(f"{text}({', '.join(args)})")
    return "/".join(parts)


_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<sym>[/()\[\],=]))",
    re.ASCII,  # "\d" would otherwise read full-width and other Unicode digits as numbers
)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"spec {self.text!r}: {what} at position {self.pos}\n  {self.text}\n  {' ' * self.pos}^")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, kind: str, value: str | None = None, expected: str = "") -> str:
        self.skip_space()
        m = _TOKEN.match(self.text, self.pos)
        if m is None or m.group(kind) is None or (value is not None and m.group(kind) != value):
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of spec"
            raise self.error(f"expected {expected or value or kind}, found {found}")
        self.pos = m.end()
        return m.group(kind)

    def at(self, value: str) -> bool:
        self.skip_space()
        return self.text.startswith(value, self.pos)

    def done(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def level(self) -> Level:
        known = rules()
        start = self.pos
        name = self.take("name", expected="an optimizer name")
        if name.lower() not in known:
            self.pos = start
            self.skip_space()
            raise self.error(f"unknown optimizer {name!r} (known: {', '.join(sorted(known))})")
        rule = known[name.lower()]
        learned = None
        if self.at("["):
            self.take("sym", "[")
            learned = [self.take("name", expected="a hyperparameter name")]
            while self.at(","):
                self.take("sym", ",")
                learned.append(self.take("name", expected="a hyperparameter name"))
            self.take("sym", "]", expected="',' or ']'")
        values: dict[str, float] = {}
        if self.at("("):
            self.take("sym", "(")
            first = True
            while not self.at(")"):
                if not first:
                    self.take("sym", ",", expected="',' or ')'")
                self.skip_space()
                arg_pos = self.pos
                m = _TOKEN.match(self.text, self.pos)
                if m is not None and m.group("num") is not None:
                    if not first:
                        raise self.error("the step size must be the first argument; name the others, e.g. lr=0.1")
                    self.pos = m.end()
                    key, raw = "lr", m.group("num")
                else:
                    key = self.take("name", expected="a number or key=value")
                    if key.lower() in ("nan", "inf", "infinity") and not self.at("="):
                        self.pos = arg_pos
                        raise self.error(f"the step size must be a finite number, but got {key!r}")
                    self.take("sym", "=", expected="'='")
                    raw = self.take("num", expected="a number")
                if key in values:
                    self.pos = arg_pos
                    raise self.error(f"{key} given twice")
                if key not in rule.defaults:
                    self.pos = arg_pos
                    raise self.error(
                        f"unknown hyperparameter {key!r} for {rule.name} (allowed: {', '.join(rule.defaults)})"
                    )
                values[key] = float(raw)
                first = False
            self.take("sym", ")", expected="')'")
        try:
            return Level(rule, values, None if learned is None else tuple(learned))
        except ValueError as e:
            self.pos = start
            raise ValueError(f"spec {self.text!r}, level at position {start}: {e}") from None


def parse_spec(spec: str | Tower | Level | Sequence[Level]) -> Tower:
    """Parse a tower written in the paper's notation (a Tower or Level passes through)."""
    if isinstance(spec, Tower):
        return spec
    if isinstance(spec, Level):
        return Tower((spec,))
    if not isinstance(spec, str):
        if isinstance(spec, Sequence) and spec and all(isinstance(x, Level) for x in spec):
            return Tower(tuple(spec))
        raise TypeError(f"spec must be a string such as 'adam/sgd(1e-5)', but got {type(spec).__name__}")
    parser = _Parser(spec)
    if parser.done():
        raise ValueError("spec must name at least one optimizer, e.g. 'adam/sgd(1e-5)', but got an empty string")
    levels = [parser.level()]
    while not parser.done():
        parser.take("sym", "/", expected="'/'")
        levels.append(parser.level())
    try:
        return Tower(tuple(levels))
    except ValueError as e:
        raise ValueError(f"spec {spec!r}: {e}") from None
