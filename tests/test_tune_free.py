"""The tuning-free baselines and the untuned defaults train the MLP: the loss goes down with no tuning at all."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import train
from bench.config import compose_config

# About a hundred steps on the digits: DoG starts from a tiny step (reps_rel=1e-6) and D-Adaptation first
# overshoots, so both need that many before their loss is clearly down.
SHORT = ["dataset=digits", "trainer.progress=false", "trainer.epochs=5", "trainer.batch_size=64"]
UNIFORM_GUESS_LOSS = math.log(10)  # cross-entropy of predicting all ten classes equally, where training starts


@pytest.mark.parametrize(
    ("optimizer", "family", "lr"),
    [
        ("prodigy", "tuning_free", 1.0),
        ("dadapt_adam", "tuning_free", 1.0),
        ("schedulefree_adamw", "tuning_free", 0.0025),
        ("schedulefree_sgd", "tuning_free", 1.0),
        ("dog", "tuning_free", 1.0),
        ("adam", "baseline", 1e-3),  # the untuned default Adam(1e-3)
        ("sgd", "baseline", 0.01),  # the untuned default SGD(0.01)
    ],
)
def test_untuned_optimizer_lowers_the_loss(tmp_path: Path, optimizer: str, family: str, lr: float) -> None:
    torch.set_num_threads(1)
    metrics = train.run(compose_config([f"optimizer={optimizer}", *SHORT]), output_dir=tmp_path)

    assert (metrics["status"], metrics["family"], metrics["init"]["lr"]) == ("completed", family, lr)
    history = pd.read_csv(tmp_path / "history.csv")
    assert len(history) == 5
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert metrics["val_loss"] < UNIFORM_GUESS_LOSS - 0.1
