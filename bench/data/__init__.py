"""Datasets as tensors on the training device, each with train/val/test splits.

Small datasets live on the device as whole tensors and are batched by a seeded index
permutation: no per-batch DataLoader overhead, and a run is reproducible from (seed, epoch).
`dataset=NAME` in the config (bench/conf/dataset/NAME.yaml) selects the loader registered here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

__all__ = ["DATASETS", "KINDS", "Data", "build_dataset", "split_indices"]

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
        from bench.errors import ConfigError

        raise ConfigError(
            f"`dataset.val_size` + `dataset.test_size` must leave training examples out of {n}, "
            f"but got {val_size} + {test_size}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size + test_size :], perm[:val_size], perm[val_size : val_size + test_size]


def _cap(split: Split, size: int | None) -> Split:
    """Keep the first `size` training examples, for quick runs (image splits are already shuffled)."""
    if size is not None and size > len(split[0]):
        from bench.errors import ConfigError

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
