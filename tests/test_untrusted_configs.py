"""Configs written by someone else: what ``amble device`` gets from a server and what ``amble worker``
reads from Redis may make it import only the packages its own ``--allow-import`` allows, whichever key
names the code; and a worker serving several runs skips one whose spec it cannot load and serves the rest.

The code named is ``tests/import_marker.py``, which writes a marker file when imported: a refusal must
leave no marker (the module never ran), and the message must name the key and the flag that allows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from amble.cli import main
from amble.config import config_from_dict
from amble.errors import AmbleError
from amble.server import keys
from amble.server.factory import handlers_from_store
from amble.server.runtime.workers import NAMESPACES, FunctionWorker, refusals_key, worker_command
from amble.server.store.redis import RedisStore, wipe
from amble.sim import run_experiment
from tests.conftest import RedisServer
from tests.test_sim import SMALL

REPO = Path(__file__).resolve().parents[1]
MARKER_MODULE = "tests.import_marker"


class FakeServer:
    """A hostile ``amble serve`` on loopback: ``/v1/whoami`` answers with the config it is given."""

    def __init__(self, config: dict[str, Any]) -> None:
        body = json.dumps({"device": 0, "config": config}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == "/v1/whoami"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if found else b'{"error": "not_found", "message": ""}')

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "imported"
    monkeypatch.setenv("AMBLE_TEST_IMPORT_MARKER", str(path))
    sys.modules.pop(MARKER_MODULE, None)
    yield path
    sys.modules.pop(MARKER_MODULE, None)


HOSTILE = [
    ("strategies.0", {"strategies": [{"name": f"{MARKER_MODULE}:Anything"}]}),
    ("aggregator", {"aggregator": f"{MARKER_MODULE}:Anything"}),
    ("strategies.0.aggregator", {"strategies": [{"name": "fedavg", "aggregator": f"{MARKER_MODULE}:Anything"}]}),
]


@pytest.mark.parametrize(("key", "named"), HOSTILE, ids=[key for key, _ in HOSTILE])
def test_a_device_imports_nothing_a_server_names_without_its_operators_leave(
    key: str, named: dict[str, Any], marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a server whose config names the marker module by a key devices never needed before
    server = FakeServer({**SMALL, **named})

    # Execute
    try:
        code = main(["device", "--server", server.url, "--token", "t", "--threads", "1"])
    finally:
        server.close()

    # Assert: refused, saying which key and how to allow it; the module never ran
    err = capsys.readouterr().err
    assert code == 2
    assert f"key '{key}'" in err and f"{MARKER_MODULE}:Anything" in err, err
    assert "add --allow-import tests" in err, err
    assert not marker.exists() and MARKER_MODULE not in sys.modules


def test_with_its_operators_leave_a_device_does_import_the_servers_package(
    marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control for the test above: the marker does record an import, and the allow-list lets it happen."""
    server = FakeServer({**SMALL, "strategies": [{"name": f"{MARKER_MODULE}:Anything"}]})
    try:
        code = main(["device", "--server", server.url, "--token", "t", "--threads", "1", "--allow-import", "tests"])
    finally:
        server.close()

    err = capsys.readouterr().err
    assert code == 2  # imported, then refused for what it is: the module has no such strategy
    assert "has no attribute 'Anything'" in err, err
    assert marker.read_text() == "imported"


def _put_spec(store: RedisStore, config: dict[str, Any]) -> None:
    store.put(keys.RUN_SPEC, json.dumps({"config": config, "strategy": 0}).encode())
    store.put(keys.POOL, json.dumps({}).encode())


