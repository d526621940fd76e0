"""Character-level text corpora for the LSTM language model.

The text is cut into contiguous train/val/test stretches (so no window straddles two splits),
then into non-overlapping windows of `seq_len + 1` characters: inputs are the first `seq_len`,
targets the same window shifted by one.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import torch
from omegaconf import DictConfig

from bench.data import Data
from bench.errors import ConfigError

__all__ = ["encode_windows", "pydoc_text", "war_and_peace", "war_and_peace_path"]


def encode_windows(name: str, text: str, cfg: DictConfig) -> Data:
    """Build a `Data` of character windows from `text`, vocabulary = its distinct characters."""
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n_val, n_test = int(len(ids) * cfg.val_fraction), int(len(ids) * cfg.test_fraction)
    stretches = {
        "train": ids[: len(ids) - n_val - n_test],
        "val": ids[len(ids) - n_val - n_test : len(ids) - n_test],
        "test": ids[len(ids) - n_test :],
    }
    width = cfg.seq_len + 1
    splits = {}
    for split, stretch in stretches.items():
        windows = stretch[: len(stretch) // width * width].reshape(-1, width)
        if len(windows) == 0:
            raise ConfigError(
                f"`dataset.seq_len` must leave at least one window in the {split} split, but got "
                f"{cfg.seq_len} for a {split} split of {len(stretch)} characters"
            )
        splits[split] = (windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
    return Data(
        name=name,
        kind="text",
        input_shape=(cfg.seq_len,),
        n_classes=len(vocab),
        info={"vocab": "".join(vocab), "characters": len(text)},
        **splits,
    )


def pydoc_text(cfg: DictConfig) -> Data:
    """English prose that ships with CPython: the help topics of `pydoc_data` (about 465,000 characters)."""
    from pydoc_data.topics import topics

    return encode_windows("pydoc_text", "\n".join(topics[k] for k in sorted(topics)), cfg)


def war_and_peace_path(cfg: DictConfig) -> Path:
    """Where the War and Peace text is read from (and downloaded to, with `dataset.download=true`)."""
    return Path(cfg.path).expanduser()


def _strip_gutenberg(text: str) -> str:
    # Project Gutenberg wraps the book in a licence header and footer; the model should learn Tolstoy.
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start != -1 and end > start:
        text = text[text.index("\n", start) + 1 : end]
    return text.strip()


def war_and_peace(cfg: DictConfig) -> Data:
    """Tolstoy's War and Peace (Project Gutenberg #2600), the paper's character-level RNN corpus."""
    path = war_and_peace_path(cfg)
    if not path.is_file() and cfg.download:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(cfg.url, tmp)
        tmp.replace(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`dataset.path` must be an existing text file, but got {str(path)!r}; "
            "pass dataset.download=true to fetch it from dataset.url"
        )
    return encode_windows("war_and_peace", _strip_gutenberg(path.read_text(encoding="utf-8-sig")), cfg)
