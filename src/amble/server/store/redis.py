"""The Store on Redis: the state of a run outlives its processes and is shared by worker processes.

Layout, all under one namespace prefix ``amble:{namespace}:`` so runs never see each other:

- ``v:{key}`` a plain string per value key, and its version in the hash ``versions``;
- ``index`` a sorted set of the value keys (score 0, ordered lexically) for prefix listings;
- ``counters`` one hash of float counters (``HINCRBYFLOAT``);
- ``s:{key}`` a Redis set per set key.

Large values never pass through a Lua script (which copies its arguments, several times slower
than a plain ``SET``): ``put`` is a ``MULTI`` transaction, and ``commit`` first writes each value
to a private staging key with ``SET`` and then runs a small script that checks every version and
``RENAME``s the staged values into place, an O(1) move. A compare-and-set of a small value is one
script. The client retries a dropped connection with backoff, so a Redis restart (with AOF on,
nothing is lost) shows up as a pause rather than a crash; every command has a socket timeout, so a
wedged server or network is a retried error, never a hang. A retried command may have run once
already: the writes here are all idempotent or versioned, except a counter increment, which
therefore carries a one-time token (:data:`_INCR_ONCE`) so a retry cannot count twice.

The password never needs to be in a config, and is never written from one (``run.json``,
``summary.json`` and the run spec show it as ``***``): ``connect`` takes it from
``AMBLE_REDIS_PASSWORD`` when the URL has none or a redacted one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from amble.errors import ConfigError
from amble.redaction import REDACTED, redact, split_password
from amble.server.store.base import Store, Value, Versioned, as_bytes

_CAS = """
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if current ~= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], current + 1)
redis.call('ZADD', KEYS[3], 0, ARGV[2])
return 1
"""

# KEYS: n value keys, n staging keys, versions, index; ARGV: n names, n expected versions.
_COMMIT = """
local n = (#KEYS - 2) / 2
local versions, index = KEYS[2 * n + 1], KEYS[2 * n + 2]
for i = 1, n do
  if tonumber(redis.call('HGET', versions, ARGV[i]) or '0') ~= tonumber(ARGV[n + i]) then
    for j = 1, n do redis.call('DEL', KEYS[n + j]) end
    return 0
  end
end
for i = 1, n do
  redis.call('RENAME', KEYS[n + i], KEYS[i])
  redis.call('PERSIST', KEYS[i])
  redis.call('HSET', versions, ARGV[i], tonumber(ARGV[n + i]) + 1)
  redis.call('ZADD', index, 0, ARGV[i])
end
return 1
"""

# KEYS: counters hash, the increment's token key; ARGV: field, amount, token lifetime in ms.
_INCR_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
end
return redis.call('HGET', KEYS[1], ARGV[1]) or '0'
"""

INCR_TOKEN_TTL_MS = 600_000
"""How long an increment's token is remembered: far longer than any retry of it can take."""
SOCKET_TIMEOUT_S = 30.0
"""Per-command socket timeout (a URL's ``?socket_timeout=`` overrides it). The longest command AMBLE
sends on purpose is a 0.2 s blocking stream read or a multi-megabyte write."""
PASSWORD_ENV = "AMBLE_REDIS_PASSWORD"

DEFAULT_MAX_BULK_BYTES = 512 * 2**20
"""Redis' default ``proto-max-bulk-len``: the largest value one command can carry (a server that
does not let this client read its setting, e.g. a managed one with CONFIG disabled, is taken to have it)."""

STAGING_TTL_MS = 600_000
"""A staged value whose commit never came (its writer died) expires after ten minutes."""


class _Connection(redis.Connection):
    """Replies parsed by hiredis when installed (5x faster on megabyte values) but commands packed
    by redis-py's own serializer, which sends large values without copying them (hiredis' packer
    copies every argument: a 6.6 MB ``SET`` took 13 ms instead of 1.7 ms here)."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


def connect(url: str, retries: int = 40) -> redis.Redis:
    """A client for ``redis://[USER[:PASSWORD]@]HOST:PORT/DB`` (``rediss://`` for TLS) that survives a
    restarting server for about a minute. Without a password in the URL, ``AMBLE_REDIS_PASSWORD`` is
    used when set; a redacted one (``***``, as ``run.json`` and workers' command lines show it) must be."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"store URL '{redact(url)}' is not a Redis URL: use redis://HOST:PORT/DB (e.g. redis://127.0.0.1:6379/0)"
        )
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries)
    options: dict[str, Any] = {"connection_class": _Connection} if url.startswith("redis://") else {}
    bare, password = split_password(url)
    if password == REDACTED and not os.environ.get(PASSWORD_ENV):
        raise ConfigError(
            f"the store URL {url} has its password redacted ({REDACTED}: it is never written to run files or "
            f"shown): give the password in {PASSWORD_ENV}"
        )
    if password is not None and password != REDACTED:
        options["password"] = password
    elif os.environ.get(PASSWORD_ENV):
        options["password"] = os.environ[PASSWORD_ENV]
    if "socket_timeout" not in parse_qs(urlsplit(bare).query):
        options["socket_timeout"] = SOCKET_TIMEOUT_S
    return redis.Redis.from_url(
        bare,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_connect_timeout=5.0,
        health_check_interval=30,
        **options,
    )


