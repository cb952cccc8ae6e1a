"""The EventLog: uploads and round transitions are events that trigger functions.

Semantics follow Redis Streams consumer groups: each topic is an append-only log; a group reads
each event once (``read``), an event stays pending until acked, and pending events idle longer than
a visibility timeout can be claimed by another consumer (``claim_stale``): at-least-once delivery,
which the functions turn into exactly-once effect.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: str
    topic: str
    type: str
    payload: dict[str, Any]
    at_s: float
    """Virtual time at which the event was emitted (0 outside simulation)."""
    deliveries: int = 1
    """How many times this event has been delivered, this delivery included."""


def encode_event(type_: str, payload: Mapping[str, Any], at_s: float) -> str:
    """Events carry JSON only; anything else is refused at publish time."""
    return json.dumps({"type": type_, "payload": dict(payload), "at_s": at_s}, allow_nan=False)


def decode_event(event_id: str, topic: str, body: str | bytes, deliveries: int) -> Event:
    data = json.loads(body)
    return Event(event_id, topic, data["type"], data["payload"], float(data["at_s"]), deliveries)


class EventLog(ABC):
    @abstractmethod
    def publish(self, topic: str, type_: str, payload: Mapping[str, Any], at_s: float = 0.0) -> str:
        """Append an event; returns its id (ids increase in publication order)."""

    @abstractmethod
    def read(self, topic: str, group: str, consumer: str, count: int = 64) -> list[Event]:
        """Up to ``count`` events this group has never been given; they become pending for ``consumer``.

        A group that reads a topic for the first time starts at the beginning of the topic.
        """

    @abstractmethod
    def claim_stale(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = 64) -> list[Event]:
        """Pending events of the group not acked for ``min_idle_s`` seconds, redelivered to ``consumer``."""

    @abstractmethod
    def ack(self, topic: str, group: str, event_id: str) -> bool:
        """Mark an event done for the group; True if it was pending."""

    @abstractmethod
    def pending(self, topic: str, group: str) -> int:
        """Events delivered to the group and not yet acked."""

    @abstractmethod
    def backlog(self, topic: str, group: str) -> int:
        """Events the group has not yet been given."""

    @abstractmethod
    def retained(self, topic: str) -> int:
        """Events of ``topic`` the log still holds: at most those some group has not read and acked
        (after :meth:`trim`), so a long run's log does not grow with its history."""

    def trim(self, topic: str) -> None:  # noqa: B027 - a log that drops events as they are acked has nothing to do
        """Drop now what every group of ``topic`` is done with (a log may also do it on its own)."""

    def close(self) -> None:  # noqa: B027 - optional hook; the embedded log holds nothing to release
        """Release connections."""