def _worker(url: str, namespace: str, marker: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AMBLE_TEST_IMPORT_MARKER": str(marker), "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    command = worker_command(url, "--namespace", namespace, "--idle-exit-s", "2", *options)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("key", "named"), HOSTILE, ids=[key for key, _ in HOSTILE])
def test_a_worker_imports_nothing_a_run_spec_names_without_its_operators_leave(
    key: str, named: dict[str, Any], redis_server: RedisServer, tmp_path: Path
) -> None:
    # Prepare: a run spec in Redis (anyone who can write there can write one) naming the marker module
    namespace = f"untrusted-{key}"
    store = RedisStore(redis_server.url, namespace)
    _put_spec(store, {**SMALL, **named})
    marker = tmp_path / "imported"

    # Execute
    try:
        done = _worker(redis_server.url, namespace, marker)
    finally:
        wipe(store.client, namespace)
        store.close()

    # Assert: the spec is refused with the key and the flag; the module never ran
    assert f"key '{key}'" in done.stderr and "add --allow-import tests" in done.stderr, done.stderr
    assert "the run spec in Redis names" in done.stderr
    assert not marker.exists()
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "spec",
    [
        json.dumps({"config": {**SMALL, "rounds": 0}, "strategy": 0}).encode(),  # a ConfigError
        b"not json",
    ],
    ids=["invalid-config", "not-json"],
)
def test_a_worker_skips_a_run_whose_spec_it_cannot_load_and_serves_the_others(
    spec: bytes, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Prepare: a database of its own holding a broken run, and one `amble worker` serving every run in it
    url = redis_server.url.replace("/0", "/2")
    broken = RedisStore(url, "broken-run")
    wipe(broken.client, "broken-run")
    broken.put(keys.RUN_SPEC, spec)
    broken.put(keys.POOL, json.dumps({}).encode())
    broken.client.sadd(NAMESPACES, "broken-run")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    worker = subprocess.Popen(worker_command(url, "--idle-exit-s", "60"), env=env, stderr=subprocess.PIPE, text=True)

    # Execute: a good run served by that worker alone (the run starts none of its own)
    try:
        config = config_from_dict({**SMALL, "strategies": ["fedavg"], "server": {"store": url, "workers": 0}})
        summary = run_experiment(config, tmp_path / "good", progress=False)
        refusals = broken.client.hgetall(refusals_key("broken-run"))
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
        broken.client.srem(NAMESPACES, "broken-run")
        wipe(broken.client, "broken-run")
        broken.close()

    # Assert: every update of the good run (4 rounds x 4 devices) was folded by the worker, which said
    # once why it skipped the broken run, on stderr and in that run's store
    assert summary["strategies"]["fedavg"]["updates_aggregated"] == 16
    assert err.count("not serving run 'broken-run'") == 1, err
    assert "Traceback" not in err
    assert len(refusals) == 1


def test_a_refused_run_started_again_with_a_good_spec_is_served(redis_server: RedisServer) -> None:
    # Prepare: a worker (in this process) that refused a run's broken spec
    url = redis_server.url.replace("/0", "/3")
    store = RedisStore(url, "restarted-run")
    wipe(store.client, "restarted-run")
    _put_spec(store, {**SMALL, "rounds": 0})
    worker = FunctionWorker(url, handlers_from_store, namespaces=["restarted-run"])
    worker.step(block_s=0.01)
    refused_first = set(worker.refused)

    # Execute: the run is wiped and started again (as `amble run` does) with a valid spec
    wipe(store.client, "restarted-run")
    _put_spec(store, SMALL)
    worker._refreshed_at = 0.0  # refresh on the next step rather than half a second later
    worker.step(block_s=0.01)

    # Assert
    try:
        assert refused_first == {"restarted-run"}
        assert set(worker.served) == {"restarted-run"} and not worker.refused
    finally:
        wipe(store.client, "restarted-run")
        store.close()


def test_a_run_whose_own_workers_cannot_load_its_spec_fails_at_once_saying_why(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a config naming an aggregator of tests/, which the run's worker processes cannot import
    # (started from another folder, with only src/ on their path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    url = redis_server.url.replace("/0", "/4")
    raw = {**SMALL, "strategies": ["fedavg"], "aggregator": "tests.user_strategies:HalfStep"}
    config = config_from_dict({**raw, "server": {"store": url, "workers": 1}})

    # Execute
    with pytest.raises(AmbleError) as failed:
        run_experiment(config, tmp_path / "out", progress=False)

    # Assert: the driver says what its workers said (rather than waiting out server.drain_timeout_s)
    message = str(failed.value)
    assert "the run's `amble worker` processes cannot load its spec" in message
    assert "module 'tests.user_strategies' is not importable" in message
