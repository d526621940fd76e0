"""Atomic file writing: a killed run never leaves a half-written result file.

Every writer puts the content into a temporary file in the same directory and then
`os.replace`s it over the target, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_save_torch", "atomic_write", "atomic_write_csv", "atomic_write_json", "to_jsonable"]


def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = False) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer (not mkstemp, whose files ignore the umask and end up private).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats become null (NaN is not valid JSON), tensors become numbers."""
    if hasattr(value, "numel") and hasattr(value, "tolist"):  # a tensor, without importing torch for readers
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def atomic_write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as indented, strictly valid JSON."""
    text = json.dumps(to_jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows (dicts) as CSV; the columns are the union of the rows' keys, in first-seen order."""
    import pandas as pd

    text = pd.DataFrame(list(rows)).to_csv(index=False)
    return atomic_write(path, lambda f: f.write(text))


def atomic_save_torch(path: str | Path, obj: Any) -> Path:
    """`torch.save` atomically."""
    import torch  # here: the report and other readers of results never need torch

    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)
