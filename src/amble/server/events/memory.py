"""The embedded EventLog: in-process logs with consumer-group bookkeeping.

An event every group of its topic has read and acknowledged is dropped, so a long run's log holds only
what is still in flight (a topic nobody reads yet keeps everything: a group starts at the beginning).
"""

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
        self._topics: dict[str, dict[int, str]] = {}
        self._published: dict[str, int] = {}
        """Events ever published per topic: the next event's index."""
        self._groups: dict[tuple[str, str], _Group] = {}

    def publish(self, topic: str, type_: str, payload: Mapping[str, Any], at_s: float = 0.0) -> str:
        body = encode_event(type_, payload, at_s)
        with self._lock:
            index = self._published.get(topic, 0)
            self._topics.setdefault(topic, {})[index] = body
            self._published[topic] = index + 1
            return str(index)

    def _group(self, topic: str, group: str) -> _Group:
        return self._groups.setdefault((topic, group), _Group())

    def read(self, topic: str, group: str, consumer: str, count: int = 64) -> list[Event]:
        with self._lock:
            log = self._topics.get(topic, {})
            state = self._group(topic, group)
            if state.next_index == 0 and 0 not in log:  # a new group: from the first event still held
                state.next_index = min(log, default=self._published.get(topic, 0))
            end = min(self._published.get(topic, 0), state.next_index + count)
            events = []
            now = self._clock()
            for index in range(state.next_index, end):
                state.pending[index] = _Pending(consumer, now, 1)
                events.append(decode_event(str(index), topic, log[index], 1))
            state.next_index = end
            return events

    def claim_stale(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = 64) -> list[Event]:
        with self._lock:
            log = self._topics.get(topic, {})
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
            index = int(event_id)
            acked = self._group(topic, group).pending.pop(index, None) is not None
            groups = [state for (name, _), state in self._groups.items() if name == topic]
            if acked and all(index < state.next_index and index not in state.pending for state in groups):
                self._topics.get(topic, {}).pop(index, None)  # every group is done with it
            return acked

    def retained(self, topic: str) -> int:
        """Events of ``topic`` still held (not yet done by every group)."""
        with self._lock:
            return len(self._topics.get(topic, {}))

    def pending(self, topic: str, group: str) -> int:
        with self._lock:
            return len(self._group(topic, group).pending)

    def backlog(self, topic: str, group: str) -> int:
        with self._lock:
            return self._published.get(topic, 0) - self._group(topic, group).next_index
