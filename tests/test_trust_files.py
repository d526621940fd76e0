"""Nothing the harness reads from disk runs code: checkpoints and CIFAR-10 batches crafted to execute a payload
are refused with one line, and the payload never runs (its marker file is never created)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from bench.config import ConfigError, compose_config
from bench.train import RunDirError, run
from tests.harness_helpers import QUICK, run_bench, write_cifar10

FAST = [*QUICK, "dataset=synthetic", "model=mlp"]


class _Payload:
    """Unpickling this creates `marker`: the stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft(path: Path, marker: Path, *, torch_format: bool) -> None:
    payload = {"model": _Payload(marker), "optimizer": {}, "progress": {}}
    if torch_format:
        torch.save(payload, path)  # the zip format torch.save writes, with the payload inside data.pkl
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path: Path, torch_format: bool) -> None:
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _craft(run_dir / "checkpoint.pt", marker, torch_format=torch_format)
    with pytest.raises(RunDirError, match=r"checkpoint\.pt` cannot be resumed .*move it aside"):
        run(compose_config(FAST), run_dir)
    assert not marker.exists()
    proc = run_bench([*FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "cannot be resumed" in proc.stderr, proc.stderr


def test_every_checkpoint_the_harness_writes_loads_as_weights_only_and_resumes(tmp_path: Path) -> None:
    # A tower and a baseline with a schedule: their states are everything a checkpoint holds.
    for opt in (["optimizer=tower"], ["optimizer=adam", "optimizer.schedule=warmup_cosine"]):
        out = tmp_path / opt[0]
        cfg = compose_config([*FAST, *opt, "trainer.checkpoint_every=1", "trainer.max_steps=null"])
        run(cfg, out)
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["progress"]["epoch"] == 1 and state["config"]["optimizer.name"] == opt[0].split("=")[1]


@pytest.mark.parametrize("verify", ["true", "false"])
def test_a_crafted_cifar10_batch_is_refused_and_its_payload_never_runs(tmp_path: Path, verify: str) -> None:
    marker = tmp_path / "PWNED"
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    cfg = compose_config(
        [*QUICK, "dataset=cifar10", "model=cnn", f"paths.data_dir={tmp_path}", f"dataset.verify_checksums={verify}"]
    )
    # On: the md5 differs from torchvision's official one. Off (re-packed files): the numpy-only unpickler refuses.
    match = "official CIFAR-10 files" if verify == "true" else "data_batch_1 is not one"
    with pytest.raises(ConfigError, match=match):
        run(cfg, tmp_path / "run")
    assert not marker.exists()


def test_repacked_cifar10_files_load_only_through_the_explicit_opt_out(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    base = [*QUICK, "dataset=cifar10", "model=cnn", f"paths.data_dir={tmp_path}", "dataset.val_size=5"]
    with pytest.raises(ConfigError, match=r"does not match; for re-packed files pass dataset.verify_checksums=false"):
        run(compose_config([*base, "dataset.verify_checksums=true"]), tmp_path / "on")
    metrics = run(compose_config([*base, "dataset.verify_checksums=false"]), tmp_path / "off")
    assert metrics["status"] == "completed" and len(written) == 6