def check_access(url: str) -> None:
    """Fail now, with what to do, when the server refuses this client (a password or ACL is needed).

    One ping from a client that does not retry: a refused password is not a network fault to wait out
    (the health check of a retrying client would retry it for a minute)."""
    client = connect(url, retries=0)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConfigError(
            f"Redis at {redact(url)} refused the connection ({exc}): give the password in the URL "
            f"(redis://USER:PASSWORD@HOST:PORT/DB) or in {PASSWORD_ENV}"
        ) from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc) or "NOPERM" in str(exc):
            raise ConfigError(
                f"Redis at {redact(url)} needs authentication ({exc}): give the password in the URL "
                f"(redis://USER:PASSWORD@HOST:PORT/DB) or in {PASSWORD_ENV}"
            ) from None
        raise
    except redis.ConnectionError:
        pass  # not up yet, or restarting: the retrying client waits for it
    finally:
        client.close()


def escape_glob(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def server_time(client: redis.Redis) -> float:
    """Redis' own clock (Unix seconds): one clock for heartbeats written and read on different machines."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


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
        if client is None:
            check_access(url)
            client = connect(url)
        self.client = client
        self._prefix = prefix_of(namespace)
        self._index = self._prefix + "index"
        self._versions = self._prefix + "versions"
        self._counters = self._prefix + "counters"
        self._cas = self.client.register_script(_CAS)
        self._commit = self.client.register_script(_COMMIT)
        self._incr_once = self.client.register_script(_INCR_ONCE)

    def _value_key(self, key: str) -> str:
        return f"{self._prefix}v:{key}"

    def get(self, key: str) -> bytes | None:
        return cast(bytes | None, self.client.get(self._value_key(key)))

    def get_versioned(self, key: str) -> Versioned | None:
        with self.client.pipeline(transaction=True) as pipe:  # one consistent snapshot of both
            pipe.get(self._value_key(key))
            pipe.hget(self._versions, key)
            value, version = pipe.execute()
        if value is None or version is None:
            return None
        return Versioned(value, int(version))

    def put(self, key: str, value: Value) -> int:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._value_key(key), as_bytes(value))
            pipe.hincrby(self._versions, key, 1)
            pipe.zadd(self._index, {key: 0})
            _, version, _ = pipe.execute()
        return int(version)

    def compare_and_set(self, key: str, value: Value, expected_version: int) -> bool:
        args: list[bytes | str | int] = [as_bytes(value), key, expected_version]
        done = self._cas(keys=[self._value_key(key), self._versions, self._index], args=args)
        return bool(int(done))

    def version(self, key: str) -> int:
        version = self.client.hget(self._versions, key)
        return 0 if version is None else int(cast(bytes, version))

    def commit(self, writes: Mapping[str, tuple[Value, int]]) -> bool:
        names = list(writes)
        staged = [f"{self._prefix}staging:{uuid.uuid4().hex}" for _ in names]
        with self.client.pipeline(transaction=False) as pipe:
            for stage, name in zip(staged, names, strict=True):
                pipe.set(stage, as_bytes(writes[name][0]), px=STAGING_TTL_MS)
            pipe.execute()
        keys = [*(self._value_key(k) for k in names), *staged, self._versions, self._index]
        done = self._commit(keys=keys, args=[*names, *(writes[k][1] for k in names)])
        return bool(int(done))

    def delete(self, key: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._value_key(key))
            pipe.hdel(self._versions, key)
            pipe.zrem(self._index, key)
            pipe.execute()

    def incr(self, key: str, amount: float = 1.0) -> float:
        token = f"{self._prefix}incr:{uuid.uuid4().hex}"  # the same token on a retry: counted once
        value = self._incr_once(keys=[self._counters, token], args=[key, repr(float(amount)), INCR_TOKEN_TTL_MS])
        return float(value)

    def counter(self, key: str) -> float:
        value = self.client.hget(self._counters, key)
        return 0.0 if value is None else float(cast(bytes, value))

    def add_to_set(self, key: str, member: str) -> bool:
        return bool(self.client.sadd(f"{self._prefix}s:{key}", member))

    def set_members(self, key: str) -> set[str]:
        return {m.decode() for m in cast(set[bytes], self.client.smembers(f"{self._prefix}s:{key}"))}

    def delete_set(self, key: str) -> None:
        self.client.delete(f"{self._prefix}s:{key}")

    def keys(self, prefix: str) -> list[str]:
        found = cast(
            list[bytes], self.client.zrangebylex(self._index, b"[" + prefix.encode(), b"[" + prefix.encode() + b"\xff")
        )
        return [k.decode() for k in found]

    def max_value_bytes(self) -> int:
        """The server's ``proto-max-bulk-len``: no value (a model, a shard of partial sums) can be larger."""
        try:
            setting = cast(dict[str, str], self.client.config_get("proto-max-bulk-len"))
        except redis.ResponseError:  # CONFIG renamed, disabled or refused to this user
            return DEFAULT_MAX_BULK_BYTES
        value = setting.get("proto-max-bulk-len")
        return DEFAULT_MAX_BULK_BYTES if value is None else int(value)

    def close(self) -> None:
        self.client.close()
