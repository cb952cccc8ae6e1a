"""The embedded Store: a dict behind a lock. Nothing to install; it lives with the process, and
:meth:`MemoryStore.save` / :meth:`MemoryStore.load` keep it on disk so a run can resume.

A save costs what changed since the last one, not the store's size: the first writes a whole snapshot
(one safetensors file), later ones append the changed values, deletions, counters and sets to a
journal beside it (``<snapshot>.journal``), each batch framed with its length and a CRC so a batch
torn by a crash is ignored. Once the journal outgrows the live data the next save writes a whole
snapshot again, under a new generation: batches of an older generation are never replayed.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from amble.durable import write_atomic
from amble.server.store.base import Encodable, Store, Stored, Value, Versioned, as_bytes
from amble.server.tensors import read_metadata

_FRAME = 8
"""Bytes of each length field of a journal batch (little-endian), and of its CRC field."""


def journal_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + ".journal")


class MemoryStore(Store):
    """Values are kept as written: bytes, or an :class:`Encodable` object (a shard of partial sums)
    that is encoded only when bytes are asked for (``get``, ``save``), so a fold in this process
    never serialises the shard it commits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Stored] = {}
        self._counters: dict[str, float] = {}
        self._sets: dict[str, set[str]] = {}
        self._changed: set[str] = set()
        """Value keys written or deleted since the last save."""
        self._changed_sets: set[str] = set()
        self._generation: str | None = None
        """The snapshot the journal extends (None: the next save writes a whole one)."""
        self._journal_bytes = 0

    def get(self, key: str) -> bytes | None:
        item = self._values.get(key)
        return None if item is None else as_bytes(item.value)

    def get_versioned(self, key: str) -> Versioned | None:
        item = self._values.get(key)
        return None if item is None else Versioned(as_bytes(item.value), item.version)

    def get_stored(self, key: str) -> Stored | None:
        return self._values.get(key)

    def put(self, key: str, value: Value) -> int:
        with self._lock:
            return self._write(key, value)

    def _write(self, key: str, value: Value) -> int:
        previous = self._values.get(key)
        version = 1 if previous is None else previous.version + 1
        self._values[key] = Stored(value if isinstance(value, Encodable) else bytes(value), version)
        self._changed.add(key)
        return version

    def compare_and_set(self, key: str, value: Value, expected_version: int) -> bool:
        with self._lock:
            current = self._values.get(key)
            if (0 if current is None else current.version) != expected_version:
                return False
            self._write(key, value)
            return True

    def version(self, key: str) -> int:
        item = self._values.get(key)
        return 0 if item is None else item.version

    def commit(self, writes: Mapping[str, tuple[Value, int]]) -> bool:
        with self._lock:
            if any(self.version(key) != expected for key, (_, expected) in writes.items()):
                return False
            for key, (value, _) in writes.items():
                self._write(key, value)
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            if self._values.pop(key, None) is not None:
                self._changed.add(key)

    def incr(self, key: str, amount: float = 1.0) -> float:
        with self._lock:
            total = self._counters.get(key, 0.0) + amount
            self._counters[key] = total
            return total

    def counter(self, key: str) -> float:
        return self._counters.get(key, 0.0)

    def add_to_set(self, key: str, member: str) -> bool:
        with self._lock:
            members = self._sets.setdefault(key, set())
            if member in members:
                return False
            members.add(member)
            self._changed_sets.add(key)
            return True

    def set_members(self, key: str) -> set[str]:
        with self._lock:
            return set(self._sets.get(key, ()))

    def delete_set(self, key: str) -> None:
        with self._lock:
            if self._sets.pop(key, None) is not None:
                self._changed_sets.add(key)

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._values if k.startswith(prefix))

    def footprint(self) -> dict[str, int]:
        """What the store holds: value keys, their bytes, set members and counters."""
        with self._lock:
            return {
                "keys": len(self._values),
                "bytes": sum(len(as_bytes(v.value)) for v in self._values.values()),
                "set_members": sum(len(m) for m in self._sets.values()),
                "counters": len(self._counters),
            }

    def save(self, path: Path) -> None:
        """Keep everything on disk: a batch of what changed appended to the journal, or a whole snapshot
        (see the module's docstring); either way a crash while saving leaves the previous state."""
        with self._lock:
            live = sum(len(v.value) for v in self._values.values() if isinstance(v.value, bytes))  # no shard is open
            if self._generation is None or not path.is_file() or self._journal_bytes > max(live, 1 << 16):
                self._save_whole(path)
            else:
                self._append_batch(journal_path(path))
            self._changed.clear()
            self._changed_sets.clear()

    def _save_whole(self, path: Path) -> None:
        generation = uuid.uuid4().hex
        names = sorted(self._values)
        tensors = {str(i): np.frombuffer(as_bytes(self._values[k].value), dtype=np.uint8) for i, k in enumerate(names)}
        metadata = {
            "keys": json.dumps(names),
            "versions": json.dumps([self._values[k].version for k in names]),
            "counters": json.dumps(self._counters),
            "sets": json.dumps({k: sorted(v) for k, v in self._sets.items()}),
            "generation": generation,
        }
        write_atomic(path, save(tensors, metadata))
        journal_path(path).unlink(missing_ok=True)  # batches of the old generation would be skipped anyway
        self._generation, self._journal_bytes = generation, 0

    def _append_batch(self, journal: Path) -> None:
        changed = sorted(self._changed)
        present = {k: as_bytes(self._values[k].value) for k in changed if k in self._values}
        header = {
            "generation": self._generation,
            "values": [[k, self._values[k].version, len(value)] for k, value in present.items()],
            "deleted": [k for k in changed if k not in self._values],
            "counters": self._counters,
            "sets": {k: sorted(self._sets[k]) if k in self._sets else None for k in sorted(self._changed_sets)},
        }
        text = json.dumps(header).encode()
        body = b"".join([len(text).to_bytes(_FRAME, "little"), text, *present.values()])
        frame = len(body).to_bytes(_FRAME, "little") + body + zlib.crc32(body).to_bytes(_FRAME, "little")
        with open(journal, "ab") as file:
            file.write(frame)
            file.flush()
            os.fsync(file.fileno())
        self._journal_bytes += len(frame)

    @classmethod
    def load(cls, path: Path) -> MemoryStore:
        """A store with the contents :meth:`save` kept at ``path``: the snapshot, then its journal."""
        blob = path.read_bytes()
        tensors = load(blob)
        metadata = read_metadata(blob)
        store = cls()
        for i, (key, version) in enumerate(
            zip(json.loads(metadata["keys"]), json.loads(metadata["versions"]), strict=True)
        ):
            store._values[key] = Stored(tensors[str(i)].tobytes(), int(version))
        store._counters = {k: float(v) for k, v in json.loads(metadata["counters"]).items()}
        store._sets = {k: set(v) for k, v in json.loads(metadata["sets"]).items()}
        store._generation = metadata.get("generation")
        journal = journal_path(path)
        if store._generation is not None and journal.is_file():
            store._replay(journal.read_bytes())
        store._generation = None  # the next save starts a new generation: nothing appends after a torn batch
        return store

    def _replay(self, journal: bytes) -> None:
        """Apply the journal's whole batches of this snapshot's generation, up to the first torn one."""
        offset = 0
        while offset + _FRAME <= len(journal):
            size = int.from_bytes(journal[offset : offset + _FRAME], "little")
            end = offset + _FRAME + size
            if end + _FRAME > len(journal):
                break  # torn by a crash while appending: the state is the one before this batch
            body = journal[offset + _FRAME : end]
            if zlib.crc32(body) != int.from_bytes(journal[end : end + _FRAME], "little"):
                break
            self._apply(body)
            offset = end + _FRAME

    def _apply(self, body: bytes) -> None:
        length = int.from_bytes(body[:_FRAME], "little")
        header: dict[str, Any] = json.loads(body[_FRAME : _FRAME + length])
        if header["generation"] != self._generation:
            return
        position = _FRAME + length
        for key, version, size in header["values"]:
            self._values[key] = Stored(body[position : position + size], int(version))
            position += size
        for key in header["deleted"]:
            self._values.pop(key, None)
        self._counters = {k: float(v) for k, v in header["counters"].items()}
        for key, members in header["sets"].items():
            if members is None:
                self._sets.pop(key, None)
            else:
                self._sets[key] = set(members)

    @staticmethod
    def discard(path: Path) -> None:
        """Remove what :meth:`save` kept at ``path`` (the snapshot and its journal)."""
        path.unlink(missing_ok=True)
        journal_path(path).unlink(missing_ok=True)
