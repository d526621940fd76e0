"""Character-level LSTM language model, for the paper's RNN experiment."""

from __future__ import annotations

import torch
from torch import nn


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> linear over the vocabulary; returns N x T x V logits of the next character."""

    def __init__(self, vocab_size: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)
