"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision, held as tensors on the device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
import torchvision.datasets as tvd
from omegaconf import DictConfig

from bench.data import Data, split_indices

__all__ = ["cifar10", "fashion_mnist", "missing_files", "mnist", "random_crop_flip"]

# CIFAR-10's per-channel mean and standard deviation over its training set.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _CIFAR10Files(tvd.CIFAR10):
    """CIFAR10 that checks the batch files exist instead of their checksums.

    torchvision pins the md5 of each official batch file, which rejects any re-packed or
    shrunk copy in the same pickle format (a subset on a cluster's scratch disk, a test's tiny
    files). A corrupt file still fails when it is unpickled; a download is still checked
    against the archive's md5 (`tgz_md5`), which this class keeps.
    """

    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in tvd.CIFAR10.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in tvd.CIFAR10.test_list]
    meta: ClassVar[dict[str, str | None]] = {**tvd.CIFAR10.meta, "md5": None}


def missing_files(cfg: DictConfig) -> list[Path]:
    """The files a torchvision dataset needs under `dataset.data_dir` that are not there."""
    root = Path(cfg.data_dir).expanduser()
    if cfg.name == "cifar10":
        names = [n for n, _ in _CIFAR10Files.train_list + _CIFAR10Files.test_list] + [_CIFAR10Files.meta["filename"]]
        needed = [root / _CIFAR10Files.base_folder / n for n in names]
    else:
        cls = tvd.MNIST if cfg.name == "mnist" else tvd.FashionMNIST
        # torchvision reads the uncompressed IDX files from <root>/<ClassName>/raw/.
        needed = [root / cls.__name__ / "raw" / os.path.splitext(url)[0] for url, _ in cls.resources]
    return [p for p in needed if not p.is_file()]


def _with_val(name: str, train: tuple[torch.Tensor, torch.Tensor], test, cfg: DictConfig, **kw) -> Data:
    # The validation split is carved out of the official training set, so the test set stays untouched.
    tr, val, _ = split_indices(len(train[0]), cfg.val_size, 0, cfg.split_seed)  # the test split is official
    x, y = train
    return Data(
        name=name,
        kind="image",
        train=(x[tr], y[tr]),
        val=(x[val], y[val]),
        test=test,
        input_shape=tuple(x.shape[1:]),
        n_classes=10,
        **kw,
    )


def _mnist_like(cls: type[tvd.MNIST], name: str, cfg: DictConfig) -> Data:
    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = cls(str(Path(cfg.data_dir).expanduser()), train=train, download=cfg.download)
        return ds.data.unsqueeze(1).float() / 255.0, ds.targets.long()

    return _with_val(name, load(True), load(False), cfg)


def mnist(cfg: DictConfig) -> Data:
    """The 60,000/10,000 MNIST digits, scaled to [0, 1] like torchvision's ToTensor."""
    return _mnist_like(tvd.MNIST, "mnist", cfg)


def fashion_mnist(cfg: DictConfig) -> Data:
    """Fashion-MNIST, same format and scaling as MNIST."""
    return _mnist_like(tvd.FashionMNIST, "fashion_mnist", cfg)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """He et al.'s CIFAR augmentation: zero-pad by `pad`, random crop back, random horizontal flip.

    Written on the batch tensor because torchvision's transforms draw one crop per call, which on
    a whole batch would crop every image the same way; here each image gets its own.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing gives N x H x W x C; move channels back in front.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cifar10(cfg: DictConfig) -> Data:
    """CIFAR-10, standardized per channel; training batches get crop-and-flip when `dataset.augment`."""
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = _CIFAR10Files(str(Path(cfg.data_dir).expanduser()), train=train, download=cfg.download)
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std, torch.as_tensor(ds.targets, dtype=torch.long)

    return _with_val("cifar10", load(True), load(False), cfg, augment=random_crop_flip if cfg.augment else None)
