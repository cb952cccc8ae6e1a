"""Reports a device cannot use to stop, stall or steer planning (issue 13, SPEC 9).

A report is parsed into a flat, bounded, typed :class:`Report` or rejected as ``malformed_report``;
its times are bounded by what the server observed; one device's reports move ``T_r`` and its
neighbours' plans no further than a stated factor; and a device whose data breaks planning is left
out of its round with a reason while the round goes on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch

from amble.errors import UpdateRejected
from amble.live.coordinator import Coordinator
from amble.server import (
    LocalRuntime,
    MemoryEventLog,
    MemoryStore,
    ParameterServer,
    PoolSettings,
    RunSettings,
    ServerFunctions,
    keys,
)
from amble.server.records.reports import as_observed, bound_by_elapsed, check_report
from amble.server.records.state import RoundState
from amble.server.tensors import encode
from amble.strategies import (
    Amble,
    AmbleSettings,
    BaseWork,
    DeadlineFedAvg,
    DeadlineSettings,
    DeviceState,
    FedNova,
    FedProx,
    PartialWorkSettings,
    Plan,
    Report,
    Strategy,
    fit_speed,
)
from amble.strategies.rounds import estimate_round
from tests.test_strategies import BASE, DEVICES

SAMPLES = {0: 64, 1: 192, 2: 128}  # B0 = 32: 2, 6 and 4 steps of FedAvg
INITIAL = {"w": torch.tensor([1.0, 2.0, 3.0])}
VALID: dict[str, Any] = {
    "round": 0,
    "device": 2,
    "num_samples": 128,
    "local_steps": 4,
    "batch_size": 32,
    "compute_s": 1.0,
    "download_s": 0.1,
    "upload_s": 0.1,
}


def make_server(
    strategy: Strategy,
    quorum: float = 0.5,
    per_round: int = 3,
    initial: dict[str, torch.Tensor] | None = None,
    samples: dict[int, int] | None = None,
) -> ParameterServer:
    """An embedded parameter server (functions run in the caller's thread) for ``strategy``."""
    store, events = MemoryStore(), MemoryEventLog()
    functions = ServerFunctions(store, strategy)
    runtime = LocalRuntime(store, events, functions.handlers(), PoolSettings(max_instances=2, invocation_s=0.0))
    server = ParameterServer(store, events, runtime)
    settings = RunSettings(seed=0, devices_per_round=per_round, quorum=quorum, max_update_bytes=10_000)
    server.initialize(INITIAL if initial is None else initial, SAMPLES if samples is None else samples, settings)
    return server


def amble() -> Amble:
    return Amble(BaseWork(32, 1, 0.1), AmbleSettings())


def honest(device: int, round_: int = 0, compute_s: float = 1.0) -> Report:
    return Report(round_, device, SAMPLES[device], SAMPLES[device] // 32, 32, compute_s, 0.1, 0.1)


def update() -> bytes:
    return encode({"w": torch.ones(3)})


def history(server: ParameterServer, device: int) -> list[dict[str, Any]]:
    stored: list[dict[str, Any]] = json.loads(server.store.get(keys.device_reports(device)) or b"[]")
    return stored


# -- a flat, bounded, typed report --------------------------------------------------------------------


def deeply_nested(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):  # built iteratively: only a recursive parser would overflow on it
        nested = [nested]
    return nested


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"compute_s": 0.0}, "under 1e-06 s per step"),
        ({"compute_s": 3.9e-6}, "under 1e-06 s per step"),  # 4 steps: just under the floor
        ({"compute_s": -1.0}, "compute_s = -1.0 is not a finite number"),
        ({"compute_s": math.nan}, "compute_s = nan"),
        ({"compute_s": math.inf}, "compute_s = inf"),
        ({"compute_s": 1e300}, "compute_s = 1e+300"),
        ({"download_s": -0.1}, "download_s = -0.1"),
        ({"upload_s": 10**400}, "upload_s = 1000"),  # a huge int: compared exactly, never overflowing a float
        ({"compute_s": "1.0"}, "compute_s is a str"),
        ({"compute_s": deeply_nested(100_000)}, "compute_s is a list"),
        ({"local_steps": True}, "local_steps is a bool"),
        ({"round": 0.0}, "round is a float"),
        ({"num_samples": 2**31}, "num_samples = 2147483648 is outside"),
        ({"local_steps": 0}, "local_steps = 0 is outside"),
        ({"note": "hello"}, "unexpected fields ['note']"),
        ({"upload_s": None}, "upload_s is a NoneType"),
    ],
)
def test_a_bad_value_is_rejected_as_malformed_with_what_is_wrong(change: dict[str, Any], words: str) -> None:
    store = MemoryStore()
    store.put(keys.device_info(2), json.dumps({"num_samples": 128}).encode())
    state = RoundState("open", 0, (2,), {2: Plan(32, 4, 0.1)})

    with pytest.raises(UpdateRejected) as rejected:
        check_report(store, 0, 2, {**VALID, **change}, state)

    assert rejected.value.reason == "malformed_report"
    assert words in str(rejected.value)
    assert "send a flat JSON object with exactly the numeric fields" in str(rejected.value)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([VALID], "the report is a list, not a JSON object"),
        ("{}", "the report is a str"),
        ({"report": VALID}, "unexpected fields ['report']"),
        ({k: v for k, v in VALID.items() if k != "upload_s"}, "missing fields ['upload_s']"),
    ],
)
def test_a_report_that_is_not_the_flat_object_is_rejected(raw: Any, words: str) -> None:
    store = MemoryStore()
    store.put(keys.device_info(2), json.dumps({"num_samples": 128}).encode())
    state = RoundState("open", 0, (2,), {2: Plan(32, 4, 0.1)})

    with pytest.raises(UpdateRejected) as rejected:
        check_report(store, 0, 2, raw, state)

    assert rejected.value.reason == "malformed_report"
    assert words in str(rejected.value)


