"""Faults on the Redis deployment, with real processes and real signals.

1. ``amble worker`` processes SIGKILLed in the middle of folding, 20 times: the model is the
   fault-free embedded run's, bit for bit, and nothing is counted twice.
2. The same update delivered twice, and an event redelivered after its consumer died: counted once.
3. 30% of devices drop mid-round: every round ends by its deadline and the drops are recorded.
4. Redis SIGKILLed and restarted mid-run (AOF on), then the driver SIGKILLed and the run resumed
   with ``amble run --resume``: it completes, with no published model lost or counted twice, and
   publishes the embedded run's model bit for bit.
5. Malformed updates are rejected by the worker processes with their reason; the model is unchanged.
Plus resuming an embedded run, whose store is checkpointed to a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import yaml
from safetensors.torch import load_file

from amble.config import config_from_dict
from amble.server import ParameterServer, RunSettings
from amble.server.factory import build_server, release_server
from amble.server.runtime.pool import stop_processes
from amble.server.runtime.workers import FOLDING, HEARTBEATS, NAMESPACES, worker_command
from amble.server.tensors import encode
from amble.sim import run_experiment
from tests.conftest import RedisServer
from tests.test_functions import (
    INITIAL,
    MALFORMED,
    SAMPLES,
    assert_malformed_update_rejected,
    assert_model,
    delta,
    reference,
    report,
    upload_all,
)
from tests.test_sim import SMALL, read_jsonl


def start_worker(url: str, **env: str) -> subprocess.Popen[bytes]:
    """An ``amble worker`` process (serving every run in the database at ``url``)."""
    return subprocess.Popen(
        worker_command(url),
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


def small(url: str, **changes: Any) -> dict[str, Any]:
    """SMALL with FedAvg only, its store at ``url`` (no local workers: the tests run their own)."""
    raw: dict[str, Any] = {**SMALL, "strategies": ["fedavg"], **changes}
    raw["server"] = {"store": url, "workers": 0, "visibility_timeout_s": 0.3, **changes.get("server", {})}
    return raw


def embedded_model(raw: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_experiment(config_from_dict({**raw, "server": {}}), out, progress=False)
    return load_file(out / "model_fedavg.safetensors")


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit: the sums do not depend on which worker folded which update in which order
    (``amble.server.records.partialsum``), so any difference is a lost, repeated or foreign update."""
    assert a.keys() == b.keys()
    differing = {name: int((a[name] != b[name]).sum()) for name in a if not torch.equal(a[name], b[name])}
    assert not differing, f"weights differing from the reference, by tensor: {differing}"


# -- the functions on worker processes (faults 2 and 5) ---------------------------------------------


@pytest.fixture(scope="module")
def worker_db(redis_server: RedisServer) -> Iterator[str]:
    """A Redis database served by two real ``amble worker`` processes."""
    url = redis_server.url.replace("/0", "/2")
    workers = [start_worker(url) for _ in range(2)]
    client = redis.Redis.from_url(url)
    wait_for(lambda: client.hlen(HEARTBEATS) >= 2, 60, "two workers to start")
    yield url
    stop_processes(workers)


def make_server(url: str, quorum: float = 0.5) -> ParameterServer:
    """The tests/test_functions.py server (FedAvg at B0 = 32 over SAMPLES), on Redis and the workers."""
    config = config_from_dict(
        {
            "train": {"batch_size": 32, "local_epochs": 1, "lr": 0.1},
            "strategies": ["fedavg"],
            "server": {"store": url, "visibility_timeout_s": 0.3, "drain_timeout_s": 60},
        }
    )
    server = build_server(config, 0, f"test-{uuid.uuid4().hex}")
    server.initialize(
        INITIAL, SAMPLES, RunSettings(seed=0, devices_per_round=3, quorum=quorum, max_update_bytes=10_000)
    )
    return server


def test_duplicates_and_a_redelivery_after_a_dead_consumer_are_counted_once(worker_db: str) -> None:
    server = make_server(worker_db)
    namespace = server.store.namespace  # type: ignore[attr-defined]
    client = server.store.client  # type: ignore[attr-defined]
    server.start_round(0, [0, 1, 2], 0.0)
    # Hide the run from the workers while a consumer takes an event and dies with it.
    client.srem(NAMESPACES, namespace)
    time.sleep(1.0)  # workers refresh their list of runs every 0.5 s
    upload_all(server, [0, 1, 2])
    server.upload(report(1), encode(delta(1)), 2.5)  # a retried upload: a second event, the same update
    taken = server.events.read("functions", "functions", "dead-consumer", count=1)
    assert taken[0].type == "update_uploaded"
    client.sadd(NAMESPACES, namespace)

    outcome = server.close_round(0, 3.0)  # a worker claims the dead consumer's event after 0.3 s

    assert sorted(outcome.counted) == [0, 1, 2]
    assert server.events.pending("functions", "functions") == 0
    assert_model(server, reference([0, 1, 2]), version=1)
    release_server(server)


@pytest.mark.parametrize(("blob", "reason"), MALFORMED)
def test_worker_processes_reject_malformed_updates_and_keep_the_model(worker_db: str, blob: bytes, reason: str) -> None:
    server = make_server(worker_db, quorum=1.0)
    assert_malformed_update_rejected(server, blob, reason)
    release_server(server)


# -- fault 1: SIGKILL in the middle of folds --------------------------------------------------------


