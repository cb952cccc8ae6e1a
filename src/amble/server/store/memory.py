"""The embedded Store: a dict behind a lock. Nothing to install; it lives with the process, and
:meth:`MemoryStore.save` / :meth:`MemoryStore.load` keep it in one file so a run can resume."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from amble.durable import write_atomic
from amble.server.store.base import Encodable, Store, Stored, Value, Versioned, as_bytes
from amble.server.tensors import read_metadata


class MemoryStore(Store):
    """Values are kept as written: bytes, or an :class:`Encodable` object (a shard of partial sums)
    that is encoded only when bytes are asked for (``get``, ``save``), so a fold in this process
    never serialises the shard it commits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Stored] = {}
        self._counters: dict[str, float] = {}
        self._sets: dict[str, set[str]] = {}

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
            self._values.pop(key, None)

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
            return True

    def set_members(self, key: str) -> set[str]:
        with self._lock:
            return set(self._sets.get(key, ()))

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._values if k.startswith(prefix))

    def save(self, path: Path) -> None:
        """Write everything to one safetensors file (values as byte tensors, the rest as JSON metadata),
        atomically: a crash while saving leaves the previous file."""
        with self._lock:
            names = sorted(self._values)
            tensors = {
                str(i): np.frombuffer(as_bytes(self._values[k].value), dtype=np.uint8) for i, k in enumerate(names)
            }
            metadata = {
                "keys": json.dumps(names),
                "versions": json.dumps([self._values[k].version for k in names]),
                "counters": json.dumps(self._counters),
                "sets": json.dumps({k: sorted(v) for k, v in self._sets.items()}),
            }
            blob = save(tensors, metadata)
        write_atomic(path, blob)

    @classmethod
    def load(cls, path: Path) -> MemoryStore:
        """A store with the contents :meth:`save` wrote to ``path``."""
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
        return store