def test_a_valid_report_parses_to_its_values_and_the_step_floor_itself_is_allowed() -> None:
    store = MemoryStore()
    store.put(keys.device_info(2), json.dumps({"num_samples": 128}).encode())
    state = RoundState("open", 0, (2,), {2: Plan(32, 4, 0.1)})

    report = check_report(store, 0, 2, {**VALID, "compute_s": 4e-6, "download_s": 0, "upload_s": 0}, state)

    assert report == Report(0, 2, 128, 4, 32, 4e-6, 0, 0)


def test_a_zero_time_report_is_rejected_and_the_next_round_is_planned() -> None:
    # Before: accepted, then the next plan_round divided by zero and the run died.
    server = make_server(amble())
    server.start_round(0, [0, 1, 2], 0.0)
    zero = Report(0, 0, 64, 2, 32, 0.0, 0.0, 0.0)

    server.upload(zero, update(), 0.5)
    server.upload(honest(1), update(), 1.2)
    server.upload(honest(2), update(), 1.2)
    outcome = server.close_round(0, 5.0)
    plans, _ = server.start_round(1, [0, 1, 2], 6.0)

    assert outcome.status == "finalized" and sorted(outcome.counted) == [1, 2]
    assert outcome.rejected == {0: "malformed_report"}
    assert history(server, 0) == []
    # Still unseen: planned at the prior of the others' speeds, exactly as if it had never reported.
    seen = [DeviceState(d, SAMPLES[d], (honest(d),)) for d in (1, 2)]
    assert plans[0] == amble().plan(1, [DeviceState(0, SAMPLES[0]), *seen], peers=[])[0]
    assert plans[0].at_deadline == "probe"
    assert sorted(plans) == [0, 1, 2]


# -- bounded by what the server observed -----------------------------------------------------------------


def test_times_beyond_the_elapsed_time_are_scaled_down_to_it() -> None:
    claimed = Report(0, 2, 128, 4, 32, 5.0, 0.5, 0.5)  # 6 s in a round that has run 2 s

    bounded = bound_by_elapsed(claimed, 2.0)

    budget_s = 2.0 * (1 + 1e-6) + 1e-3  # elapsed plus the stated tolerance
    assert bounded.compute_s == pytest.approx(5.0 * budget_s / 6)
    assert bounded.download_s == pytest.approx(0.5 * budget_s / 6)
    assert bounded.upload_s == pytest.approx(0.5 * budget_s / 6)
    assert bound_by_elapsed(claimed, 6.0) == claimed  # exactly the elapsed time: untouched
    assert bound_by_elapsed(claimed, -1.0) == claimed  # clocks that disagree bound nothing


def test_the_planner_learns_at_most_the_observed_elapsed_time() -> None:
    server = make_server(amble(), quorum=1.0)
    server.start_round(0, [0, 1, 2], 10.0)
    inflated = Report(0, 0, 64, 2, 32, 1000.0, 0.0, 0.0)

    server.upload(inflated, update(), 12.0)  # arrived 2 s after the round started
    server.upload(honest(1), update(), 11.2)  # 1.2 s, exactly its download + compute + upload
    server.upload(honest(2), update(), 11.2)
    outcome = server.close_round(0, 13.0)

    assert sorted(outcome.counted) == [0, 1, 2]  # the work counts: only the claim is bounded
    assert history(server, 0)[0]["compute_s"] == pytest.approx(2.0 * (1 + 1e-6) + 1e-3)
    assert history(server, 1)[0] == honest(1).to_dict()


