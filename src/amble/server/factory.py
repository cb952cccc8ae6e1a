"""Builds the parameter server a config names: store, event log and runtime (embedded, Redis workers or Ray).

Shared by the simulator and the live path (``amble serve``); strategies come from :mod:`amble.strategies.registry`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amble import raycluster
from amble.config import ExperimentConfig, ServerConfig, config_from_dict, config_to_dict
from amble.errors import AmbleError
from amble.imports import packages_named
from amble.server import LocalRuntime, MemoryEventLog, MemoryStore, ParameterServer, PoolSettings, ServerFunctions, keys
from amble.server.events.redis import RedisEventLog
from amble.server.runtime.base import Handler
from amble.server.runtime.onray import RayRuntime
from amble.server.runtime.pool import ScalingPolicy
from amble.server.runtime.workers import HEARTBEAT_STALE_S, NAMESPACES, WorkerRuntime
from amble.server.store.base import Store
from amble.server.store.redis import RedisStore, wipe
from amble.strategies import Strategy
from amble.strategies.registry import build_strategy


def pool_settings(server: ServerConfig) -> PoolSettings:
    return PoolSettings(
        max_instances=server.max_instances,
        keep_alive_s=server.keep_alive_s,
        reuse=server.reuse,
        cold_start_s=server.cold_start_s,
        invocation_s=None if server.invocation_s == "measured" else server.invocation_s,
        max_attempts=server.max_attempts,
        visibility_timeout_s=server.visibility_timeout_s,
    )


def scaling_policy(server: ServerConfig) -> ScalingPolicy:
    """The real worker pool of a Redis run. A worker is wedged when silent for the visibility timeout
    (its events are being claimed by others by then), and never sooner than a worker is deemed gone."""
    return ScalingPolicy(
        min_instances=server.workers,
        max_instances=server.max_instances,
        autoscale=server.autoscale,
        keep_alive_s=server.keep_alive_s,
        reuse=server.reuse,
        wedged_after_s=max(server.visibility_timeout_s, HEARTBEAT_STALE_S),
    )


def build_embedded_server(strategy: Strategy, server: ServerConfig, snapshot: Path | None = None) -> ParameterServer:
    """The embedded parameter server: in-memory Store (loaded from ``snapshot`` to resume) and
    EventLog, in-process Runtime."""
    store = MemoryStore.load(snapshot) if snapshot is not None else MemoryStore()
    events = MemoryEventLog()
    functions = ServerFunctions(store, strategy)
    runtime = LocalRuntime(store, events, functions.handlers(), pool_settings(server))
    return ParameterServer(store, events, runtime)


def build_server(
    config: ExperimentConfig, strategy_index: int, namespace: str, snapshot: Path | None = None
) -> ParameterServer:
    """The parameter server ``config.server.store`` names, set up for one strategy of ``config``.

    To resume, pass the embedded store's ``snapshot`` file; a Redis run resumes from what its
    ``namespace`` holds (:func:`wipe_run` clears it for a fresh start). With Redis, functions run in
    ``amble worker`` processes, ``server.workers`` of them started here.
    """
    strategy = build_strategy(config.strategies[strategy_index], config)
    if config.server.store == "memory":
        return build_embedded_server(strategy, config.server, snapshot)
    store = RedisStore(config.server.store, namespace)
    events = RedisEventLog(config.server.store, namespace, store.client)
    # What a function instance needs to rebuild this run's functions (its password shown as ***).
    store.put(keys.RUN_SPEC, json.dumps({"config": config_to_dict(config), "strategy": strategy_index}).encode())
    store.put(keys.POOL, pool_settings(config.server).to_json())
    if config.server.runtime == "ray":
        raycluster.connect(config.ray.address, config.ray.num_cpus)
        on_ray = RayRuntime(
            store, events, handlers_from_store, pool_settings(config.server), config.server.drain_timeout_s
        )
        return ParameterServer(store, events, on_ray)
    runtime = WorkerRuntime(store, events, pool_settings(config.server), config.server.drain_timeout_s)
    store.client.sadd(NAMESPACES, namespace)  # the run joins the list `amble worker` processes serve
    runtime.start_pool(scaling_policy(config.server), packages_named(config_to_dict(config)))
    return ParameterServer(store, events, runtime)


def discard_snapshot(snapshot: Path) -> None:
    """Remove an embedded store's snapshot (and its journal) once its run is done."""
    MemoryStore.discard(snapshot)


def saved_checkpoint(config: ExperimentConfig, namespace: str, snapshot: Path) -> dict[str, Any] | None:
    """The driver checkpoint a run left in its store (Redis namespace or embedded snapshot file)."""
    if config.server.store == "memory":
        store: Store | None = MemoryStore.load(snapshot) if snapshot.is_file() else None
    else:
        store = RedisStore(config.server.store, namespace)
    if store is None:
        return None
    blob = store.get(keys.CHECKPOINT)
    store.close()
    checkpoint: dict[str, Any] | None = json.loads(blob) if blob is not None else None
    return checkpoint


def wipe_run(config: ExperimentConfig, namespace: str) -> None:
    """Forget a run's state in a shared store (a no-op for the embedded one, which dies with its process)."""
    if config.server.store != "memory":
        store = RedisStore(config.server.store, namespace)
        wipe(store.client, namespace)
        store.close()


def release_server(server: ParameterServer) -> None:
    """Stop the run's local workers and take it off the list workers serve (its state stays)."""
    if isinstance(server.runtime, WorkerRuntime):
        server.runtime.redis.client.srem(NAMESPACES, server.runtime.redis.namespace)
    server.runtime.close()
    server.store.close()


def handlers_from_store(store: Store) -> Mapping[str, Handler]:
    """A run's function handlers, rebuilt from the spec its driver left in the Store (for workers)."""
    blob = store.get(keys.RUN_SPEC)
    if blob is None:
        raise AmbleError("this run has no spec in the store: it was not started by `amble run`")
    spec = json.loads(blob)
    config = config_from_dict(spec["config"], "the run spec in the store")
    strategy = build_strategy(config.strategies[int(spec["strategy"])], config)
    return ServerFunctions(store, strategy).handlers()
