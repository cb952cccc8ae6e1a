"""One entry point, ``load_dataset(name)``, dispatching to each dataset's loader.

A new dataset plugs in by adding one function with the :class:`DatasetLoader`
signature to ``_LOADERS``; ``DATASET_NAMES`` and the error message follow automatically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from amble.data.cifar import load_cifar10
from amble.data.dataset import Dataset
from amble.data.files import load_user_dataset
from amble.data.idx import load_idx_dataset
from amble.data.synthetic import make_synthetic
from amble.errors import DataError
from amble.imports import is_import_path

Root: TypeAlias = str | os.PathLike[str] | None
# A loader takes the root ("auto"/None to search, or a path) and the experiment seed.
DatasetLoader: TypeAlias = Callable[[Root, int], Dataset]


def _load_fashion_mnist(root: Root, seed: int) -> Dataset:
    return load_idx_dataset("fashion-mnist", root)


def _load_mnist(root: Root, seed: int) -> Dataset:
    return load_idx_dataset("mnist", root)


def _load_cifar10(root: Root, seed: int) -> Dataset:
    return load_cifar10(root)


def _load_synthetic(root: Root, seed: int) -> Dataset:
    return make_synthetic(seed=seed)


_LOADERS: dict[str, DatasetLoader] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "synthetic": _load_synthetic,
}

DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(
    name: str,
    root: Root = "auto",
    *,
    seed: int = 0,
    synthetic_size: tuple[int, int] | None = None,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load dataset ``name`` whole into memory; ``root`` is a folder or ``"auto"`` to search for it.

    ``name`` is a built-in dataset, or a user's (:mod:`amble.data.files`): a ``.npz``/``.safetensors``
    file, an image folder, or an import path ``package.module:function`` to a loader; for a file or
    folder, an explicit ``root`` is where it is on this machine (``amble device --data-root``).
    ``seed`` and ``synthetic_size`` (train, test samples) matter for generated data (``synthetic``),
    ``seed`` and ``test_fraction`` for a user's pooled ``x, y`` arrays.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        if not is_import_path(name) and not Path(name).suffix and not Path(name).expanduser().is_dir():
            raise DataError(
                f"unknown dataset {name!r}; data.dataset must be one of: {', '.join(DATASET_NAMES)}, a .npz or "
                ".safetensors file, an image folder, or an import path 'package.module:function'"
            )
        return load_user_dataset(_user_source(name, root), seed=seed, test_fraction=test_fraction)
    if name == "synthetic" and synthetic_size is not None:
        return make_synthetic(num_train=synthetic_size[0], num_test=synthetic_size[1], seed=seed)
    return loader(root, seed)


def _user_source(name: str, root: Root) -> str:
    """Where a user's dataset is: ``name``, unless an explicit ``root`` says where it is on this machine
    (the file or folder itself, or for a file the folder holding one of the same name)."""
    if is_import_path(name) or root is None or str(root) == "auto":
        return name
    place = Path(root).expanduser()
    if place.is_dir() and Path(name).suffix in (".npz", ".safetensors"):
        return str(place / Path(name).name)
    return str(place)
