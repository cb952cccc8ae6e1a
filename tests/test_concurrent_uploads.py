"""Uploads folded concurrently: every device counted once, and the same model, bit for bit, as one at a time.

The gateway's request threads hand their validated uploads to the coordinator, which folds whatever is
waiting in one pass (:class:`amble.live.batching.Batcher`) outside its bookkeeping lock. These tests
check the pass machinery itself, then a round of concurrent uploads with racing duplicates against
the same uploads accepted one at a time in another order, in-process and over loopback HTTP.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from amble.config import config_from_dict
from amble.live.batching import Batcher
from amble.live.coordinator import UploadFate
from amble.live.serve import Served, prepare
from amble.server.records.reports import num_samples
from amble.server.tensors import encode
from amble.strategies.base import Report
from tests.test_gateway import running
from tests.test_sim import SMALL

# -- the Batcher -----------------------------------------------------------------------------------


def recording_batcher(turn: threading.Lock) -> tuple[Batcher[tuple[str, int], str], list[list[tuple[str, int]]]]:
    """A batcher whose pass answers each item ``(key, n)`` with ``"key:n"``, and the passes it ran."""
    passes: list[list[tuple[str, int]]] = []

    def run(items: Sequence[tuple[str, int]]) -> list[str | BaseException]:
        passes.append(list(items))
        return [f"{key}:{n}" for key, n in items]

    return Batcher(run, key=lambda item: item[0], turn=turn, max_batch=8), passes


def submit_all(submit: Callable[[Any], Any], items: list[Any], threads: int = 16) -> list[Any]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(submit, items))


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_every_item_runs_once_and_its_submitter_gets_its_own_result() -> None:
    batcher, passes = recording_batcher(threading.Lock())
    items = [(f"device{n % 40}", n) for n in range(200)]  # 5 items per key

    results = submit_all(batcher.submit, items)

    assert results == [f"{key}:{n}" for key, n in items]
    ran = [item for one_pass in passes for item in one_pass]
    assert sorted(ran) == sorted(items)  # each exactly once
    assert all(len(one_pass) <= 8 for one_pass in passes)
    assert all(len({key for key, _ in one_pass}) == len(one_pass) for one_pass in passes)  # one per key


def test_waiting_items_are_folded_in_one_pass_and_a_repeated_key_waits_for_the_next() -> None:
    turn = threading.Lock()
    batcher, passes = recording_batcher(turn)
    items = [("a", 0), ("b", 1), ("a", 2), ("c", 3)]
    with turn:  # a pass is under way: everything submitted now waits for the next
        pool = ThreadPoolExecutor(len(items))
        futures = []
        for item in items:
            futures.append(pool.submit(batcher.submit, item))
            submitted = len(futures)
            wait_until(lambda: batcher.pending() == submitted)  # noqa: B023 - called before the next item

    assert [f.result(timeout=10) for f in futures] == ["a:0", "b:1", "a:2", "c:3"]
    pool.shutdown()
    assert passes == [[("a", 0), ("b", 1), ("c", 3)], [("a", 2)]]


def test_a_failed_pass_fails_its_items_and_an_items_own_error_only_that_item() -> None:
    def run(items: Sequence[int]) -> list[int | BaseException]:
        if 13 in items:
            raise OSError("the store is down")
        return [ValueError(f"bad {n}") if n % 2 else n * 10 for n in items]

    batcher: Batcher[int, int] = Batcher(run, key=lambda n: n, turn=threading.Lock(), max_batch=1)

    assert batcher.submit(4) == 40
    with pytest.raises(ValueError, match="bad 3"):
        batcher.submit(3)
    with pytest.raises(OSError, match="the store is down"):
        batcher.submit(13)
    assert batcher.submit(6) == 60 and batcher.pending() == 0  # nothing left waiting after a failure


# -- a round of concurrent uploads -----------------------------------------------------------------

DEVICES = 24


def served_run(tmp_path: Path) -> Served:
    """FedAvg, the MLP, ``DEVICES`` devices with skewed sample counts (so weights differ), all selected."""
    raw = {
        **SMALL,
        "strategies": ["fedavg"],
        "data": {"dataset": "synthetic", "num_devices": DEVICES, "partition": {"kind": "quantity"}},
        "devices_per_round": DEVICES,
        "rounds": 1,
        "server": {"quorum": 1.0},
    }
    return prepare(config_from_dict(raw), tmp_path, round_timeout_s=60)


def deltas(served: Served) -> dict[int, bytes]:
    """A random update of the model's floating tensors per device (the same for the same run)."""
    generator = torch.Generator().manual_seed(7)
    model = served.coordinator.server.model(0)
    floating = {name: t for name, t in sorted(model.items()) if t.is_floating_point()}
    return {
        device: encode({name: 0.01 * torch.randn(t.shape, generator=generator) for name, t in floating.items()})
        for device in range(DEVICES)
    }


