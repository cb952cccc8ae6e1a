"""Federated learning on tabular data: scikit-learn's breast-cancer set, a small MLP, hospitals as devices.

The data (569 patients, 30 features, malignant or benign) ships with scikit-learn, so this runs offline.
It has no natural owner, so one is derived from a feature, as a stand-in for hospitals with different
case mixes: patients are grouped into ten "clinics" by decile of ``mean radius``. Larger tumours are
mostly malignant, so the clinics' label mixes differ strongly (the first clinic sees almost only benign
cases, the last almost only malignant ones): a natural partition with real label skew.

Run it (from the repository root) either way; both write runs/tabular/ with the usual report:

    PYTHONPATH=examples/tabular amble run examples/tabular/tabular.yaml
    python examples/tabular/tabular.py

``tabular.yaml`` names ``make_mlp`` and ``load_breast_cancer`` below by import path (``tabular:...``),
which is why this folder goes on ``PYTHONPATH``; running this file puts it there by itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

CLINICS = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the train/test split is fixed, whatever the experiment's seed


class MLP(nn.Module):
    """Features -> hidden ReLU units -> one logit per class."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = nn.Linear(math.prod(input_shape), hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(torch.relu(self.hidden(x.flatten(1))))  # (B, num_classes)
        return logits


def make_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    """The model factory the config names: AMBLE calls it with the sample shape, (30,), and 2 classes."""
    return MLP(input_shape, num_classes, hidden)


def load_breast_cancer() -> dict[str, npt.NDArray[np.generic]]:
    """The arrays AMBLE trains on: standardised features, labels and each training patient's clinic."""
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    bunch = sklearn_breast_cancer()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    radius = x[:, list(bunch.feature_names).index("mean radius")]
    clinic = np.searchsorted(np.quantile(radius, np.linspace(0, 1, CLINICS + 1)[1:-1]), radius, side="right")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, train = order[: round(len(y) * TEST_FRACTION)], order[round(len(y) * TEST_FRACTION) :]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-8  # train statistics only
    x = (x - mean) / std
    return {
        "x_train": x[train],
        "y_train": y[train],
        "owner_train": clinic[train].astype(np.int64),
        "x_test": x[test],
        "y_test": y[test],
    }


if __name__ == "__main__":
    import amble

    result = amble.run(Path(__file__).with_name("tabular.yaml"), progress=True)
    for label, numbers in result.strategies.items():
        final, virtual_s = numbers["final_accuracy"], numbers["virtual_time_s"]
        print(f"{label:>10}: final accuracy {final:.3f}, virtual time {virtual_s:.1f} s")
    print(f"report: {result.report}")
