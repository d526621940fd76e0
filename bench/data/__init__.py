"""Datasets as tensors on the training device, each with train/val/test splits.

Small datasets live on the device as whole tensors and are batched by a seeded index
permutation: no per-batch DataLoader overhead, and a run is reproducible from (seed, epoch).
`dataset=NAME` in the config (bench/conf/dataset/NAME.yaml) selects the loader registered here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from bench.errors import ConfigError, check_bool, check_int, check_number, fail

__all__ = ["DATASETS", "KINDS", "Data", "build_dataset", "split_indices", "validate"]

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Data:
    """A dataset ready for training: (inputs, targets) per split and the shape facts a model needs.

    `kind` is "image" (inputs N x C x H x W), "vector" (N x D) or "text" (N x T token ids, with
    targets N x T, the next character). `n_classes` is the vocabulary size for text.
    `augment(x, generator)` (training only) returns an augmented batch.
    """

    name: str
    kind: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    n_classes: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Data:
        """Move every split to `device` (once, at the start of a run)."""
        for name in ("train", "val", "test"):
            x, y = getattr(self, name)
            setattr(self, name, (x.to(device), y.to(device)))
        return self


def split_indices(n: int, val_size: int, test_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded disjoint train/val/test index sets over `n` examples."""
    if val_size + test_size >= n:
        raise ConfigError(
            f"`dataset.val_size` + `dataset.test_size` must leave training examples out of {n}, "
            f"but got {val_size} + {test_size}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size + test_size :], perm[:val_size], perm[val_size : val_size + test_size]


def _cap(split: Split, size: int | None) -> Split:
    """Keep the first `size` training examples, for quick runs (image splits are already shuffled)."""
    if size is not None and size > len(split[0]):
        raise ConfigError(
            f"`dataset.train_size` must be at most the {len(split[0])} training examples of this dataset "
            f"(or null for all), but got {size}"
        )
    return split if size is None else (split[0][:size], split[1][:size])


KINDS: dict[str, str] = {
    "mnist5k": "image",
    "digits": "image",
    "synthetic": "vector",
    "pydoc_text": "text",
    "war_and_peace": "text",
    "mnist": "image",
    "fashion_mnist": "image",
    "cifar10": "image",
}
"""Every dataset name, with the kind of input it gives (which decides the models it fits)."""
DATASETS: tuple[str, ...] = tuple(KINDS)


def validate(cfg: DictConfig) -> None:
    """Check the run config's `dataset` group, files on disk included; raise `ConfigError` with one line."""
    d = cfg.dataset
    if d.get("name") not in DATASETS:
        raise fail("dataset.name", f"one of {list(DATASETS)}", d.get("name"))
    check_int(d, "train_size", 1, optional=True, prefix="dataset.")
    for key in ("val_size", "test_size"):
        if key in d:
            check_int(d, key, 0, prefix="dataset.")
    if "seq_len" in d:
        check_int(d, "seq_len", 1, prefix="dataset.")
        for key in ("val_fraction", "test_fraction"):
            check_number(d, key, "(0, 0.5]", prefix="dataset.")
    if d.name in ("mnist", "fashion_mnist", "cifar10"):
        check_bool(d, "download", "dataset.")
        if not d.download:
            from bench.data.vision import missing_files

            missing = missing_files(d)
            if missing:
                root = Path(d.data_dir).expanduser()
                names = ", ".join(str(p.relative_to(root)) for p in missing[:3])
                more = ", ..." if len(missing) > 3 else ""
                raise fail(
                    "dataset.data_dir",
                    f"a directory holding the {d.name} files",
                    str(d.data_dir),
                    f"missing {names}{more} (pass dataset.download=true to fetch them)",
                )
    if d.name == "cifar10":
        check_bool(d, "verify_checksums", "dataset.")
        if d.verify_checksums:
            from bench.data.vision import cifar_checksum_mismatches

            bad = cifar_checksum_mismatches(d)
            if bad:
                raise fail(
                    "dataset.data_dir",
                    "a directory holding the official CIFAR-10 files (torchvision's md5 checksums)",
                    str(d.data_dir),
                    f"{bad[0].name} does not match; for re-packed files pass dataset.verify_checksums=false",
                )
    if d.name == "war_and_peace":
        check_bool(d, "download", "dataset.")
        if not d.download and not Path(d.path).expanduser().is_file():
            raise fail("dataset.path", "an existing text file", str(d.path), "pass dataset.download=true to fetch it")


# The module of each loader, imported only when used: torchvision alone takes seconds to import.
_MODULES = {"image": "vision", "vector": "embedded", "text": "text"}
_EMBEDDED = ("mnist5k", "digits", "synthetic")


def _loader(name: str) -> Callable[[DictConfig], Data]:
    module = "embedded" if name in _EMBEDDED else _MODULES[KINDS[name]]
    return getattr(importlib.import_module(f"bench.data.{module}"), name)


def build_dataset(cfg: DictConfig, device: torch.device | str = "cpu") -> Data:
    """Load the dataset described by the `dataset` config group, on `device`."""
    data = _loader(cfg.name)(cfg)
    data.train = _cap(data.train, cfg.get("train_size"))
    return data.to(device)
