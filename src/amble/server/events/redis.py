"""The EventLog on Redis Streams: one stream per topic, consumer groups, claims after a timeout.

A topic is the stream ``amble:{namespace}:t:{topic}``; each entry has one field, ``e``, holding
the event as JSON. Groups are created on first read at id 0, so a group that starts late still sees
every event. A consumer that dies leaves its events pending; ``claim_stale`` hands them to another
consumer once they have been idle for the visibility timeout (``XPENDING`` + ``XCLAIM``, whose
min-idle check makes sure only one claimer wins). Every :data:`TRIM_EVERY` acknowledgements of a topic
the stream is trimmed (``XTRIM MINID``) below the oldest entry some group still needs: its first
pending one, or the one after its last delivered; a long run's streams hold what is in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis

from amble.server.events.base import Event, EventLog, decode_event, encode_event
from amble.server.store.redis import connect, prefix_of

# KEYS: the stream; ARGV: group, consumer, event id. Claimed again (idle reset to 0, deliveries not
# counted) only while that consumer still holds it: an event another consumer claimed stays theirs.
_KEEP_CLAIMED = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


TRIM_EVERY = 64
"""Acknowledgements of a topic (by this client) between two trims of its stream."""


def _id_key(event_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = event_id.partition("-")
    return int(milliseconds), int(sequence or 0)


class RedisEventLog(EventLog):
    def __init__(self, url: str, namespace: str, client: redis.Redis | None = None) -> None:
        self.url = url
        self.namespace = namespace
        self.client = client if client is not None else connect(url)
        self._prefix = prefix_of(namespace)
        self._groups: set[tuple[str, str]] = set()
        self._keep_claimed = self.client.register_script(_KEEP_CLAIMED)
        self._acks: dict[str, int] = {}

    def stream(self, topic: str) -> str:
        return f"{self._prefix}t:{topic}"

    def publish(self, topic: str, type_: str, payload: Mapping[str, Any], at_s: float = 0.0) -> str:
        event_id = self.client.xadd(self.stream(topic), {"e": encode_event(type_, payload, at_s)})
        return cast(bytes, event_id).decode()

    def ensure_group(self, topic: str, group: str) -> None:
        if (topic, group) in self._groups:
            return
        try:
            self.client.xgroup_create(self.stream(topic), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((topic, group))

    def read(self, topic: str, group: str, consumer: str, count: int = 64) -> list[Event]:
        self.ensure_group(topic, group)
        reply = self.client.xreadgroup(group, consumer, {self.stream(topic): ">"}, count=count)
        return self._events(topic, reply)

    def read_blocking(
        self, topics: Sequence[str], group: str, consumer: str, count: int, block_s: float
    ) -> list[Event]:
        """Like :meth:`read` over several topics, waiting up to ``block_s`` for the first event."""
        for topic in topics:
            self.ensure_group(topic, group)
        streams: dict[Any, Any] = {self.stream(t): ">" for t in topics}
        reply: Any = self.client.xreadgroup(group, consumer, streams, count=count, block=max(1, int(block_s * 1000)))
        by_stream = {self.stream(t): t for t in topics}
        events: list[Event] = []
        for stream, entries in reply or []:
            events += self._events(by_stream[stream.decode()], [(stream, entries)])
        return events

    def _events(self, topic: str, reply: Any, deliveries: Mapping[str, int] | None = None) -> list[Event]:
        events = []
        for _stream, entries in reply or []:
            for raw_id, fields in entries:
                if fields is None:  # trimmed away while pending: nothing left to deliver
                    continue
                event_id = raw_id.decode()
                count = 1 if deliveries is None else deliveries[event_id]
                events.append(decode_event(event_id, topic, fields[b"e"], count))
        return events

    def claim_stale(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = 64) -> list[Event]:
        self.ensure_group(topic, group)
        stream = self.stream(topic)
        idle_ms = int(min_idle_s * 1000)
        pending: Any = self.client.xpending_range(stream, group, min="-", max="+", count=count, idle=idle_ms)
        if not pending:
            return []
        before = {p["message_id"].decode(): int(p["times_delivered"]) for p in pending}
        claimed = self.client.xclaim(stream, group, consumer, idle_ms, list(before))
        # XCLAIM counts this delivery; ids another consumer claimed first are simply not returned.
        return self._events(topic, [(stream, claimed)], {i: n + 1 for i, n in before.items()})

    def keep_claimed(self, topic: str, group: str, consumer: str, event_id: str) -> bool:
        """Tell the group ``consumer`` is still working on ``event_id``: its idle time restarts, so no
        other consumer claims it as stale. False if it is no longer ``consumer``'s (acked, or claimed)."""
        return bool(self._keep_claimed(keys=[self.stream(topic)], args=[group, consumer, event_id]))

    def ack(self, topic: str, group: str, event_id: str) -> bool:
        self.ensure_group(topic, group)
        acked = bool(self.client.xack(self.stream(topic), group, event_id))
        self._acks[topic] = self._acks.get(topic, 0) + 1
        if self._acks[topic] % TRIM_EVERY == 0:
            self.trim(topic)
        return acked

    def trim(self, topic: str) -> None:
        """Drop the entries every group of ``topic`` is done with (read and acknowledged)."""
        stream = self.stream(topic)
        groups: Any = self.client.xinfo_groups(stream)
        floor: tuple[int, int] | None = None
        for info in groups:
            summary: Any = self.client.xpending(stream, info["name"])
            if summary["pending"]:
                needed = _id_key(_text(summary["min"]))
            else:
                milliseconds, sequence = _id_key(_text(info["last-delivered-id"]))
                needed = (milliseconds, sequence + 1)
            floor = needed if floor is None else min(floor, needed)
        if floor is not None:
            self.client.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)

    def retained(self, topic: str) -> int:
        """Entries of ``topic``'s stream still held."""
        return int(self.client.xlen(self.stream(topic)))

    def pending(self, topic: str, group: str) -> int:
        self.ensure_group(topic, group)
        summary = self.client.xpending(self.stream(topic), group)
        return int(summary["pending"])

    def backlog(self, topic: str, group: str) -> int:
        self.ensure_group(topic, group)
        groups: Any = self.client.xinfo_groups(self.stream(topic))
        for info in groups:
            if info["name"].decode() == group:
                lag = info.get("lag")
                if lag == 0:
                    return 0
                # After a restart from an RDB-preamble AOF, Redis replays deliveries as XCLAIMs that move
                # the group's last id without counting the entries as read: its lag then stays too high
                # for good. Trust a positive lag only while an entry does follow the last delivered one.
                last = info["last-delivered-id"].decode()
                after: Any = self.client.xrange(self.stream(topic), min="(" + last, max="+", count=1)
                if not after:
                    return 0
                if lag is not None:
                    return int(lag)
                unread: Any = self.client.xrange(self.stream(topic), min="(" + last, max="+")
                return len(unread)
        return 0

    def close(self) -> None:
        self.client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