def test_time_the_server_saw_elapse_beyond_the_report_counts_as_communication() -> None:
    # A device that waited 0.3 s for its next poll: 0.5 s elapsed, 0.05 + 0.1 + 0.05 reported.
    reported = Report(0, 2, 128, 4, 32, 0.1, 0.05, 0.05)

    observed = as_observed(reported, 0.5)

    assert (observed.compute_s, observed.upload_s) == (0.1, 0.05)  # compute is the device's own figure
    assert observed.download_s == pytest.approx(0.05 + 0.3)  # the unseen 0.3 s joins its link time
    assert as_observed(reported, 0.2) == reported  # exactly the elapsed time: untouched, as in simulation
    assert as_observed(reported, 0.2 + 1e-3) == reported  # within the stated tolerance: untouched
    assert as_observed(reported, 0.1) == bound_by_elapsed(reported, 0.1)  # more than elapsed: scaled down


def test_a_served_rounds_deadline_includes_the_time_a_device_needs_to_get_its_task() -> None:
    # Issue 21: compute of milliseconds, but each upload arrived 0.4 s after the round began (polling,
    # HTTP): T_r must cover those 0.4 s, or no device can start a step before it.
    server = make_server(amble(), quorum=1.0)
    coordinator = Coordinator(server, rounds=2, min_devices=3, round_timeout_s=30)
    server.start_round(0, [0, 1, 2], coordinator.now_s() - 0.4)  # the round began 0.4 s ago
    for device in (0, 1, 2):
        steps = SAMPLES[device] // 32
        coordinator.accept(Report(0, device, SAMPLES[device], steps, 32, 0.002 * steps, 0.001, 0.0), update())
    server.close_round(0, coordinator.now_s())

    plans, _ = server.start_round(1, [0, 1, 2], coordinator.now_s())

    # Each device's FedAvg time is now at least 0.4 s: its compute plus all it did not report as compute.
    assert all(plan.deadline_s is not None and plan.deadline_s >= 0.4 for plan in plans.values())
    assert all(plan.at_deadline == "stop" for plan in plans.values())  # q = 0.8 as shipped: bounded
    learned = history(server, 0)[0]
    assert learned["compute_s"] == 0.002 * (SAMPLES[0] // 32) and learned["download_s"] >= 0.4 - learned["compute_s"]
    assert coordinator.arrivals[0][0].report.download_s == 0.001  # the round's record keeps what the device said


# -- one report, one device: bounded influence --------------------------------------------------------------


@pytest.mark.parametrize("inflated_s", [1000.0, 1e5])
def test_one_inflated_report_moves_its_own_estimate_boundedly(inflated_s: float) -> None:
    reports = [honest(2, r) for r in range(3)] + [honest(2, 3, compute_s=inflated_s)]  # 0.25 s/step, then more

    model = fit_speed(reports, decay=0.5)

    # The newest is winsorized to 4x the median (0.25 -> 1.0 s/step); weights 0.125, 0.25, 0.5, 1:
    # (0.875 * 0.25 + 1 * 1.0) / 1.875 = 0.65 s per step, whatever the inflated report said.
    assert model.step_s(32) == pytest.approx((0.875 * 0.25 + 1.0) / 1.875)


def hostile(compute_s: float) -> DeviceState:
    return DeviceState(3, 320, (Report(0, 3, 320, 10, 32, compute_s, 0.0, 0.0),))


@pytest.mark.parametrize("compute_s", [1e5, 1e9])
def test_one_device_cannot_stretch_the_deadline_beyond_32x_the_others_median(compute_s: float) -> None:
    # DEVICES' FedAvg times are 1.4, 3.5 and 11 s; the hostile one claims compute_s over 10 steps.
    estimate = estimate_round([*DEVICES, hostile(compute_s)], BASE, 1.0)

    assert estimate is not None
    assert estimate.deadline_s == pytest.approx(32 * 3.5)  # not compute_s: 32 x median(1.4, 3.5, 11)
    # v_ref is held to 1/128 of the others' median throughput (320, 106.7, 32 samples/s).
    assert estimate.ref_throughput == pytest.approx(320 / 3 / 128)


def test_one_device_cannot_shrink_the_deadline_below_the_bound() -> None:
    fast = DeviceState(3, 320, (Report(0, 3, 320, 10, 32, 1e-5, 0.0, 0.0),))  # the per-step floor, no link

    estimate = estimate_round([*DEVICES, fast], BASE, 0.25)  # the fastest sets T_r

    assert estimate is not None
    assert estimate.deadline_s == pytest.approx(3.5 / 32)


@pytest.mark.parametrize("compute_s", [1e5, 1e9])
def test_a_neighbours_amble_plan_moves_no_further_than_the_bound(compute_s: float) -> None:
    settings = AmbleSettings(epochs_max=1000, deadline_slack=0.0, lr_max_factor=8.0)

    plans = Amble(BASE, settings).plan(3, [*DEVICES, hostile(compute_s)])

    # Device 0 (0.1 s/step at B0, comm 0.4 s): batch 256 (the ceiling), t(256) = 0.8 s; its budget is
    # T_r = 112 s, not compute_s: floor((112 - 0.4) / 0.8) = 139 steps (13 with T_r = 11 s unhindered).
    assert (plans[0].batch_size, plans[0].local_steps, plans[0].deadline_s) == (256, 139, pytest.approx(112.0))


@pytest.mark.parametrize(
    "strategy",
    [
        DeadlineFedAvg(BASE, DeadlineSettings(deadline_quantile=0.8)),
        FedProx(BASE, PartialWorkSettings(deadline_quantile=0.8)),
        FedNova(BASE, PartialWorkSettings(deadline_quantile=0.8)),
        Amble(BASE, AmbleSettings(deadline_quantile=0.8)),
    ],
)
def test_the_baselines_share_the_bounded_deadline(strategy: Strategy) -> None:
    # 4 devices, q = 0.8: rank ceil(3.2) = 4, the largest, which the hostile device would be.
    plans = strategy.plan(3, [*DEVICES, hostile(1e9)])

    assert [p.deadline_s for p in plans.values()] == pytest.approx([112.0] * 4)


def test_honest_fleets_keep_their_deadline() -> None:
    estimate = estimate_round(DEVICES, BASE, 1.0)

    assert estimate is not None
    assert (estimate.deadline_s, estimate.ref_throughput) == (pytest.approx(11.0), pytest.approx(32.0))


# -- a device whose data breaks planning is left out, the round goes on -----------------------------------


class Faulty(Strategy):
    """The AMBLE planner, except that planning ``device`` raises or gives it a NaN learning rate."""

    def __init__(self, device: int, fault: str) -> None:
        self.inner = amble()
        self.aggregator = self.inner.aggregator
        self.device, self.fault = device, fault

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        if self.fault == "raise" and any(d.device == self.device for d in devices):
            raise ZeroDivisionError("float division by zero")
        plans = self.inner.plan(round_index, devices)
        if self.fault == "nan" and self.device in plans:
            plans[self.device] = replace(plans[self.device], lr=math.nan)
        return plans


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("raise", "planning it raised ZeroDivisionError: float division by zero"),
        ("nan", "its plan's learning rate nan is not a finite positive number"),
    ],
)
def test_a_device_that_breaks_planning_is_left_out_and_the_round_completes(fault: str, reason: str) -> None:
    server = make_server(Faulty(1, fault), quorum=1.0)

    plans, _ = server.start_round(0, [0, 1, 2], 0.0)
    state = server.round_state(0)
    server.upload(honest(0), update(), 1.2)
    server.upload(honest(2), update(), 1.2)
    outcome = server.close_round(0, 5.0)

    assert state is not None and state.expected == (0, 2) and sorted(plans) == [0, 2]
    assert list(state.excluded) == [1] and reason in state.excluded[1]
    assert (outcome.status, sorted(outcome.counted)) == ("finalized", [0, 2])  # quorum 1.0 of the 2 expected


