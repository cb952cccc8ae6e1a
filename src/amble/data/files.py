"""A user's own data: arrays from a ``.npz`` or ``.safetensors`` file or from a loader of theirs, or an image folder.

Arrays come under one of two sets of names (nothing else, so a typo is an error, not ignored data):

- ``x_train, y_train, x_test, y_test`` and optionally ``owner_train``: the splits as given;
- ``x, y`` and optionally ``owner``: one pool, of which ``data.test_fraction`` is held out for testing
  (drawn by the seed; the owner column follows the training samples).

Either set may add ``num_classes`` (a scalar): labels must then lie in ``[0, num_classes)``; without it
there are ``max(label) + 1`` classes. ``x`` is ``(N, *sample_shape)`` of any shape (vectors, images,
sequences): floating point becomes float32, integers (token ids, categories) int64, used as they are
(scale your features yourself). Labels and owners are integers. Nothing is unpickled: ``np.load`` runs
with ``allow_pickle=False``, so an object array is an error, never code.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from amble.data.dataset import Dataset
from amble.data.images import load_image_folder
from amble.errors import AmbleError, DataError
from amble.imports import is_import_path, resolve_callable

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
POOLED_KEYS = ("x", "y")
OPTIONAL_KEYS = {"x_train": ("owner_train", "num_classes"), "x": ("owner", "num_classes")}


def load_user_dataset(source: str, *, seed: int, test_fraction: float = 0.2) -> Dataset:
    """The dataset ``source`` names: an import path to a loader, a ``.npz``/``.safetensors`` file or an image folder."""
    if is_import_path(source):
        return arrays_to_dataset(_call_loader(source), source, seed=seed, test_fraction=test_fraction)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_image_folder(path)
    if not path.is_file():
        raise DataError(
            f"data.dataset {source}: no such file or folder on this machine; copy the data here (a real device "
            "may point at its copy with `amble device --data-root PATH`)"
        )
    if path.suffix == ".npz":
        arrays = _read_npz(path)
    elif path.suffix == ".safetensors":
        arrays = _read_safetensors(path)
    else:
        raise DataError(
            f"data.dataset {path}: unknown file type {path.suffix!r}; give a .npz or .safetensors file of arrays, "
            "an image folder (train/<class>/*, test/<class>/*) or an import path 'package.module:function'"
        )
    return arrays_to_dataset(arrays, str(path), seed=seed, test_fraction=test_fraction)


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as loaded:
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a single .npy array, not a .npz archive of named arrays: use np.savez")
            arrays: dict[str, Any] = {}
            for key in loaded.files:
                try:
                    arrays[key] = loaded[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc):
                        raise DataError(
                            f"{path}: array {key!r} holds Python objects (dtype=object), which AMBLE never "
                            "unpickles; save numbers instead, e.g. np.savez(path, x=x.astype(np.float32), "
                            "y=y.astype(np.int64))"
                        ) from None
                    raise
            return arrays
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}); write it with np.savez") from None


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
        raise DataError(
            f"{path}: not a readable .safetensors file ({exc}); write it with safetensors.numpy.save_file"
        ) from None


def _call_loader(path: str) -> Mapping[str, Any]:
    loader = resolve_callable(path, "data.dataset")
    try:
        arrays = loader()
    except AmbleError:
        raise
    except Exception as exc:
        raise DataError(f"data loader {path!r} raised {type(exc).__name__}: {exc}; fix the loader") from None
    if not isinstance(arrays, Mapping):
        raise DataError(
            f"data loader {path!r} returned a {type(arrays).__name__}: it must return a dict of arrays with keys "
            f"{', '.join(SPLIT_KEYS)} (or {', '.join(POOLED_KEYS)})"
        )
    return arrays


def arrays_to_dataset(arrays: Mapping[str, Any], name: str, *, seed: int, test_fraction: float = 0.2) -> Dataset:
    """Check arrays named as the module docstring says and hold them as a :class:`Dataset`."""
    keys = set(arrays)
    form = "x_train" if set(SPLIT_KEYS) <= keys else "x" if set(POOLED_KEYS) <= keys else None
    allowed = set(SPLIT_KEYS if form == "x_train" else POOLED_KEYS) | set(OPTIONAL_KEYS.get(form or "", ()))
    if form is None or keys - allowed:
        raise DataError(
            f"dataset {name}: found arrays {sorted(keys)}, expected either {', '.join(SPLIT_KEYS)} [owner_train] "
            f"[num_classes] or {', '.join(POOLED_KEYS)} [owner] [num_classes]; rename the arrays"
        )
    values = {key: _numeric(name, key, arrays[key]) for key in keys}
    num_classes = _num_classes(name, values.pop("num_classes", None))
    if form == "x":
        x, y = _samples(name, "x", values["x"]), _labels(name, "y", values["y"])
        owner = _labels(name, "owner", values["owner"]) if "owner" in values else None
        _same_length(name, {"x": x, "y": y, **({"owner": owner} if owner is not None else {})})
        train, test = _hold_out(name, len(y), seed, test_fraction)
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
        owner_train = owner[train] if owner is not None else None
    else:
        x_train, y_train = _samples(name, "x_train", values["x_train"]), _labels(name, "y_train", values["y_train"])
        x_test, y_test = _samples(name, "x_test", values["x_test"]), _labels(name, "y_test", values["y_test"])
        owner_train = _labels(name, "owner_train", values["owner_train"]) if "owner_train" in values else None
        train_arrays = {"x_train": x_train, "y_train": y_train}
        _same_length(name, train_arrays | ({"owner_train": owner_train} if owner_train is not None else {}))
        _same_length(name, {"x_test": x_test, "y_test": y_test})
    largest = int(max(y_train.max(initial=-1), y_test.max(initial=-1)))
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise DataError(
            f"dataset {name}: labels go up to {largest} but num_classes is {num_classes}; labels must lie in "
            f"[0, {num_classes}): fix the labels or num_classes"
        )
    if x_train.dtype != x_test.dtype:
        raise DataError(f"dataset {name}: train samples are {x_train.dtype} but test samples {x_test.dtype}")
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test)),
        num_classes=max(num_classes, 1),
        owner_train=None if owner_train is None else torch.from_numpy(np.ascontiguousarray(owner_train)),
    )


def _numeric(name: str, key: str, value: Any) -> npt.NDArray[Any]:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"dataset {name}: array {key!r} has dtype {array.dtype}; only numbers are accepted (float for "
            "features, integers for labels, owners and token ids)"
        )
    return array


def _samples(name: str, key: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if array.ndim < 2 or array.shape[0] == 0:
        raise DataError(
            f"dataset {name}: {key} must be (N, *sample_shape) with N >= 1, e.g. (N, features), got shape "
            f"{array.shape}; a single feature per sample is (N, 1)"
        )
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    converted = array.astype(np.float32, copy=False)
    finite = np.isfinite(converted)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.reshape(len(converted), -1).all(axis=1))[0])
        raise DataError(
            f"dataset {name}: {key} holds NaN or infinite values (first in sample {bad}); impute or drop them"
        )
    return converted


def _labels(name: str, key: str, array: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(f"dataset {name}: {key} must be a 1-D integer array, got {array.dtype} {array.shape}")
    labels = array.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise DataError(
            f"dataset {name}: {key} has negative values (smallest {int(labels.min())}); they must be 0, 1, 2, ..."
        )
    return labels


def _num_classes(name: str, value: npt.NDArray[Any] | None) -> int | None:
    if value is None:
        return None
    if value.size != 1 or value.dtype.kind not in "iu" or int(value.reshape(-1)[0]) < 1:
        raise DataError(f"dataset {name}: num_classes must be one positive integer, got {value!r}")
    return int(value.reshape(-1)[0])


def _same_length(name: str, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    lengths = {key: int(array.shape[0]) for key, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise DataError(f"dataset {name}: arrays of one split must have one row per sample, but {shown}")


def _hold_out(name: str, count: int, seed: int, test_fraction: float) -> tuple[npt.NDArray[np.int64], ...]:
    """(train, test) sample indices, each sorted: ``test_fraction`` of ``count`` held out, drawn by ``seed``."""
    num_test = round(count * test_fraction)
    if not 1 <= num_test < count:
        raise DataError(
            f"dataset {name}: holding out data.test_fraction={test_fraction} of {count} samples leaves "
            f"{num_test} test and {count - num_test} train samples; both need at least one"
        )
    order = np.random.default_rng([seed, 0x7E57]).permutation(count)
    return np.sort(order[num_test:]).astype(np.int64), np.sort(order[:num_test]).astype(np.int64)


def save_arrays(arrays: Mapping[str, Any], path: Path) -> None:
    """Check arrays as :func:`arrays_to_dataset` does, then write them to ``path`` as a ``.npz`` (numbers only)."""
    arrays_to_dataset(arrays, "the arrays given", seed=0)
    numeric = {key: _numeric("the arrays given", key, value) for key, value in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, allow_pickle=False, **numeric)  # numpy >= 2.1 takes allow_pickle here (pyproject pins it)
    tmp.replace(path)
