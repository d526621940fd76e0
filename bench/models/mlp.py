"""The paper's MNIST multilayer perceptron."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """784-128-10 with tanh, as in the paper; any input is flattened.

    The reference implementation also applies tanh to the output logits before the softmax;
    `output_tanh=True` (the default in bench/conf/model/mlp.yaml) keeps that, so results are comparable.
    """

    def __init__(self, n_in: int, hidden: int, n_out: int, output_tanh: bool = True) -> None:
        super().__init__()
        self.layer1 = nn.Linear(n_in, hidden)
        self.layer2 = nn.Linear(hidden, n_out)
        self.output_tanh = output_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(torch.tanh(self.layer1(x.flatten(1))))
        return torch.tanh(x) if self.output_tanh else x
