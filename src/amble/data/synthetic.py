"""A small, seeded, learnable image dataset so tests and demos run without any files."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from amble.data.dataset import Dataset, standardise
from amble.errors import DataError

# Each class is a random prototype image; a sample is its class prototype plus unit Gaussian noise.
# A prototype scale well below the noise keeps the task learnable yet not solved in one step.
PROTOTYPE_SCALE = 0.2


def make_synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    num_classes: int = 10,
    shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
) -> Dataset:
    """Build a balanced classification dataset of ``shape`` images, identical for the same arguments."""
    if num_train < 1 or num_test < 1:
        raise DataError(f"synthetic dataset needs num_train >= 1 and num_test >= 1, got {num_train}, {num_test}")
    if num_classes < 2:
        raise DataError(f"synthetic dataset needs num_classes >= 2, got {num_classes}")
    if len(shape) != 3 or any(int(size) < 1 for size in shape):
        raise DataError(f"synthetic shape must be three positive sizes (C, H, W), got {shape}")

    rng = np.random.default_rng(seed)
    prototypes = PROTOTYPE_SCALE * rng.standard_normal((num_classes, *shape), dtype=np.float32)
    x_train, y_train = _sample(rng, prototypes, num_train)
    x_test, y_test = _sample(rng, prototypes, num_test)
    x_train, x_test = standardise(x_train, x_test)
    return Dataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
    )


def _sample(
    rng: np.random.Generator, prototypes: npt.NDArray[np.float32], count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` noisy samples with balanced, shuffled labels."""
    num_classes = prototypes.shape[0]
    labels = rng.permutation(np.arange(count) % num_classes)
    noise = rng.standard_normal((count, *prototypes.shape[1:]), dtype=np.float32)
    images = prototypes[labels] + noise  # (count, C, H, W)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
