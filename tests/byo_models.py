"""Models and data loaders of a "user's own", imported by path in tests/test_byo.py (``tests.byo_models:...``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn


def make_net(input_shape: tuple[int, ...], num_classes: int, hidden: int = 16) -> nn.Module:
    """A small MLP over any sample shape."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def wrong_output(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One logit too many: the forward check must refuse it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> Any:
    return {"weights": torch.zeros(num_classes)}


NOT_CALLABLE = 3


class TokenNet(nn.Module):
    """An embedding bag over int64 token ids: a model whose input is not floating point."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, vocab: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.out = nn.Linear(4, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(self.embed(tokens).mean(dim=1))  # (B, num_classes)
        return logits


def separable_data(num_samples: int = 400, features: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Two classes split by the sign of the first feature, four owners: a loader's return value."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_samples, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    owner = np.arange(num_samples, dtype=np.int64) % 4
    return {"x": x, "y": y, "owner": owner}
