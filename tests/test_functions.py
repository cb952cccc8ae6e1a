"""The parameter-server functions end to end through the embedded Store, EventLog and Runtime.

Exactly-once effect: duplicates, redeliveries and a function that crashes mid-fold all leave the
aggregate equal to the reference computed by hand; malformed updates leave the model unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch

from amble.config import config_from_dict
from amble.runsetup import run_settings
from amble.server import (
    Invocation,
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
from amble.server.records.state import RoundState
from amble.server.runtime.base import FUNCTIONS_GROUP, FUNCTIONS_TOPIC
from amble.server.tensors import encode
from amble.strategies import Amble, AmbleSettings, BaseWork, FedAvg, FedAvgAggregator, Report, Strategy
from amble.strategies.base import Contribution, Params

INITIAL = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5]), "steps": torch.tensor(7)}
SAMPLES = {0: 64, 1: 192, 2: 128}  # FedAvg plans at B0 = 32: 2, 6 and 4 steps


class CrashingStore(MemoryStore):
    """Raises inside the fold's commit the first ``crashes`` times: an instance dying mid-fold."""

    def __init__(self, crashes: int) -> None:
        super().__init__()
        self.crashes = crashes

    def commit(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        if any("/shard/" in key for key in writes) and self.crashes > 0:
            self.crashes -= 1
            raise ConnectionError("instance killed while folding")
        return super().commit(writes)


def make_server(
    store: MemoryStore | None = None,
    quorum: float = 0.5,
    per_round: int = 3,
    strategy: Strategy | None = None,
    max_update_norm: float | None = None,
    max_update_norm_ratio: float | None = None,
) -> ParameterServer:
    store = store or MemoryStore()
    events = MemoryEventLog()
    functions = ServerFunctions(store, strategy or FedAvg(BaseWork(32, 1, 0.1)))
    runtime = LocalRuntime(store, events, functions.handlers(), PoolSettings(max_instances=2, invocation_s=0.02))
    server = ParameterServer(store, events, runtime)
    settings = RunSettings(
        seed=0,
        devices_per_round=per_round,
        quorum=quorum,
        max_update_bytes=10_000,
        max_update_norm=max_update_norm,
        max_update_norm_ratio=max_update_norm_ratio,
    )
    server.initialize(INITIAL, SAMPLES, settings)
    return server


def report(device: int, round_: int = 0) -> Report:
    return Report(round_, device, SAMPLES[device], SAMPLES[device] // 32, 32, 1.0, 0.1, 0.1)


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
    # w: 1 + (64*1 + 192*2 + 128*3)/384 = 1 + 832/384 for each entry of w
    assert_model(server, reference([0, 1, 2]), version=1)
    assert server.model()["w"][0].item() == pytest.approx(1 + 832 / 384)


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


MALFORMED = [
    (encode({"w": torch.zeros(4), "b": torch.zeros(1)}), "shape"),
    (encode({"w": torch.tensor([0.0, float("nan"), 0.0]), "b": torch.zeros(1)}), "non_finite"),
    (encode({"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(1)}), "dtype"),
    (encode({"w": torch.zeros(3), "b": torch.zeros(1)})[:-5], "malformed"),
    (encode({"w": torch.zeros(3)}), "missing_tensor"),
    (encode({"w": torch.zeros(3), "b": torch.zeros(1), "x": torch.zeros(1)}), "unexpected_tensor"),
    (b"\x00" * 20_000, "too_large"),
    (json.dumps({"not": "tensors"}).encode(), "malformed"),
]
"""Updates every backend must reject, with the reason it records."""


@pytest.mark.parametrize(("blob", "reason"), MALFORMED)
def test_a_malformed_update_is_rejected_with_its_reason_and_the_model_is_unchanged(blob: bytes, reason: str) -> None:
    assert_malformed_update_rejected(make_server(quorum=1.0), blob, reason)


def assert_malformed_update_rejected(server: ParameterServer, blob: bytes, reason: str) -> None:
    """Device 1 uploads ``blob`` among good updates: rejected for ``reason``, the model untouched."""
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 2])
    upload = server.upload(report(1), blob, 1.0)
    outcome = server.close_round(0, 3.0)

    assert outcome.rejected == {1: reason}
    message = json.loads(server.store.get(keys.round_rejection(0, 1, upload)) or b"{}")
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

    rejected = {m.split(":")[0] + ":" + m.split(":")[2] for m in server.store.set_members(keys.round_rejected(0))}
    assert rejected == {f"{outsider}:not_selected"}  # the late duplicate was already counted: a no-op
    for name in ("w", "b"):
        torch.testing.assert_close(server.model()[name], published[name])

    fresh = make_server(per_round=2)
    fresh.start_round(0, [0, 1, 2], 0.0)
    upload_all(fresh, selected[:1])
    fresh.close_round(0, 3.0)  # finalised at the deadline with one update (quorum 1 of 2)
    fresh.upload(report(selected[1]), encode(delta(selected[1])), 4.0)
    fresh.runtime.drain()
    assert [m.split(":")[2] for m in fresh.store.set_members(keys.round_rejected(0))] == ["late"]


def test_a_report_that_does_not_match_its_upload_is_rejected() -> None:
    server = make_server(quorum=1.0)
    server.start_round(0, [0, 1, 2], 0.0)
    bad = Report(0, 2, 128, -1, 32, 1.0, 0.1, 0.1)  # negative steps

    upload = server.upload(bad, encode(delta(2)), 0.0)
    server.runtime.drain()

    assert server.store.set_members(keys.round_rejected(0)) == {f"2:{upload}:malformed_report"}


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
    # per round: plan_round + 3 aggregates + finalize = 5 invocations. Round 0: plan_round starts
    # instance 1 (cold, busy until 0.02 s); the upload at 0.0 finds it busy and starts instance 2
    # (cold); everything after lands on a warm instance (keep-alive 60 s covers the 10 s gaps).
    assert (stats.invocations, stats.cold_starts, stats.warm_starts) == (15, 2, 13)


def test_a_lie_about_the_sample_count_is_rejected_not_weighted() -> None:
    server = make_server(quorum=1.0)
    server.start_round(0, [0, 1, 2], 0.0)
    liar = Report(0, 0, 1_000_000, 2, 32, 1.0, 0.1, 0.1)

    server.upload(liar, encode(delta(0)), 0.0)
    outcome = server.close_round(0, 1.0)

    assert outcome.rejected == {0: "malformed_report"}
    assert_model(server, INITIAL, version=0)


def test_a_bad_retry_does_not_destroy_a_good_update() -> None:
    server = make_server()
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 1, 2])
    server.upload(report(2), b"\x00" * 20_000, 2.5)  # an oversize retry of a counted update
    outcome = server.close_round(0, 3.0)

    assert sorted(outcome.counted) == [0, 1, 2]
    assert outcome.rejected == {}  # already counted: the retry is a no-op, not a rejection
    assert_model(server, reference([0, 1, 2]), version=1)


class FailOnceStore(MemoryStore):
    """Raises the first time ``operation`` touches a key containing ``fragment``."""

    def __init__(self, operation: str, fragment: str) -> None:
        super().__init__()
        self.operation, self.fragment, self.armed = operation, fragment, True

    def _maybe_fail(self, operation: str, key: str) -> None:
        if self.armed and operation == self.operation and self.fragment in key:
            self.armed = False
            raise ConnectionError(f"instance killed during {operation} {key}")

    def compare_and_set(self, key: str, value: bytes, expected_version: int) -> bool:
        self._maybe_fail("compare_and_set", key)
        return super().compare_and_set(key, value, expected_version)

    def delete(self, key: str) -> None:
        self._maybe_fail("delete", key)
        super().delete(key)


def test_finalize_crashing_after_its_decision_still_publishes() -> None:
    store = FailOnceStore("compare_and_set", keys.LATEST)  # dies between the state CAS and `latest`
    server = make_server(store)
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 1, 2])
    outcome = server.close_round(0, 3.0)

    assert (outcome.status, outcome.version) == ("finalized", 1)
    assert server.runtime.stats().failures == 1
    assert_model(server, reference([0, 1, 2]), version=1)


