"""The Ray Runtime: the parameter server's functions run on Ray actors, the warm instances.

The driver consumes the functions topic and decides, on the virtual clock and with the same
:class:`~amble.server.runtime.local.InstancePool` as the embedded runtime, which instance runs each
event and whether it starts cold; so for a fixed seed the cold/warm counts and event times match the
embedded run. Each live instance is one Ray actor, created when the pool opens a new instance
(never more than ``max_instances``) and stopped when its instance expires on the virtual clock
(idle past ``keep_alive_s``, or used once with ``reuse`` off): the pool scales between 0 and
``max_instances``. Actors run their calls in order, so events on different instances run in
parallel and events on one instance run one after another, as a serverless platform would. The last
event of each pass waits for the others, so the fold that completes a round (and the virtual time
of its ``round_ready``) is the one the embedded runtime picks: a Ray run keeps the embedded run's
virtual times, with ``invocation_s`` fixed.

An actor is stateless beyond its warm cache: it reads and writes the run's state in Redis (the
store every node can reach) and runs :func:`~amble.server.runtime.base.invoke`, which publishes what
the function emitted and acks last. An actor that dies mid-event leaves the event pending; the next
pass redelivers it to another actor, and an event whose instance died ``max_attempts`` times is
dead-lettered. Events travel to actors as JSON.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from amble.errors import AmbleError
from amble.raycluster import import_ray
from amble.server import keys
from amble.server.events.base import Event
from amble.server.events.redis import RedisEventLog
from amble.server.runtime.base import (
    HandlersFor,
    InstanceRecord,
    Invocation,
    PoolSettings,
    RealInstances,
    Runtime,
    dead_letter,
    invoke,
    next_events,
)
from amble.server.runtime.local import InstancePool, PoolInstance
from amble.server.store.redis import RedisStore


class FunctionInstance:
    """One function instance, as a Ray actor: its own connections, handlers and warm cache."""

    def __init__(
        self, url: str, namespace: str, handlers_for: HandlersFor, settings: str, slot: int, created_at_s: float
    ) -> None:
        self.store = RedisStore(url, namespace)
        self.events = RedisEventLog(url, namespace, self.store.client)
        self.handlers = handlers_for(self.store)
        self.settings = PoolSettings.from_json(settings.encode())
        self.slot = slot
        self.cache: dict[str, Any] = {}
        self.fresh = True
        """Nothing cached yet (just started, or the last invocation failed and lost the cache)."""
        self.record = InstanceRecord(f"ray-{os.getpid()}-{slot}", created_at_s)
        """Its real figures; its cold start counts from the driver's request to create it."""

    def run(self, event: str, instance_id: int, cold: bool, start_s: float) -> str:
        """Run one event (as JSON); returns JSON ``{"end_s": float | null}`` (null: the function failed)."""
        data = json.loads(event)
        cold = cold or self.fresh
        if cold:
            self.cache.clear()
        invocation = Invocation(instance_id, cold, self.cache, shard=self.slot)
        end_s = invoke(self.store, self.events, self.handlers, Event(**data), invocation, start_s, self.settings)
        self.fresh = end_s is None
        self.record.ran_one(self.store)
        return json.dumps({"end_s": end_s})

    def ready(self) -> bool:
        return True


@dataclass
class _Actor:
    handle: Any
    slot: int
    """Which shard of a round's partial sums this actor folds into (unique per actor)."""


