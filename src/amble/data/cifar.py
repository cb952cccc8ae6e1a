"""CIFAR-10 (Krizhevsky 2009): 50,000 train and 10,000 test 32x32 RGB images in 10 classes.

Two pickle-free layouts are read, each as a folder or as a ``.tar``/``.tar.gz`` streamed member by
member (never extracted to disk):

- the original binary release, ``cifar-10-batches-bin/`` with ``data_batch_1..5.bin`` and
  ``test_batch.bin``: records of one label byte then 3072 pixel bytes, channel-major (R, G, B planes);
- an image folder, ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (PNG and BMP work too), such
  as ``cifar10-jpg.tar.gz``. That JPEG copy is a lossy re-encoding of the original, so its pixels
  differ slightly and accuracy measured on it is close to, not identical with, accuracy on the
  original release: say which copy was used when reporting a figure.

Either is decoded once into ``${XDG_CACHE_HOME:-~/.cache}/amble/datasets/cifar10/`` as uint8
``.npy`` arrays with a stamp naming the source; later loads read that cache.

Discovery: an explicit root is the only place looked at (a wrong path is an error). Otherwise
``$AMBLE_DATA_DIR/cifar10`` (any layout, or ``cifar10-jpg.tar.gz`` / ``cifar-10-binary.tar.gz``
inside it or in ``$AMBLE_DATA_DIR``), then the cache, then (unless ``AMBLE_OFFLINE=1``) a download
of the binary release.
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from amble.data.cache import ArrayCache, Arrays, Stamp
from amble.data.dataset import Dataset, images_to_tensors
from amble.data.download import cache_dir, fetch, offline
from amble.data.images import ImageDecoder, ImageSpec, image_names, is_image
from amble.errors import DataError

logger = logging.getLogger(__name__)

NAME = "cifar10"
# Label i is CLASS_NAMES[i], the order of the original release's batches.meta.txt.
CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIDE = 32
RECORD_BYTES = 1 + 3 * IMAGE_SIDE * IMAGE_SIDE  # one label byte, then the R, G and B planes

BINARY_FOLDER = "cifar-10-batches-bin"
BINARY_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{index}.bin" for index in range(1, 6)),
    "test": ("test_batch.bin",),
}
JPEG_ARCHIVE = "cifar10-jpg.tar.gz"
BINARY_ARCHIVE = "cifar-10-binary.tar.gz"
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
DOWNLOAD_MD5: str | None = "c32a1d4ab5d03f1284b67883e8d87530"  # as published on the CIFAR page

SPEC = ImageSpec("CIFAR-10", CLASS_NAMES, IMAGE_SIDE, IMAGE_SIDE, "RGB")

CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes, so old caches are decoded again
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")  # x: uint8 (N, 3, 32, 32); y: uint8 (N,)
SPLITS = ("train", "test")

SourceKind = Literal["image-folder", "binary-folder", "archive"]


@dataclass(frozen=True)
class CifarSource:
    """One copy of CIFAR-10 on disk: a folder in either layout, or an archive of one."""

    path: Path
    kind: SourceKind

    def fingerprint(self) -> dict[str, Any]:
        """What the cache stamp records: a changed file count, size or time means decode again.

        For an image folder the times are those of the split and class folders, which change when an
        image is added, removed or renamed: listing 60,000 names is cheap, a stat of each costs ~1 s.
        An image edited in place is not noticed; delete the cache folder to force a decode.
        """
        if self.kind == "image-folder":
            stamped = [folder for split in SPLITS for _, folder in _class_folders(self.path / split)]
            count = sum(len(image_names(folder)) for folder in stamped)
            stamped += [self.path / split for split in SPLITS]
        else:
            stamped = [self.path / name for name in _binary_names()] if self.kind == "binary-folder" else [self.path]
            count = len(stamped)
        sizes, times = [], []
        for path in stamped:
            try:
                status = path.stat()
            except OSError as err:
                raise DataError(f"cannot read {path}: {err.strerror or err}; check the path and permissions") from err
            sizes.append(status.st_size)
            times.append(status.st_mtime_ns)
        return {
            "format": CACHE_FORMAT,
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "files": count,
            "size": sum(sizes),
            "mtime_ns": max(times),
        }


# --------------------------------------------------------------------------- load


def load_cifar10(root: str | os.PathLike[str] | None = "auto") -> Dataset:
    """Load CIFAR-10 into a :class:`Dataset`: float32 ``(N, 3, 32, 32)``, int64 labels, 10 classes.

    Images are standardised per channel with the train split's mean and std. ``root`` is a folder
    or archive in either layout, or ``"auto"``/``None`` to search (see the module docstring). Loaded
    from the JPEG image-folder copy, pixels differ slightly from the original binary release.
    """
    arrays = _find_arrays(root)
    x_train, x_test = images_to_tensors(arrays["x_train"], arrays["x_test"])
    return Dataset(
        name=NAME,
        x_train=x_train,
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=len(CLASS_NAMES),
    )


def decode(source: CifarSource) -> Arrays:
    """Read every image of ``source`` into uint8 arrays ``x_train``/``x_test`` ``(N, 3, 32, 32)`` and labels.

    Image-folder samples are ordered by class, then file name, whatever order the folder or archive
    lists them in; the binary release keeps its record order.
    """
    logger.info("decoding CIFAR-10 from %s (once; later loads read the cache)", source.path)
    if source.kind == "binary-folder":
        files = {name: _read_file(source.path / name) for name in _binary_names()}
        return _binary_splits(files, where=f"{source.path}{os.sep}")
    if source.kind == "image-folder":
        return _decode_image_folder(source.path)
    return _decode_archive(source.path)


def _find_arrays(root: str | os.PathLike[str] | None) -> Arrays:
    """Follow the discovery order and return the uint8 arrays, from the cache whenever it is current."""
    cache = ArrayCache(cache_dir(NAME), ARRAY_NAMES)
    if root is not None and str(root) != "auto":
        return _cached_or_decoded(_explicit_source(Path(root).expanduser()), cache)

    places = _search_places()
    for folder, _, find in places:
        source = find(folder)
        if source is not None:
            return _cached_or_decoded(source, cache)

    cached = cache.read(accept=_current_format)
    if cached is not None:
        return cached[1]
    looked = [(folder, why) for folder, why, _ in places] + [(cache.folder, "decoded cache")]

    if offline():
        reason = "downloading is disabled (AMBLE_OFFLINE is set)"
    else:
        try:
            return _download(cache)
        except DataError as err:
            reason = f"the download failed: {err}"
    raise DataError(_not_found_message(looked, reason))


def _cached_or_decoded(source: CifarSource, cache: ArrayCache) -> Arrays:
    fingerprint = source.fingerprint()
    cached = cache.read(accept=lambda stamp: stamp.get("source") == fingerprint)
    if cached is not None:
        return cached[1]
    arrays = decode(source)
    _store(cache, arrays, fingerprint)
    return arrays


def _store(cache: ArrayCache, arrays: Arrays, source: dict[str, Any]) -> None:
    """Cache the arrays; a read-only cache folder only costs the next run another decode."""
    try:
        cache.write(arrays, source)
    except OSError as err:
        logger.warning("cannot write the CIFAR-10 cache in %s (%s); the next run decodes again", cache.folder, err)


def _current_format(stamp: Stamp) -> bool:
    source = stamp.get("source")
    return isinstance(source, dict) and source.get("format") == CACHE_FORMAT


# --------------------------------------------------------------------------- discovery


def source_in(folder: Path) -> CifarSource | None:
    """The CIFAR-10 copy ``folder`` holds, checked in this order, or ``None``.

    ``train/`` and ``test/`` folders; the binary files directly; then :func:`_named_copy_in`.
    """
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return CifarSource(folder, "image-folder")
    if (folder / BINARY_FILES["train"][0]).is_file():
        return CifarSource(folder, "binary-folder")
    return _named_copy_in(folder)


def _named_copy_in(folder: Path) -> CifarSource | None:
    """A copy under its release name: ``cifar-10-batches-bin/``, ``cifar10-jpg.tar.gz``, ``cifar-10-binary.tar.gz``.

    Only these are looked for directly in ``$AMBLE_DATA_DIR``, where bare ``train/`` and ``test/``
    folders could belong to any dataset.
    """
    if (folder / BINARY_FOLDER / BINARY_FILES["train"][0]).is_file():
        return CifarSource(folder / BINARY_FOLDER, "binary-folder")
    for archive in (folder / JPEG_ARCHIVE, folder / BINARY_ARCHIVE):
        if archive.is_file():
            return CifarSource(archive, "archive")
    return None


def _explicit_source(root: Path) -> CifarSource:
    if root.is_file():
        return CifarSource(root, "archive")
    if root.is_dir():
        for folder in (root, root / NAME):
            source = source_in(folder)
            if source is not None:
                return source
    state = "is empty of CIFAR-10 data" if root.exists() else "does not exist"
    raise DataError(
        f"data.root={root} {state}: expected train/ and test/ folders of class subfolders, the binary "
        f"release's {_binary_list()} (directly or in {BINARY_FOLDER}/), or a .tar.gz of either; point "
        "data.root at one, or set it to 'auto' to search the usual places"
    )


_Place = tuple[Path, str, Callable[[Path], CifarSource | None]]  # folder, why it is searched, what is looked for


def _search_places() -> list[_Place]:
    """Folders searched when no explicit root is given, in order."""
    env_dir = os.environ.get("AMBLE_DATA_DIR")
    if not env_dir:
        return []
    return [
        (Path(env_dir) / NAME, "AMBLE_DATA_DIR/cifar10: any layout", source_in),
        (Path(env_dir), f"AMBLE_DATA_DIR: {BINARY_FOLDER}/, {JPEG_ARCHIVE} or {BINARY_ARCHIVE}", _named_copy_in),
    ]


def _binary_names() -> list[str]:
    return [name for names in BINARY_FILES.values() for name in names]


def _binary_list() -> str:
    return ", ".join(_binary_names())


def _not_found_message(looked: list[tuple[Path, str]], reason: str) -> str:
    places = "\n".join(f"  - {folder} ({why})" for folder, why in looked)
    if not os.environ.get("AMBLE_DATA_DIR"):
        places = "  - AMBLE_DATA_DIR (not set)\n" + places
    fixes = [
        f"download the original binary release {DOWNLOAD_URL} (or use an image-folder copy such as "
        f"{JPEG_ARCHIVE}: train/<class>/*.jpg and test/<class>/*.jpg) and set data.root (config) to the "
        f"archive or its unpacked folder, or put it in $AMBLE_DATA_DIR/{NAME} (AMBLE_DATA_DIR environment variable)"
    ]
    if offline():
        fixes.append(f"unset AMBLE_OFFLINE to let AMBLE download {DOWNLOAD_URL}")
    return f"CIFAR-10 ({NAME!r}) not found. Looked in:\n{places}\nand {reason}.\nTo get it: {'; or '.join(fixes)}."


def _download(cache: ArrayCache) -> Arrays:
    """Fetch the binary release into the cache folder, decode it, and keep only the decoded arrays."""
    try:
        cache.folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the cache folder {cache.folder}: {err}") from err
    archive = cache.folder / BINARY_ARCHIVE
    try:
        fetch(DOWNLOAD_URL, archive, DOWNLOAD_MD5)
        arrays = decode(CifarSource(archive, "archive"))
        _store(cache, arrays, {"format": CACHE_FORMAT, "url": DOWNLOAD_URL})
    finally:
        archive.unlink(missing_ok=True)
    return arrays


# --------------------------------------------------------------------------- binary release


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(
            f"cannot read {path}: {err.strerror or err}; the binary release needs all of {_binary_list()}"
        ) from err


def _binary_splits(files: dict[str, bytes], where: str) -> Arrays:
    """Parse the six batch files (``name -> contents``) into the cached arrays; ``where`` prefixes names."""
    arrays: Arrays = {}
    for split, names in BINARY_FILES.items():
        parts = [_parse_records(files[name], f"{where}{name}") for name in names]
        arrays[f"x_{split}"] = np.concatenate([images for images, _ in parts])
        arrays[f"y_{split}"] = np.concatenate([labels for _, labels in parts])
    return arrays


def _parse_records(data: bytes, where: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Split ``data`` into uint8 images ``(N, 3, 32, 32)`` and labels ``(N,)``, rejecting a corrupt file."""
    refetch = f"the file is truncated or not from the CIFAR-10 binary release; download it again from {DOWNLOAD_URL}"
    if not data or len(data) % RECORD_BYTES:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records "
            f"(1 label byte + 3072 pixel bytes); {refetch}"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].copy()
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if bad.size:
        raise DataError(
            f"{where}: record {int(bad[0])} has label {int(labels[bad[0]])}, but CIFAR-10 labels are 0..9; {refetch}"
        )
    images = records[:, 1:].reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE).copy()  # (N, 3, 32, 32), already R, G, B planes
    return images, labels