def test_aggregate_crashing_after_its_fold_still_completes_the_round() -> None:
    store = FailOnceStore("delete", "/update/")  # dies after the fold committed, before cleanup
    server = make_server(store)
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 1, 2])
    server.runtime.drain()

    state = json.loads(server.store.get(keys.round_state(0)) or b"{}")
    assert state["status"] == "finalized"  # round_ready was still announced: no deadline needed
    assert server.store.keys("round/000000/update/") == []
    assert_model(server, reference([0, 1, 2]), version=1)


def test_a_fold_racing_the_deadline_is_either_in_the_model_or_rejected() -> None:
    server = make_server(quorum=0.5)
    functions = ServerFunctions(server.store, FedAvg(BaseWork(32, 1, 0.1)))
    server.start_round(0, [0, 1, 2], 0.0)
    upload_all(server, [0, 1])
    server.runtime.drain()
    server.upload(report(2), encode(delta(2)), 2.0)
    (late_event,) = server.events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, "racer")
    original = server.store.compare_and_set

    def racing_cas(key: str, value: bytes, expected_version: int) -> bool:
        if key == keys.round_meta(0) and json.loads(value)["sealed"] and late_event is not None:
            # Between finalize's read of the partial and its seal, another worker folds device 2.
            functions.aggregate(late_event, Invocation(99, True, {}))
            server.events.ack(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, late_event.id)
            object.__setattr__(server.store, "compare_and_set", original)
        return original(key, value, expected_version)

    object.__setattr__(server.store, "compare_and_set", racing_cas)
    outcome = server.close_round(0, 5.0)

    state = json.loads(server.store.get(keys.round_state(0)) or b"{}")
    assert sorted(outcome.counted) == sorted(state["counted"]) == [0, 1, 2]
    assert outcome.rejected == {}
    assert_model(server, reference([0, 1, 2]), version=1)


