"""The parameter-server functions end to end through the embedded Store, EventLog and Runtime.

Exactly-once effect: duplicates, redeliveries and a function that crashes mid-fold all leave the
aggregate equal to the reference computed by hand; malformed updates leave the model unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from amble.server import (
    LocalRuntime,
    MemoryEventLog,
    MemoryStore,
    ParameterServer,
    PoolSettings,
    RunSettings,
    ServerFunctions,
    keys,
    select_devices,
)
from amble.server.runtime.base import FUNCTIONS_GROUP, FUNCTIONS_TOPIC
from amble.server.tensors import encode
from amble.strategies import BaseWork, FedAvg, Report

INITIAL = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5]), "steps": torch.tensor(7)}
SAMPLES = {0: 10, 1: 30, 2: 20}


class CrashingStore(MemoryStore):
    """Raises inside the fold's commit the first ``crashes`` times: an instance dying mid-fold."""

    def __init__(self, crashes: int) -> None:
        super().__init__()
        self.crashes = crashes

    def compare_and_set(self, key: str, value: bytes, expected_version: int) -> bool:
        if "/partial" in key and self.crashes > 0:
            self.crashes -= 1
            raise ConnectionError("instance killed while folding")
        return super().compare_and_set(key, value, expected_version)


def make_server(store: MemoryStore | None = None, quorum: float = 0.5, per_round: int = 3) -> ParameterServer:
    store = store or MemoryStore()
    events = MemoryEventLog()
    functions = ServerFunctions(store, FedAvg(BaseWork(32, 1, 0.1)))
    runtime = LocalRuntime(store, events, functions.handlers(), PoolSettings(max_instances=2))
    server = ParameterServer(store, events, runtime)
    server.initialize(
        INITIAL, SAMPLES, RunSettings(seed=0, devices_per_round=per_round, quorum=quorum, max_update_bytes=10_000)
    )
    return server


def report(device: int, round_: int = 0) -> Report:
    return Report(round_, device, SAMPLES[device], 2, 32, 1.0, 0.1, 0.1)


def delta(device: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(device + 1)), "b": torch.tensor([-float(device)])}


