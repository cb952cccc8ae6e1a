"""The elastic worker pool of a Redis run, with real processes and real signals.

- the scaling policy, by hand;
- a burst of events grows the pool from zero up to ``max_instances``, and idle instances retire back
  to zero; rounds run on such a pool, its real cold starts measured;
- a SIGSTOPped (wedged) worker is killed and replaced, and its round still closes;
- a run whose workers are SIGKILLed 20 times (once all of them at once) finishes with the
  embedded run's model, bit for bit, every update counted once;
- workers that cannot start make the pool give up with a clear message instead of restarting forever.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from safetensors.torch import load_file

from amble.config import config_from_dict
from amble.server import ParameterServer, RunSettings
from amble.server.factory import build_server, release_server
from amble.server.runtime import FUNCTIONS_TOPIC
from amble.server.runtime.pool import CRASH_LOOP, ScalingPolicy, WorkerPool
from amble.server.runtime.workers import HEARTBEATS, WorkerRuntime, worker_command
from amble.server.tensors import encode
from amble.sim import run_experiment
from tests.conftest import RedisServer
from tests.test_faults import assert_same_model, embedded_model, small, wait_for, workers_serving
from tests.test_functions import INITIAL, SAMPLES, assert_model, delta, reference, report, upload_all
from tests.test_sim import read_jsonl


@pytest.mark.parametrize(
    ("policy", "waiting", "alive", "expected"),
    [
        (ScalingPolicy(min_instances=2), 10, 0, 2),  # fixed: the floor only, whatever waits
        (ScalingPolicy(min_instances=2), 0, 3, 3),  # never asks an instance to stop
        (ScalingPolicy(autoscale=True, max_instances=4), 0, 0, 0),  # nothing waits: zero
        (ScalingPolicy(autoscale=True, max_instances=4), 3, 1, 3),  # one instance per waiting event
        (ScalingPolicy(autoscale=True, max_instances=4), 9, 1, 4),  # capped at max_instances
        (ScalingPolicy(min_instances=1, autoscale=True, events_per_instance=4), 9, 0, 3),  # ceil(9 / 4)
    ],
)
def test_instances_wanted(policy: ScalingPolicy, waiting: int, alive: int, expected: int) -> None:
    assert policy.wanted(waiting, alive) == expected


def served(url: str, **server: object) -> ParameterServer:
    """tests/test_functions.py's FedAvg server (3 devices) on Redis, its workers from the pool."""
    config = config_from_dict(
        {
            "train": {"batch_size": 32, "local_epochs": 1, "lr": 0.1},
            "strategies": ["fedavg"],
            "server": {"store": url, "visibility_timeout_s": 0.5, "drain_timeout_s": 90, **server},
        }
    )
    server_ = build_server(config, 0, f"test-{uuid.uuid4().hex}")
    server_.initialize(INITIAL, SAMPLES, RunSettings(seed=0, devices_per_round=3, quorum=1.0, max_update_bytes=10_000))
    return server_


def pool_of(server: ParameterServer) -> WorkerPool:
    assert isinstance(server.runtime, WorkerRuntime) and server.runtime.pool is not None
    return server.runtime.pool


def test_the_pool_follows_the_queue_up_to_max_instances_and_back_to_zero(redis_server: RedisServer) -> None:
    # Prepare: real workers (serving a run that does not exist), a queue length the test sets
    client = redis.Redis.from_url(redis_server.url)
    waiting = [0]
    command = worker_command(redis_server.url, "--namespace", f"idle-{uuid.uuid4().hex}")
    # Idle from their start (no run to serve): keep_alive_s must outlast the burst's checks below.
    policy = ScalingPolicy(autoscale=True, max_instances=3, keep_alive_s=3.0)
    pool = WorkerPool(client, HEARTBEATS, lambda options: [*command, *options], lambda: waiting[0], policy)
    pool.start()
    try:
        assert pool.alive() == []
        waiting[0] = 5  # a burst: more than max_instances events wait
        wait_for(lambda: len(pool.alive()) == 3, 30, "three instances")
        time.sleep(1.0)
        assert len(pool.alive()) == 3  # and no more
        waiting[0] = 0  # drained: each leaves after keep_alive_s idle
        wait_for(lambda: pool.figures.retired == 3, 60, "the three to retire")
        assert pool.alive() == []
        waiting[0] = 1  # from zero again
        wait_for(lambda: len(pool.alive()) == 1, 30, "one instance")
    finally:
        pool.close()
    assert (pool.figures.started, pool.figures.peak, pool.figures.died, pool.figures.replacements) == (4, 3, 0, 0)


