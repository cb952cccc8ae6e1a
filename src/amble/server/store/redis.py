"""The Store on Redis: the state of a run outlives its processes and is shared by worker processes.

Layout, all under one namespace prefix ``amble:{namespace}:`` so runs never see each other:

- ``v:{key}`` a hash ``{value, version}`` per value key; writes go through Lua scripts, so a
  compare-and-set is one atomic step on the server;
- ``index`` a sorted set of the value keys (score 0, ordered lexically) for prefix listings;
- ``counters`` one hash of float counters (``HINCRBYFLOAT``);
- ``s:{key}`` a Redis set per set key.

The client retries a dropped connection with backoff, so a Redis restart (with AOF on, nothing is
lost) shows up as a pause rather than a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from amble.errors import ConfigError
from amble.server.store.base import Store, Versioned

_PUT = """
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'value', ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return version
"""

_CAS = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'version', current + 1)
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
"""

_COMMIT = """
local n = #KEYS - 1
for i = 1, n do
  if tonumber(redis.call('HGET', KEYS[i], 'version') or '0') ~= tonumber(ARGV[n + i]) then return 0 end
end
for i = 1, n do
  redis.call('HSET', KEYS[i], 'value', ARGV[i], 'version', tonumber(ARGV[n + i]) + 1)
  redis.call('ZADD', KEYS[n + 1], 0, ARGV[2 * n + i])
end
return 1
"""

_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def connect(url: str) -> redis.Redis:
    """A client for ``redis://HOST:PORT/DB`` that survives a restarting server for about a minute."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"store URL '{url}' is not a Redis URL: use redis://HOST:PORT/DB (e.g. redis://127.0.0.1:6379/0)"
        )
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=40)
    return redis.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )


def escape_glob(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def prefix_of(namespace: str) -> str:
    return f"amble:{namespace}:"


def wipe(client: redis.Redis, namespace: str) -> int:
    """Delete every key of a namespace (values, counters, sets and event streams); returns how many."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=escape_glob(prefix_of(namespace)) + "*", count=500):
        batch.append(key)
        if len(batch) == 500:
            deleted += int(client.delete(*batch))
            batch = []
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


class RedisStore(Store):
    def __init__(self, url: str, namespace: str, client: redis.Redis | None = None) -> None:
        self.url = url
        self.namespace = namespace
        self.client = client if client is not None else connect(url)
        self._prefix = prefix_of(namespace)
        self._index = self._prefix + "index"
        self._counters = self._prefix + "counters"
        self._put = self.client.register_script(_PUT)
        self._cas = self.client.register_script(_CAS)
        self._commit = self.client.register_script(_COMMIT)
        self._delete = self.client.register_script(_DELETE)

    def _value_key(self, key: str) -> str:
        return f"{self._prefix}v:{key}"

    def get(self, key: str) -> bytes | None:
        return cast(bytes | None, self.client.hget(self._value_key(key), "value"))

    def get_versioned(self, key: str) -> Versioned | None:
        value, version = cast(list[bytes | None], self.client.hmget(self._value_key(key), ["value", "version"]))
        if value is None or version is None:
            return None
        return Versioned(value, int(version))

    def put(self, key: str, value: bytes) -> int:
        return int(self._put(keys=[self._value_key(key), self._index], args=[value, key]))

    def compare_and_set(self, key: str, value: bytes, expected_version: int) -> bool:
        done = self._cas(keys=[self._value_key(key), self._index], args=[value, key, expected_version])
        return bool(int(done))

    def version(self, key: str) -> int:
        version = self.client.hget(self._value_key(key), "version")
        return 0 if version is None else int(cast(bytes, version))

    def commit(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        names = list(writes)
        args: list[bytes | str | int] = [writes[k][0] for k in names]
        args += [writes[k][1] for k in names]
        args += names
        done = self._commit(keys=[*(self._value_key(k) for k in names), self._index], args=args)
        return bool(int(done))

    def delete(self, key: str) -> None:
        self._delete(keys=[self._value_key(key), self._index], args=[key])

    def incr(self, key: str, amount: float = 1.0) -> float:
        return float(self.client.hincrbyfloat(self._counters, key, amount))

    def counter(self, key: str) -> float:
        value = self.client.hget(self._counters, key)
        return 0.0 if value is None else float(cast(bytes, value))

    def add_to_set(self, key: str, member: str) -> bool:
        return bool(self.client.sadd(f"{self._prefix}s:{key}", member))

    def set_members(self, key: str) -> set[str]:
        return {m.decode() for m in cast(set[bytes], self.client.smembers(f"{self._prefix}s:{key}"))}

    def keys(self, prefix: str) -> list[str]:
        found = cast(
            list[bytes], self.client.zrangebylex(self._index, b"[" + prefix.encode(), b"[" + prefix.encode() + b"\xff")
        )
        return [k.decode() for k in found]

    def close(self) -> None:
        self.client.close()
