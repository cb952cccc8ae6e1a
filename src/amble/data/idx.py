"""IDX files (the MNIST family's format): read, write, find on disk, download, load.

An IDX file is a 4-byte magic number ``00 00 <dtype code> <ndim>``, ``ndim`` big-endian uint32
sizes, then the values big-endian in C order. Files may be gzip-compressed (``.gz``).

Discovery looks, in order, at an explicit root, ``$AMBLE_DATA_DIR``, the user cache and the system
folders a distribution package installs; only then does it download into the cache (unless
``AMBLE_OFFLINE=1``), so a machine without network uses whatever copy it already has.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from amble.data.dataset import Dataset, images_to_tensors
from amble.data.download import cache_dir, fetch, offline
from amble.errors import DataError

# Four files per dataset, named as the MNIST release names them; keys are the roles they play.
IDX_FILES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_DTYPE_BY_CODE: Mapping[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_KIND: Mapping[tuple[str, int], int] = {
    (dtype.kind, dtype.itemsize): code for code, dtype in _DTYPE_BY_CODE.items()
}


@dataclass(frozen=True)
class IdxSource:
    """Where one IDX dataset comes from: its download mirror, checksums and system install folders."""

    title: str
    base_url: str
    md5: Mapping[str, str]  # file name (with .gz) -> md5 of the published file
    system_dirs: tuple[Path, ...] = ()
    apt_package: str | None = None
    num_classes: int = 10


IDX_SOURCES: dict[str, IdxSource] = {
    "fashion-mnist": IdxSource(
        title="Fashion-MNIST",
        base_url="https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": IdxSource(
        title="MNIST",
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}


# --------------------------------------------------------------------------- read / write


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read one IDX file (plain or ``.gz``) into a native-endian array, validating it fully.

    A bad magic number, unknown dtype code, or a payload whose size differs from what the header
    promises raises :class:`DataError` naming the file: such a file is truncated or not IDX at all.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX header; {_REFETCH}")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{path}: bad magic number {data[:4].hex()} (an IDX file starts with 0000); "
            f"this is not an IDX file or it is corrupt; {_REFETCH}"
        )
    if code not in _DTYPE_BY_CODE:
        allowed = ", ".join(f"0x{c:02X}" for c in _DTYPE_BY_CODE)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (allowed: {allowed}); {_REFETCH}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions; {_REFETCH}")
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise DataError(f"{path}: truncated inside the IDX header ({len(data)} bytes); {_REFETCH}")
    shape = struct.unpack(f">{ndim}I", data[4:header_bytes])
    dtype = _DTYPE_BY_CODE[code]
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    actual = len(data) - header_bytes
    if actual != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds {actual}; "
            f"it is truncated or corrupt; {_REFETCH}"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header_bytes)
    # astype copies into a writable, native-endian array (frombuffer over bytes is read-only).
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: str | os.PathLike[str], array: npt.NDArray[Any]) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    Used to build MNIST-format fixtures; dtypes are those IDX can hold (u1, i1, i2, i4, f4, f8).
    """
    path = Path(path)
    array = np.asarray(array)
    code = _CODE_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise DataError(
            f"cannot write {path}: IDX holds uint8, int8, int16, int32, float32 or float64, not {array.dtype}"
        )
    if not 1 <= array.ndim <= 255:
        raise DataError(f"cannot write {path}: IDX holds 1 to 255 dimensions, not {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = np.ascontiguousarray(array, dtype=_DTYPE_BY_CODE[code]).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=6) as stream:
            stream.write(header)
            stream.write(payload)
    else:
        path.write_bytes(header + payload)


_REFETCH = "delete it and download or copy it again"


def _read_bytes(path: Path) -> bytes:
    """Return the file's bytes, decompressed if it is ``.gz``; any I/O or gzip failure is a DataError."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; check the path and permissions") from err
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a valid gzip file ({err}); it is truncated or corrupt; {_REFETCH}") from err


# --------------------------------------------------------------------------- discovery


def find_idx_root(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder holding ``name``'s four IDX files, downloading them into the cache if needed.

    ``root`` other than ``None``/``"auto"`` is the only place looked at (and its ``<name>`` subfolder):
    a wrong explicit path is an error, never silently replaced by another copy.
    """
    source = _source(name)
    if root is not None and str(root) != "auto":
        explicit = Path(root).expanduser()
        for folder in (explicit, explicit / name):
            if _has_idx_files(folder):
                return folder
        raise DataError(
            f"data.root={explicit} does not hold the {source.title} files ({_file_list()}, each .gz or "
            f"uncompressed), neither directly nor in {explicit / name}; point data.root at the folder "
            "that has them, or set it to 'auto' to search the usual places"
        )

    looked = _search_places(name, source)
    for folder, _ in looked:
        if _has_idx_files(folder):
            return folder

    cache = cache_dir(name)
    if offline():
        reason = "downloading is disabled (AMBLE_OFFLINE is set)"
    else:
        try:
            _download(source, cache)
            return cache
        except DataError as err:
            reason = f"the download failed: {err}"
    raise DataError(_not_found_message(name, source, looked, reason))


def _source(name: str) -> IdxSource:
    if name not in IDX_SOURCES:
        raise DataError(f"no IDX dataset named {name!r}; IDX datasets are: {', '.join(IDX_SOURCES)}")
    return IDX_SOURCES[name]


def _search_places(name: str, source: IdxSource) -> list[tuple[Path, str]]:
    """Folders searched when no explicit root is given, in order, each with why it is searched."""
    places: list[tuple[Path, str]] = []
    env_dir = os.environ.get("AMBLE_DATA_DIR")
    if env_dir:
        places += [(Path(env_dir), "AMBLE_DATA_DIR"), (Path(env_dir) / name, "AMBLE_DATA_DIR/<name>")]
    places.append((cache_dir(name), "download cache"))
    places += [(folder, f"system folder ({source.apt_package or 'package'})") for folder in source.system_dirs]
    return places


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The file for ``stem`` in ``folder``, preferring the ``.gz`` copy; ``None`` when absent."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for stem in IDX_FILES.values())


def _file_list() -> str:
    return ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())


