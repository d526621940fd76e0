"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision, held as tensors on the device."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.datasets as tvd
from omegaconf import DictConfig

from bench.data import Data, split_indices
from bench.errors import ConfigError

__all__ = ["cifar10", "cifar_checksum_mismatches", "fashion_mnist", "missing_files", "mnist", "random_crop_flip"]

# CIFAR-10's per-channel mean and standard deviation over its training set.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, lists, dicts and strings, and refuses every other global.

    A crafted pickle runs code through the globals it names (os.system, builtins.eval, ...); the CIFAR-10 batch
    format needs only numpy's array reconstruction, so nothing else may be named.
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _cifar_files() -> list[tuple[str, str]]:
    """(file name, official md5) of every CIFAR-10 file torchvision reads."""
    return [*tvd.CIFAR10.train_list, *tvd.CIFAR10.test_list, (tvd.CIFAR10.meta["filename"], tvd.CIFAR10.meta["md5"])]


def cifar_checksum_mismatches(cfg: DictConfig) -> list[Path]:
    """The CIFAR-10 files under `dataset.data_dir` whose md5 differs from the official one (torchvision's list)."""
    from torchvision.datasets.utils import check_integrity

    folder = Path(cfg.data_dir).expanduser() / tvd.CIFAR10.base_folder
    return [folder / n for n, md5 in _cifar_files() if (folder / n).is_file() and not check_integrity(folder / n, md5)]


def _load_repacked_cifar(root: Path, train: bool) -> tuple[np.ndarray, list[int]]:
    """CIFAR-10 batches that are not the official files (`dataset.verify_checksums=false`), read without pickle's
    power to run code: only numpy arrays, lists, dicts and strings are rebuilt."""
    names = [n for n, _ in (tvd.CIFAR10.train_list if train else tvd.CIFAR10.test_list)]
    data, labels = [], []
    for name in names:
        path = root / tvd.CIFAR10.base_folder / name
        try:
            with open(path, "rb") as f:
                entry = _SafeUnpickler(f, encoding="latin1").load()
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry["labels"])
        except Exception as e:
            raise ConfigError(
                f"`dataset.data_dir` must hold CIFAR-10 batches, but {path} is not one ({str(e)[:160]}); "
                "replace it with the official file"
            ) from None
    return np.concatenate(data).transpose(0, 2, 3, 1), labels


def missing_files(cfg: DictConfig) -> list[Path]:
    """The files a torchvision dataset needs under `dataset.data_dir` that are not there."""
    root = Path(cfg.data_dir).expanduser()
    if cfg.name == "cifar10":
        needed = [root / tvd.CIFAR10.base_folder / n for n, _ in _cifar_files()]
    else:
        cls = tvd.MNIST if cfg.name == "mnist" else tvd.FashionMNIST
        # torchvision reads the uncompressed IDX files from <root>/<ClassName>/raw/.
        needed = [root / cls.__name__ / "raw" / os.path.splitext(url)[0] for url, _ in cls.resources]
    return [p for p in needed if not p.is_file()]


def _torchvision(cls: type, cfg: DictConfig, train: bool) -> tvd.VisionDataset:
    """torchvision's dataset, with a failed download or a corrupt file reported in one line."""
    try:
        return cls(str(Path(cfg.data_dir).expanduser()), train=train, download=cfg.download)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; torchvision's checks raise RuntimeError
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        hint = "check the network, or put the files there by hand" if cfg.download else "pass dataset.download=true"
        raise ConfigError(
            f"`dataset.data_dir` must provide the {cfg.name} files, but loading {cfg.data_dir} failed ({reason}); "
            f"{hint}"
        ) from None


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
        ds = _torchvision(cls, cfg, train)
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
        root = Path(cfg.data_dir).expanduser()
        if cfg.get("verify_checksums", True):
            # torchvision checks every batch file against its official md5 before unpickling it.
            ds = _torchvision(tvd.CIFAR10, cfg, train)
            data, targets = ds.data, ds.targets
        else:
            data, targets = _load_repacked_cifar(root, train)
        x = torch.as_tensor(data).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std, torch.as_tensor(targets, dtype=torch.long)

    return _with_val("cifar10", load(True), load(False), cfg, augment=random_crop_flip if cfg.augment else None)
