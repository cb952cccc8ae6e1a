"""The Runtime contract: functions run once per event in effect, on a pool with cold/warm accounting.

Subclasses define ``make(store, events, handlers_for, settings)``; the store and log are the embedded
ones unless a subclass overrides ``make_store``/``make_events``. A runtime's instances build their
handlers with ``handlers_for(their store)``, possibly in another process, so the handlers here report
what they saw through the Store, never through the test's own memory.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from amble.server.events.base import Event, EventLog
from amble.server.events.memory import MemoryEventLog
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation, PoolSettings, Runtime
from amble.server.store.base import Store
from amble.server.store.memory import MemoryStore

HandlersFor = Callable[[Store], Mapping[str, Handler]]


class RuntimeContract(ABC):
    @abstractmethod
    def make(self, store: Store, events: EventLog, handlers_for: HandlersFor, settings: PoolSettings) -> Runtime:
        """A runtime consuming ``events``, its instances running ``handlers_for(store)``."""

    def make_store(self) -> Store:
        return MemoryStore()

    def make_events(self) -> EventLog:
        return MemoryEventLog()

    def _setup(self, handlers_for: HandlersFor, **settings: float | int | bool) -> tuple[Store, EventLog, Runtime]:
        store, events = self.make_store(), self.make_events()
        return store, events, self.make(store, events, handlers_for, PoolSettings(**settings))  # type: ignore[arg-type]

    def test_each_event_runs_its_handler_and_is_acked(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def handle(event: Event, inv: Invocation) -> None:
                store.incr(f"seen/{event.payload['i']}")

            return {"work": handle}

        store, events, runtime = self._setup(handlers_for)
        for i in range(5):
            events.publish(FUNCTIONS_TOPIC, "work", {"i": i})
        runtime.drain()
        assert [store.counter(f"seen/{i}") for i in range(5)] == [1, 1, 1, 1, 1]
        assert events.pending(FUNCTIONS_TOPIC, "functions") == 0
        assert runtime.stats().invocations == 5

    def test_warm_instances_are_reused_and_keep_their_cache(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def handle(event: Event, inv: Invocation) -> None:
                seen = {"cold": inv.cold, "cached": "loaded" in inv.cache}
                store.put(f"seen/{event.payload['i']}", json.dumps(seen).encode())
                inv.cache["loaded"] = True

            return {"work": handle}

        store, events, runtime = self._setup(handlers_for, max_instances=1, keep_alive_s=100.0)
        for i in range(3):
            events.publish(FUNCTIONS_TOPIC, "work", {"i": i}, at_s=float(i))
        runtime.drain()
        seen = [json.loads(store.get(f"seen/{i}") or b"{}") for i in range(3)]
        assert [s["cold"] for s in seen] == [True, False, False]
        assert [s["cached"] for s in seen] == [False, True, True]
        stats = runtime.stats()
        assert (stats.cold_starts, stats.warm_starts) == (1, 2)

    def test_keep_alive_expiry_and_reuse_off_force_cold_starts(self) -> None:
        _, events, runtime = self._setup(_idle_handlers, max_instances=1, keep_alive_s=5.0)
        for at_s in (0.0, 1.0, 100.0):  # the third arrives after the instance expired
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=at_s)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (2, 1)

        _, events, runtime = self._setup(_idle_handlers, max_instances=4, keep_alive_s=100.0, reuse=False)
        for at_s in (0.0, 1.0, 2.0):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=at_s)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (3, 0)

    def test_simultaneous_events_start_parallel_instances_up_to_the_limit(self) -> None:
        _, events, runtime = self._setup(_idle_handlers, max_instances=2, keep_alive_s=100.0, cold_start_s=1.0)
        for _ in range(4):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=0.0)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (2, 2)

    def test_a_crashing_handler_is_retried_until_it_succeeds(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def flaky(event: Event, inv: Invocation) -> None:
                store.incr(f"attempt/{event.deliveries}")
                if event.deliveries < 3:
                    raise RuntimeError("instance crashed")

            return {"work": flaky}

        store, events, runtime = self._setup(handlers_for, max_attempts=5)
        events.publish(FUNCTIONS_TOPIC, "work", {})
        runtime.drain()
        assert [store.counter(f"attempt/{n}") for n in (1, 2, 3, 4)] == [1, 1, 1, 0]
        stats = runtime.stats()
        assert (stats.failures, stats.dead_letters) == (2, 0)
        assert events.pending(FUNCTIONS_TOPIC, "functions") == 0

    def test_an_always_failing_event_is_dead_lettered_not_retried_forever(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def broken(event: Event, inv: Invocation) -> None:
                raise ValueError("bad event")

            return {"work": broken}

        store, events, runtime = self._setup(handlers_for, max_attempts=3)
        events.publish(FUNCTIONS_TOPIC, "work", {})
        runtime.drain()
        stats = runtime.stats()
        assert (stats.failures, stats.dead_letters) == (3, 1)
        assert any(b"bad event" in (store.get(k) or b"") for k in store.keys("runtime/dead_letter/"))

    def test_emitted_events_are_published_only_after_success(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def first(event: Event, inv: Invocation) -> None:
                inv.emit(FUNCTIONS_TOPIC, "second", {"from": event.payload["i"]})
                if event.deliveries == 1:
                    raise RuntimeError("crash after emit")

            def second(event: Event, inv: Invocation) -> None:
                store.incr(f"got/{event.payload['from']}")

            return {"first": first, "second": second}

        store, events, runtime = self._setup(handlers_for)
        events.publish(FUNCTIONS_TOPIC, "first", {"i": 9})
        runtime.drain()
        assert store.counter("got/9") == 1  # once: the failed attempt's emission was discarded


def _idle_handlers(store: Store) -> Mapping[str, Handler]:
    def handle(event: Event, inv: Invocation) -> None:
        pass

    return {"work": handle}