def _not_found_message(name: str, source: IdxSource, looked: list[tuple[Path, str]], reason: str) -> str:
    places = "\n".join(f"  - {folder} ({why})" for folder, why in looked)
    if not os.environ.get("AMBLE_DATA_DIR"):
        places += "\n  - AMBLE_DATA_DIR (not set)"
    fixes = []
    if source.apt_package:
        fixes.append(f"run `apt-get install {source.apt_package}`")
    fixes.append(
        f"put the four files {_file_list()} in a folder and set data.root (config) or the AMBLE_DATA_DIR "
        "environment variable to it"
    )
    if offline():
        fixes.append(f"unset AMBLE_OFFLINE to let AMBLE download them from {source.base_url}")
    return (
        f"{source.title} ({name!r}) not found. Looked in:\n{places}\nand {reason}.\nTo get it: {'; or '.join(fixes)}."
    )


# --------------------------------------------------------------------------- download


def _download(source: IdxSource, folder: Path) -> None:
    """Fetch the missing files into ``folder``, each to a temp file renamed only once its md5 matches."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the cache folder {folder}: {err}") from err
    for stem in IDX_FILES.values():
        if _idx_file(folder, stem) is None:
            file_name = f"{stem}.gz"
            fetch(source.base_url + file_name, folder / file_name, source.md5.get(file_name))


# --------------------------------------------------------------------------- load


def load_idx_dataset(name: str, root: str | os.PathLike[str] | None = None) -> Dataset:
    """Load an MNIST-format dataset (``fashion-mnist`` or ``mnist``) into a normalised :class:`Dataset`."""
    source = _source(name)
    folder = find_idx_root(name, root)
    paths = {role: _idx_file(folder, stem) or folder / stem for role, stem in IDX_FILES.items()}
    splits: dict[str, tuple[npt.NDArray[np.uint8], torch.Tensor]] = {}
    for split in ("train", "test"):
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(
                f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}; "
                "is this a label file or another dataset?"
            )
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise DataError(f"{labels_path}: expected integer labels (N,), got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise DataError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                "the two files come from different releases"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= source.num_classes):
            raise DataError(
                f"{labels_path}: labels span [{labels.min()}, {labels.max()}], expected 0..{source.num_classes - 1}"
            )
        splits[split] = (images[:, None, :, :], torch.from_numpy(labels.astype(np.int64)))  # (N, 1, H, W)

    x_train, x_test = images_to_tensors(splits["train"][0], splits["test"][0])
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=splits["train"][1],
        x_test=x_test,
        y_test=splits["test"][1],
        num_classes=source.num_classes,
    )
