"""Image folders, ``train/<class>/*`` and ``test/<class>/*``: CIFAR-10's JPEG copy and a user's own images.

One decoder for both: images are decoded in a thread pool straight into preallocated uint8 chunks,
ordered by (class, file name), channel-major ``(N, C, H, W)``. A user's folder takes its class names
from ``train/``'s subfolders (sorted: label ``i`` is the ``i``-th name), its size and colour mode from
its first image (grey stays one channel, anything else becomes RGB); every image must have that size.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError

from amble.data.cache import Arrays
from amble.data.dataset import Dataset, images_to_tensors
from amble.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
_PIL_FORMATS = ("JPEG", "PNG", "BMP")  # skips Pillow's probe of every other format: ~20% faster
DECODE_CHUNK = 1000  # images per decoding task
DECODE_THREADS = min(4, os.cpu_count() or 1)  # Pillow releases the GIL while decoding
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageSpec:
    """What every image of one dataset is: its classes (label ``i`` is ``class_names[i]``), size and mode."""

    dataset: str
    class_names: tuple[str, ...]
    height: int
    width: int
    mode: Literal["RGB", "L"]

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1


def is_image(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def image_names(folder: Path) -> list[str]:
    """Sorted names of the images directly in ``folder``."""
    try:
        return sorted(name for name in os.listdir(folder) if is_image(name))
    except OSError as err:
        raise DataError(f"cannot list {folder}: {err.strerror or err}; check the path and permissions") from err


def load_image_folder(folder: Path) -> Dataset:
    """A user's image folder as a :class:`Dataset`, standardised per channel with the train split's statistics."""
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise DataError(
            f"image folder {folder} must hold train/<class>/<image> and test/<class>/<image> (class names are the "
            "subfolder names); train/ or test/ is missing"
        )
    class_names = tuple(sorted(entry.name for entry in _subfolders(folder / "train")))
    if not class_names:
        raise DataError(f"image folder {folder}/train has no class subfolders: put the images in train/<class>/")
    unknown = sorted({entry.name for entry in _subfolders(folder / "test")} - set(class_names))
    if unknown:
        raise DataError(f"image folder {folder}/test has classes {unknown} that train/ has not; add them to train/")
    first = next((folder / "train" / c / n for c in class_names for n in image_names(folder / "train" / c)), None)
    if first is None:
        raise DataError(f"image folder {folder}/train holds no images (.jpg, .jpeg, .png, .bmp)")
    try:
        with Image.open(first) as image:
            width, height = image.size
            mode: Literal["RGB", "L"] = "L" if image.mode in ("1", "L", "I", "I;16") else "RGB"
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise DataError(f"{first}: cannot decode the image ({err}); it is corrupt, copy it again") from err
    spec = ImageSpec(str(folder), class_names, height, width, mode)
    with ImageDecoder(spec, where="") as decoder:
        for split in SPLITS:
            for label, name in enumerate(class_names):
                class_folder = folder / split / name
                if class_folder.is_dir():
                    for image_name in image_names(class_folder):
                        decoder.add(split, label, str(class_folder / image_name), class_folder / image_name)
        arrays = decoder.finish(str(folder))
    x_train, x_test = images_to_tensors(arrays["x_train"], arrays["x_test"])
    return Dataset(
        name=folder.name,
        x_train=x_train,
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=len(class_names),
    )


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    except OSError as err:
        raise DataError(f"cannot list {folder}: {err.strerror or err}; check the path and permissions") from err


class ImageDecoder:
    """Decodes images in a thread pool while the caller is still listing or unpacking the rest.

    Each image is decoded straight into one slot of a preallocated uint8 chunk: no per-pixel Python.
    """

    def __init__(self, spec: ImageSpec, where: str) -> None:
        self._spec = spec
        self._where = where  # prefixes image names in error messages
        self._pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="image-decode")
        self._keys: list[tuple[str, int, str]] = []  # (split, label, name) per image, in add() order
        self._pending: list[tuple[str, bytes | Path]] = []
        self._chunks: list[Future[npt.NDArray[np.uint8]]] = []

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def count(self) -> int:
        return len(self._keys)

    def add(self, split: str, label: int, name: str, payload: bytes | Path) -> None:
        """Queue one image: ``payload`` is its encoded bytes or its file path."""
        self._keys.append((split, label, name))
        self._pending.append((name, payload))
        if len(self._pending) >= DECODE_CHUNK:
            self._submit()

    def finish(self, where: str) -> Arrays:
        """Wait for every chunk; return both splits ordered by (label, name), channel-major."""
        self._submit()
        spec = self._spec
        images = (
            np.concatenate([chunk.result() for chunk in self._chunks])
            if self._chunks
            else np.empty((0, spec.height, spec.width, spec.channels), dtype=np.uint8)
        )
        arrays: Arrays = {}
        for split in SPLITS:
            order = sorted((label, name, index) for index, (s, label, name) in enumerate(self._keys) if s == split)
            label_dtype = np.uint8 if len(spec.class_names) <= 256 else np.int64
            labels = np.array([label for label, _, _ in order], dtype=label_dtype)
            present = set(labels.tolist())
            missing = [name for label, name in enumerate(spec.class_names) if label not in present]
            if missing:
                raise DataError(
                    f"{where}: {split}/ has no images of class {', '.join(missing)}; the copy is incomplete, "
                    "unpack or download it again"
                )
            picked = images[np.array([index for _, _, index in order], dtype=np.int64)]  # (N, H, W, C)
            arrays[f"x_{split}"] = np.ascontiguousarray(picked.transpose(0, 3, 1, 2))  # (N, C, H, W)
            arrays[f"y_{split}"] = labels
        return arrays

    def _submit(self) -> None:
        if self._pending:
            self._chunks.append(self._pool.submit(_decode_chunk, self._pending, self._where, self._spec))
            self._pending = []


def _decode_chunk(items: list[tuple[str, bytes | Path]], where: str, spec: ImageSpec) -> npt.NDArray[np.uint8]:
    """Decode ``(name, bytes or path)`` images into a uint8 ``(n, H, W, C)`` array."""
    out = np.empty((len(items), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for slot, (name, payload) in enumerate(items):
        source: Any = io.BytesIO(payload) if isinstance(payload, bytes) else payload
        try:
            with Image.open(source, formats=_PIL_FORMATS) as image:
                if image.size != (spec.width, spec.height):
                    width, height = image.size
                    raise DataError(
                        f"{where}{name}: image is {width}x{height}, but {spec.dataset} images are "
                        f"{spec.width}x{spec.height}"
                    )
                converted = image if image.mode == spec.mode else image.convert(spec.mode)
                # tobytes + frombuffer is ~2x faster than np.asarray(image) for tiny images.
                out[slot] = np.frombuffer(converted.tobytes(), dtype=np.uint8).reshape(out.shape[1:])
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
            raise DataError(f"{where}{name}: cannot decode the image ({err}); it is corrupt, copy it again") from err
    return out