def test_after_the_seal_a_fold_is_rejected_as_late_and_the_model_ignores_it() -> None:
    server = make_server(quorum=0.5)
    server.start_round(0, [0, 1, 2], 0.0)
    upload_all(server, [0, 1])
    server.close_round(0, 3.0)

    server.upload(report(2), encode(delta(2)), 4.0)
    server.runtime.drain()

    assert [m.split(":")[2] for m in server.store.set_members(keys.round_rejected(0))] == ["late"]
    assert_model(server, reference([0, 1]), version=1)


def test_two_plan_round_runs_agree_on_plans_and_expectations() -> None:
    server = make_server(per_round=2)
    server.events.publish(FUNCTIONS_TOPIC, "round_start", {"round": 0, "available": [0, 1]}, 0.0)
    plans, _ = server.start_round(0, [0, 1, 2], 0.0)  # a second, different request for round 0

    state = json.loads(server.store.get(keys.round_state(0)) or b"{}")
    assert sorted(plans) == sorted(state["expected"]) == [0, 1]


def test_decided_rounds_are_compacted_to_their_records_and_two_models_are_kept() -> None:
    server = make_server()
    for r in range(3):
        server.start_round(r, [0, 1, 2], float(r * 10))
        upload_all(server, [0, 1, 2], round_=r)
        assert server.close_round(r, r * 10 + 5.0).status == "finalized"

    assert server.store.keys("model/0") == [keys.model(2), keys.model(3)]
    assert server.store.keys("round/000001/shard/") == []  # the partial sums went with the round
    meta = json.loads(server.store.get(keys.round_meta(1)) or b"{}")
    assert meta["sealed"] and sorted(meta["counted"]) == [0, 1, 2]  # what a late duplicate is checked against
    server.upload(report(0, round_=1), encode(delta(0)), 40.0)  # a duplicate after compaction: still a no-op
    server.runtime.drain()
    assert server.latest_version() == 3 and server.store.set_members(keys.round_rejected(1)) == set()


# -- bounded updates, folds that cannot overflow, and no non-finite model -----------------------------


def exact(values: list[float]) -> torch.Tensor:
    """A float32 tensor of values computed in float64 and rounded once, as the server does."""
    return torch.tensor(values, dtype=torch.float64).float()


HONEST_0_2 = {"w": exact([w + 448 / 192 for w in (1, 2, 3)]), "b": exact([0.5 - 256 / 192])}
"""FedAvg of devices 0 and 2 alone: w + (64 * 1 + 128 * 3) / 192 and b = 0.5 + (64 * 0 - 128 * 2) / 192."""


def assert_exact_model(server: ParameterServer, expected: dict[str, torch.Tensor], version: int) -> None:
    model = server.model()
    assert server.latest_version() == version
    assert torch.equal(model["w"], expected["w"]) and torch.equal(model["b"], expected["b"]), model


