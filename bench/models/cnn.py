"""A small convolutional network for MNIST-sized and CIFAR-sized images."""

from __future__ import annotations

import torch
from torch import nn


class CNN(nn.Module):
    """Two conv-ReLU-maxpool blocks and a linear classifier; works for any image size >= 4x4."""

    def __init__(self, input_shape: tuple[int, ...], channels: int, n_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * channels * (h // 4) * (w // 4), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
