"""Function workers: separate processes that run the parameter server's functions from Redis.

A worker (``amble worker --store redis://...``) is one function instance. It serves every run
registered in the Redis database (the set ``amble:namespaces``): it claims events another worker
left un-acked past the visibility timeout, else reads new ones, one at a time so work spreads over
the workers, and runs them with :func:`~amble.server.runtime.base.invoke`, which publishes what
the function emitted and acks last. Between events it keeps a warm cache per run (settings, model
template, the current model, its partial sums), so the thesis's instance reuse is real here.

Cold and warm starts are decided on the event clock, as in the embedded runtime: a worker's first
event of a run is cold; later ones are warm if they arrive within ``keep_alive_s`` of the end of its
previous one (and ``reuse`` is on), else the cache is dropped and the start is cold. In simulation
that clock is virtual, so the counts mean the same as in the embedded runtime. Beside them each worker
records its *real* figures in the run's Store (:class:`~amble.server.runtime.base.InstanceRecord`:
process start to first event done, events run), and the workers a run starts itself are an elastic,
self-healing pool (:mod:`amble.server.runtime.pool`).

The driver's side is :class:`WorkerRuntime`: its ``drain`` waits until the run's functions topic
has nothing unread or pending, and fails with a clear message, never waits forever, when no worker
is alive or nothing moves for ``drain_timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import redis

from amble.errors import AmbleError
from amble.imports import ImportPolicy, only_imports_from
from amble.redaction import REDACTED, redact, split_password
from amble.server import keys
from amble.server.events.base import Event
from amble.server.events.redis import RedisEventLog
from amble.server.runtime.base import (
    FUNCTIONS_GROUP,
    FUNCTIONS_TOPIC,
    Handler,
    HandlersFor,
    InstanceRecord,
    Invocation,
    PoolSettings,
    RealInstances,
    Runtime,
    invoke,
)
from amble.server.runtime.pool import ScalingPolicy, WorkerPool
from amble.server.store.base import Value
from amble.server.store.redis import PASSWORD_ENV, RedisStore, connect, prefix_of, server_time

NAMESPACES = "amble:namespaces"
"""The runs workers serve: a Redis set of namespaces, added by the driver when a run starts."""
HEARTBEATS = "amble:workers"
"""Worker liveness: a hash of consumer name -> Redis server time of its last loop."""
HEARTBEAT_STALE_S = 10.0


def refusals_key(namespace: str) -> str:
    """A hash of consumer -> why that worker could not load the run's spec (wiped with the run)."""
    return prefix_of(namespace) + "refusals"


def process_started_at() -> float | None:
    """Wall-clock time this process started (Linux: from /proc), None where that cannot be read.

    A worker started by the run's pool is told its spawn time instead (``--spawned-at``), which also
    counts the interpreter's start before this module was imported.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        stat = Path("/proc/stat").read_text().splitlines()
        boot_s = next(float(line.split()[1]) for line in stat if line.startswith("btime"))
        return boot_s + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass
class _Served:
    """One run as seen by this worker: its store, log, functions and this instance's warm state."""

    store: RedisStore
    events: RedisEventLog
    handlers: Mapping[str, Handler]
    settings: PoolSettings
    record: InstanceRecord
    cache: dict[str, Any] = field(default_factory=dict)
    free_at_s: float | None = None
    """Event-clock time this instance finished its last event here (None: never ran: cold)."""


