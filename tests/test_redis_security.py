"""Redis as a deployment runs it: behind a password, with commands that a dropped reply makes the
client retry. A real ``redis-server`` (with ``--requirepass``) and a real TCP proxy that cuts the
connection after forwarding a command, before its reply, exactly what a network fault does."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amble.cli import main
from amble.config import ExperimentConfig, config_from_dict, config_to_dict
from amble.errors import ConfigError
from amble.live.serve import prepare
from amble.redaction import redact
from amble.server import keys
from amble.server.factory import build_server, release_server
from amble.server.runtime.workers import HEARTBEATS, WorkerRuntime
from amble.server.store.redis import PASSWORD_ENV, RedisStore, connect, wipe
from amble.sim import run_experiment
from tests.conftest import RedisServer
from tests.test_gateway import running, samples_of
from tests.test_sim import SMALL

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


# -- the password is never written or shown (issue 22 item 2) ------------------------------------------


def _locked_config(locked_redis: RedisServer, **changes: Any) -> ExperimentConfig:
    store = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    return config_from_dict(
        {**SMALL, "strategies": ["fedavg"], **changes, "server": {"store": store, **changes.get("server", {})}}
    )


def test_a_run_given_its_password_in_the_url_writes_it_to_no_file(
    locked_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the password only in the URL (nothing in the environment), two workers started by the run
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    config = _locked_config(locked_redis, server={"workers": 2})

    # Execute
    summary = run_experiment(config, tmp_path / "out", progress=False)

    # Assert: the workers reached Redis (they folded all 4 x 4 updates), yet no file of the run holds the
    # password; run.json still says where the state is, the password shown as ***
    assert summary["strategies"]["fedavg"]["updates_aggregated"] == 16
    files = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert {"run.json", "summary.json", "metrics.jsonl"} <= {path.name for path in files}
    assert all(PASSWORD.encode() not in path.read_bytes() for path in files)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["server"]["store"] == f"redis://:***@127.0.0.1:{locked_redis.port}/0"


def test_the_run_spec_and_the_workers_command_lines_hold_no_password(
    locked_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a run on the locked Redis with one worker of its own
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    config = _locked_config(locked_redis, server={"workers": 1})
    namespace = f"spec-{uuid.uuid4().hex}"

    # Execute: start it, and wait (a minute at most) until its worker beats: it did connect
    server = build_server(config, 0, namespace)
    try:
        assert isinstance(server.runtime, WorkerRuntime) and server.runtime.pool is not None
        pids = server.runtime.pool.alive()
        consumers = {f"{socket.gethostname()}-{pid}".encode() for pid in pids}
        deadline = time.monotonic() + 60
        while not consumers & set(server.store.client.hkeys(HEARTBEATS)) and time.monotonic() < deadline:
            time.sleep(0.1)
        beating = bool(consumers & set(server.store.client.hkeys(HEARTBEATS)))
        spec = server.store.get(keys.RUN_SPEC)
        command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids]
    finally:
        wipe(server.store.client, namespace)
        release_server(server)

    # Assert: ps shows the URL with *** (the password went by the environment), and so does the spec
    assert len(pids) == 1 and beating
    assert spec is not None and PASSWORD.encode() not in spec and b"redis://:***@" in spec
    assert all(PASSWORD.encode() not in line for line in command_lines)
    assert all(b"redis://:***@" in line for line in command_lines)


def test_a_failed_run_tells_devices_why_without_the_password(
    locked_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: amble serve on the locked Redis with no worker at all: round 0 never gets planned, and the
    # coordinator gives up after drain_timeout_s with a message naming the store
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    raw = {**SMALL, "strategies": ["fedavg"], "data": {**SMALL["data"], "num_devices": 2}, "devices_per_round": 2}
    config = _locked_config(locked_redis, **raw, server={"workers": 0, "drain_timeout_s": 1.0})
    served = prepare(config, tmp_path, round_timeout_s=30)

    # Execute: both devices register, then ask for a task until the run has failed (a minute at most)
    with contextlib.contextmanager(running)(served) as gw:
        for device in (0, 1):
            gw.client(device).post("/v1/register", json={"num_samples": samples_of(gw, device)})
        deadline, task = time.monotonic() + 60, {}
        while task.get("state") != "failed" and time.monotonic() < deadline:
            task = gw.client(0).get("/v1/task").json()
            time.sleep(0.1)
        status = gw.operator().get("/v1/status").text

    # Assert: devices are told the store's address with the password as ***; the operator's status alike
    assert task["state"] == "failed", task
    assert "made no progress" in task["message"] and f"redis://:***@127.0.0.1:{locked_redis.port}/0" in task["message"]
    assert PASSWORD not in task["message"] and PASSWORD not in status


def test_a_redacted_url_connects_with_the_password_from_the_environment_and_says_so_without_it(
    locked_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How a resumed run reaches its Redis: run.json's URL reads ***, AMBLE_REDIS_PASSWORD gives it."""
    shown = f"redis://:***@127.0.0.1:{locked_redis.port}/0"
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"redacted.*give the password in {PASSWORD_ENV}"):
        RedisStore(shown, "t")

    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    store = RedisStore(shown, f"redacted-{uuid.uuid4().hex}")
    assert store.incr("c", 3.0) == 3.0
    wipe(store.client, store.namespace)
    store.close()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p%40w@h:6380/1", "rediss://user:***@h:6380/1"),
        ("unix:///tmp/r.sock?db=1&password=pw", "unix:///tmp/r.sock?db=1&password=***"),
        ("round 0: on 'redis://:pw@h/0': no progress", "round 0: on 'redis://:***@h/0': no progress"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_hides_every_password_of_a_url_or_a_message_quoting_one(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_resuming_a_run_takes_the_password_from_the_environment_or_the_same_config(
    locked_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run whose run.json shows its store's password as ***
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    out = tmp_path / "out"
    config = _locked_config(locked_redis, rounds=1, server={"workers": 1})
    run_experiment(config, out, progress=False)
    given = tmp_path / "config.yaml"
    given.write_text(json.dumps(config_to_dict(config, with_secrets=True)))

    # Execute: resume with no password anywhere, then with it in the environment, then with the config
    without = main(["run", "--resume", str(out), "--no-progress"])
    refused = capsys.readouterr().err
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    from_env = main(["run", "--resume", str(out), "--no-progress"])
    monkeypatch.delenv(PASSWORD_ENV)
    from_config = main(["run", str(given), "--resume", str(out), "--no-progress"])

    # Assert
    assert without == 2 and f"give the password in {PASSWORD_ENV}" in refused and PASSWORD not in refused
    assert from_env == 0 and from_config == 0
    assert all(PASSWORD.encode() not in path.read_bytes() for path in out.rglob("*") if path.is_file())


def test_a_config_error_quoting_a_store_url_shows_no_password() -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"server": {"store": f"http://:{PASSWORD}@127.0.0.1:6379/0"}})  # not a Redis URL

    assert "key 'server.store'" in str(refused.value) and "http://:***@127.0.0.1:6379/0" in str(refused.value)
    assert PASSWORD not in str(refused.value)
