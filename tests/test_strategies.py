"""The AMBLE planner, FedAvg and the aggregators against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from amble.strategies import (
    Amble,
    AmbleSettings,
    BaseWork,
    DeviceState,
    FedAvg,
    FedAvgAggregator,
    FedNovaAggregator,
    Report,
    fit_speed,
)

BASE = BaseWork(batch_size=32, local_epochs=1, lr=0.1)


def report(device: int, compute_s: float, comm_s: float, batch: int = 32, steps: int = 10, round_: int = 0) -> Report:
    return Report(round_, device, 320, steps, batch, compute_s, comm_s / 2, comm_s / 2)


# Three devices with 320 samples (10 steps per epoch at B0 = 32), one report each at B = 32:
#   device 0: 0.1 s/step, comm 0.4 s -> FedAvg time 0.4 + 10 * 0.1 = 1.4 s, throughput 320 samples/s
#   device 1: 0.3 s/step, comm 0.5 s -> 3.5 s, 106.7 samples/s
#   device 2: 1.0 s/step, comm 1.0 s -> 11 s, 32 samples/s (the straggler)
DEVICES = [
    DeviceState(0, 320, (report(0, 1.0, 0.4),)),
    DeviceState(1, 320, (report(1, 3.0, 0.5),)),
    DeviceState(2, 320, (report(2, 10.0, 1.0),)),
]


def test_amble_q1_plans_match_hand_computation() -> None:
    # lr_max_factor 8 lifts the batch ceiling (B0 * 8) to B_max, so this is SPEC 3's rule verbatim.
    settings = AmbleSettings(batch_min=16, batch_max=256, epochs_max=5, deadline_slack=0.0, lr_max_factor=8.0)
    planner = Amble(BASE, settings)

    plans = planner.plan(3, DEVICES)

    # T = 11 s (device 2). Device 0: B = 32 * 320/32 = 320 -> 256 (B_max); t(256) = 0.8 s;
    # tau = floor((11 - 0.4) / 0.8) = 13 -> capped at floor(5 epochs * 320 / 256) = 6; lr = min(0.8, 0.8).
    assert (plans[0].batch_size, plans[0].local_steps) == (256, 6)
    assert plans[0].lr == pytest.approx(0.8)
    # Device 1: B = 32 * 106.67/32 = 106.67 -> 104 (multiple of 8); t(104) = 0.975 s;
    # tau = floor(10.5 / 0.975) = 10; lr = min(0.1 * 104/32, 0.8) = 0.325.
    assert (plans[1].batch_size, plans[1].local_steps) == (104, 10)
    assert plans[1].lr == pytest.approx(0.325)
    # Device 2 is the reference: B0, tau = floor((11 - 1) / 1.0) = 10, lr0.
    assert (plans[2].batch_size, plans[2].local_steps) == (32, 10)
    assert plans[2].lr == pytest.approx(0.1)
    assert [p.deadline_s for p in plans.values()] == pytest.approx([11.0, 11.0, 11.0])


def test_batches_grow_only_as_far_as_the_capped_lr_follows() -> None:
    planner = Amble(BASE, AmbleSettings(lr_max_factor=2.0, batch_max=256, deadline_slack=0.1))

    plans = planner.plan(3, DEVICES)

    # Ceiling B0 * 2 = 64. Device 0: t(64) = 0.2 s; tau = floor((9.9 - 0.4) / 0.2) = 47 -> 25 (5 epochs).
    assert (plans[0].batch_size, plans[0].local_steps, plans[0].lr) == (64, 25, pytest.approx(0.2))
    # Device 1: 104 -> 64; t(64) = 0.6 s; tau = floor((9.9 - 0.5) / 0.6) = 15.
    assert (plans[1].batch_size, plans[1].local_steps, plans[1].lr) == (64, 15, pytest.approx(0.2))
    assert Amble(BASE, AmbleSettings(lr_scaling="sqrt", lr_max_factor=2.0)).batch_ceiling() == 128
    assert Amble(BASE, AmbleSettings(lr_scaling="none", batch_max=200)).batch_ceiling() == 200


def test_amble_slack_leaves_room_for_noise_except_on_the_deadline_device() -> None:
    planner = Amble(BASE, AmbleSettings(deadline_slack=0.1, lr_max_factor=8.0))

    plans = planner.plan(3, DEVICES)

    # Budget 0.9 * 11 = 9.9 s: device 1 gets floor((9.9 - 0.5) / 0.975) = 9 steps (10 without slack).
    assert plans[1].local_steps == 9
    assert plans[2].local_steps == 10  # the deadline device keeps the whole T_r (its own FedAvg time)


def test_slack_never_gives_a_device_less_time_than_fedavg_would() -> None:
    # Device 3 communicates for 9.5 s: its FedAvg time 10.5 s is above 0.9 * T_r = 9.9 s but fits T_r.
    devices = [*DEVICES, DeviceState(3, 320, (report(3, 1.0, 9.5),))]
    planner = Amble(BASE, AmbleSettings(deadline_slack=0.1))

    plans = planner.plan(3, devices)

    # Budget = its own 10.5 s: at B = 64 (t = 0.2 s) floor((10.5 - 9.5) / 0.2) = 5 steps (1 epoch at B0
    # would be 10 steps of 32, the same 320 samples), not floor((9.9 - 9.5) / 0.2) = 2.
    assert (plans[3].batch_size, plans[3].local_steps) == (64, 5)


def test_a_straggler_slowed_by_its_link_does_not_shrink_the_batches() -> None:
    # Device 3 computes as fast as device 0 but needs 20 s to communicate: it sets T = 21 s,
    # while v_ref stays the slowest compute throughput (device 2, 32 samples/s).
    devices = [*DEVICES, DeviceState(3, 320, (report(3, 1.0, 20.0),))]
    planner = Amble(BASE, AmbleSettings(deadline_slack=0.0, lr_max_factor=8.0))

    plans = planner.plan(3, devices)

    assert plans[0].deadline_s == pytest.approx(21.0)
    assert (plans[0].batch_size, plans[1].batch_size, plans[2].batch_size) == (256, 104, 32)
    assert plans[2].local_steps == 20  # floor((21 - 1) / 1.0): the slow computer fills the wait too


def test_amble_sqrt_scaling_below_the_cap() -> None:
    planner = Amble(BASE, AmbleSettings(lr_scaling="sqrt", lr_max_factor=2.0))

    plans = planner.plan(3, DEVICES)

    assert plans[1].batch_size == 104  # under the sqrt ceiling 32 * 2**2 = 128
    assert plans[1].lr == pytest.approx(0.1 * (104 / 32) ** 0.5)  # 0.180, under the 0.2 cap
    assert (plans[0].batch_size, plans[0].lr) == (128, pytest.approx(0.2))


def test_amble_median_deadline_gives_the_straggler_partial_work() -> None:
    planner = Amble(BASE, AmbleSettings(deadline_quantile=0.5, batch_min=16, deadline_slack=0.1))

    plans = planner.plan(3, DEVICES)

    # T = 3.5 s (device 1, the median), v_ref = 106.67 samples/s; others plan to 0.9 T = 3.15 s.
    # Device 1: B0, tau = floor((3.5 - 0.5) / 0.3) = 10 exactly (no floating-point 9.999...).
    assert (plans[1].batch_size, plans[1].local_steps) == (32, 10)
    # Device 0: B = 32 * 320 / 106.67 = 96 -> ceiling 64; t(64) = 0.2; tau = floor(2.75 / 0.2) = 13.
    assert (plans[0].batch_size, plans[0].local_steps) == (64, 13)
    # Device 2: B = 9.6 -> 8 -> B_min 16; t(16) = 0.5; tau = floor(2.15 / 0.5) = 4: 0.2 of an epoch.
    assert (plans[2].batch_size, plans[2].local_steps) == (16, 4)
    assert plans[2].lr == pytest.approx(0.05)  # linear scaling down with the smaller batch


def test_with_q_below_1_every_device_stops_at_the_deadline() -> None:
    planner = Amble(BASE, AmbleSettings(deadline_quantile=0.5, unseen_devices="profile"))

    plans = planner.plan(3, [*DEVICES, DeviceState(5, 100)])

    assert {p.at_deadline for p in plans.values()} == {"stop"}
    assert [p.deadline_s for p in plans.values()] == pytest.approx([3.5] * 4)
    assert (plans[5].batch_size, plans[5].local_steps) == (32, 4)  # the unseen device keeps the base plan
    q1 = Amble(BASE, AmbleSettings(deadline_quantile=1.0, unseen_devices="profile"))
    assert {p.at_deadline for p in q1.plan(3, [*DEVICES, DeviceState(5, 100)]).values()} == {"continue"}


def test_an_unseen_device_is_planned_at_the_median_speed_and_counts_in_the_deadline() -> None:
    # Prior = the medians over devices 0-2: 0.3/32 s per sample, no intercept, comm 0.5 s. Device 5
    # (100 samples, ceil(100/32) = 4 base steps) is expected to take 0.5 + 4 * 0.3 = 1.7 s.
    planner = Amble(BASE, AmbleSettings(deadline_quantile=0.5))

    plans = planner.plan(3, [*DEVICES, DeviceState(5, 100)])

    # q = 0.5 over [1.4, 1.7, 3.5, 11]: the 2nd smallest, 1.7 s (without the prior: 3.5 s over three).
    assert [p.deadline_s for p in plans.values()] == pytest.approx([1.7] * 4)
    # Throughputs 320, 106.7, 32 and the prior's 106.7: v_ref (q = 0.5 counted from the fastest) is
    # 106.7, so B = B0 and lr0, with steps up to the epoch cap floor(5 * 100/32) = 15, stopping at T_r.
    assert (plans[5].batch_size, plans[5].local_steps, plans[5].at_deadline) == (32, 15, "probe")
    assert plans[5].lr == pytest.approx(0.1)


def test_at_q_1_an_unseen_device_works_to_the_deadline_and_a_straggler_stops_there() -> None:
    planner = Amble(BASE, AmbleSettings(deadline_quantile=1.0))  # q = 1, prior
    unseen = DeviceState(5, 320)
    # Only the fast device 0 is selected with it; devices 1 and 2 took part in recent rounds (peers).
    plans = planner.plan(3, [DEVICES[0], unseen], peers=DEVICES[1:])

    # Prior = the median of devices 0-2 (device 1: 0.3 s/step, comm 0.5): 0.5 + 10 * 0.3 = 3.5 s, so
    # T_r = max(1.4, 3.5) = 3.5 s, not device 0's 1.4 s: the round is sized for the newcomer too.
    assert plans[0].deadline_s == pytest.approx(3.5)
    assert plans[0].at_deadline == "continue"
    # The newcomer: v_ref = its own prior throughput (the slowest here), so B0, lr0, up to 5 epochs
    # (50 steps), and it stops at T_r: a fast newcomer fills the round, a slow one cannot stretch it.
    assert (plans[5].batch_size, plans[5].local_steps, plans[5].lr) == (32, 50, 0.1)
    assert (plans[5].deadline_s, plans[5].at_deadline) == (pytest.approx(3.5), "probe")
    profile = Amble(BASE, AmbleSettings(deadline_quantile=1.0, unseen_devices="profile")).plan(
        3, [DEVICES[0], unseen], peers=DEVICES[1:]
    )
    assert profile[0].deadline_s == pytest.approx(1.4)
    assert (profile[5].local_steps, profile[5].deadline_s) == (10, None)


def test_with_nobody_seen_anywhere_every_device_gets_the_base_plan() -> None:
    plans = Amble(BASE, AmbleSettings()).plan(0, [DeviceState(5, 100), DeviceState(6, 64)], peers=[])

    assert {k: (p.batch_size, p.local_steps, p.deadline_s) for k, p in plans.items()} == {
        5: (32, 4, None),
        6: (32, 2, None),
    }


def test_amble_gives_unseen_devices_the_base_plan_and_plans_the_rest() -> None:
    planner = Amble(BASE, AmbleSettings(deadline_quantile=1.0, unseen_devices="profile"))
    devices = [DeviceState(5, 100), DEVICES[0], DEVICES[2]]

    plans = planner.plan(0, devices)

    assert (plans[5].batch_size, plans[5].local_steps, plans[5].lr) == (32, 4, 0.1)  # ceil(100/32) = 4
    assert plans[5].deadline_s is None
    assert plans[0].batch_size == 64


def test_amble_proximal_term_reaches_every_plan() -> None:
    devices = [DeviceState(5, 100), *DEVICES]
    plans = Amble(BASE, AmbleSettings(deadline_quantile=0.5, prox_mu=0.01)).plan(3, devices)

    assert {k: p.prox_mu for k, p in plans.items()} == {5: 0.01, 0: 0.01, 1: 0.01, 2: 0.01}
    without = Amble(BASE, AmbleSettings(deadline_quantile=0.5)).plan(3, devices)
    assert {p.prox_mu for p in without.values()} == {0.0}
    # Only the objective changes: the same batches, steps and learning rates.
    assert [(p.batch_size, p.local_steps, p.lr) for p in plans.values()] == [
        (p.batch_size, p.local_steps, p.lr) for p in without.values()
    ]


def test_amble_deadline_cap_shortens_work() -> None:
    planner = Amble(BASE, AmbleSettings(deadline_s=5.0, deadline_slack=0.1))

    plans = planner.plan(3, DEVICES)

    # Device 2's FedAvg time (11 s) does not fit the 5 s cap: it plans to 0.9 * 5 = 4.5 s.
    assert plans[2].local_steps == 3  # floor((4.5 - 1) / 1.0)
    assert plans[2].deadline_s == pytest.approx(5.0)


def test_fedavg_plans_fixed_work() -> None:
    plans = FedAvg(BASE).plan(0, [*DEVICES, DeviceState(9, 20)])
    assert {(p.batch_size, p.local_steps, p.lr) for d, p in plans.items() if d != 9} == {(32, 10, 0.1)}
    assert (plans[9].batch_size, plans[9].local_steps) == (20, 1)  # a batch never exceeds the data


def test_speed_fit_proportional_from_one_report() -> None:
    model = fit_speed([report(0, 2.0, 0.6)])
    assert model.step_s(32) == pytest.approx(0.2)
    assert model.step_s(64) == pytest.approx(0.4)
    assert model.comm_s == pytest.approx(0.6)


def test_speed_fit_recovers_intercept_and_slope() -> None:
    # t(B) = 0.05 + 0.01 B, observed exactly at B = 16 and 64.
    reports = [report(0, 10 * (0.05 + 0.01 * 16), 1.0, 16, 10, 0), report(0, 10 * (0.05 + 0.01 * 64), 1.0, 64, 10, 1)]
    model = fit_speed(reports, decay=0.5)
    assert model.step_intercept_s == pytest.approx(0.05)
    assert model.step_per_sample_s == pytest.approx(0.01)


def test_speed_fit_weights_recent_reports_more() -> None:
    reports = [report(0, 1.0, 0.0, round_=0), report(0, 3.0, 0.0, round_=1)]  # 0.1 then 0.3 s/step
    model = fit_speed(reports, decay=0.5)
    # weights 0.5 (old) and 1 (new): b*32 = (0.5*0.1 + 1*0.3) / 1.5
    assert model.step_s(32) == pytest.approx((0.05 + 0.3) / 1.5)


def _two_updates() -> tuple[list[Report], list[dict[str, torch.Tensor]]]:
    reports = [
        Report(0, 0, 1, 2, 32, 1.0, 0.0, 0.0),  # n = 1, tau = 2
        Report(0, 1, 3, 6, 32, 1.0, 0.0, 0.0),  # n = 3, tau = 6
    ]
    return reports, [{"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}]


def _fold(aggregator: FedAvgAggregator | FedNovaAggregator) -> torch.Tensor:
    reports, deltas = _two_updates()
    total = {"w": torch.zeros(1)}
    stats: dict[str, float] = {}
    for rep, delta in zip(reports, deltas, strict=True):
        c = aggregator.contribution(rep)
        total = {"w": total["w"] + c.weight * delta["w"]}
        for k, v in c.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    return aggregator.apply({"w": torch.tensor([1.0])}, total, stats)["w"]


def test_fedavg_aggregation_by_sample_count() -> None:
    # x = 1 + 0.25 * 2 + 0.75 * 3 = 3.75
    assert _fold(FedAvgAggregator()).item() == pytest.approx(3.75)


def test_fednova_aggregation_hand_computed_tau_2_and_6() -> None:
    # p = (0.25, 0.75); sum p tau = 0.5 + 4.5 = 5; sum p Delta/tau = 0.25 * 1 + 0.75 * 0.5 = 0.625
    # x = 1 + 5 * 0.625 = 4.125
    assert _fold(FedNovaAggregator()).item() == pytest.approx(4.125)


def test_aggregator_does_not_mutate_inputs() -> None:
    params = {"w": torch.tensor([1.0]), "count": torch.tensor(3)}
    summed = {"w": torch.tensor([2.0])}
    out = FedAvgAggregator().apply(params, summed, {"num_samples": 2.0})
    assert params["w"].item() == 1.0 and summed["w"].item() == 2.0
    assert out["w"].item() == 2.0 and out["count"].item() == 3


def test_one_lying_peer_moves_the_prior_no_further_than_the_honest_devices_speeds() -> None:
    # Four honest peers at 0.1-0.4 s per step (comm 0.4 s); a fifth claims 100 s per step and 50 s of
    # communication. The prior is a median, so the liar only shifts it by one rank, within the honest range.
    honest = [DeviceState(10 + i, 320, (report(10 + i, 1.0 * (i + 1), 0.4),)) for i in range(4)]
    liar = DeviceState(99, 320, (report(99, 1000.0, 50.0),))
    planner = Amble(BASE, AmbleSettings(deadline_quantile=1.0))
    newcomer = DeviceState(5, 320)

    lied = planner.plan(3, [newcomer], peers=[*honest, liar])[5]
    truthful = planner.plan(3, [newcomer], peers=honest)[5]

    # Honest prior: median of 0.1..0.4 = 0.25 s/step -> 0.4 + 10 * 0.25 = 2.9 s; with the liar the median
    # of five is 0.3 s/step -> 3.4 s: the deadline stays between the honest devices' own FedAvg times.
    assert truthful.deadline_s == pytest.approx(2.9)
    assert lied.deadline_s == pytest.approx(3.4)
    assert 0.4 + 10 * 0.1 <= lied.deadline_s <= 0.4 + 10 * 0.4
    assert lied.local_steps == truthful.local_steps == 50  # up to the epoch cap, stopping at T_r either way