class FunctionWorker:
    def __init__(
        self,
        url: str,
        handlers_for: HandlersFor,
        consumer: str | None = None,
        namespaces: list[str] | None = None,
        store_factory: Callable[[str, str, redis.Redis], RedisStore] = RedisStore,
        parent_pid: int | None = None,
        started_at_s: float | None = None,
        imports: ImportPolicy | None = None,
    ) -> None:
        self.url = url
        self.client = connect(url)
        self.handlers_for = handlers_for
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.fixed_namespaces = namespaces
        self.store_factory = store_factory
        self.parent_pid = parent_pid
        """Exit when this process is orphaned (the driver that started it died)."""
        self.started_at_s = started_at_s if started_at_s is not None else process_started_at()
        """Wall-clock time this instance's process started: where its real cold start begins."""
        self.imports = imports
        """What a run spec may make this process import (``--allow-import``); None: anything installed."""
        self.served: dict[str, _Served] = {}
        self.refused: dict[str, str] = {}
        """Runs whose spec this worker could not load, with why: skipped until the run is started again."""
        self.records: dict[str, InstanceRecord] = {}
        """This instance's figures per run, kept when the runs are reloaded (its cold start happened once)."""
        self.stopping = False
        self.invocations = 0
        self._refreshed_at = 0.0

    # -- which runs to serve ----------------------------------------------------------------------

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at < 0.5 and self.served:
            return
        self._refreshed_at = now
        self.client.hset(HEARTBEATS, self.consumer, server_time(self.client))
        if self.fixed_namespaces is not None:
            wanted = set(self.fixed_namespaces)
        else:
            wanted = {m.decode() for m in cast(set[bytes], self.client.smembers(NAMESPACES))}
        for gone in set(self.served) - wanted:
            del self.served[gone]
        for gone in [n for n in self.refused if n not in wanted or not self._still_refused(n)]:
            del self.refused[gone]  # the run left, or was wiped to start again: try it afresh
        for namespace in sorted(wanted - set(self.served) - set(self.refused)):
            try:
                served = self._load(namespace)
            except redis.RedisError:
                raise
            except Exception as exc:  # one bad run spec: skip that run, keep serving the others
                self._refuse(namespace, exc)
                continue
            if served is not None:
                self.served[namespace] = served

    def _load(self, namespace: str) -> _Served | None:
        """A run's functions and settings, rebuilt from its spec (None: not yet initialised)."""
        store = self.store_factory(self.url, namespace, self.client)
        pool = store.get(keys.POOL)
        if pool is None:  # registered but not yet initialised: try again on the next refresh
            return None
        events = RedisEventLog(self.url, namespace, self.client)
        settings = PoolSettings.from_json(pool)
        with only_imports_from(self.imports):
            handlers = self.handlers_for(store)
        record = self.records.setdefault(namespace, InstanceRecord(self.consumer, self.started_at_s))
        return _Served(store, events, handlers, settings, record)

    def _still_refused(self, namespace: str) -> bool:
        """Whether the run holds this worker's refusal still (a run started afresh was wiped first)."""
        return bool(self.client.hexists(refusals_key(namespace), self.consumer))

    def _refuse(self, namespace: str, exc: Exception) -> None:
        """Say once, on stderr and in the run's :data:`REFUSALS`, why this worker does not serve a run."""
        why = redact(str(exc) if isinstance(exc, AmbleError) else f"{type(exc).__name__}: {exc}")
        self.refused[namespace] = why
        print(f"amble worker {self.consumer}: not serving run {namespace!r}: {why}", file=sys.stderr)
        self.client.hset(refusals_key(namespace), self.consumer, why)

    # -- the loop ---------------------------------------------------------------------------------

    def step(self, block_s: float = 0.2) -> bool:
        """Run at most one event; True if one ran (or failed)."""
        self._refresh()
        if not self.served:
            time.sleep(min(block_s, 0.2))
            return False
        for run in self.served.values():
            stale = run.events.claim_stale(
                FUNCTIONS_TOPIC, FUNCTIONS_GROUP, self.consumer, run.settings.visibility_timeout_s, count=1
            )
            if stale:
                self._run(run, stale[0])
                return True
        for run in self.served.values():
            fresh = run.events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, self.consumer, count=1)
            if fresh:
                self._run(run, fresh[0])
                return True
        # Nothing anywhere: wait on one run's stream (the others are polled on the next step).
        run = next(iter(self.served.values()))
        waited = run.events.read_blocking([FUNCTIONS_TOPIC], FUNCTIONS_GROUP, self.consumer, 1, block_s)
        if waited:
            self._run(run, waited[0])
            return True
        return False

    def _run(self, run: _Served, event: Event) -> None:
        s = run.settings
        start_s = event.at_s if run.free_at_s is None else max(event.at_s, run.free_at_s)
        expired = run.free_at_s is not None and start_s - run.free_at_s > s.keep_alive_s
        cold = run.free_at_s is None or not s.reuse or expired
        if cold:
            run.cache.clear()
        invocation = Invocation(os.getpid(), cold, run.cache, shard=os.getpid())
        with only_imports_from(self.imports), self._beating(run, event):
            end_s = invoke(run.store, run.events, run.handlers, event, invocation, start_s, s)
        self.invocations += 1
        run.record.ran_one(run.store)
        if end_s is None:  # a failed instance loses its warm state
            run.cache.clear()
            run.free_at_s = None
        else:
            run.free_at_s = end_s

    @contextlib.contextmanager
    def _beating(self, run: _Served, event: Event) -> Iterator[None]:
        """While a function runs, however long: a thread writes this worker's heartbeat and keeps its
        claim on the event every quarter of the shorter of the stale-heartbeat and visibility
        timeouts, so a slow but healthy function is neither killed as wedged nor redelivered to
        another worker. A stopped or frozen process stops beating with it, and is still replaced."""
        interval_s = min(HEARTBEAT_STALE_S, run.settings.visibility_timeout_s) / 4
        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval_s):
                try:
                    self.client.hset(HEARTBEATS, self.consumer, server_time(self.client))
                    run.events.keep_claimed(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, self.consumer, event.id)
                except redis.RedisError:  # Redis restarting: the next beat tries again
                    continue

        beater = threading.Thread(target=beat, name=f"amble-heartbeat-{event.id}", daemon=True)
        beater.start()
        try:
            yield
        finally:
            done.set()
            beater.join()

    def serve(self, max_events: int | None = None, idle_exit_s: float | None = None) -> int:
        """Run events until stopped (SIGTERM/SIGINT), ``max_events`` ran, or idle for ``idle_exit_s``."""
        if self.parent_pid is not None:
            threading.Thread(target=self._exit_with_parent, daemon=True).start()
        idle_since = time.monotonic()
        try:
            while not self.stopping:
                try:
                    ran = self.step()
                except redis.ConnectionError as exc:  # Redis restarting: its clients retry, then we wait here
                    print(f"amble worker {self.consumer}: Redis unreachable ({exc}); retrying", file=sys.stderr)
                    time.sleep(1.0)
                    continue
                except redis.ResponseError as exc:  # e.g. a finished run wiped while we waited on its stream
                    print(f"amble worker {self.consumer}: {exc}; reloading the runs to serve", file=sys.stderr)
                    self.served.clear()
                    continue
                if ran:
                    idle_since = time.monotonic()
                    if max_events is not None and self.invocations >= max_events:
                        break
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
        finally:
            with contextlib.suppress(redis.ConnectionError):  # else its heartbeat goes stale by itself
                self.client.hdel(HEARTBEATS, self.consumer)
        return self.invocations

    def _exit_with_parent(self) -> None:
        """An orphaned worker leaves at once, even in the middle of a Redis retry: whatever it held
        un-acked is redelivered to the workers of whoever resumes the run."""
        while os.getppid() == self.parent_pid:
            time.sleep(0.5)
        os._exit(0)

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stopping = True


