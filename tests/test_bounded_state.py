"""A long run's state stays bounded: decided rounds, buffers and tasks are compacted, the event logs
drop what every group is done with, and the embedded checkpoint costs what changed, not the history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amble.server import MemoryStore, ParameterServer, keys
from amble.server.functions.common import KEEP_ROUNDS
from amble.server.runtime.base import FUNCTIONS_TOPIC
from amble.server.store.memory import journal_path
from amble.server.tensors import encode
from amble.strategies import Amble, AmbleSettings, BaseWork, FedAvg, Report
from tests import test_fedbuff
from tests.test_functions import SAMPLES, delta, make_server, report


def play(server: ParameterServer, rounds: range, reject: int | None = None) -> None:
    """Rounds of devices 0-2; ``reject``: that device also sends a malformed update each round."""
    for r in rounds:
        plans, start_s = server.start_round(r, [0, 1, 2], float(r * 10))
        if reject is not None:  # before its good one: a rejection (after it, a duplicate)
            server.upload(report(reject, round_=r), b"not safetensors", start_s + 0.5)
        for d, plan in sorted(plans.items()):  # each device as planned (AMBLE's plans differ by device)
            sent = Report(r, d, SAMPLES[d], plan.local_steps, plan.batch_size, 0.01 * plan.local_steps, 0.1, 0.1)
            server.upload(sent, encode(delta(d)), start_s + 1.0 + d)
        assert server.close_round(r, start_s + 5.0).status == "finalized"


def round_keys(store: MemoryStore) -> set[int]:
    return {int(key.split("/")[1]) for key in store.keys("round/")}


@pytest.mark.parametrize("adaptive", [False, True], ids=["fedavg", "amble"])
def test_decided_rounds_beyond_the_planners_window_are_compacted(adaptive: bool) -> None:
    # AMBLE plans from the reports and its prior reads the last rounds' states: compaction must leave both
    strategy = Amble(BaseWork(32, 1, 0.1), AmbleSettings()) if adaptive else FedAvg(BaseWork(32, 1, 0.1))
    server = make_server(strategy=strategy)
    play(server, range(3 * KEEP_ROUNDS), reject=1)
    assert isinstance(server.store, MemoryStore)

    last = 3 * KEEP_ROUNDS - 1
    assert round_keys(server.store) == set(range(last + 1 - KEEP_ROUNDS, last + 1))
    assert server.store.set_members(keys.round_rejected(0)) == set()  # the rejections went with the round
    assert server.store.set_members(keys.round_rejected(last)) != set()
    assert server.store.keys("model/0") == [keys.model(last), keys.model(last + 1)]
    assert server.events.retained(FUNCTIONS_TOPIC) == 0  # every event was run and acknowledged

    footprint = server.store.footprint()
    play(server, range(3 * KEEP_ROUNDS, 6 * KEEP_ROUNDS), reject=1)
    later = server.store.footprint()  # three windows on: not one key more, the same bytes give or take
    assert {k: v for k, v in later.items() if k != "bytes"} == {k: v for k, v in footprint.items() if k != "bytes"}
    assert later["bytes"] <= footprint["bytes"] * 1.01  # plans' and reports' numbers vary in their digits


def test_an_event_of_a_compacted_round_changes_nothing() -> None:
    server = make_server()
    play(server, range(KEEP_ROUNDS + 2))
    model, version = server.model(), server.latest_version()

    server.events.publish(FUNCTIONS_TOPIC, "round_start", {"round": 0, "available": [0, 1, 2]}, 500.0)
    server.events.publish(FUNCTIONS_TOPIC, "round_deadline", {"round": 0}, 501.0)
    server.upload(report(0, round_=1), encode(delta(0)), 502.0)  # a late upload of a compacted round
    server.runtime.drain()

    assert server.round_state(0) is None  # not planned anew
    assert server.latest_version() == version
    assert all(bool((server.model()[name] == value).all()) for name, value in model.items())
    assert server.store.get(keys.COMPACTED) is not None


def test_fedbuff_task_records_and_buffers_are_compacted() -> None:
    server = test_fedbuff.make_server(buffer_size=2, concurrency=2, max_staleness=2)

    def publish(buffers: range) -> tuple[int, int]:
        for task in range(2 * buffers.start, 2 * buffers.stop):  # two tasks a buffer, each from the latest model
            test_fedbuff.start(server, task, task % 2, at_s=float(task))
            test_fedbuff.upload(server, task, task % 2, at_s=task + 0.5)
        assert server.latest_version() == buffers.stop
        held_tasks = [key for key in server.store.keys("task/") if "/update/" not in key]
        return len(held_tasks), len(round_keys(server.store))

    held = publish(range(0, 40))
    assert held[0] <= 2 * (2 + KEEP_ROUNDS + 1) and held[1] <= 2 + KEEP_ROUNDS + 2
    assert publish(range(40, 80)) == held  # twice the run, the same records


def test_the_journal_replays_changes_deletes_counters_and_sets(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = MemoryStore()
    store.put("a", b"1" * 4096)
    store.put("b", b"2")
    store.add_to_set("s", "x")
    store.save(path)  # the whole store
    store.put("b", b"22")
    store.delete("a")
    store.incr("n", 3)
    store.add_to_set("s", "y")
    store.add_to_set("gone", "z")
    store.delete_set("gone")
    store.save(path)  # a batch of what changed

    assert journal_path(path).stat().st_size < 1024  # not the 4 KiB value again
    loaded = MemoryStore.load(path)
    assert loaded.get("a") is None and loaded.get_versioned("b") == store.get_versioned("b")
    assert loaded.counter("n") == 3 and loaded.set_members("s") == {"x", "y"}
    assert loaded.set_members("gone") == set()


def test_a_batch_torn_by_a_crash_is_ignored_and_saving_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = MemoryStore()
    store.put("k", b"first")
    store.save(path)
    store.put("k", b"second")
    store.save(path)
    store.put("k", b"third")
    store.save(path)
    journal = journal_path(path)
    journal.write_bytes(journal.read_bytes()[:-3])  # the last batch cut short

    loaded = MemoryStore.load(path)
    assert loaded.get("k") == b"second"
    loaded.put("k", b"fourth")
    loaded.save(path)  # a new whole snapshot: nothing is appended after the torn batch
    assert MemoryStore.load(path).get("k") == b"fourth"


def test_a_journal_of_an_older_snapshot_is_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = MemoryStore()
    store.put("k", b"v1")
    store.save(path)
    store.put("k", b"v2")
    store.save(path)
    stale = journal_path(path).read_bytes()
    fresh = MemoryStore()
    fresh.put("k", b"other")
    fresh.save(path)  # a new generation, and a crash before the old journal was removed:
    journal_path(path).write_bytes(stale)
    assert MemoryStore.load(path).get("k") == b"other"


def test_the_journal_is_folded_into_a_whole_snapshot_once_it_outgrows_the_store(tmp_path: Path) -> None:
    path = tmp_path / "store.safetensors"
    store = MemoryStore()
    store.save(path)
    for i in range(40):
        store.put("big", bytes([i]) * 100_000)  # 4 MB of changes to a 100 kB store
        store.save(path)
    journal = journal_path(path)
    assert (journal.stat().st_size if journal.is_file() else 0) <= 2 * 100_000 + 1_000  # about the store's size
    assert MemoryStore.load(path).get("big") == bytes([39]) * 100_000


@pytest.mark.parametrize("saves", [1, 5])
def test_a_resumed_embedded_run_sees_its_last_saved_state(tmp_path: Path, saves: int) -> None:
    path = tmp_path / "store.safetensors"
    server = make_server()
    for r in range(saves):
        play(server, range(r, r + 1))
        server.save_checkpoint({"round": r}, path)
    assert isinstance(server.store, MemoryStore)
    loaded = MemoryStore.load(path)
    assert json.loads(loaded.get(keys.CHECKPOINT) or b"{}") == {"round": saves - 1}
    assert loaded.footprint() == server.store.footprint()
    assert loaded.get(keys.model(saves)) == server.store.get(keys.model(saves))
