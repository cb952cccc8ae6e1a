"""The baselines against hand-computed plans, and how devices behave at a plan's deadline."""

from __future__ import annotations

from pathlib import Path

import pytest

from amble.config import config_from_dict
from amble.fleet.clock import RoundTiming
from amble.sim import run_experiment
from amble.sim.common import apply_deadline
from amble.strategies import (
    AdaBatch,
    AdaBatchSettings,
    DeadlineFedAvg,
    DeadlineSettings,
    DeviceState,
    FedNova,
    FedNovaAggregator,
    FedProx,
    PartialWorkSettings,
    Plan,
)
from tests.test_strategies import BASE, DEVICES

# DEVICES (tests/test_strategies.py): FedAvg times 1.4 s, 3.5 s and 11 s; throughputs at B0 = 32 of
# 320, 106.7 and 32 samples/s; 320 samples each (10 steps of 32).


def test_deadline_fedavg_keeps_fixed_work_and_drops_past_the_median() -> None:
    plans = DeadlineFedAvg(BASE, DeadlineSettings(deadline_quantile=0.5)).plan(3, DEVICES)

    assert {(p.batch_size, p.local_steps, p.lr) for p in plans.values()} == {(32, 10, 0.1)}
    assert [p.deadline_s for p in plans.values()] == pytest.approx([3.5, 3.5, 3.5])
    assert {p.at_deadline for p in plans.values()} == {"drop"}


def test_deadline_fedavg_waits_for_everyone_before_any_measurement() -> None:
    plans = DeadlineFedAvg(BASE, DeadlineSettings()).plan(0, [DeviceState(0, 320), DeviceState(1, 64)])
    expected = [(10, None, "continue"), (2, None, "continue")]
    assert [(p.local_steps, p.deadline_s, p.at_deadline) for p in plans.values()] == expected


def test_fedprox_plans_partial_work_with_the_proximal_term() -> None:
    plans = FedProx(BASE, PartialWorkSettings(deadline_quantile=0.5, prox_mu=0.1)).plan(3, DEVICES)

    assert {(p.batch_size, p.local_steps, p.prox_mu, p.at_deadline) for p in plans.values()} == {(32, 10, 0.1, "stop")}
    assert plans[2].deadline_s == pytest.approx(3.5)


def test_fednova_shares_fedprox_plans_and_normalises_aggregation() -> None:
    strategy = FedNova(BASE, PartialWorkSettings(deadline_quantile=1.0, prox_mu=0.0))
    plans = strategy.plan(3, DEVICES)
    assert isinstance(strategy.aggregator, FedNovaAggregator)
    assert [p.deadline_s for p in plans.values()] == pytest.approx([11.0, 11.0, 11.0])
    assert {p.prox_mu for p in plans.values()} == {0.0}


def test_adabatch_scales_batch_with_throughput_keeps_epochs_and_lr() -> None:
    plans = AdaBatch(BASE, AdaBatchSettings(batch_min=16, batch_max=256)).plan(3, DEVICES)

    # B = 32 * v_k / v_slowest: 320 -> 256 (cap), 106.7 -> 104, 32; one epoch each: ceil(320 / B) steps
    assert [(plans[k].batch_size, plans[k].local_steps) for k in (0, 1, 2)] == [(256, 2), (104, 4), (32, 10)]
    assert {p.lr for p in plans.values()} == {0.1}
    assert {p.deadline_s for p in plans.values()} == {None}


TIMING = RoundTiming(download_s=0.5, compute_s=10.0, upload_s=0.5, dropped_at_s=None)  # 10 steps of 1 s


def test_a_device_past_its_deadline_sends_the_whole_steps_it_finished() -> None:
    plan, timing = apply_deadline(Plan(32, 10, 0.1, deadline_s=5.2, at_deadline="stop"), TIMING)
    # 5.2 s - 1 s of communication leaves 4.2 s: 4 whole steps
    assert (plan.local_steps, timing.compute_s, timing.dropped_at_s) == (4, 4.0, None)
    assert timing.total_s <= 5.2


def test_a_device_past_its_deadline_drops_under_deadline_fedavg() -> None:
    plan, timing = apply_deadline(Plan(32, 10, 0.1, deadline_s=5.2, at_deadline="drop"), TIMING)
    assert (plan.local_steps, timing.dropped_at_s) == (10, 5.2)


def test_within_the_deadline_or_without_one_nothing_changes() -> None:
    for plan in (
        Plan(32, 10, 0.1, deadline_s=11.0, at_deadline="stop"),
        Plan(32, 10, 0.1, deadline_s=5.0, at_deadline="continue"),
        Plan(32, 10, 0.1),
    ):
        assert apply_deadline(plan, TIMING) == (plan, TIMING)


def test_no_whole_step_before_the_deadline_means_nothing_to_send() -> None:
    _, timing = apply_deadline(Plan(32, 10, 0.1, deadline_s=1.5, at_deadline="stop"), TIMING)
    assert timing.dropped_at_s == 1.5


def test_a_probing_device_sends_one_step_even_past_the_deadline_and_stops_like_stop_otherwise() -> None:
    plan, timing = apply_deadline(Plan(32, 10, 0.1, deadline_s=1.5, at_deadline="probe"), TIMING)
    assert (plan.local_steps, timing.compute_s, timing.dropped_at_s) == (1, 1.0, None)  # ends at 2 s, late
    plan, timing = apply_deadline(Plan(32, 10, 0.1, deadline_s=5.2, at_deadline="probe"), TIMING)
    assert (plan.local_steps, timing.compute_s) == (4, 4.0)


def test_every_strategy_runs_side_by_side_and_deadlines_bite(tmp_path: Path) -> None:
    from tests.test_sim import SMALL, read_jsonl

    raw = {
        **SMALL,
        "rounds": 5,
        "strategies": [
            "fedavg",
            "amble",
            {"name": "deadline", "deadline_quantile": 0.5},
            {"name": "fedprox", "deadline_quantile": 0.5, "prox_mu": 0.01},
            {"name": "fednova", "deadline_quantile": 0.5},
            "adabatch",
        ],
    }

    summary = run_experiment(config_from_dict(raw), tmp_path, progress=False)

    assert list(summary["strategies"]) == ["fedavg", "amble", "deadline", "fedprox", "fednova", "adabatch"]
    devices = read_jsonl(tmp_path / "devices.jsonl")

    def statuses(strategy: str) -> set[str]:
        return {d["status"] for d in devices if d["strategy"] == strategy}

    assert "dropped" in statuses("deadline") and "partial" not in statuses("deadline")
    assert "partial" in statuses("fedprox")  # (a device whose link alone outlasts T_r still drops)
    assert statuses("fedavg") == {"ok"}
    # deadline-FedAvg rounds are shorter than FedAvg's, at the price of dropped work
    time = {name: s["virtual_time_s"] for name, s in summary["strategies"].items()}
    assert time["deadline"] < time["fedavg"]
    assert (
        summary["strategies"]["deadline"]["updates_aggregated"] < summary["strategies"]["fedavg"]["updates_aggregated"]
    )
