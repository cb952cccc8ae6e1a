"""The embedded EventLog: in-process lists with consumer-group bookkeeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from amble.server.events.base import Event, EventLog, decode_event, encode_event


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass
class _Group:
    next_index: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)


class MemoryEventLog(EventLog):
    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._topics: dict[str, list[str]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}

    def publish(self, topic: str, type_: str, payload: Mapping[str, Any], at_s: float = 0.0) -> str:
        body = encode_event(type_, payload, at_s)
        with self._lock:
            log = self._topics.setdefault(topic, [])
            log.append(body)
            return str(len(log) - 1)

    def _group(self, topic: str, group: str) -> _Group:
        return self._groups.setdefault((topic, group), _Group())

    def read(self, topic: str, group: str, consumer: str, count: int = 64) -> list[Event]:
        with self._lock:
            log = self._topics.get(topic, [])
            state = self._group(topic, group)
            end = min(len(log), state.next_index + count)
            events = []
            now = self._clock()
            for index in range(state.next_index, end):
                state.pending[index] = _Pending(consumer, now, 1)
                events.append(decode_event(str(index), topic, log[index], 1))
            state.next_index = end
            return events

    def claim_stale(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = 64) -> list[Event]:
        with self._lock:
            log = self._topics.get(topic, [])
            state = self._group(topic, group)
            now = self._clock()
            events = []
            for index in sorted(state.pending):
                entry = state.pending[index]
                if now - entry.delivered_at < min_idle_s:
                    continue
                entry.consumer, entry.delivered_at, entry.deliveries = consumer, now, entry.deliveries + 1
                events.append(decode_event(str(index), topic, log[index], entry.deliveries))
                if len(events) == count:
                    break
            return events

    def ack(self, topic: str, group: str, event_id: str) -> bool:
        with self._lock:
            return self._group(topic, group).pending.pop(int(event_id), None) is not None

    def pending(self, topic: str, group: str) -> int:
        with self._lock:
            return len(self._group(topic, group).pending)

    def backlog(self, topic: str, group: str) -> int:
        with self._lock:
            return len(self._topics.get(topic, [])) - self._group(topic, group).next_index
