"""The Runtime contract: functions run once per event in effect, on a pool with cold/warm accounting.

Subclasses define ``make(store, events, handlers, settings)``; the store and log are the embedded
ones unless a subclass overrides ``make_store``/``make_events``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from amble.server.events.base import Event, EventLog
from amble.server.events.memory import MemoryEventLog
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation, PoolSettings, Runtime
from amble.server.store.base import Store
from amble.server.store.memory import MemoryStore


class RuntimeContract(ABC):
    @abstractmethod
    def make(self, store: Store, events: EventLog, handlers: Mapping[str, Handler], settings: PoolSettings) -> Runtime:
        """A runtime consuming ``events`` with ``handlers``."""

    def make_store(self) -> Store:
        return MemoryStore()

    def make_events(self) -> EventLog:
        return MemoryEventLog()

    def _setup(
        self, handlers: Mapping[str, Handler], **settings: float | int | bool
    ) -> tuple[Store, EventLog, Runtime]:
        store, events = self.make_store(), self.make_events()
        return store, events, self.make(store, events, handlers, PoolSettings(**settings))  # type: ignore[arg-type]

    def test_each_event_runs_its_handler_and_is_acked(self) -> None:
        seen: list[int] = []

        def handle(event: Event, inv: Invocation) -> None:
            seen.append(event.payload["i"])

        _store, events, runtime = self._setup({"work": handle})
        for i in range(5):
            events.publish(FUNCTIONS_TOPIC, "work", {"i": i})
        runtime.drain()
        assert sorted(seen) == [0, 1, 2, 3, 4]
        assert events.pending(FUNCTIONS_TOPIC, "functions") == 0
        assert runtime.stats().invocations == 5

    def test_warm_instances_are_reused_and_keep_their_cache(self) -> None:
        colds: list[bool] = []
        cached: list[bool] = []

        def handle(event: Event, inv: Invocation) -> None:
            colds.append(inv.cold)
            cached.append("loaded" in inv.cache)
            inv.cache["loaded"] = True

        _store, events, runtime = self._setup({"work": handle}, max_instances=1, keep_alive_s=100.0)
        for i in range(3):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=float(i))
        runtime.drain()
        assert colds == [True, False, False]
        assert cached == [False, True, True]
        stats = runtime.stats()
        assert (stats.cold_starts, stats.warm_starts) == (1, 2)

    def test_keep_alive_expiry_and_reuse_off_force_cold_starts(self) -> None:
        def handle(event: Event, inv: Invocation) -> None:
            pass

        _, events, runtime = self._setup({"work": handle}, max_instances=1, keep_alive_s=5.0)
        for at_s in (0.0, 1.0, 100.0):  # the third arrives after the instance expired
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=at_s)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (2, 1)

        _, events, runtime = self._setup({"work": handle}, max_instances=4, keep_alive_s=100.0, reuse=False)
        for at_s in (0.0, 1.0, 2.0):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=at_s)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (3, 0)

    def test_simultaneous_events_start_parallel_instances_up_to_the_limit(self) -> None:
        def handle(event: Event, inv: Invocation) -> None:
            pass

        _, events, runtime = self._setup({"work": handle}, max_instances=2, keep_alive_s=100.0, cold_start_s=1.0)
        for _ in range(4):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=0.0)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (2, 2)

    def test_a_crashing_handler_is_retried_until_it_succeeds(self) -> None:
        attempts: list[int] = []

        def flaky(event: Event, inv: Invocation) -> None:
            attempts.append(event.deliveries)
            if len(attempts) < 3:
                raise RuntimeError("instance crashed")

        _, events, runtime = self._setup({"work": flaky}, max_attempts=5)
        events.publish(FUNCTIONS_TOPIC, "work", {})
        runtime.drain()
        assert attempts == [1, 2, 3]
        stats = runtime.stats()
        assert (stats.failures, stats.dead_letters) == (2, 0)
        assert events.pending(FUNCTIONS_TOPIC, "functions") == 0

    def test_an_always_failing_event_is_dead_lettered_not_retried_forever(self) -> None:
        def broken(event: Event, inv: Invocation) -> None:
            raise ValueError("bad event")

        store, events, runtime = self._setup({"work": broken}, max_attempts=3)
        events.publish(FUNCTIONS_TOPIC, "work", {})
        runtime.drain()
        stats = runtime.stats()
        assert (stats.failures, stats.dead_letters) == (3, 1)
        assert any(b"bad event" in (store.get(k) or b"") for k in store.keys("runtime/dead_letter/"))

    def test_emitted_events_are_published_only_after_success(self) -> None:
        def first(event: Event, inv: Invocation) -> None:
            inv.emit(FUNCTIONS_TOPIC, "second", {"from": event.payload["i"]})
            if event.deliveries == 1:
                raise RuntimeError("crash after emit")

        got: list[int] = []

        def second(event: Event, inv: Invocation) -> None:
            got.append(event.payload["from"])

        _, events, runtime = self._setup({"first": first, "second": second})
        events.publish(FUNCTIONS_TOPIC, "first", {"i": 9})
        runtime.drain()
        assert got == [9]  # once: the failed attempt's emission was discarded
