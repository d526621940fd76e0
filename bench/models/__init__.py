"""Models selected by `model=NAME` (bench/conf/model/NAME.yaml); shapes adapt to the dataset."""

from __future__ import annotations

import math

from omegaconf import DictConfig
from torch import nn

from bench.data import KINDS, Data
from bench.errors import check_int, fail, is_int

__all__ = ["MODELS", "build_model", "validate"]

MODELS: dict[str, tuple[str, ...]] = {
    "mlp": ("image", "vector"),
    "cnn": ("image",),
    "resnet20": ("image",),
    "char_lstm": ("text",),
}
"""Every model name, with the dataset kinds (see `bench.data.KINDS`) it accepts."""


def validate(cfg: DictConfig) -> None:
    """Check the run config's `model` group against its dataset; raise `ConfigError` with one line."""
    name = cfg.model.get("name")
    if name not in MODELS:
        raise fail("model.name", f"one of {sorted(MODELS)}", name)
    kind = KINDS[cfg.dataset.name]
    if kind not in MODELS[name]:
        fitting = [m for m, kinds in MODELS.items() if kind in kinds]
        raise fail("model", f"one of {fitting} for the {kind} dataset {cfg.dataset.name!r}", name)
    for key in ("hidden", "channels", "embedding", "layers", "width"):
        if key in cfg.model:
            check_int(cfg.model, key, 1, prefix="model.")
    if name == "resnet20" and (not is_int(cfg.model.depth) or cfg.model.depth < 8 or (cfg.model.depth - 2) % 6):
        raise fail("model.depth", "6n+2 for n >= 1 (20, 32, 44, 56, ...)", cfg.model.depth)


def build_model(cfg: DictConfig, data: Data) -> nn.Module:
    """Build the model named by `cfg.name` for `data`'s input shape and number of classes."""
    if cfg.name == "mlp":
        from bench.models.mlp import MLP

        return MLP(math.prod(data.input_shape), cfg.hidden, data.n_classes, output_tanh=cfg.output_tanh)
    if cfg.name == "cnn":
        from bench.models.cnn import CNN

        return CNN(data.input_shape, cfg.channels, data.n_classes)
    if cfg.name == "resnet20":
        from bench.models.resnet import CifarResNet

        return CifarResNet(cfg.depth, data.input_shape[0], data.n_classes, cfg.width)
    if cfg.name == "char_lstm":
        from bench.models.char_lstm import CharLSTM

        return CharLSTM(data.n_classes, cfg.embedding, cfg.hidden, cfg.layers)
    raise ValueError(f"`model.name` must be one of {sorted(MODELS)}, but got {cfg.name!r}")
