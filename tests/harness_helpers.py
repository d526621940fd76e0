"""Shared pieces of the harness tests: tiny datasets in their real on-disk formats, and a CLI runner.

The files are written exactly as torchvision and Project Gutenberg ship them (IDX ubyte files under
<root>/<Class>/raw/, CIFAR-10 python pickle batches, a Gutenberg text with its licence header), only
with a few examples each, so the real loaders run on them with no network.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Every test run trains only a few steps, on one thread (the test machine's cores are shared), quietly.
QUICK = ["trainer.epochs=1", "trainer.max_steps=2", "trainer.progress=false", "trainer.num_threads=1"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) as an IDX file: magic 0x0000_08_<ndim>, big-endian int32 dims, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, class_name: str = "MNIST", n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    """MNIST-format files under root/class_name/raw/; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(root / class_name / "raw" / name, array)
    return arrays


def write_cifar10(root: Path, n_per_batch: int = 8, seed: int = 0) -> dict:
    """CIFAR-10 python batches under root/cifar-10-batches-py/; returns {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return written


BOOK = "WELL, PRINCE, so Genoa and Lucca are now just family estates of the Buonapartes. " * 40


def write_war_and_peace(path: Path) -> str:
    """A text shaped like Gutenberg's #2600 file: licence header, the book, licence footer; returns the book."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "The Project Gutenberg eBook of War and Peace\nLICENCE HEADER\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK WAR AND PEACE ***\n"
        f"{BOOK}\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK WAR AND PEACE ***\nLICENCE FOOTER\n",
        encoding="utf-8",
    )
    return BOOK.strip()


def write_all(root: Path) -> Path:
    """Every on-disk dataset of the harness, tiny, under `root`; returns `root` (use as paths.data_dir)."""
    write_mnist(root, "MNIST")
    write_mnist(root, "FashionMNIST", seed=1)
    write_cifar10(root)
    write_war_and_peace(root / "war_and_peace.txt")
    return root


def bench_env(tmp_path: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a `python -m bench` subprocess: offline W&B with every directory in tmp."""
    env = dict(os.environ)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYPERGRAD_DATA_DIR=str(tmp_path / "data"))
    # One CPU thread per process: the test machine's cores are shared, and oversubscribed threads
    # make a small model many times slower (this changes no config value).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    env.update(extra_env or {})
    return env


def checkout_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that runs this checkout's code as a user would: PYTHONPATH at the checkout,
    one CPU thread (the test machine's cores are shared), everything else inherited."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra_env or {})}


def run_text(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run a program to its end with stdout and stderr captured as text, as a test that runs one reads it."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def signal_once_started(
    argv: list[str], env: dict[str, str], started: Path, settle: float, signum: int, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Start a program, wait until ``started`` exists (at most 120 s), let it run ``settle`` more seconds (into its
    training loop), send it ``signum`` and read it to its end, as a user stopping a run with Ctrl-C or `kill` does.

    The program starts with ``signum``'s default action, as in a user's terminal: a test runner started in the
    background by a shell without job control ignores SIGINT, its children inherit that, and the harness rightly
    leaves an ignored signal ignored."""
    import signal
    import time

    def default_action() -> None:
        signal.signal(signum, signal.SIG_DFL)

    proc = subprocess.Popen(argv, cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_action)  # fmt: skip
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(settle)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_module(
    module: str, args: list[str], tmp_path: Path, timeout: float = 240, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args` (bench, bench.tune, bench.report) from the repository root, W&B offline in tmp."""
    return run_text([sys.executable, "-m", module, *args], REPO, bench_env(tmp_path, extra_env), timeout)


def run_bench(
    args: list[str], tmp_path: Path, timeout: float = 240, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m bench args` like `run_module`."""
    return run_module("bench", args, tmp_path, timeout, extra_env)
