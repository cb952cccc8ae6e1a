"""An elastic, self-healing pool of ``amble worker`` processes for one run on Redis.

The thesis' parameter server is serverless: instances appear when events arrive, are reused while
warm, and disappear when idle. A supervisor thread in the driver looks at the run every
``tick_s`` and

- **replaces** an instance that died (SIGKILL, a crash) — everything it held un-acked is claimed by
  another after the visibility timeout, so nothing is lost, only delayed;
- **replaces a wedged one**: an instance whose heartbeat (written on every pass of its loop, and by a
  thread while a function runs) is older than ``wedged_after_s`` (SIGSTOP, a frozen process) is
  SIGKILLed and replaced rather than waited for;
- **scales with the queue** (``autoscale``): it starts instances while more events wait (unread or
  pending) than ``events_per_instance`` per live instance, up to ``max_instances``;
- **scales to zero**: instances above ``min_instances`` are started with ``--idle-exit-s
  keep_alive_s`` and leave by themselves once idle that long (without ``reuse``, after one event).

``min_instances`` (``server.workers``) instances are always kept, replaced when they die. Real cold
starts are measured by the instances themselves (:class:`~amble.server.runtime.base.InstanceRecord`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import redis

from amble.server.runtime.base import RealInstances
from amble.server.store.redis import server_time

CRASH_LOOP = 5
"""Instances in a row that exit with an error at start (before their first heartbeat): the pool
stops replacing them and the run fails with their messages."""
START_GRACE_S = 60.0
"""How long a starting instance (importing torch, connecting) may go without a heartbeat."""


@dataclass(frozen=True)
class ScalingPolicy:
    """How many instances the pool keeps: a small policy object (STYLE: passed in, not hard-wired)."""

    min_instances: int = 0
    max_instances: int = 4
    autoscale: bool = False
    keep_alive_s: float = 60.0
    reuse: bool = True
    """False: an instance runs one event and leaves (a fresh instance per event)."""
    wedged_after_s: float = 30.0
    events_per_instance: int = 1

    def wanted(self, waiting: int, alive: int) -> int:
        """Instances to have alive when ``waiting`` events wait and ``alive`` instances are up.

        Never fewer than ``min_instances``; with ``autoscale``, enough for the queue up to
        ``max_instances``. Never asks to stop any: surplus instances retire when idle.
        """
        wanted = self.min_instances
        if self.autoscale and waiting > 0:
            wanted = max(wanted, min(self.max_instances, math.ceil(waiting / self.events_per_instance)))
        return max(wanted, alive)


@dataclass
class _Instance:
    process: subprocess.Popen[bytes]
    consumer: str
    spawned_at: float
    """time.monotonic() at start."""
    kept: bool
    """One of the ``min_instances`` (never told to retire), else a burst instance."""
    beat: bool = False
    """Seen a heartbeat from it at least once."""


class WorkerPool:
    """Supervises the local ``amble worker`` processes of one run (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        heartbeats: str,
        command: Callable[[list[str]], list[str]],
        waiting: Callable[[], int],
        policy: ScalingPolicy,
        tick_s: float = 0.2,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.env = env
        """The instances' environment (None: this process's): how a secret reaches them, never argv."""
        self.heartbeats = heartbeats
        self.command = command
        self.waiting = waiting
        self.policy = policy
        self.tick_s = tick_s
        self.instances: list[_Instance] = []
        self.figures = RealInstances()
        self.failure: str | None = None
        """Why the pool gave up (a crash loop at start), for the driver to raise."""
        self._to_replace = 0
        self._failed_starts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._scale()
        self._thread = threading.Thread(target=self._loop, name="amble-worker-pool", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop supervising, then SIGTERM every instance (SIGKILL what outlives ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            processes = [i.process for i in self.instances]
            now = time.monotonic()
            self.figures.instance_s += sum(now - i.spawned_at for i in self.instances)
            self.instances = []
        stop_processes(processes, timeout_s)

    def alive(self) -> list[int]:
        """The pids of the instances alive now."""
        with self._lock:
            return [i.process.pid for i in self.instances if i.process.poll() is None]

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                with self._lock:
                    self.tick()
            except redis.RedisError:  # Redis restarting: supervise again on the next tick
                continue
            except Exception as exc:
                print(f"amble worker pool: {type(exc).__name__}: {exc}; supervising on", file=sys.stderr)

    # -- one look at the run ----------------------------------------------------------------------

    def tick(self) -> None:
        """Reap the dead, kill the wedged, start what is wanted (the lock is held)."""
        self._reap()
        self._kill_wedged()
        self._scale()

    def _reap(self) -> None:
        for instance in [i for i in self.instances if i.process.poll() is not None]:
            self.instances.remove(instance)
            self.figures.instance_s += time.monotonic() - instance.spawned_at  # exited within a tick
            self.client.hdel(self.heartbeats, instance.consumer)  # a later process may get its pid
            code = instance.process.returncode
            if code == 0 and (not instance.kept or not self.policy.reuse):
                self.figures.retired += 1  # idle for keep_alive_s, or its one event done
                continue
            self.figures.died += 1
            self._to_replace += 1
            # A process that exits with an error before its first heartbeat could not start (a bad
            # URL, a missing package): replacing it forever would hide that. A killed one is not that.
            self._failed_starts = self._failed_starts + 1 if code > 0 and not instance.beat else 0
            if self._failed_starts >= CRASH_LOOP and self.failure is None:
                self.failure = (
                    f"{CRASH_LOOP} local `amble worker` processes in a row exited at start (last exit status "
                    f"{code}); their messages are above: fix what they say (the Redis URL or password?)"
                )

    def _kill_wedged(self) -> None:
        beats = cast(dict[bytes, bytes], self.client.hgetall(self.heartbeats))
        server_now_s = server_time(self.client)
        now = time.monotonic()
        for instance in self.instances:
            beat = beats.get(instance.consumer.encode())
            if beat is not None:
                instance.beat = True
                silent_s = server_now_s - float(beat)
            else:
                silent_s = now - instance.spawned_at - (START_GRACE_S if not instance.beat else 0.0)
            if silent_s > self.policy.wedged_after_s and instance.process.poll() is None:
                instance.process.kill()  # SIGKILL works on a stopped process too
                instance.process.wait()
                self.instances.remove(instance)
                self.figures.instance_s += time.monotonic() - instance.spawned_at
                self.client.hdel(self.heartbeats, instance.consumer)
                self.figures.wedged += 1
                self._to_replace += 1
                return  # the list changed: the rest on the next tick

    def _scale(self) -> None:
        if self.failure is not None:
            return
        alive = len(self.instances)
        wanted = self.policy.wanted(self.waiting() if self.policy.autoscale else 0, alive)
        kept = sum(1 for i in self.instances if i.kept)
        for _ in range(wanted - alive):
            self._start(kept=kept < self.policy.min_instances)
            kept += 1
        self.figures.peak = max(self.figures.peak, len(self.instances))

    def _start(self, kept: bool) -> None:
        options = ["--spawned-at", repr(time.time())]
        if not self.policy.reuse:
            options += ["--max-events", "1"]
        elif not kept:
            options += ["--idle-exit-s", repr(self.policy.keep_alive_s)]
        process = subprocess.Popen(self.command(options), stdin=subprocess.DEVNULL, env=self.env)
        self.instances.append(_Instance(process, f"{socket.gethostname()}-{process.pid}", time.monotonic(), kept))
        self.figures.started += 1
        if self._to_replace:
            self._to_replace -= 1
            self.figures.replacements += 1


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    """SIGTERM each process (a worker finishes its event and leaves), SIGKILL what outlives ``timeout_s``.

    A stopped (SIGSTOPped) process is sent SIGCONT too, or it could not act on the SIGTERM."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