def test_bad_histories_from_before_the_checks_do_not_crash_planning() -> None:
    server = make_server(amble())
    good = honest(1, compute_s=1.2).to_dict()  # 0.2 s per step
    stale = [{**good, "compute_s": 0.0}, {"garbage": True}, "text", good]
    server.store.put(keys.device_reports(1), json.dumps(stale).encode())
    server.store.put(keys.device_reports(2), b"not json")

    plans, _ = server.start_round(1, [0, 1, 2], 0.0)

    state = server.round_state(1)
    assert state is not None and state.excluded == {}
    # Device 1 is planned from its one good report alone (0.2 s per step: it is also the prior of the
    # unseen devices, so all three are planned at its speed); device 2's unreadable history means unseen.
    alone = amble().plan(1, [DeviceState(0, 64), DeviceState(1, 192, (honest(1, 0, 1.2),)), DeviceState(2, 128)])
    assert plans == alone
    assert (plans[1].batch_size, plans[1].local_steps) == (32, 6)
    assert (plans[2].batch_size, plans[2].at_deadline) == (32, "probe")


def test_a_selected_device_without_a_registration_is_left_out() -> None:
    server = make_server(amble(), per_round=4)

    plans, _ = server.start_round(0, [0, 1, 2, 7], 0.0)  # 7 is offered as available, never registered

    state = server.round_state(0)
    assert state is not None and state.expected == (0, 1, 2) and sorted(plans) == [0, 1, 2]
    assert list(state.excluded) == [7] and "device 7 is not registered" in state.excluded[7]