class RayRuntime(Runtime):
    def __init__(
        self,
        store: RedisStore,
        events: RedisEventLog,
        handlers_for: HandlersFor,
        settings: PoolSettings,
        drain_timeout_s: float = 120.0,
        consumer: str = "ray-driver",
    ) -> None:
        self.ray = import_ray()
        self.store = store
        self.redis = store
        self.events = events
        self.handlers_for = handlers_for
        self.types = set(handlers_for(store))
        self.settings = settings
        self.drain_timeout_s = drain_timeout_s
        self.consumer = consumer
        self.pool = InstancePool(settings)
        self.actors: dict[int, _Actor] = {}
        """The actor running each live virtual instance (by instance id)."""
        self.spare: list[_Actor] = []
        """Actors whose instance expired: the next new instance takes one over (cold)."""
        self._slots = 0
        self.figures = RealInstances()
        """Real actors: started, died (and replaced), peak; retired when their instance expired."""
        self._to_replace = 0
        self.now_s = 0.0
        """The latest event time seen: the virtual clock the pool expires instances on."""
        # Ray pickles the actor's constructor arguments: give it the handler factory, never the handlers.
        self._actor_class = self.ray.remote(num_cpus=0, max_restarts=0)(FunctionInstance)

    @property
    def actor_count(self) -> int:
        return len(self.actors) + len(self.spare)

    def _actor_for(self, instance: PoolInstance) -> _Actor:
        live = {i.id for i in self.pool.idle} | {instance.id}
        for instance_id in [i for i in self.actors if i not in live]:
            self.spare.append(self.actors.pop(instance_id))  # its instance expired
        actor = self.actors.get(instance.id)
        if actor is None:
            if self.spare:
                actor = self.spare.pop()
            else:
                self._slots += 1
                handle = self._actor_class.remote(
                    self.redis.url,
                    self.redis.namespace,
                    self.handlers_for,
                    self.settings.to_json().decode(),
                    self._slots,
                    time.time(),
                )
                actor = _Actor(handle, self._slots)
                self.figures.started += 1
                if self._to_replace:
                    self._to_replace -= 1
                    self.figures.replacements += 1
            self.actors[instance.id] = actor
        self.figures.peak = max(self.figures.peak, self.actor_count)
        return actor

    def drain(self) -> None:
        try:
            self._drain()
        finally:
            self._retire_expired()

    def _drain(self) -> None:
        # Everything pending was handed to an actor of an earlier pass that has since returned or died.
        while ordered := next_events(self.events, self.consumer):
            calls: list[tuple[Event, PoolInstance, _Actor, Any]] = []
            for position, event in enumerate(ordered):
                if position and position == len(ordered) - 1:
                    # The last event runs once the others have finished, as it would in the embedded
                    # runtime: then the fold that completes a round, and the virtual time its
                    # round_ready carries, do not depend on which actor happened to finish first.
                    self._collect(calls)
                    calls = []
                if event.type not in self.types:
                    dead_letter(self.store, self.events, event, f"no function handles events of type '{event.type}'")
                    continue
                if event.deliveries > self.settings.max_attempts:  # its instance died every time
                    last = (self.store.get(keys.last_error(event.id)) or b"").decode()
                    reason = f"its function instance died {event.deliveries - 1} times; last error: {last}"
                    dead_letter(self.store, self.events, event, reason)
                    continue
                self.now_s = max(self.now_s, event.at_s)
                instance, start_s, cold = self.pool.acquire(event.at_s)
                actor = self._actor_for(instance)
                body = json.dumps(asdict(event))
                calls.append((event, instance, actor, actor.handle.run.remote(body, instance.id, cold, start_s)))
                # Later events of this pass may queue on the instance: free it when it should end
                # (exactly, with a fixed invocation_s; corrected from the actor's answer otherwise).
                self.pool.release(instance, self.settings.end_s(start_s, cold, busy_s=0.0))
            self._collect(calls)

    def _collect(self, calls: list[tuple[Event, PoolInstance, _Actor, Any]]) -> None:
        ray = self.ray
        for event, instance, actor, ref in calls:
            try:
                result = json.loads(ray.get(ref, timeout=self.drain_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise AmbleError(
                    f"a function actor ran event {event.id} ({event.type}) for over {self.drain_timeout_s:g} s: "
                    "check the Ray logs, or raise server.drain_timeout_s"
                ) from None
            except ray.exceptions.RayError as exc:
                # The instance died (or could not start): its event stays pending for redelivery to
                # another, with what killed it kept where a dead letter will report it.
                self.store.put(keys.last_error(event.id), f"{type(exc).__name__}: {exc}"[-2000:].encode())
                self.pool.discard(instance)
                self._forget(actor)
                self.figures.died += 1
                self._to_replace += 1
                continue
            if result["end_s"] is None:  # the function failed: its instance is lost (its next start is cold)
                self.pool.discard(instance)
            else:  # (back) in the pool, even if an earlier event of this pass failed on it: it is warm
                self.pool.discard(instance)
                self.pool.release(instance, max(instance.free_at_s, float(result["end_s"])))

    def _forget(self, actor: _Actor) -> None:
        for instance_id, held in list(self.actors.items()):
            if held is actor:
                del self.actors[instance_id]
        if actor in self.spare:
            self.spare.remove(actor)

    def _retire_expired(self) -> None:
        """Stop the actors of instances that expired on the virtual clock (idle past ``keep_alive_s``, or
        used once with ``reuse`` off): the pool shrinks as the embedded one does, to nothing when every
        instance has expired, and a retired actor never held an instance the pool still counts warm."""
        self.pool.expire(self.now_s)
        live = {instance.id for instance in self.pool.idle}
        for instance_id in [i for i in self.actors if i not in live]:
            self.spare.append(self.actors.pop(instance_id))
        for actor in self.spare:
            self.ray.kill(actor.handle, no_restart=True)
        self.figures.retired += len(self.spare)
        self.spare = []

    def real_instances(self) -> dict[str, Any] | None:
        return self.figures.summary(InstanceRecord.all_in(self.store))

    def close(self) -> None:
        for actor in [*self.actors.values(), *self.spare]:
            self.ray.kill(actor.handle, no_restart=True)
        self.actors, self.spare = {}, []