@pytest.mark.parametrize(
    "strategy",
    [FedAvg(BaseWork(32, 1, 0.1)), Amble(BaseWork(32, 1, 0.1), AmbleSettings())],
    ids=["fedavg", "amble"],
)
def test_an_update_of_1e30_everywhere_is_refused_and_the_model_is_the_honest_aggregate(strategy: Strategy) -> None:
    # Prepare: the config's default bounds; device 1 sends finite values that overflowed the old float32 fold
    server = make_server(strategy=strategy, max_update_norm=1e4, max_update_norm_ratio=20.0)
    server.start_round(0, [0, 1, 2], 0.0)

    # Execute
    upload_all(server, [0, 2])
    upload = server.upload(report(1), encode({"w": torch.full((3,), 1e30), "b": torch.tensor([1e30])}), 1.0)
    outcome = server.close_round(0, 3.0)

    # Assert: refused for its norm (2e30 > 1e4), the round finalised with the honest two, exactly
    assert (outcome.status, outcome.counted, outcome.rejected) == ("finalized", [0, 2], {1: "norm"})
    message = json.loads(server.store.get(keys.round_rejection(0, 1, upload)) or b"{}")["message"]
    assert "2e+30" in message and "server.max_update_norm (10000)" in message
    assert_exact_model(server, HONEST_0_2, version=1)
    # and the run goes on: the next round counts every honest update (sent as planned: AMBLE's plans
    # now follow the devices' measured speeds)
    plans, _ = server.start_round(1, [0, 1, 2], 10.0)
    for d, plan in plans.items():
        planned = Report(1, d, SAMPLES[d], plan.local_steps, plan.batch_size, 1.0, 0.1, 0.1)
        server.upload(planned, encode(delta(d)), 11.0)
    assert sorted(server.close_round(1, 13.0).counted) == [0, 1, 2]


def test_the_relative_bound_compares_with_the_median_norm_behind_the_model() -> None:
    # Prepare: ratio 2, no absolute bound. Norms of delta(d): sqrt(3), sqrt(13), sqrt(31) (w = d+1 thrice, b = -d)
    server = make_server(max_update_norm_ratio=2.0)
    server.start_round(0, [0, 1, 2], 0.0)
    upload_all(server, [0, 1, 2])
    first = server.close_round(0, 3.0)  # the first model has no reference: a 3.2x spread is fine

    # Execute: round 1 trains from version 1, whose reference is the median, sqrt(13) = 3.606: bound 7.211
    server.start_round(1, [0, 1, 2], 10.0)
    scaled = {0: 4.0, 1: 3.0, 2: 1.0}  # norms 4 sqrt(3) = 6.93, 3 sqrt(13) = 10.8, sqrt(31) = 5.57
    uploads = {
        d: server.upload(report(d, 1), encode({n: t * scaled[d] for n, t in delta(d).items()}), 11.0) for d in scaled
    }
    second = server.close_round(1, 13.0)

    # Assert
    assert first.counted == [0, 1, 2] and first.rejected == {}
    assert json.loads(server.store.get(keys.norm_reference(1)) or b"{}") == {"median_norm": 13**0.5, "updates": 3}
    assert (second.status, second.counted, second.rejected) == ("finalized", [0, 2], {1: "norm"})
    message = json.loads(server.store.get(keys.round_rejection(1, 1, uploads[1])) or b"{}")["message"]
    assert "10.82" in message and "2 times the median norm 3.606" in message and "model version 1" in message
    median = json.loads(server.store.get(keys.norm_reference(2)) or b"{}")["median_norm"]
    assert median == pytest.approx((4 * 3**0.5 + 31**0.5) / 2)


class HugeWeightFedAvg(FedAvgAggregator):
    """FedAvg with every weight and count scaled by 2**900: the same model (powers of two scale
    exactly), but a float32 update of 3e38 then weighs 3e38 * 192 * 2**900, past float64's range."""

    def contribution(self, report: Report) -> Contribution:
        n = float(report.num_samples) * 2.0**900
        return Contribution(weight=n, stats={"num_samples": n})