# --------------------------------------------------------------------------- image folders


def _class_label(folder_name: str, where: str) -> int:
    try:
        return CLASS_NAMES.index(folder_name.lower())
    except ValueError:
        raise DataError(
            f"{where}: unknown class folder {folder_name!r}; CIFAR-10 class folders are {', '.join(CLASS_NAMES)}"
        ) from None


def _class_folders(split_dir: Path) -> list[tuple[int, Path]]:
    """``(label, folder)`` of each class folder in ``split_dir``, by label; unknown names are an error."""
    try:
        folders = [entry for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    except OSError as err:
        raise DataError(f"cannot list {split_dir}: {err.strerror or err}; check the path and permissions") from err
    return sorted((_class_label(folder.name, str(folder)), folder) for folder in folders)


def _decode_image_folder(folder: Path) -> Arrays:
    with ImageDecoder(SPEC, where="") as decoder:
        for split in SPLITS:
            for label, class_folder in _class_folders(folder / split):
                for name in image_names(class_folder):
                    decoder.add(split, label, str(class_folder / name), class_folder / name)
        return decoder.finish(str(folder))


def _decode_archive(path: Path) -> Arrays:
    """Stream ``path`` once: binary batch files and ``<split>/<class>/<image>`` members, anywhere inside."""
    binary: dict[str, bytes] = {}
    binary_names = set(_binary_names())
    with ImageDecoder(SPEC, where=f"{path} member ") as decoder:
        try:
            with tarfile.open(path, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    parts = PurePosixPath(member.name).parts
                    if parts[-1] in binary_names:
                        binary[parts[-1]] = _member_bytes(path, archive, member)
                    elif len(parts) >= 3 and parts[-3] in SPLITS and is_image(parts[-1]):
                        label = _class_label(parts[-2], f"{path} member {member.name}")
                        decoder.add(parts[-3], label, member.name, _member_bytes(path, archive, member))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DataError(
                f"{path}: not a readable tar archive ({err}); it is truncated or corrupt, or not CIFAR-10: "
                "download or copy it again"
            ) from err
        if binary:
            missing = sorted(binary_names - set(binary))
            if missing:
                raise DataError(f"{path}: the binary release is incomplete, missing {', '.join(missing)}")
            return _binary_splits(binary, where=f"{path} member ")
        if decoder.count == 0:
            raise DataError(
                f"{path} holds no CIFAR-10 data: expected members <...>/train/<class>/<image> and "
                f"<...>/test/<class>/<image>, or the binary release's {_binary_list()}"
            )
        return decoder.finish(str(path))


def _member_bytes(path: Path, archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = archive.extractfile(member)
    if stream is None:
        raise DataError(f"{path}: cannot read member {member.name}; copy the archive again")
    return stream.read()