def test_rounds_run_on_a_pool_that_scales_from_zero_and_retires_to_zero(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("/0", "/5")
    server = served(url, workers=0, autoscale=True, max_instances=3, keep_alive_s=1.0)
    pool = pool_of(server)
    try:
        assert pool.alive() == []  # scaled to zero before anything waits
        for r in range(2):
            server.start_round(r, [0, 1, 2], 10.0 * r)
            for d in range(3):  # three events wait: instances start for them
                server.upload(report(d, r), encode(delta(d)), 10.0 * r + 1 + d)
            assert sorted(server.close_round(r, 10.0 * r + 5).counted) == [0, 1, 2]
            wait_for(lambda: pool.figures.retired == pool.figures.started, 60, "the idle instances to retire")
            assert pool.alive() == []
        once = reference([0, 1, 2])
        assert_model(server, {n: 2 * once[n] - INITIAL[n] for n in ("w", "b")}, 2)  # the same average twice
        real = server.runtime.real_instances()
    finally:
        release_server(server)

    assert real is not None
    assert real["started"] == real["retired"] >= 2  # each round found the pool at zero
    assert 1 <= real["peak"] <= 3
    assert real["died"] == real["wedged"] == real["replacements"] == 0
    assert real["instances_that_ran"] >= 2
    assert real["cold_start_ms_median"] > 0  # process start to first event done, really measured
    assert sum(real["events_per_instance"]) == server.runtime.stats().invocations


def test_a_sigstopped_worker_is_killed_and_replaced(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("/0", "/6")
    server = served(url, workers=2)
    pool = pool_of(server)
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: client.hlen(HEARTBEATS) >= 2, 60, "two workers to start")
        stopped = pool.alive()[0]
        os.kill(stopped, signal.SIGSTOP)
        server.start_round(0, [0, 1, 2], 0.0)
        upload_all(server, [0, 1, 2])
        outcome = server.close_round(0, 3.0)  # the other worker claims what the stopped one held
        assert sorted(outcome.counted) == [0, 1, 2]
        assert_model(server, reference([0, 1, 2]), 1)
        wait_for(lambda: pool.figures.wedged == 1, 60, "the stopped worker to be found wedged")
        wait_for(lambda: len(pool.alive()) == 2, 60, "its replacement")
        assert stopped not in pool.alive()
        assert pool.figures.replacements == 1
    finally:
        release_server(server)


def test_a_slow_function_keeps_beating_and_is_neither_killed_nor_run_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two workers whose every fold takes 2 x 1.5 s, longer than the pool's 2 s wedge timeout
    # and the run's 0.5 s visibility timeout; before heartbeats while working, the folding worker was
    # SIGKILLed as wedged and its event claimed by the other worker.
    url = redis_server.url.replace("/0", "/8")
    server = served(url, workers=0)
    monkeypatch.setenv("AMBLE_FAULT_FOLD_PAUSE_S", "1.5")
    assert isinstance(server.runtime, WorkerRuntime)
    server.runtime.start_pool(ScalingPolicy(min_instances=2, wedged_after_s=2.0))
    pool = pool_of(server)
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: client.hlen(HEARTBEATS) >= 2, 60, "two workers to start")

        # Execute
        server.start_round(0, [0, 1, 2], 0.0)
        upload_all(server, [0, 1, 2])
        outcome = server.close_round(0, 3.0)

        # Assert: every update folded once, by workers that were never killed or replaced.
        assert sorted(outcome.counted) == [0, 1, 2]
        assert_model(server, reference([0, 1, 2]), 1)
        assert (pool.figures.wedged, pool.figures.died, pool.figures.started) == (0, 0, 2)
        stats = server.runtime.stats()
        published = client.xlen(server.runtime.events.stream(FUNCTIONS_TOPIC))
        assert stats.invocations == published  # each event ran (and was acked) once, none redelivered
        assert stats.failures == stats.dead_letters == 0
    finally:
        release_server(server)


def test_a_run_whose_workers_are_killed_20_times_finishes_with_the_embedded_model(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url.replace("/0", "/7")
    raw = small(url, rounds=30, server={"workers": 2, "autoscale": True, "max_instances": 3})
    kills: list[int] = []
    all_at_once: list[int] = []
    done = threading.Event()
    rng = random.Random(0)

    def killer() -> None:
        while not done.is_set() and len(kills) < 20:
            live = workers_serving(url)
            if live:
                victims = live if len(kills) >= 8 and not all_at_once else [rng.choice(live)]
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                if len(victims) > 1:
                    all_at_once.extend(victims)
            time.sleep(0.25)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_experiment(config_from_dict(raw), tmp_path / "killed", progress=False)
    finally:
        done.set()
        thread.join()

    assert len(kills) >= 20, f"the run ended after {len(kills)} kills: make it longer"
    assert len(all_at_once) >= 2
    results = summary["strategies"]["fedavg"]
    completed = [d for d in read_jsonl(tmp_path / "killed" / "devices.jsonl") if d["status"] in ("ok", "partial")]
    assert results["updates_aggregated"] == len(completed) == 30 * 4  # each once: none lost, none twice
    real = results["real_instances"]
    assert real["died"] >= 19  # every kill the pool saw before the summary was taken
    assert real["replacements"] >= 1 and real["peak"] <= 3
    reference_dir = tmp_path / "reference"
    assert_same_model(load_file(tmp_path / "killed" / "model_fedavg.safetensors"), embedded_model(raw, reference_dir))
    final = read_jsonl(tmp_path / "killed" / "metrics.jsonl")[-1]["accuracy"]
    assert abs(final - read_jsonl(reference_dir / "metrics.jsonl")[-1]["accuracy"]) <= 0.01


def test_workers_that_cannot_start_fail_the_run_clearly(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    exits = [sys.executable, "-c", "import sys; sys.exit(3)"]
    pool = WorkerPool(client, HEARTBEATS, lambda options: exits, lambda: 0, ScalingPolicy(min_instances=1))
    pool.start()
    try:
        wait_for(lambda: pool.failure is not None, 60, "the pool to give up")
    finally:
        pool.close()
    assert pool.failure is not None and f"{CRASH_LOOP} local `amble worker` processes" in pool.failure
    assert "exit status 3" in pool.failure
    assert pool.figures.started == CRASH_LOOP  # and no more after it gave up
