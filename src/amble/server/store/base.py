"""The Store: where all parameter-server state lives, so functions can stay stateless.

Values are bytes (safetensors for tensors, JSON for the rest). Every key carries a version that
increases on each write, so a read-modify-write can be committed with :meth:`Store.compare_and_set`
only if nobody wrote in between: this is what makes a fold exactly-once in effect.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Encodable(ABC):
    """A value an in-process store may keep as the object it is, encoded to bytes only when it must
    cross a process boundary (Redis, a checkpoint file) or a caller asks for bytes.

    Such a value must never change once written: a store hands the same object to every reader.
    """

    @abstractmethod
    def __bytes__(self) -> bytes:
        """The value's bytes: what :meth:`Store.get` returns for it."""


Value = bytes | Encodable
"""What a store's writes take: bytes, or an :class:`Encodable` object."""


def as_bytes(value: Value) -> bytes:
    return value if isinstance(value, bytes) else bytes(value)


@dataclass(frozen=True)
class Versioned:
    value: bytes
    version: int


@dataclass(frozen=True)
class Stored:
    """A value as the store holds it (bytes, or the object an in-process store kept) and its version."""

    value: Value
    version: int


class Store(ABC):
    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None."""

    @abstractmethod
    def get_versioned(self, key: str) -> Versioned | None:
        """The value and its version (versions start at 1 and grow on every write)."""

    @abstractmethod
    def put(self, key: str, value: Value) -> int:
        """Write unconditionally; returns the new version."""

    @abstractmethod
    def compare_and_set(self, key: str, value: Value, expected_version: int) -> bool:
        """Write only if the key's version is still ``expected_version`` (0 means: absent)."""

    @abstractmethod
    def version(self, key: str) -> int:
        """The key's version without its value (0 when absent): a cheap check of a cached copy."""

    @abstractmethod
    def commit(self, writes: Mapping[str, tuple[Value, int]]) -> bool:
        """Compare-and-set several keys at once: ``{key: (value, expected_version)}``, all or nothing."""

    def get_stored(self, key: str) -> Stored | None:
        """The value as stored and its version: an in-process store returns an :class:`Encodable` it
        was given as that object, without encoding it (the default reads bytes)."""
        current = self.get_versioned(key)
        return None if current is None else Stored(current.value, current.version)

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key (and its version); absent keys are ignored."""

    @abstractmethod
    def incr(self, key: str, amount: float = 1.0) -> float:
        """Atomically add ``amount`` to a numeric counter (absent counts as 0); returns the new total."""

    @abstractmethod
    def counter(self, key: str) -> float:
        """A counter's value, 0 when absent."""

    @abstractmethod
    def add_to_set(self, key: str, member: str) -> bool:
        """Add to a set; True if the member was new."""

    @abstractmethod
    def set_members(self, key: str) -> set[str]:
        """All members of a set (empty when absent)."""

    @abstractmethod
    def delete_set(self, key: str) -> None:
        """Remove a set; an absent one is ignored."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Sorted value keys starting with ``prefix`` (counters and sets are separate namespaces)."""

    def max_value_bytes(self) -> int | None:
        """The largest value this store can hold (None: as large as memory allows)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook; the embedded store holds nothing to release
        """Release connections."""


def read_json(store: Store, key: str) -> Any:
    """The JSON value at ``key``, or None when absent."""
    blob = store.get(key)
    return None if blob is None else json.loads(blob)
