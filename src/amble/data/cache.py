"""A folder of ``.npy`` arrays plus a JSON stamp: decode a dataset once, then load it in about a second.

The stamp says where the arrays came from (so a changed source is decoded again) and records each
array file's size and modification time, so arrays from two interleaved writers are never mixed:
a mismatch reads as "no cache". Every file is written to a temp file and renamed into place, the
stamp last, so a crash mid-write leaves either the old complete cache or none.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

STAMP_NAME = "stamp.json"

Stamp = dict[str, Any]
Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class ArrayCache:
    """Arrays ``names`` stored as ``<folder>/<name>.npy`` (never pickled) with ``<folder>/stamp.json``."""

    folder: Path
    names: tuple[str, ...]

    @property
    def stamp_path(self) -> Path:
        return self.folder / STAMP_NAME

    def read_stamp(self) -> Stamp | None:
        """The stamp's ``source`` description and bookkeeping, or ``None`` if there is no readable stamp."""
        try:
            stamp = json.loads(self.stamp_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return stamp if isinstance(stamp, dict) else None

    def read(self, accept: Callable[[Stamp], bool] = lambda stamp: True) -> tuple[Stamp, Arrays] | None:
        """Return ``(stamp, arrays)`` if a complete cache exists and ``accept(stamp)``; else ``None``.

        A missing, partial, foreign or unreadable cache is not an error: the caller decodes again.
        """
        stamp = self.read_stamp()
        if stamp is None or not accept(stamp):
            return None
        files = stamp.get("files")
        if not isinstance(files, dict) or set(files) != set(self.names):
            return None
        arrays: Arrays = {}
        for name in self.names:
            path = self.folder / f"{name}.npy"
            try:
                if _file_identity(path) != files[name]:
                    logger.info("cache file %s changed since its stamp was written; ignoring the cache", path)
                    return None
                arrays[name] = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write: no upfront read
            except (OSError, ValueError) as err:
                logger.warning("cannot read cached %s (%s); decoding the dataset again", path, err)
                return None
        return stamp, arrays

    def write(self, arrays: Mapping[str, npt.NDArray[Any]], source: Mapping[str, Any]) -> None:
        """Replace the cache with ``arrays`` (exactly ``names``) decoded from ``source``.

        Raises ``OSError`` if the folder cannot be written; callers may carry on without a cache.
        """
        if set(arrays) != set(self.names):
            raise ValueError(f"cache holds {sorted(self.names)}, got {sorted(arrays)}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stamp_path.unlink(missing_ok=True)  # the old stamp must not vouch for half-new arrays
        files: dict[str, list[int]] = {}
        for name in self.names:
            path = self.folder / f"{name}.npy"
            with _atomic(path) as out:
                np.save(out, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            files[name] = _file_identity(path)
        stamp = {"source": dict(source), "files": files}
        with _atomic(self.stamp_path) as out:
            out.write(json.dumps(stamp, indent=1, sort_keys=True).encode("utf-8"))


def _file_identity(path: Path) -> list[int]:
    """``[size, mtime_ns]``: changes whenever another writer renames a new file into place."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


@contextmanager
def _atomic(target: Path) -> Iterator[IO[bytes]]:
    """Yield a binary temp file beside ``target``; rename it onto ``target`` only if the block succeeds."""
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
