"""The in-memory dataset every experiment trains on: whole train and test splits as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from amble.errors import DataError


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory (built-in images normalised with the train split's statistics).

    Samples are float32 (or int64, e.g. token ids) ``(N, *sample_shape)``: images ``(N, C, H, W)``,
    feature vectors ``(N, F)``, sequences ``(N, T)``; labels are int64 ``(N,)`` in ``[0, num_classes)``.
    ``owner_train`` (optional, int64 ``(N_train,)``) says which user each training sample came from:
    what a ``natural`` partition splits by. Holding everything as tensors once lets devices slice their
    partition without a DataLoader. ``eq=False`` because comparing tensors element-wise is not what
    ``==`` on a dataset should mean.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    owner_train: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise DataError(f"dataset {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            _check_split(self.name, split, x, y, self.num_classes)
        if self.x_train.shape[1:] != self.x_test.shape[1:] or self.x_train.dtype != self.x_test.dtype:
            raise DataError(
                f"dataset {self.name!r}: train samples are {self.x_train.dtype} {tuple(self.x_train.shape[1:])} but "
                f"test samples are {self.x_test.dtype} {tuple(self.x_test.shape[1:])}; both splits must have the "
                "same sample shape and dtype"
            )
        owners = self.owner_train
        if owners is not None and (owners.dtype != torch.int64 or tuple(owners.shape) != (len(self.y_train),)):
            raise DataError(
                f"dataset {self.name!r}: owner_train must be int64 with one owner per training sample "
                f"({len(self.y_train)}), got {owners.dtype} {tuple(owners.shape)}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (``(C, H, W)`` for images), what a model needs to size its first layer."""
        return tuple(int(size) for size in self.x_train.shape[1:])


def _check_split(name: str, split: str, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """Reject a split whose tensors have the wrong dtype, rank, length or label range."""
    where = f"dataset {name!r} ({split} split)"
    if x.dtype not in (torch.float32, torch.int64) or x.dim() < 2:
        raise DataError(
            f"{where}: samples must be float32 or int64 (N, *sample_shape), e.g. images (N, C, H, W), got "
            f"{x.dtype} {tuple(x.shape)}"
        )
    if y.dtype != torch.int64 or y.dim() != 1:
        raise DataError(f"{where}: labels must be int64 (N,), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: {x.shape[0]} samples but {y.shape[0]} labels; the files do not match")
    if y.numel() > 0 and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{where}: labels span [{int(y.min())}, {int(y.max())}] but must lie in [0, {num_classes}); "
            "the label file is corrupt or belongs to another dataset"
        )


def images_to_tensors(
    train_images: npt.NDArray[np.uint8], test_images: npt.NDArray[np.uint8]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn uint8 ``(N, C, H, W)`` arrays into float32 tensors standardised per channel.

    Mean and standard deviation come from the train split only, so no test information leaks into
    training; both splits are scaled with them. They are computed exactly from a 256-bin histogram
    per channel: on CIFAR-10 that takes 0.25 s where ``Tensor.std`` over the floats takes 0.9 s.
    """
    train_u8, test_u8 = _as_tensor(train_images), _as_tensor(test_images)
    mean, std = _channel_stats(train_u8)
    # torch converts uint8 -> float32 about 8x faster than numpy's astype on 60k MNIST images.
    x_train = train_u8.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    x_test = test_u8.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x_train, x_test


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of uint8 ``(N, C, H, W)`` images scaled to [0, 1], each ``(1, C, 1, 1)``."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum().clamp_min(1.0)
        mean = (counts * values).sum() / total
        means.append(mean)
        stds.append(((counts * (values - mean).square()).sum() / total).sqrt().clamp_min(1e-8))
    shape = (1, images.shape[1], 1, 1)
    return torch.stack(means).to(torch.float32).view(shape), torch.stack(stds).to(torch.float32).view(shape)


def _as_tensor(array: npt.NDArray[np.uint8]) -> torch.Tensor:
    """Share ``array``'s memory as a tensor (copying only if it is read-only, which torch rejects)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise float ``(N, C, H, W)`` images in place per channel with the train mean and std."""
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    std = x_train.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-8)
    x_train.sub_(mean).div_(std)
    x_test.sub_(mean).div_(std)
    return x_train, x_test