def reports(served: Served, round_index: int = 0) -> dict[int, Report]:
    """Each device's report, agreeing with its plan and its partition."""
    state = served.coordinator.round_state(round_index)
    assert state is not None
    store = served.coordinator.server.store
    return {
        device: Report(round_index, device, num_samples(store, device), p.local_steps, p.batch_size, 0.5, 0.1, 0.1)
        for device, p in state.plans.items()
    }


def start_round(served: Served) -> None:
    coordinator = served.coordinator
    with coordinator.runtime_lock:
        coordinator.server.start_round(0, list(range(DEVICES)), coordinator.now_s())


def sequential_model(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The reference: the same run's uploads accepted one at a time, in reverse order."""
    served = served_run(tmp_path)
    start_round(served)
    updates, said = deltas(served), reports(served)
    for device in reversed(range(DEVICES)):
        assert served.coordinator.accept(said[device], updates[device]).counted
    assert served.coordinator.server.latest_version() == 1  # the last upload completed the round
    return served.coordinator.server.model(1)


def assert_same_bits(model: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert model.keys() == reference.keys()
    for name, tensor in model.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name


def test_concurrent_uploads_with_racing_duplicates_count_each_device_once_and_match_one_at_a_time(
    tmp_path: Path,
) -> None:
    served = served_run(tmp_path / "concurrent")
    start_round(served)
    updates, said = deltas(served), reports(served)
    last = DEVICES - 1  # held back until the burst is decided, so the round is open for every duplicate
    order = [d for d in range(last) for _ in range(2 if d % 6 == 0 else 1)]  # 4 devices send twice at once
    coordinator = served.coordinator

    with coordinator.runtime_lock:  # a pass is under way: all of them queue, then fold in a few passes
        pool = ThreadPoolExecutor(len(order))
        futures = [pool.submit(coordinator.accept, said[d], updates[d]) for d in order]
        wait_until(lambda: coordinator._uploads.pending() == len(order))
    fates: list[UploadFate] = [f.result(timeout=60) for f in futures]
    pool.shutdown()

    by_device: dict[int, list[UploadFate]] = {}
    for device, fate in zip(order, fates, strict=True):
        by_device.setdefault(device, []).append(fate)
    assert all(sum(f.counted for f in fates_of) == 1 for fates_of in by_device.values())  # each device once
    duplicates = [f for fates_of in by_device.values() for f in fates_of if not f.counted]
    assert [f.reason for f in duplicates] == ["replayed"] * 4 and all(f.upload == "" for f in duplicates)
    assert coordinator.accept(said[last], updates[last]).counted
    state = coordinator.round_state(0)
    assert state is not None and state.status == "finalized" and sorted(state.counted) == list(range(DEVICES))
    assert_same_bits(coordinator.server.model(1), sequential_model(tmp_path / "sequential"))


def test_uploads_after_the_round_closed_are_refused_unfolded(tmp_path: Path) -> None:
    served = served_run(tmp_path)
    start_round(served)
    updates, said = deltas(served), reports(served)
    coordinator = served.coordinator
    with coordinator.runtime_lock:
        coordinator.server.close_round(0, coordinator.now_s())  # the deadline: no update in, the round fails

    fate = coordinator.accept(said[0], updates[0])

    assert (fate.counted, fate.reason, fate.upload) == (False, "stale_round", "")
    assert 0 not in coordinator.arrivals.get(0, {})  # it never reached the functions


def test_concurrent_uploads_over_http_are_each_accepted_once_and_match_one_at_a_time(tmp_path: Path) -> None:
    served = served_run(tmp_path / "http")
    with contextlib.contextmanager(running)(served) as gateway:
        for device, token in served.tokens.items():
            auth = {"Authorization": f"Bearer {token}"}
            registration = {"num_samples": num_samples(served.coordinator.server.store, device)}
            assert httpx.post(f"{gateway.url}/v1/register", json=registration, headers=auth).status_code == 200
        wait_until(lambda: served.coordinator.round_state(0) is not None)
        updates, said = deltas(served), reports(served)

        def post(device: int) -> int:
            headers = {
                "Authorization": f"Bearer {served.tokens[device]}",
                "X-Amble-Report": json.dumps(said[device].to_dict()),
                "Content-Type": "application/octet-stream",
            }
            with httpx.Client(base_url=gateway.url, timeout=60) as client:
                return client.post("/v1/rounds/0/update", content=updates[device], headers=headers).status_code

        statuses = submit_all(post, list(range(DEVICES)), threads=DEVICES)

        assert statuses == [202] * DEVICES
        wait_until(lambda: len(served.coordinator.history) == 1)
        record: dict[str, Any] = served.coordinator.status()["history"][0]
        assert (record["status"], record["counted"]) == ("finalized", DEVICES)
        assert_same_bits(served.coordinator.server.model(1), sequential_model(tmp_path / "sequential"))