def test_workers_killed_mid_fold_20_times_change_nothing(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url.replace("/0", "/3")
    raw = small(url, rounds=12)
    pause = {"AMBLE_FAULT_FOLD_PAUSE_S": "0.1"}  # each fold announces itself and pauses around its commit
    workers = [start_worker(url, **pause) for _ in range(3)]
    kills: list[int] = []
    done = threading.Event()

    def killer() -> None:
        client = redis.Redis.from_url(url)
        while not done.is_set() and len(kills) < 20:
            for consumer, pid in client.hgetall(FOLDING).items():
                if len(kills) == 20:  # several folds may be announced at once: kill exactly 20
                    break
                live = [w for w in workers if w.pid == int(pid) and w.poll() is None]
                if live:
                    os.kill(live[0].pid, signal.SIGKILL)
                    live[0].wait()
                    kills.append(live[0].pid)
                    workers.append(start_worker(url, **pause))
                client.hdel(FOLDING, consumer)
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_experiment(config_from_dict(raw), tmp_path / "faults", progress=False)
    finally:
        done.set()
        thread.join()
        stop_processes(workers)

    assert len(kills) == 20
    results = summary["strategies"]["fedavg"]
    completed = [d for d in read_jsonl(tmp_path / "faults" / "devices.jsonl") if d["status"] in ("ok", "partial")]
    assert results["updates_aggregated"] == len(completed) == 12 * 4
    reference_dir = tmp_path / "reference"
    assert_same_model(load_file(tmp_path / "faults" / "model_fedavg.safetensors"), embedded_model(raw, reference_dir))
    accuracies = [r["accuracy"] for r in read_jsonl(tmp_path / "faults" / "metrics.jsonl")]
    assert accuracies == [r["accuracy"] for r in read_jsonl(reference_dir / "metrics.jsonl")]


# -- fault 3: devices dropping out ------------------------------------------------------------------


def test_with_30_percent_of_devices_dropping_every_round_ends_by_its_deadline(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url.replace("/0", "/4")
    raw = small(url, rounds=6)
    raw["fleet"] = {**raw["fleet"], "p_dropout": 0.3}
    workers = [start_worker(url) for _ in range(2)]
    try:
        run_experiment(config_from_dict(raw), tmp_path, progress=False)
    finally:
        stop_processes(workers)
    rounds = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rounds] == list(range(6))
    assert sum(r["dropped"] for r in rounds) > 0
    dropped = [d for d in read_jsonl(tmp_path / "devices.jsonl") if d["status"] == "dropped"]
    assert len(dropped) == sum(r["dropped"] for r in rounds)
    for r in rounds:  # each round published or failed visibly; none waited for the devices that left
        assert r["status"] in ("finalized", "failed")
        assert r["completed"] + r["dropped"] <= r["participants"]


# -- fault 4 and resume: kill Redis, kill the driver, resume ----------------------------------------


def run_cli(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "amble", "run", "--no-progress", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def workers_serving(url: str) -> list[int]:
    """Live ``amble worker`` processes serving the Redis at ``url`` (found in /proc by command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and url.encode() in argv:
            found.append(int(entry.name))
    return found


def rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_redis_restarted_and_driver_killed_mid_run_the_run_resumes_and_completes(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    try:
        raw = small(redis.url, rounds=30, server={"workers": 2})
        config_file = tmp_path / "run.yaml"
        config_file.write_text(yaml.safe_dump(raw))
        out = tmp_path / "run"
        driver = run_cli([str(config_file), "--out", str(out)])
        wait_for(lambda: rows(out) >= 5, 120, "5 rounds")
        redis.kill()  # SIGKILL: only the append-only file survives
        time.sleep(0.5)
        redis.start()
        wait_for(lambda: rows(out) >= 12, 120, "12 rounds after the Redis restart")
        assert len(workers_serving(redis.url)) == 2  # the driver's own
        driver.kill()  # SIGKILL the driver too; its workers exit with it
        driver.wait()
        wait_for(lambda: not workers_serving(redis.url), 10, "the killed driver's workers to exit")
        killed_at = rows(out)
        assert killed_at < 30

        resumed = run_cli(["--resume", str(out)])
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err.decode()
        assert not workers_serving(redis.url)  # a finished run stops the workers it started
    finally:
        redis.stop()

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in metrics] == list(range(30))  # every round once: none lost, none repeated
    assert all(r["status"] == "finalized" and r["completed"] == 4 for r in metrics)
    summary = json.loads((out / "summary.json").read_text())["strategies"]["fedavg"]
    assert summary["updates_aggregated"] == 30 * 4
    reference_dir = tmp_path / "reference"
    assert_same_model(load_file(out / "model_fedavg.safetensors"), embedded_model(raw, reference_dir))
    assert [r["accuracy"] for r in metrics] == [r["accuracy"] for r in read_jsonl(reference_dir / "metrics.jsonl")]


def test_an_embedded_run_killed_mid_way_resumes_from_its_checkpoint_file(tmp_path: Path) -> None:
    raw = {**SMALL, "rounds": 30}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    driver = run_cli([str(config_file), "--out", str(out)])
    wait_for(lambda: rows(out) >= 40, 120, "the second strategy to start")  # fedavg done, amble under way
    driver.kill()
    driver.wait()
    assert (out / "state" / "fedavg.summary.json").is_file() and (out / "state" / "amble.safetensors").is_file()

    resumed = run_cli(["--resume", str(out)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()

    reference = tmp_path / "reference"
    run_experiment(config_from_dict(raw), reference, progress=False)
    for label in ("fedavg", "amble"):
        # Single process, folds in upload order: the resumed run is bit-for-bit the uninterrupted one.
        a, b = load_file(out / f"model_{label}.safetensors"), load_file(reference / f"model_{label}.safetensors")
        assert all(torch.equal(a[name], b[name]) for name in a)
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [(r["strategy"], r["round"], r["accuracy"]) for r in ours] == [
        (r["strategy"], r["round"], r["accuracy"]) for r in theirs
    ]
    assert not (out / "state").exists()  # a finished run keeps no checkpoint
