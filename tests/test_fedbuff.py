"""FedBuff: buffered asynchronous aggregation on the event-driven parameter server, and its clock.

The functions through the embedded Store, EventLog and Runtime, on tiny updates whose published
models are computed by hand; then short simulated runs, embedded and on Redis with a worker process.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from amble.config import config_from_dict
from amble.errors import ConfigError
from amble.server import (
    LocalRuntime,
    MemoryEventLog,
    MemoryStore,
    ParameterServer,
    PoolSettings,
    Published,
    RunSettings,
    keys,
)
from amble.server.functions import ServerFunctions
from amble.server.functions.buffered import read_task
from amble.server.runtime.base import FUNCTIONS_TOPIC
from amble.server.tensors import encode
from amble.sim import run_experiment
from amble.strategies import BaseWork, FedAvgAggregator, FedNovaAggregator, Report
from amble.strategies.fedbuff import FedBuff, FedBuffAggregator, FedBuffSettings
from tests.conftest import RedisServer
from tests.test_functions import INITIAL, SAMPLES, CrashingStore
from tests.test_sim import SMALL


def make_server(store: MemoryStore | None = None, **settings: Any) -> ParameterServer:
    store = store or MemoryStore()
    events = MemoryEventLog()
    strategy = FedBuff(BaseWork(32, 1, 0.1), FedBuffSettings(**settings))
    functions = ServerFunctions(store, strategy)  # an asynchronous strategy gets the buffered functions
    runtime = LocalRuntime(store, events, functions.handlers(), PoolSettings(max_instances=2, invocation_s=0.02))
    server = ParameterServer(store, events, runtime)
    server.initialize(INITIAL, SAMPLES, RunSettings(seed=0, devices_per_round=3, quorum=0.5, max_update_bytes=10_000))
    return server


def start(server: ParameterServer, task: int, device: int, at_s: float = 0.0) -> int:
    """Start task ``task`` on ``device`` (the only one offered); the model version it trains from."""
    started, _ = server.start_task(task, [device], at_s)
    assert started.device == device
    return started.base_version


def delta(task: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(task + 1)), "b": torch.tensor([-float(task)])}


def upload(server: ParameterServer, task: int, device: int, at_s: float = 5.0) -> list[Published]:
    report = Report(task, device, SAMPLES[device], SAMPLES[device] // 32, 32, 1.0, 0.1, 0.1)
    return server.upload_task(report, encode(delta(task)), at_s)


def assert_model(server: ParameterServer, w: float, b: float, version: int) -> None:
    model = server.model()
    assert server.latest_version() == version
    torch.testing.assert_close(model["w"], torch.tensor([w, w + 1, w + 2]))
    torch.testing.assert_close(model["b"], torch.tensor([b]))
    assert model["steps"].item() == 7  # non-float state is carried over, never averaged


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_a_publish_weights_each_update_by_its_samples_and_staleness(server_lr: float) -> None:
    server = make_server(buffer_size=2, server_lr=server_lr)
    for task, device in enumerate([0, 1, 2]):  # three tasks train from version 0
        assert start(server, task, device) == 0

    upload(server, 0, 0)
    published = upload(server, 1, 1)  # buffer 0 is full: version 1, both updates fresh (s = 1)
    assert start(server, 3, 0, at_s=6.0) == 1
    upload(server, 2, 2, at_s=7.0)  # trained from version 0, folded on version 1: staleness 1
    published += upload(server, 3, 0, at_s=8.0)

    assert [(p.buffer, p.version, p.counted) for p in published] == [(0, 1, 2), (1, 2, 2)]
    # version 1 = x0 + lr (64 d0 + 192 d1) / 256; d0 = (1, -0), d1 = (2, -1)
    w1, b1 = 1 + server_lr * (64 * 1 + 192 * 2) / 256, 0.5 + server_lr * (192 * -1) / 256
    # version 2 = x1 + lr (s(1) 128 d2 + s(0) 64 d3) / (128 + 64); d2 = (3, -2), d3 = (4, -3); not renormalised by s
    s1 = 1 / math.sqrt(2)
    w2 = w1 + server_lr * (s1 * 128 * 3 + 64 * 4) / 192
    b2 = b1 + server_lr * (s1 * 128 * -2 + 64 * -3) / 192
    assert_model(server, w2, b2, version=2)


def test_a_buffer_closes_at_exactly_k_counted_updates() -> None:
    server = make_server(buffer_size=3)
    for task, device in enumerate([0, 1, 2]):
        start(server, task, device)
    upload(server, 0, 0)
    assert upload(server, 1, 1) == []  # two of three: nothing published
    assert server.latest_version() == 0
    published = upload(server, 2, 2)
    start(server, 3, 0, at_s=6.0)
    upload(server, 3, 0, at_s=7.0)

    assert [(p.buffer, p.counted) for p in published] == [(0, 3)]
    closed = json.loads(server.store.get(keys.round_meta(0)) or b"{}")
    assert (sorted(closed["counted"]), closed["sealed"]) == ([0, 1, 2], True)
    following = json.loads(server.store.get(keys.round_meta(1)) or b"{}")
    assert (following["counted"], following["sealed"]) == ([3], False)  # the fourth went to the next buffer
    assert server.latest_version() == 1


def test_a_redelivered_upload_counts_once() -> None:
    server = make_server(buffer_size=2)
    start(server, 0, 0)
    start(server, 1, 1)
    server.events.read(FUNCTIONS_TOPIC, "redelivery-test", "reader", count=100)  # a group that keeps the log's events
    upload(server, 0, 0)
    # The same event delivered again (its consumer died before acking, say), and a retried upload.
    events = server.events.read(FUNCTIONS_TOPIC, "redelivery-test", "reader", count=100)
    first = next(e for e in events if e.type == "task_uploaded")
    server.events.publish(FUNCTIONS_TOPIC, "task_uploaded", first.payload, 5.5)
    server.run_functions()
    upload(server, 0, 0, at_s=5.6)
    published = upload(server, 1, 1, at_s=6.0)

    assert [(p.buffer, p.counted) for p in published] == [(0, 2)]
    assert sorted(json.loads(server.store.get(keys.round_meta(0)) or b"{}")["counted"]) == [0, 1]
    assert_model(server, 1 + (64 * 1 + 192 * 2) / 256, 0.5 - 192 / 256, version=1)


def test_a_fold_crashing_before_its_commit_is_retried_and_counted_once() -> None:
    server = make_server(CrashingStore(crashes=1), buffer_size=2)
    start(server, 0, 0)
    start(server, 1, 1)
    upload(server, 0, 0)
    upload(server, 1, 1)

    assert server.runtime.stats().failures == 1
    assert_model(server, 1 + (64 * 1 + 192 * 2) / 256, 0.5 - 192 / 256, version=1)


def test_a_too_stale_update_is_rejected_with_its_reason_and_changes_nothing() -> None:
    server = make_server(buffer_size=1, max_staleness=0)
    start(server, 0, 0)
    start(server, 1, 1)
    upload(server, 0, 0)  # K = 1: version 1 at once
    before = server.model()

    assert upload(server, 1, 1, at_s=6.0) == []  # trained from version 0, folded on 1: staleness 1 > 0

    rejected = server.store.set_members(keys.round_rejected(1))
    assert [member.split(":")[-1] for member in rejected] == ["too_stale"]
    task = read_task(server.store, 1)
    assert task is not None and task.buffer is None
    assert server.latest_version() == 1
    after = server.model()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert server.store.keys("task/00000001/update/") == []  # the refused blob is not kept


def test_default_buffer_is_half_the_concurrency_and_only_sample_weighting_is_accepted() -> None:
    assert FedBuffSettings().buffer_size_for(10) == 5
    assert FedBuffSettings().buffer_size_for(5) == 3
    assert FedBuffSettings(concurrency=4).buffer_size_for(10) == 2
    assert FedBuffSettings(buffer_size=7).buffer_size_for(10) == 7
    with pytest.raises(ConfigError, match="own staleness-weighted aggregator"):
        FedBuff(BaseWork(32, 1, 0.1), FedBuffSettings(), FedNovaAggregator())
    # a config's `aggregator: fedavg` (the quickstart's) means FedBuff's own: it weights by samples too
    strategy = FedBuff(BaseWork(32, 1, 0.1), FedBuffSettings(server_lr=0.5), FedAvgAggregator())
    assert isinstance(strategy.aggregator, FedBuffAggregator) and strategy.aggregator.server_lr == 0.5


def test_amble_serve_refuses_fedbuff_clearly(tmp_path: Path) -> None:
    from amble.live.serve import prepare

    config = config_from_dict({**SMALL, "strategies": ["fedbuff"]})
    with pytest.raises(ConfigError, match="not supported on real devices yet"):
        prepare(config, tmp_path)


FEDBUFF_RUN: dict[str, Any] = {
    **SMALL,
    "rounds": 4,
    "fleet": {**SMALL["fleet"], "p_dropout": 0.2},
    "strategies": ["fedavg", {"name": "fedbuff", "buffer_size": 2}],
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_simulated_fedbuff_run_writes_the_usual_outputs_without_idle_time(tmp_path: Path) -> None:
    summary = run_experiment(config_from_dict(FEDBUFF_RUN), tmp_path, progress=False)

    for name in ("metrics.jsonl", "devices.jsonl", "summary.json", "report.html", "model_fedbuff.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert set(summary["strategies"]["fedbuff"]) == set(summary["strategies"]["fedavg"])
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["strategy"] == "fedbuff"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    times = [r["virtual_time_s"] for r in rows]
    assert all(a < b for a, b in itertools.pairwise(times)) and times[0] > 0
    assert [r["completed"] for r in rows] == [2, 2, 2, 2]
    devices = [r for r in read_jsonl(tmp_path / "devices.jsonl") if r["strategy"] == "fedbuff"]
    assert {r["idle_s"] for r in devices} == {0.0}
    assert {r["status"] for r in devices} <= {"ok", "dropped", "failed"}
    for r in rows:  # a publish's device rows: its K counted updates and the tasks dropped since the last
        mine = [d for d in devices if d["round"] == r["round"]]
        assert sum(d["status"] == "ok" for d in mine) == 2
        assert sum(d["status"] == "dropped" for d in mine) == r["dropped"]
    fedbuff = summary["strategies"]["fedbuff"]
    assert fedbuff["updates_aggregated"] == 8 and fedbuff["virtual_time_s"] == times[-1]


def test_fedbuff_on_redis_and_a_worker_process_publishes_the_same_bits(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    run = {**SMALL, "rounds": 3, "strategies": [{"name": "fedbuff", "buffer_size": 2}]}
    embedded = run_experiment(config_from_dict(run), tmp_path / "a", progress=False)
    on_redis = config_from_dict({**run, "server": {"store": redis_server.url, "workers": 1}})
    redis_run = run_experiment(on_redis, tmp_path / "b", progress=False)

    a, b = embedded["strategies"]["fedbuff"], redis_run["strategies"]["fedbuff"]
    assert b["updates_aggregated"] == a["updates_aggregated"] == 6
    # (virtual times differ by the runtimes' own accounting of function time; the models may not)
    model = "model_fedbuff.safetensors"
    assert (tmp_path / "b" / model).read_bytes() == (tmp_path / "a" / model).read_bytes()


def test_more_concurrency_than_devices_is_a_clear_error(tmp_path: Path) -> None:
    config = config_from_dict({**SMALL, "strategies": [{"name": "fedbuff", "concurrency": 9}]})  # 8 devices
    with pytest.raises(ConfigError, match=r"concurrency 9 exceeds data.num_devices \(8\)"):
        run_experiment(config, tmp_path, progress=False)


def test_a_server_optimizer_on_fedbuff_is_refused_not_ignored() -> None:
    raw = {**SMALL, "strategies": [{"name": "fedbuff", "server_optimizer": {"kind": "momentum"}}]}

    with pytest.raises(ConfigError, match="server_optimizer is applied by the synchronous rounds' finalize"):
        config_from_dict(raw)


class DiesAfterSealing(MemoryStore):
    """Raises once when device 1's report is written: the instance died right after the commit that
    counted device 1's task and sealed the buffer, before it announced the buffer was ready."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def compare_and_set(self, key: str, value: bytes, expected_version: int) -> bool:
        if key == keys.device_reports(1) and self.armed:
            self.armed = False
            raise ConnectionError("instance killed after its commit")
        return super().compare_and_set(key, value, expected_version)


def test_an_instance_dying_after_the_sealing_commit_still_gets_the_buffer_published() -> None:
    server = make_server(DiesAfterSealing(), buffer_size=2)
    start(server, 0, 0)
    start(server, 1, 1)
    upload(server, 0, 0)

    upload(server, 1, 1)  # its fold seals the buffer, then the instance dies; the event is redelivered

    assert server.runtime.stats().failures == 1
    assert_model(server, 1 + (64 * 1 + 192 * 2) / 256, 0.5 - 192 / 256, version=1)
    assert json.loads(server.store.get(keys.device_reports(1)) or b"[]")[0]["device"] == 1  # the report too