FOLDING = "amble:folding"
"""Fault injection: a hash of consumer -> pid for workers paused inside a fold's commit."""


class PausingStore(RedisStore):
    """Fault-injection aid for the crash tests (``AMBLE_FAULT_FOLD_PAUSE_S``): around committing a
    fold, the worker announces itself in :data:`FOLDING` and pauses, so a test can SIGKILL it in
    the middle of folding an update (before or after the commit)."""

    pause_s = 0.0
    consumer = ""

    def commit(self, writes: Mapping[str, tuple[Value, int]]) -> bool:
        if not any("/shard/" in key for key in writes):
            return super().commit(writes)
        self.client.hset(FOLDING, self.consumer, os.getpid())
        time.sleep(self.pause_s)  # a kill now lands before the commit: the fold must be redone
        done = super().commit(writes)
        time.sleep(self.pause_s)  # a kill now lands after it, before the ack: the redelivery must not count it again
        self.client.hdel(FOLDING, self.consumer)
        return done


def store_factory_from_env(consumer: str) -> Callable[[str, str, redis.Redis], RedisStore]:
    pause_s = float(os.environ.get("AMBLE_FAULT_FOLD_PAUSE_S", "0") or 0)
    if pause_s <= 0:
        return RedisStore

    def make(url: str, namespace: str, client: redis.Redis) -> RedisStore:
        store = PausingStore(url, namespace, client)
        store.pause_s, store.consumer = pause_s, consumer
        return store

    return make