def reference(devices: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg by hand: x + sum n_k delta_k / sum n_k."""
    total = sum(SAMPLES[d] for d in devices)
    return {
        "w": INITIAL["w"] + sum(SAMPLES[d] * delta(d)["w"] for d in devices) / total,
        "b": INITIAL["b"] + sum(SAMPLES[d] * delta(d)["b"] for d in devices) / total,
    }


def upload_all(server: ParameterServer, devices: list[int], round_: int = 0) -> None:
    for at_s, d in enumerate(devices):
        server.upload(report(d, round_), encode(delta(d)), float(at_s))


def assert_model(server: ParameterServer, expected: dict[str, torch.Tensor], version: int) -> None:
    model = server.model()
    assert server.latest_version() == version
    torch.testing.assert_close(model["w"], expected["w"])
    torch.testing.assert_close(model["b"], expected["b"])
    assert model["steps"].item() == 7  # non-float state is carried over, never averaged


def test_a_round_publishes_the_fedavg_of_its_updates() -> None:
    server = make_server()
    plans, _ = server.start_round(0, [0, 1, 2], 0.0)
    assert sorted(plans) == [0, 1, 2]

    upload_all(server, [0, 1, 2])
    outcome = server.close_round(0, 3.0)

    assert (outcome.status, outcome.version, sorted(outcome.counted)) == ("finalized", 1, [0, 1, 2])
    # w: 1 + (10*1 + 30*2 + 20*3)/60 = 1 + 130/60 for each entry of w
    assert_model(server, reference([0, 1, 2]), version=1)
    assert server.model()["w"][0].item() == pytest.approx(1 + 130 / 60)


def test_the_same_update_delivered_twice_is_counted_once() -> None:
    server = make_server()
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 1])
    server.upload(report(1), encode(delta(1)), 2.5)  # a retried upload: second event, same update
    upload_all(server, [2])
    outcome = server.close_round(0, 3.0)

    assert sorted(outcome.counted) == [0, 1, 2]
    assert_model(server, reference([0, 1, 2]), version=1)


def test_an_event_redelivered_after_its_consumer_died_is_counted_once() -> None:
    server = make_server()
    server.start_round(0, [0, 1, 2], 0.0)
    upload_all(server, [0, 1, 2])
    # A worker takes the first update event and dies without acking it.
    taken = server.events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, "dead-worker", count=1)
    assert taken[0].type == "update_uploaded"

    outcome = server.close_round(0, 3.0)  # the runtime claims the stale event and folds it

    assert sorted(outcome.counted) == [0, 1, 2]
    assert server.events.pending(FUNCTIONS_TOPIC, FUNCTIONS_GROUP) == 0
    assert_model(server, reference([0, 1, 2]), version=1)


def test_a_function_crashing_mid_fold_loses_nothing_and_counts_nothing_twice() -> None:
    server = make_server(CrashingStore(crashes=2))
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 1, 2])
    outcome = server.close_round(0, 3.0)

    assert sorted(outcome.counted) == [0, 1, 2]
    assert server.runtime.stats().failures == 2
    assert_model(server, reference([0, 1, 2]), version=1)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (encode({"w": torch.zeros(4), "b": torch.zeros(1)}), "shape"),
        (encode({"w": torch.tensor([0.0, float("nan"), 0.0]), "b": torch.zeros(1)}), "non_finite"),
        (encode({"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(1)}), "dtype"),
        (encode({"w": torch.zeros(3), "b": torch.zeros(1)})[:-5], "malformed"),
        (encode({"w": torch.zeros(3)}), "missing_tensor"),
        (encode({"w": torch.zeros(3), "b": torch.zeros(1), "x": torch.zeros(1)}), "unexpected_tensor"),
        (b"\x00" * 20_000, "too_large"),
        (json.dumps({"not": "tensors"}).encode(), "malformed"),
    ],
)
def test_a_malformed_update_is_rejected_with_its_reason_and_the_model_is_unchanged(blob: bytes, reason: str) -> None:
    server = make_server(quorum=1.0)
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 2])
    server.upload(report(1), blob, 1.0)
    outcome = server.close_round(0, 3.0)

    assert outcome.rejected == {1: reason}
    message = json.loads(server.store.get(keys.round_rejection(0, 1)) or b"{}")
    assert message["reason"] == reason and message["message"]
    # quorum 1.0: with one update rejected the round fails visibly, and the model stays at version 0
    assert outcome.status == "failed"
    assert_model(server, INITIAL, version=0)


def test_below_quorum_at_the_deadline_the_round_fails_and_never_hangs() -> None:
    server = make_server(quorum=0.7)
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0])  # two devices dropped out
    outcome = server.close_round(0, 5.0)

    assert outcome.status == "failed" and outcome.version == 0
    assert_model(server, INITIAL, version=0)


def test_at_the_deadline_a_quorum_is_enough() -> None:
    server = make_server(quorum=0.5)
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 2])
    outcome = server.close_round(0, 5.0)

    assert outcome.status == "finalized" and sorted(outcome.counted) == [0, 2]
    assert_model(server, reference([0, 2]), version=1)


def test_late_and_unselected_updates_are_rejected_and_change_nothing() -> None:
    server = make_server(per_round=2)
    plans, _ = server.start_round(0, [0, 1, 2], 0.0)
    selected = sorted(plans)
    outsider = ({0, 1, 2} - set(selected)).pop()
    upload_all(server, selected)
    server.close_round(0, 3.0)
    published = server.model()

    server.upload(report(selected[0]), encode(delta(selected[0])), 4.0)  # late: round 0 is closed
    server.upload(report(outsider), encode(delta(outsider)), 4.0)  # never selected
    server.runtime.drain()

    rejected = server.store.set_members(keys.round_rejected(0))
    assert rejected == {f"{outsider}:not_selected"}  # the late duplicate was already counted: a no-op
    for name in ("w", "b"):
        torch.testing.assert_close(server.model()[name], published[name])

    fresh = make_server(per_round=2)
    fresh.start_round(0, [0, 1, 2], 0.0)
    upload_all(fresh, selected[:1])
    fresh.close_round(0, 3.0)  # finalised at the deadline with one update (quorum 1 of 2)
    fresh.upload(report(selected[1]), encode(delta(selected[1])), 4.0)
    fresh.runtime.drain()
    assert fresh.store.set_members(keys.round_rejected(0)) == {f"{selected[1]}:late"}


def test_a_report_that_does_not_match_its_upload_is_rejected() -> None:
    server = make_server(quorum=1.0)
    server.start_round(0, [0, 1, 2], 0.0)
    bad = Report(0, 2, 20, -1, 32, 1.0, 0.1, 0.1)  # negative steps

    server.upload(bad, encode(delta(2)), 0.0)
    server.runtime.drain()

    assert server.store.set_members(keys.round_rejected(0)) == {"2:malformed_report"}


def test_selection_is_a_function_of_seed_and_round() -> None:
    first = select_devices(3, 5, list(range(100)), 10)
    assert first == select_devices(3, 5, list(reversed(range(100))), 10)
    assert first != select_devices(3, 6, list(range(100)), 10)
    assert len(set(first)) == 10


def test_reports_reach_the_planner_history_once() -> None:
    server = make_server()
    server.start_round(0, [0, 1, 2], 0.0)
    upload_all(server, [0, 1, 2])
    server.upload(report(0), encode(delta(0)), 3.0)  # duplicate
    server.close_round(0, 3.0)

    history = json.loads(server.store.get(keys.device_reports(0)) or b"[]")
    assert [r["round"] for r in history] == [0]


def test_warm_instances_serve_most_invocations() -> None:
    server = make_server()
    for r in range(3):
        server.start_round(r, [0, 1, 2], float(10 * r))
        upload_all(server, [0, 1, 2], round_=r)
        server.close_round(r, float(10 * r + 3))

    stats = server.runtime.stats()
    # per round: plan_round + 3 aggregates + finalize = 5 invocations
    assert stats.invocations == 15
    assert stats.cold_starts + stats.warm_starts == 15
    assert stats.cold_starts <= 2  # max_instances = 2, keep-alive 60 s covers the gaps
