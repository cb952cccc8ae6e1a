"""The Runtime: runs a function for each event, on a pool of reusable instances.

A function instance is cold when it starts (empty ``cache``: it must load what it needs from the
Store) and warm when the runtime reuses it within ``keep_alive_s`` of its last invocation. The
runtime counts invocations, cold and warm starts and busy function-seconds into the Store, so any
implementation (in-process, worker processes, Ray) reports the same numbers the same way.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from amble.server import keys
from amble.server.events.base import Event, EventLog
from amble.server.store.base import Store

FUNCTIONS_TOPIC = "functions"
FUNCTIONS_GROUP = "functions"


@dataclass(frozen=True)
class PoolSettings:
    max_instances: int = 4
    keep_alive_s: float = 60.0
    reuse: bool = True
    cold_start_s: float = 0.0
    """Seconds a cold instance spends starting (charged on the virtual clock)."""
    invocation_s: float | None = None
    """Virtual seconds charged per invocation; None charges the measured wall time instead (which
    makes virtual time, and pool decisions, vary slightly from run to run)."""
    max_attempts: int = 5
    """Deliveries of one event before it is dead-lettered instead of retried forever."""
    visibility_timeout_s: float = 30.0
    """Real seconds an event may stay un-acked before another worker claims it (worker processes)."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def end_s(self, start_s: float, cold: bool, busy_s: float) -> float:
        """Virtual time an invocation started at ``start_s`` ends, having run ``busy_s`` real seconds."""
        charged_s = busy_s if self.invocation_s is None else self.invocation_s
        return start_s + (self.cold_start_s if cold else 0.0) + charged_s

    @classmethod
    def from_json(cls, blob: bytes) -> PoolSettings:
        return cls(**json.loads(blob))


@dataclass
class Invocation:
    """What a function sees besides its event: its instance's warm cache and a way to emit events."""

    instance_id: int
    cold: bool
    cache: dict[str, Any]
    emitted: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    shard: int = 0
    """Which shard of a round's partial sums this instance folds into: its own, so it never redoes
    another instance's fold and its warm copy of the shard stays valid between its events. The sum
    does not depend on which shard took which update (aggregation is exact: ``server.partialsum``)."""

    def emit(self, topic: str, type_: str, payload: Mapping[str, Any]) -> None:
        """Publish an event once this invocation succeeds (never on failure)."""
        self.emitted.append((topic, type_, dict(payload)))


Handler = Callable[[Event, Invocation], None]
HandlersFor = Callable[[Store], Mapping[str, Handler]]
"""Builds a run's function handlers from a Store (each function instance, in whatever process it
runs, builds its own from the store it reaches)."""


@dataclass(frozen=True)
class RuntimeStats:
    invocations: int
    cold_starts: int
    warm_starts: int
    busy_s: float
    failures: int
    dead_letters: int

    @classmethod
    def from_store(cls, store: Store) -> RuntimeStats:
        return cls(
            invocations=int(store.counter(keys.INVOCATIONS)),
            cold_starts=int(store.counter(keys.COLD_STARTS)),
            warm_starts=int(store.counter(keys.WARM_STARTS)),
            busy_s=store.counter(keys.BUSY_S),
            failures=int(store.counter(keys.FAILURES)),
            dead_letters=int(store.counter(keys.DEAD_LETTERS)),
        )


@dataclass
class InstanceRecord:
    """What one real function instance (a worker process, a Ray actor) did for a run, on the wall clock.

    Written to the run's Store by the instance itself after every event, so the figures survive it.
    """

    instance: str
    started_at_s: float | None
    """Wall-clock (Unix) time the instance's process started (None: unknown)."""
    first_event_done_at_s: float | None = None
    events: int = 0

    @property
    def cold_start_s(self) -> float | None:
        """Process start to its first event done: the real cold start, import and connect included."""
        if self.started_at_s is None or self.first_event_done_at_s is None:
            return None
        return self.first_event_done_at_s - self.started_at_s

    def ran_one(self, store: Store) -> None:
        """Count one more event run, and write the record to ``store``."""
        self.events += 1
        if self.first_event_done_at_s is None:
            self.first_event_done_at_s = time.time()
        store.put(keys.instance(self.instance), json.dumps(asdict(self)).encode())

    @classmethod
    def all_in(cls, store: Store) -> list[InstanceRecord]:
        records = []
        for key in sorted(store.keys(keys.INSTANCE_PREFIX)):
            blob = store.get(key)
            if blob is not None:
                records.append(cls(**json.loads(blob)))
        return records


