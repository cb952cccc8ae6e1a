"""The embedded Runtime: functions run in the caller's thread, on a simulated instance pool.

Running in-process keeps simulations deterministic (updates are folded in upload order, so a
seed reproduces the same floating-point sums; with a fixed ``invocation_s`` the virtual clock and
the pool's cold/warm decisions are reproducible too). The pool is simulated on the virtual clock: an event
emitted at virtual time ``t`` lands on an idle warm instance if one was freed within
``keep_alive_s`` (and ``reuse`` is on), else on a new cold instance if fewer than ``max_instances``
are alive, else it queues for the first instance to free up. Execution time is measured for real
and counted as busy function-seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from amble.server.events.base import Event, EventLog
from amble.server.runtime.base import (
    Handler,
    Invocation,
    PoolSettings,
    Runtime,
    dead_letter,
    invoke,
    next_events,
)
from amble.server.store.base import Store


@dataclass
class PoolInstance:
    id: int
    free_at_s: float
    cache: dict[str, Any] = field(default_factory=dict)


class InstancePool:
    """The serverless instance pool, simulated on the virtual clock (shared by the in-process and the
    Ray runtime, so both decide cold and warm starts identically)."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.idle: list[PoolInstance] = []
        """Instances alive (busy until ``free_at_s``, or idle since then)."""
        self._next_id = 0

    def expire(self, now_s: float) -> None:
        """Forget instances that are no longer warm at ``now_s``."""
        s = self.settings
        self.idle = [i for i in self.idle if i.free_at_s > now_s or now_s - i.free_at_s <= s.keep_alive_s]
        if not s.reuse:  # a finished instance is never invoked again
            self.idle = [i for i in self.idle if i.free_at_s > now_s]

    def acquire(self, at_s: float) -> tuple[PoolInstance, float, bool]:
        """Pick the instance for an event at ``at_s``: (instance, start time, cold?)."""
        s = self.settings
        self.expire(at_s)
        ready = [i for i in self.idle if i.free_at_s <= at_s]
        if ready:
            instance = max(ready, key=lambda i: i.free_at_s)
            self.idle.remove(instance)
            return instance, at_s, False
        if len(self.idle) < s.max_instances:
            self._next_id += 1
            return PoolInstance(self._next_id, at_s), at_s, True
        # Every instance is busy: queue for the first to free up.
        instance = min(self.idle, key=lambda i: i.free_at_s)
        self.idle.remove(instance)
        if s.reuse:
            return instance, instance.free_at_s, False
        self._next_id += 1
        return PoolInstance(self._next_id, instance.free_at_s), instance.free_at_s, True

    def release(self, instance: PoolInstance, free_at_s: float) -> None:
        """A finished instance rejoins the pool (a failed one is simply never released: it is lost)."""
        instance.free_at_s = free_at_s
        self.idle.append(instance)

    def discard(self, instance: PoolInstance) -> None:
        if instance in self.idle:
            self.idle.remove(instance)

    def state(self) -> dict[str, Any]:
        """The pool as JSON (for a checkpoint): each alive instance's id and the virtual time it frees
        up, in pool order (ties are broken by it), and the next id. Warm caches are left out: a cache
        only holds what the Store holds, checked against its version on every use."""
        return {"next_id": self._next_id, "instances": [[i.id, i.free_at_s] for i in self.idle]}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state`: the same instances, warm or busy until the same times."""
        self._next_id = int(state["next_id"])
        self.idle = [PoolInstance(int(i), float(free_at_s)) for i, free_at_s in state["instances"]]


class LocalRuntime(Runtime):
    def __init__(
        self,
        store: Store,
        events: EventLog,
        handlers: Mapping[str, Handler],
        settings: PoolSettings | None = None,
        consumer: str = "local",
    ) -> None:
        self.store = store
        self.events = events
        self.handlers = dict(handlers)
        self.settings = settings or PoolSettings()
        self.consumer = consumer
        self.pool = InstancePool(self.settings)

    def _run(self, event: Event) -> None:
        if event.type not in self.handlers:
            dead_letter(self.store, self.events, event, f"no function handles events of type '{event.type}'")
            return
        instance, start_s, cold = self.pool.acquire(event.at_s)
        end_s = invoke(
            self.store,
            self.events,
            self.handlers,
            event,
            Invocation(instance.id, cold, instance.cache, shard=instance.id),
            start_s,
            self.settings,
        )
        if end_s is not None:  # a failed instance is lost; a finished one rejoins the pool
            self.pool.release(instance, end_s)

    def pool_state(self) -> dict[str, Any] | None:
        return self.pool.state()

    def restore_pool(self, state: Mapping[str, Any]) -> None:
        self.pool.restore(state)

    def drain(self) -> None:
        while batch := next_events(self.events, self.consumer):
            for event in batch:
                self._run(event)
