"""Redis as a deployment runs it: behind a password, with commands that a dropped reply makes the
client retry. A real ``redis-server`` (with ``--requirepass``) and a real TCP proxy that cuts the
connection after forwarding a command, before its reply, exactly what a network fault does."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from amble.errors import ConfigError
from amble.redaction import redact
from amble.server.store.redis import PASSWORD_ENV, RedisStore, connect
from tests.conftest import RedisServer

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("locked"), extra_args=("--requirepass", PASSWORD))
    try:
        yield server
    finally:
        server.stop()


def test_a_redis_with_a_password_refuses_a_store_without_it_and_says_how_to_give_it(
    locked_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError) as refused:
        RedisStore(locked_redis.url, "t")
    assert PASSWORD_ENV in str(refused.value) and "redis://USER:PASSWORD@" in str(refused.value)


def test_the_password_comes_from_the_url_or_the_environment_and_never_shows_in_messages(
    locked_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with_password = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    from_url = RedisStore(with_password, f"url-{uuid.uuid4().hex}")
    from_url.put("k", b"v")
    assert from_url.get("k") == b"v"
    from_url.close()

    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    from_env = RedisStore(locked_redis.url, f"env-{uuid.uuid4().hex}")  # no password in the URL itself
    assert from_env.incr("c", 2.0) == 2.0
    from_env.close()

    assert PASSWORD not in redact(with_password) and "***" in redact(with_password)
    assert redact(locked_redis.url) == locked_redis.url


def test_every_command_has_a_socket_timeout(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 30.0
    override = connect(redis_server.url + "?socket_timeout=2")
    assert override.connection_pool.connection_kwargs["socket_timeout"] == 2.0


class ReplyCutter:
    """A TCP proxy in front of Redis that forwards every command but, for the first command containing
    ``marker``, closes the client's connection instead of passing the reply back: the command ran,
    the client saw a dropped connection, and retries it."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        self.upstream_port = upstream_port
        self.marker = marker
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        try:
            while True:
                request = client.recv(1 << 16)
                if not request:
                    return
                upstream.sendall(request)
                reply = upstream.recv(1 << 16)
                if self.marker in request and not self.cut.is_set():
                    self.cut.set()
                    return  # the command ran on the server; its reply is lost
                client.sendall(reply)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def test_a_counter_increment_retried_after_its_reply_was_lost_counts_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"cut-{uuid.uuid4().hex}"
    direct = RedisStore(redis_server.url, namespace)
    direct.incr("warm-up")  # loads the increment script, so the proxied call is one EVALSHA
    proxy = ReplyCutter(redis_server.port, marker=b"EVALSHA")
    try:
        through_proxy = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", namespace)
        through_proxy.incr("uploads", 1.0)
        assert proxy.cut.is_set()  # the first reply really was lost and the client retried
        assert direct.counter("uploads") == 1.0
        through_proxy.close()
    finally:
        proxy.close()
        direct.close()


def test_without_its_token_the_same_lost_reply_would_count_twice(redis_server: RedisServer) -> None:
    """The control for the test above: a plain HINCRBYFLOAT through the same fault counts twice."""
    namespace = f"cut-{uuid.uuid4().hex}"
    direct = RedisStore(redis_server.url, namespace)
    proxy = ReplyCutter(redis_server.port, marker=b"HINCRBYFLOAT")
    try:
        client = connect(f"redis://127.0.0.1:{proxy.port}/0")
        client.hincrbyfloat(f"amble:{namespace}:counters", "uploads", 1.0)
        assert proxy.cut.is_set()
        assert direct.counter("uploads") == 2.0
        client.close()
    finally:
        proxy.close()
        direct.close()
