"""The EventLog contract: every EventLog implementation must pass these (define ``make``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import pytest

from amble.server.events.base import EventLog


class EventLogContract(ABC):
    @abstractmethod
    def make(self) -> EventLog:
        """A fresh, empty log."""

    def test_read_returns_events_in_publication_order_once_per_group(self) -> None:
        log = self.make()
        for i in range(3):
            log.publish("t", "e", {"i": i}, at_s=float(i))
        first = log.read("t", "g", "c1")
        assert [e.payload["i"] for e in first] == [0, 1, 2]
        assert [e.at_s for e in first] == [0.0, 1.0, 2.0]
        assert all(e.type == "e" and e.deliveries == 1 for e in first)
        assert log.read("t", "g", "c2") == []

    def test_groups_are_independent_and_start_at_the_beginning(self) -> None:
        log = self.make()
        log.publish("t", "e", {"i": 0})
        log.read("t", "g1", "c")
        assert [e.payload["i"] for e in log.read("t", "g2", "c")] == [0]

    def test_topics_are_independent(self) -> None:
        log = self.make()
        log.publish("a", "e", {})
        assert log.read("b", "g", "c") == []
        assert len(log.read("a", "g", "c")) == 1

    def test_count_limits_a_read(self) -> None:
        log = self.make()
        for i in range(5):
            log.publish("t", "e", {"i": i})
        assert len(log.read("t", "g", "c", count=2)) == 2
        assert log.backlog("t", "g") == 3

    def test_unacked_events_stay_pending_and_acked_ones_leave(self) -> None:
        log = self.make()
        log.publish("t", "e", {"i": 0})
        log.publish("t", "e", {"i": 1})
        events = log.read("t", "g", "c")
        assert log.pending("t", "g") == 2
        assert log.ack("t", "g", events[0].id) is True
        assert log.ack("t", "g", events[0].id) is False
        assert log.pending("t", "g") == 1

    def test_events_every_group_acked_are_dropped_up_to_the_oldest_still_needed(self) -> None:
        log = self.make()
        for i in range(150):
            log.publish("t", "e", {"i": i})
        events = log.read("t", "g1", "c", count=200)
        log.read("t", "g2", "c", count=200)  # g2 reads, acks nothing: every event stays pending for it
        for event in events:
            log.ack("t", "g1", event.id)
        log.trim("t")
        assert log.retained("t") == 150
        for event in events[:-1]:
            log.ack("t", "g2", event.id)
        log.trim("t")
        assert log.retained("t") == 1  # the one still pending for g2 (a log may keep all from the oldest needed)
        (kept,) = log.claim_stale("t", "g2", "other", min_idle_s=0.0)
        assert kept.payload == {"i": 149}
        log.ack("t", "g2", kept.id)
        log.publish("t", "e", {"i": 150})
        log.trim("t")
        assert log.retained("t") == 1  # only the event nobody has read yet
        assert [e.payload["i"] for e in log.read("t", "g1", "c")] == [150]

    def test_stale_pending_events_are_redelivered_with_a_delivery_count(self) -> None:
        log = self.make()
        log.publish("t", "e", {"i": 7})
        (event,) = log.read("t", "g", "crashed-worker")
        assert log.claim_stale("t", "g", "other", min_idle_s=60.0) == []  # not idle long enough
        time.sleep(0.05)
        (again,) = log.claim_stale("t", "g", "other", min_idle_s=0.01)
        assert again.id == event.id and again.payload == {"i": 7}
        assert again.deliveries == 2
        assert log.ack("t", "g", again.id) is True
        assert log.claim_stale("t", "g", "other", min_idle_s=0.0) == []

    def test_payloads_must_be_json(self) -> None:
        log = self.make()
        with pytest.raises((TypeError, ValueError)):
            log.publish("t", "e", {"x": object()})
        with pytest.raises(ValueError):
            log.publish("t", "e", {"x": float("nan")})
