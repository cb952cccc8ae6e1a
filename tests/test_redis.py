"""The Redis Store and EventLog against the same contracts as the embedded ones, on a real redis-server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace

import pytest
import redis
import torch

from amble.errors import ConfigError
from amble.server import ParameterServer, RunSettings, keys
from amble.server.events.base import Event, EventLog
from amble.server.events.redis import RedisEventLog
from amble.server.records.partialsum import BYTES_PER_WEIGHT, MAX_BLOCKS, FoldRecord, PartialSum, shard_size_bound
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation, PoolSettings, Runtime
from amble.server.runtime.local import LocalRuntime
from amble.server.runtime.workers import FunctionWorker, WorkerRuntime
from amble.server.store.base import Store
from amble.server.store.redis import RedisStore, connect, wipe
from amble.server.tensors import TensorSpec, template_of
from tests.conftest import RedisServer
from tests.contract.events_contract import EventLogContract
from tests.contract.runtime_contract import HandlersFor, RuntimeContract
from tests.contract.store_contract import StoreContract


class TestRedisStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.url = redis_server.url

    def make(self) -> Store:
        return RedisStore(self.url, f"test-{uuid.uuid4().hex}")


class TestRedisEventLog(EventLogContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.url = redis_server.url

    def make(self) -> EventLog:
        return RedisEventLog(self.url, f"test-{uuid.uuid4().hex}")


def test_namespaces_are_isolated_and_wipe_removes_only_its_own(redis_server: RedisServer) -> None:
    a, b = RedisStore(redis_server.url, "ns-a*"), RedisStore(redis_server.url, "ns-a")
    a.put("k", b"1")
    a.incr("c")
    a.add_to_set("s", "m")
    RedisEventLog(redis_server.url, "ns-a*").publish("t", "e", {})
    b.put("k", b"2")
    assert a.get("k") == b"1" and b.get("k") == b"2"
    # value, versions, index, counters, the increment's one-time token, set, stream
    assert wipe(connect(redis_server.url), "ns-a*") == 7
    assert a.get("k") is None and a.counter("c") == 0 and a.keys("") == []
    assert b.get("k") == b"2"  # the glob in the other name did not match this one


def test_a_non_redis_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="redis://HOST:PORT/DB"):
        RedisStore("memory", "x")


def test_values_survive_a_redis_restart_with_aof(tmp_path: pytest.TempPathFactory) -> None:
    server = RedisServer(tmp_path / "aof", appendonly=True)  # type: ignore[operator]
    try:
        store = RedisStore(server.url, "durable")
        store.put("model", b"weights")
        store.incr("uploads", 3)
        server.kill()
        server.start()
        assert store.get("model") == b"weights"  # the client reconnected by itself
        assert store.counter("uploads") == 3
    finally:
        server.stop()


class _ThreadedWorkers(WorkerRuntime):
    """The worker runtime with its workers as threads of this process (same code as `amble worker`)."""

    def __init__(self, store: RedisStore, events: RedisEventLog, handlers_for: HandlersFor, settings: PoolSettings):
        super().__init__(store, events, settings, drain_timeout_s=30.0)
        store.put(keys.POOL, settings.to_json())
        self.workers = [
            FunctionWorker(store.url, handlers_for, f"w{i}", [store.namespace]) for i in range(settings.max_instances)
        ]
        self.threads = [threading.Thread(target=w.serve, daemon=True) for w in self.workers]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(timeout=5)


class RedisRuntimeContract(RuntimeContract):
    """The runtime contract for runtimes whose instances share a run through Redis (one namespace per
    test); ``make`` appends its runtime to ``self.runtimes`` to have it closed after the test."""

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> Iterator[None]:
        self.url = redis_server.url
        self.runtimes: list[Runtime] = []
        yield
        for runtime in self.runtimes:
            runtime.close()

    def make_store(self) -> Store:
        self.namespace = f"test-{uuid.uuid4().hex}"
        return RedisStore(self.url, self.namespace)

    def make_events(self) -> EventLog:
        return RedisEventLog(self.url, self.namespace)


class TestWorkerRuntime(RedisRuntimeContract):
    """Real workers: claims after a (short) visibility timeout, warm caches, cold/warm on the event clock."""

    def make(self, store: Store, events: EventLog, handlers_for: HandlersFor, settings: PoolSettings) -> Runtime:
        assert isinstance(store, RedisStore) and isinstance(events, RedisEventLog)
        if settings.visibility_timeout_s == PoolSettings().visibility_timeout_s:  # retries within the test's time
            settings = replace(settings, visibility_timeout_s=0.05)
        runtime = _ThreadedWorkers(store, events, handlers_for, settings)
        self.runtimes.append(runtime)
        return runtime

    def test_simultaneous_events_start_parallel_instances_up_to_the_limit(self) -> None:
        # Real workers take events as they free up, so "simultaneous" needs events that keep a worker busy.
        _, events, runtime = self._setup(
            _busy_handlers, max_instances=2, keep_alive_s=100.0, cold_start_s=1.0, visibility_timeout_s=10.0
        )
        for _ in range(4):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=0.0)
        runtime.drain()
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (2, 2)


def _busy_handlers(store: Store) -> Mapping[str, Handler]:
    def handle(event: Event, inv: Invocation) -> None:
        time.sleep(0.3)

    return {"work": handle}


# -- item: a value larger than Redis can hold is refused before the run ------------------------------


def test_the_shard_size_bound_covers_real_shards() -> None:
    # Prepare: a template with 1- to 4-dimensional tensors and a round of 7 folds with statistics
    shapes = {"w": (3, 4), "conv.weight": (2, 3, 5, 5), "a.long.layer.name.bias": (11,)}
    template = {name: TensorSpec(shape, "float32") for name, shape in shapes.items()}
    sums = PartialSum.zeros(template)
    for device in range(7):
        update = {name: torch.full(shape, float(device)) for name, shape in shapes.items()}
        sums.add(device, update, 3.0, FoldRecord(1.5, {"samples": 10.0, "steps": 2.0}))

    # Execute
    actual, bound = len(sums.to_blob()), shard_size_bound(template, 7)

    # Assert: an upper bound, and within the header and record allowances of it (these folds are
    # all in one block: a shard can hold up to MAX_BLOCKS)
    weights = 12 + 150 + 11
    assert len(sums.blocks) == 1
    assert 8 * weights < actual <= bound <= BYTES_PER_WEIGHT * weights + 8 * 1024
    assert MAX_BLOCKS * 8 == BYTES_PER_WEIGHT


@pytest.fixture(scope="module")
def small_values_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis whose values may hold at most 1 MiB (its smallest allowed proto-max-bulk-len)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-1mb"), extra_args=("--proto-max-bulk-len", "1mb"))
    server.start()
    yield server
    server.stop()


def test_a_model_whose_shard_exceeds_a_redis_value_is_refused_up_front(small_values_redis: RedisServer) -> None:
    # Prepare: 1 MiB values hold the MAX_BLOCKS (4) int64 blocks of 32,768 weights, less the header:
    # 30,000 fit, 35,000 do not.
    store = RedisStore(small_values_redis.url, f"limits-{uuid.uuid4().hex}")
    events = RedisEventLog(small_values_redis.url, store.namespace, store.client)
    server = ParameterServer(store, events, LocalRuntime(store, events, {}))
    settings = RunSettings(seed=0, devices_per_round=4, quorum=1.0, max_update_bytes=256 * 2**20)
    fits, too_large = {"w": torch.zeros(30_000)}, {"w": torch.zeros(35_000)}

    # Execute / Assert: the limit is the server's own, and the refusal says what to do
    assert store.max_value_bytes() == 2**20
    with pytest.raises(ConfigError, match=r"35,000 weights.*proto-max-bulk-len.*server\.store: memory"):
        server.initialize(too_large, {0: 10}, settings)
    assert store.get(keys.LATEST) is None  # nothing was published
    server.initialize(fits, {0: 10}, settings)
    assert store.get(keys.LATEST) is not None

    # Assert: the check matches what this Redis accepts: the largest shard of the model that fits is
    # stored, one of the refused model is refused by Redis itself.
    def shard(params: Mapping[str, torch.Tensor]) -> bytes:
        """The largest shard of the model: weights 2**20 apart put each fold in a block of its own."""
        sums = PartialSum.zeros(template_of(params))
        ones = {name: torch.ones_like(t) for name, t in params.items()}
        for device in range(MAX_BLOCKS):
            assert sums.add(device, ones, 2.0 ** (20 * device), FoldRecord(1.0, {"samples": 10.0}))
        assert len(sums.blocks) == MAX_BLOCKS
        return sums.to_blob()

    store.put("shard-that-fits", shard(fits))
    with pytest.raises(redis.RedisError):
        store.put("shard-too-large", shard(too_large))
    store.close()