class WorkerRuntime(Runtime):
    """The driver's view of a run served by worker processes: wait for them, never forever.

    With :meth:`start_pool` the run supervises local workers of its own; workers started elsewhere
    (``amble worker`` under systemd or Kubernetes) serve it too.
    """

    def __init__(
        self, store: RedisStore, events: RedisEventLog, settings: PoolSettings, drain_timeout_s: float
    ) -> None:
        self.store = store
        self.redis = store
        self.events = events
        self.settings = settings
        self.drain_timeout_s = drain_timeout_s
        self.pool: WorkerPool | None = None

    def drain(self) -> None:
        last: tuple[int, int, float] | None = None
        moved_at = started = time.monotonic()
        delay = 0.001
        while True:
            progress = (
                self.events.backlog(FUNCTIONS_TOPIC, FUNCTIONS_GROUP),
                self.events.pending(FUNCTIONS_TOPIC, FUNCTIONS_GROUP),
                self.store.counter(keys.INVOCATIONS),
            )
            if progress[:2] == (0, 0):
                return
            now = time.monotonic()
            if progress != last:
                last, moved_at, delay = progress, now, 0.001
            elif now - moved_at > self.drain_timeout_s:
                raise AmbleError(
                    f"the function workers made no progress for {self.drain_timeout_s:g} s "
                    f"({progress[0]} events unread, {progress[1]} pending) on {redact(self.redis.url)}: "
                    f"check the `amble worker` logs, or raise server.drain_timeout_s{self._refusals()}"
                )
            if self.pool is not None and self.pool.failure is not None:
                raise AmbleError(self.pool.failure)
            if now - moved_at > 1.0:  # stalled: did the run's own workers refuse its spec?
                self._check_own_workers_serve()
            if now - started > HEARTBEAT_STALE_S:  # workers started along with the run get time to come up
                self._check_alive()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _check_alive(self) -> None:
        if self.pool is not None and (self.pool.policy.min_instances > 0 or self.pool.policy.autoscale):
            return  # the pool starts (and replaces) instances while events wait
        beats = cast(dict[bytes, bytes], self.redis.client.hgetall(HEARTBEATS))
        now = server_time(self.redis.client)
        if any(now - float(t) < HEARTBEAT_STALE_S for t in beats.values()):
            return
        url = redact(self.redis.url)
        raise AmbleError(
            f"no amble worker is serving {url}: start some with "
            f"`amble worker --store {url}`, or set server.workers: N to start N local ones{self._refusals()}"
        )

    def _refusals(self) -> str:
        """What workers said when they could not load this run's spec, for the driver's messages."""
        said = cast(dict[bytes, bytes], self.redis.client.hgetall(refusals_key(self.redis.namespace)))
        reasons = sorted({why.decode() for why in said.values()})
        return f". Workers refused this run: {'; '.join(reasons)}" if reasons else ""

    def _check_own_workers_serve(self) -> None:
        """The workers this run started serve it alone, with its own allow-list: if one could not load
        the run's spec, none of them will, so fail now, saying why, rather than at the drain timeout."""
        if self.pool is None:
            return
        said = cast(dict[bytes, bytes], self.redis.client.hgetall(refusals_key(self.redis.namespace)))
        own = {instance.consumer.encode() for instance in list(self.pool.instances)}
        for consumer, why in said.items():
            if consumer in own:
                raise AmbleError(f"the run's `amble worker` processes cannot load its spec: {why.decode()}")

    def start_pool(self, policy: ScalingPolicy, allow_imports: Sequence[str] = ()) -> None:
        """Supervise local ``amble worker`` processes serving this run as ``policy`` says (stopped by
        ``close``): at least ``min_instances``, replaced when they die or wedge, more while events wait.
        They may import the packages ``allow_imports`` (those the run's own config names) and no other.
        A password in the store URL reaches them in their environment, never on their command line."""
        if policy.min_instances == 0 and not policy.autoscale:
            return
        options = ["--namespace", self.redis.namespace, "--parent-pid", str(os.getpid())]
        for package in allow_imports:
            options += ["--allow-import", package]
        base = worker_command(redact(self.redis.url), *options)
        password = split_password(self.redis.url)[1]
        env = {**os.environ, PASSWORD_ENV: password} if password is not None and password != REDACTED else None
        self.pool = WorkerPool(
            self.redis.client,
            HEARTBEATS,
            lambda options: [*base, *options],
            lambda: (
                self.events.backlog(FUNCTIONS_TOPIC, FUNCTIONS_GROUP)
                + self.events.pending(FUNCTIONS_TOPIC, FUNCTIONS_GROUP)
            ),
            policy,
            env=env,
        )
        self.pool.start()

    def real_instances(self) -> dict[str, Any] | None:
        figures = self.pool.figures if self.pool is not None else RealInstances()
        return figures.summary(InstanceRecord.all_in(self.store))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def worker_command(url: str, *options: str) -> list[str]:
    """The command line of an ``amble worker`` serving the Redis at ``url``, with ``options``."""
    return [sys.executable, "-m", "amble", "worker", "--store", url, *options]
