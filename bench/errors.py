"""The harness's error for bad input: a leaf module, so every package can raise it without importing the validator.

(bench/config.py validates every group and imports bench.data and bench.models; they raise `ConfigError` too, which
made an import circle while it lived in bench/config.py.)
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the value."""