def test_an_update_that_would_overflow_the_sum_is_refused_not_folded() -> None:
    # Prepare: no norm bounds, so only the overflow check stands in the way
    server = make_server(strategy=FedAvg(BaseWork(32, 1, 0.1), aggregator=HugeWeightFedAvg()))
    server.start_round(0, [0, 1, 2], 0.0)

    # Execute: device 1 lands between the two honest folds of the same shard
    server.upload(report(0), encode(delta(0)), 0.0)
    upload = server.upload(report(1), encode({"w": torch.full((3,), 3e38), "b": torch.tensor([0.0])}), 1.0)
    server.upload(report(2), encode(delta(2)), 2.0)
    outcome = server.close_round(0, 3.0)

    # Assert
    assert (outcome.status, outcome.counted, outcome.rejected) == ("finalized", [0, 2], {1: "overflow"})
    assert "non-finite" in json.loads(server.store.get(keys.round_rejection(0, 1, upload)) or b"{}")["message"]
    assert_exact_model(server, HONEST_0_2, version=1)


class OverscaledFedAvg(FedAvgAggregator):
    """FedAvg with a server learning rate of 1e39: finite in float64, infinite once rounded to float32."""

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        return super().apply(global_params, {n: s * 1e39 for n, s in weighted_sum.items()}, stats)


def test_a_non_finite_model_is_never_published_and_the_round_fails_saying_why() -> None:
    server = make_server(strategy=FedAvg(BaseWork(32, 1, 0.1), aggregator=OverscaledFedAvg()))
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0, 1, 2])
    outcome = server.close_round(0, 3.0)

    assert (outcome.status, outcome.version, outcome.rejected) == ("failed", 0, {})
    state = RoundState.from_json(server.store.get(keys.round_state(0)) or b"{}")
    assert state.failure is not None and "NaN or infinite values in ['b', 'w']" in state.failure
    assert server.store.get(keys.model(1)) is None and server.store.get(keys.norm_reference(1)) is None
    assert_model(server, INITIAL, version=0)


def test_below_quorum_the_failure_says_so() -> None:
    server = make_server(quorum=0.7)
    server.start_round(0, [0, 1, 2], 0.0)

    upload_all(server, [0])
    server.close_round(0, 5.0)

    state = RoundState.from_json(server.store.get(keys.round_state(0)) or b"{}")
    assert state.failure == "1 of 3 updates counted at the deadline, below the quorum of 3"


def test_the_configs_norm_bounds_reach_the_functions() -> None:
    default = run_settings(config_from_dict({}))
    off = run_settings(config_from_dict({"server": {"max_update_norm": None, "max_update_norm_ratio": 5}}))

    assert (default.max_update_norm, default.max_update_norm_ratio) == (1e4, 20.0)
    assert (off.max_update_norm, off.max_update_norm_ratio) == (None, 5.0)
    assert (
        RunSettings.from_json(
            b'{"seed": 0, "devices_per_round": 3, "quorum": 0.5, "max_update_bytes": 9}'
        ).max_update_norm
        is None
    )


def test_a_device_never_seen_is_planned_at_the_prior_of_the_devices_counted_in_recent_rounds() -> None:
    server = make_server(per_round=2, strategy=Amble(BaseWork(32, 1, 0.1), AmbleSettings()))
    server.start_round(0, [0, 1], 0.0)  # both selected: nobody is known yet, so both get the base plan
    for d in (0, 1):  # device 0: 2 steps in 1 s, device 1: 6 steps in 1 s; comm 0.2 s each
        server.upload(report(d), encode(delta(d)), 2.0)
    server.close_round(0, 3.0)

    plans, _ = server.start_round(1, [2], 4.0)  # only device 2, never seen, can be selected

    # The prior: the median of devices 0 and 1 (counted in round 0, not selected now): (0.5 + 1/6) / 2
    # s per step at B0, comm 0.2 s. Device 2's 4 base steps: T_r = 0.2 + 4 * 1/3 = 1.533 s. It works at
    # B0 (it is its own v_ref) up to the epoch cap, 5 * 128 / 32 = 20 steps, and stops at T_r.
    assert (plans[2].batch_size, plans[2].local_steps, plans[2].lr, plans[2].at_deadline) == (32, 20, 0.1, "probe")
    assert plans[2].deadline_s == pytest.approx(0.2 + 4 / 3)
    profile = make_server(per_round=2, strategy=Amble(BaseWork(32, 1, 0.1), AmbleSettings(unseen_devices="profile")))
    profile.start_round(0, [0, 1], 0.0)
    for d in (0, 1):
        profile.upload(report(d), encode(delta(d)), 2.0)
    profile.close_round(0, 3.0)
    assert profile.start_round(1, [2], 4.0)[0][2].deadline_s is None  # the base plan: a profiling round
