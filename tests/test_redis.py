"""The Redis Store and EventLog against the same contracts as the embedded ones, on a real redis-server."""

from __future__ import annotations

import uuid

import pytest

from amble.errors import ConfigError
from amble.server.events.base import EventLog
from amble.server.events.redis import RedisEventLog
from amble.server.store.base import Store
from amble.server.store.redis import RedisStore, connect, wipe
from tests.conftest import RedisServer
from tests.contract.events_contract import EventLogContract
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
    assert wipe(connect(redis_server.url), "ns-a*") == 5  # value, index, counters, set, stream
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