@dataclass
class RealInstances:
    """A run's real function instances: what the virtual clock's cold and warm starts stand for."""

    started: int = 0
    """Instances the runtime started (replacements included)."""
    replacements: int = 0
    """Started because an instance died or was wedged."""
    retired: int = 0
    """Left by themselves: idle for ``keep_alive_s``, or after their one event without ``reuse``."""
    died: int = 0
    """Exited unasked (killed, crashed)."""
    wedged: int = 0
    """Stopped making progress (e.g. SIGSTOP) and were killed."""
    peak: int = 0
    """Most instances alive at once."""
    instance_s: float = 0.0
    """Seconds the local pool's worker processes were alive, summed (what a provider bills; Ray: 0)."""

    def summary(self, records: list[InstanceRecord]) -> dict[str, Any]:
        """These counts and, from the instances' own records, real cold starts and events per instance."""
        cold_ms = sorted(1000 * c for r in records if (c := r.cold_start_s) is not None)
        events = sorted(r.events for r in records)
        return {
            **asdict(self),
            "instances_that_ran": sum(1 for r in records if r.events > 0),
            "cold_start_ms_median": cold_ms[len(cold_ms) // 2] if cold_ms else None,
            "cold_start_ms_max": cold_ms[-1] if cold_ms else None,
            "events_per_instance": events,
        }


def record_invocation(store: Store, *, cold: bool, busy_s: float, failed: bool) -> None:
    store.incr(keys.INVOCATIONS)
    store.incr(keys.COLD_STARTS if cold else keys.WARM_STARTS)
    store.incr(keys.BUSY_S, busy_s)
    if failed:
        store.incr(keys.FAILURES)


def invoke(
    store: Store,
    events: EventLog,
    handlers: Mapping[str, Handler],
    event: Event,
    invocation: Invocation,
    start_s: float,
    settings: PoolSettings,
) -> float | None:
    """Run one event's function on an instance; returns the virtual time it ended, None if it failed.

    On success the function's emitted events are published (stamped with the end time) and then the
    event is acked: a crash anywhere before the ack leaves it pending for redelivery. A failure is
    recorded and the event stays pending, until its ``max_attempts``-th delivery dead-letters it.
    """
    handler = handlers.get(event.type)
    if handler is None:
        dead_letter(store, events, event, f"no function handles events of type '{event.type}'")
        return None
    began = time.perf_counter()
    try:
        handler(event, invocation)
    except Exception as exc:  # a crashed function: its instance is lost, the event stays pending
        record_invocation(store, cold=invocation.cold, busy_s=time.perf_counter() - began, failed=True)
        store.put(keys.last_error(event.id), f"{type(exc).__name__}: {exc}".encode())
        if event.deliveries >= settings.max_attempts:
            dead_letter(
                store, events, event, f"failed {event.deliveries} times; last error {type(exc).__name__}: {exc}"
            )
        return None
    busy_s = time.perf_counter() - began
    record_invocation(store, cold=invocation.cold, busy_s=busy_s, failed=False)
    end_s = settings.end_s(start_s, invocation.cold, busy_s)
    for topic, type_, payload in invocation.emitted:
        events.publish(topic, type_, payload, at_s=end_s)
    events.ack(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, event.id)
    return end_s


def next_events(events: EventLog, consumer: str) -> list[Event]:
    """The next functions events for a runtime that is the only consumer of its run, in virtual-time
    order (stable: ties keep log order). Whatever it left pending (an instance that failed or died
    before acking) comes back at once: nothing else can be running it."""
    batch = events.claim_stale(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, consumer, min_idle_s=0.0)
    batch += events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, consumer)
    return sorted(batch, key=lambda e: e.at_s)


def dead_letter(store: Store, events: EventLog, event: Event, reason: str) -> None:
    store.incr(keys.DEAD_LETTERS)
    store.put(keys.dead_letter(event.id), f"{event.type}: {reason}".encode())
    events.ack(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, event.id)


class Runtime(ABC):
    """Consumes the functions topic and runs the handler registered for each event type."""

    @abstractmethod
    def drain(self) -> None:
        """Return once every event on the functions topic has been run (or dead-lettered)."""

    def stats(self) -> RuntimeStats:
        return RuntimeStats.from_store(self.store)

    def real_instances(self) -> dict[str, Any] | None:
        """The real instances' figures (:meth:`RealInstances.summary`); None where instances are
        virtual only (the embedded runtime runs every function in the driver's process)."""
        return None

    def pool_state(self) -> dict[str, Any] | None:
        """The simulated instance pool as JSON, for a driver checkpoint (None: nothing to keep, e.g.
        worker processes, whose warm state lives and dies with them)."""
        return None

    def restore_pool(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - only simulated pools have state
        """Continue from what :meth:`pool_state` returned, so a resumed run starts the same instances
        cold or warm, at the same virtual times, as the run it continues would have."""

    store: Store

    def close(self) -> None:  # noqa: B027 - optional hook; the embedded runtime holds nothing to release
        """Stop instances and release resources."""
