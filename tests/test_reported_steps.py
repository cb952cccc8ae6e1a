"""Reported steps cannot steer weights (issue 22, item 3).

FedNova weights an update by ``n / steps`` and SCAFFOLD divides it by the sum of its steps' learning
rates, so a device that runs all its planned steps and reports one would count many times over. The
server holds a report's steps to what the plan, the device's own speed and the time it had make
plausible (``amble.server.records.reports.hold_steps``): one lying report moves the model, its control variate
and the planner at most 2x, and honest partial work keeps its weight. Every figure below goes through
the real functions (embedded store, real folds).

Each device moves only its own coordinate of the model, by ``STEP`` per step it really ran, so what
each device contributed can be read off the published model.
"""

from __future__ import annotations

import pytest
import torch

from amble.server import (
    ParameterServer,
    controlvariates,
    keys,
)
from amble.server.records.reports import expected_steps, hold_steps
from amble.server.tensors import encode, template_from_json
from amble.strategies import Amble, AmbleSettings, BaseWork, FedNova, FedNovaSettings, Plan, Report, Strategy
from amble.strategies.scaffold import Scaffold
from tests import test_hostile_reports as hostile_reports

BASE = BaseWork(32, 1, 0.1)  # 640 samples at B0 = 32: 20 steps of FedAvg
SAMPLES = {0: 640, 1: 640, 2: 640}
STEP = 2.0**-6  # a power of two: every product and sum of the folds below is exact in float32
FAST_S, SLOW_S, LINK_S = 0.5, 2.0, 0.1  # seconds per step at B = 32; download and upload each
SECOND_ROUND_AT_S = 100.0


def make_server(strategy: Strategy) -> ParameterServer:
    return hostile_reports.make_server(strategy, quorum=1.0, initial={"w": torch.zeros(3)}, samples=SAMPLES)


def send(server: ParameterServer, round_: int, device: int, steps_run: int, reported: int, step_s: float) -> None:
    """``device`` ran ``steps_run`` steps of ``step_s`` seconds each and reports ``reported`` of them;
    it arrives as an honest device would: after download, compute and upload."""
    state = server.round_state(round_)
    assert state is not None
    plan = state.plans[device]
    compute_s = steps_run * step_s * plan.batch_size / 32
    report = Report(round_, device, SAMPLES[device], reported, plan.batch_size, compute_s, LINK_S, LINK_S)
    delta = torch.zeros(3)
    delta[device] = steps_run * STEP
    server.upload(report, encode({"w": delta}), state.started_at_s + compute_s + 2 * LINK_S)


def first_round(server: ParameterServer, liar_reports: int = 20) -> None:
    """Round 0, the base plan (20 steps, no deadline) for all: 0 and 1 fast, 2 slow; 1 reports
    ``liar_reports`` steps."""
    server.start_round(0, [0, 1, 2], 0.0)
    send(server, 0, 0, 20, 20, FAST_S)
    send(server, 0, 1, 20, liar_reports, FAST_S)
    send(server, 0, 2, 20, 20, SLOW_S)
    assert server.close_round(0, 90.0).counted == [0, 1, 2]


def moved(server: ParameterServer) -> list[float]:
    """How far the second round moved each coordinate (the difference of two float32 values)."""
    before, after = server.model(1)["w"].double(), server.model(2)["w"].double()
    return (after - before).tolist()


# -- FedNova ---------------------------------------------------------------------------------------------


def fednova_second_round(liar_reports: int) -> ParameterServer:
    # FedAvg times 10.2, 10.2 and 40.2 s; q = 0.5 makes T_r = 10.2 s: device 2 fits 5 of its 20 steps.
    server = make_server(FedNova(BASE, FedNovaSettings(deadline_quantile=0.5)))
    first_round(server)
    plans, _ = server.start_round(1, [0, 1, 2], SECOND_ROUND_AT_S)
    assert [(p.local_steps, p.deadline_s, p.at_deadline) for p in plans.values()] == [
        (20, pytest.approx(10.2), "stop")
    ] * 3
    send(server, 1, 0, 20, 20, FAST_S)
    send(server, 1, 1, 20, liar_reports, FAST_S)  # ran all 20 in time
    send(server, 1, 2, 5, 5, SLOW_S)  # honest partial work: 5 steps in 10 s, cut at T_r
    assert server.close_round(1, SECOND_ROUND_AT_S + 90.0).counted == [0, 1, 2]
    return server


def test_fednova_one_lie_about_steps_moves_the_model_at_most_twice_its_honest_share() -> None:
    honest = moved(fednova_second_round(liar_reports=20))
    lied = moved(fednova_second_round(liar_reports=1))

    # Honest: S = 640 STEP (1, 1, 1), T/N = 640 * 45 / 1920 = 15: each coordinate moves 15 STEP / 3.
    assert honest == pytest.approx([5 * STEP] * 3, rel=1e-6)  # float32 model values: 1e-6 is 16x their eps
    # The lie is held to ceil(20 / 2) = 10 steps: S = 640 STEP (1, 2, 1), T/N = 640 * 35 / 1920.
    # Unheld it was 1 step: S_1 = 640 * 20 STEP, 20 times the others' (11.6x its honest move).
    assert lied == pytest.approx([35 / 9 * STEP, 70 / 9 * STEP, 35 / 9 * STEP], rel=1e-6)
    assert lied[1] <= 2 * honest[1]
    assert lied[1] / lied[0] == pytest.approx(2.0, rel=1e-6)  # twice the others' where it was equal


def test_fednova_honest_partial_work_keeps_its_weight() -> None:
    # Device 2 ran 5 of 20 steps (cut at T_r, at the speed its reports show): n / 5 on 5 steps of
    # movement is the same normalised weight as n / 20 on device 0's 20 steps: equal moves, bit for bit.
    server = fednova_second_round(liar_reports=20)
    history = server.store.get(keys.device_reports(2))

    step = moved(server)

    assert step[2] == step[0]
    assert history is not None and b'"local_steps": 5' in history  # the planner learns the 5 it ran


# -- SCAFFOLD -------------------------------------------------------------------------------------------


def eta_ratio(server: ParameterServer, liar: int, version: int) -> float:
    """``delta / eta`` of the liar's counted upload, in units of STEP / lr: ``c_k+ - c_k + c``."""
    template = template_from_json(server.store.get(keys.TEMPLATE) or b"")
    c = controlvariates.server_variate(server.store, version, template)["w"].double()
    new = controlvariates.device_variate(server.store, liar, template)["w"].double()
    return float(-(new + c)[liar])  # c_k was zero before its first round


def test_scaffold_a_lie_about_steps_under_a_plan_without_a_deadline_is_held_to_the_plan() -> None:
    # Scaffold plans every device's 20 steps with no deadline: an honest device reports all 20.
    honest, lied = make_server(Scaffold(BASE)), make_server(Scaffold(BASE))
    first_round(honest)
    first_round(lied, liar_reports=1)

    # delta / eta = 20 STEP / (20 * 0.1) for both (unheld: 20 STEP / (1 * 0.1), 20 times more).
    assert eta_ratio(lied, 1, 0) == eta_ratio(honest, 1, 0) == pytest.approx(STEP / 0.1, rel=1e-6)
    assert lied.model(1)["w"].tolist() == honest.model(1)["w"].tolist()


# -- AMBLE's planner (with SCAFFOLD's control variates) ----------------------------------------------------


def amble_second_round(liar: int, liar_reports: int | None) -> ParameterServer:
    # Round 1, q = 0.8: T_r = 40.2 s, set by device 2 (the slow one: batch 32, 20 steps of 2 s); devices 0
    # and 1 get batch 64 (t = 1 s per step) and 35 steps. Each runs all its steps in time; ``liar``
    # reports ``liar_reports`` of them (None: all).
    server = make_server(Amble(BASE, AmbleSettings(control_variates=True)))
    first_round(server)
    plans, _ = server.start_round(1, [0, 1, 2], SECOND_ROUND_AT_S)
    assert [(p.batch_size, p.local_steps, p.deadline_s) for p in plans.values()] == [
        (64, 35, pytest.approx(40.2)),
        (64, 35, pytest.approx(40.2)),
        (32, 20, pytest.approx(40.2)),
    ]
    for device, plan in plans.items():
        reported = plan.local_steps if device != liar or liar_reports is None else liar_reports
        send(server, 1, device, plan.local_steps, reported, SLOW_S if device == 2 else FAST_S)
    assert server.close_round(1, SECOND_ROUND_AT_S + 90.0).counted == [0, 1, 2]
    return server


def test_amble_the_deadline_devices_lie_moves_its_variate_and_everyones_deadline_at_most_twice() -> None:
    honest, lied = amble_second_round(2, None), amble_second_round(2, liar_reports=1)
    # Its speed before: 2 s per step, 0.2 s of link; in the 40.2 s it had, 20 steps fit: held to 10.

    honest_plans, _ = honest.start_round(2, [0, 1, 2], 200.0)
    lied_plans, _ = lied.start_round(2, [0, 1, 2], 200.0)

    # SCAFFOLD: delta / eta is 20 STEP / (10 * 0.1) instead of 20 STEP / (20 * 0.1) (unheld: 20x).
    assert eta_ratio(lied, 2, 1) - eta_ratio(honest, 2, 1) == pytest.approx(STEP / 0.1, rel=1e-5)
    # Its history says 40 s / 10 steps = 4 s per step (unheld: 40 s per step, winsorized to 8); the fit
    # over its two reports (weights 0.7, 1) is (0.7 * 2 + 4) / 1.7 s per step: its FedAvg time, which
    # sets T_r for every device, is 0.2 + 20 * 5.4 / 1.7 s instead of 40.2 s (unheld: 110.8 s, 2.8x).
    assert lied_plans[0].deadline_s == pytest.approx(0.2 + 20 * 5.4 / 1.7)
    assert lied_plans[0].deadline_s <= 2 * honest_plans[0].deadline_s  # type: ignore[operator]


def test_amble_a_fast_devices_lie_moves_its_own_planned_work_at_most_twice_and_no_one_elses() -> None:
    honest, lied = amble_second_round(1, None), amble_second_round(1, liar_reports=1)
    # It ran 35 steps of 1 s at batch 64 and arrived after 35.2 s, in which its speed (0.5 s per step at
    # batch 32, 0.2 s of link) fits 35: held to 18, so its history says 35 / 18 s per step at 64.

    honest_plans, _ = honest.start_round(2, [0, 1, 2], 200.0)
    lied_plans, _ = lied.start_round(2, [0, 1, 2], 200.0)

    # The fit through the origin over (32, 0.5 s) and (64, 35/18 s), weights 0.7 and 1, is 0.0282 s per
    # sample: still batch 64 (the ceiling), and floor((0.9 * 40.2 - 0.2) / 1.804) = 19 steps, not 35:
    # 1,216 samples of work instead of 2,240 (unheld: 16 steps of 40, 640, 3.5x less).
    assert (lied_plans[1].batch_size, lied_plans[1].local_steps) == (64, 19)
    assert honest_plans[1].local_steps * 64 <= 2 * lied_plans[1].local_steps * lied_plans[1].batch_size
    assert (lied_plans[0], lied_plans[2]) == (honest_plans[0], honest_plans[2])


# -- the bound itself ----------------------------------------------------------------------------------


def test_expected_steps_follow_the_plan_the_speed_and_the_time_it_had() -> None:
    history = [Report(0, 1, 640, 20, 32, 10.0, 0.1, 0.1)]  # 0.5 s per step, 0.2 s of link
    cut = Plan(32, 20, 0.1, deadline_s=10.2, at_deadline="stop")

    assert expected_steps(Plan(32, 20, 0.1), history, 3.0) == 20  # no deadline: every step
    assert expected_steps(Plan(32, 20, 0.1, deadline_s=10.2, at_deadline="drop"), history, 3.0) == 20
    assert expected_steps(cut, history, None) == 20  # (10.2 - 0.2) / 0.5
    assert expected_steps(cut, history, 5.2) == 10  # it arrived after 5.2 s: (5.2 - 0.2) / 0.5
    assert expected_steps(cut, history, 0.1) == 1  # the first step always runs
    assert expected_steps(cut, [], None) is None  # no speed to judge by


def test_hold_steps_raises_a_lie_and_keeps_an_honest_report() -> None:
    history = [Report(0, 1, 640, 20, 32, 10.0, 0.1, 0.1)]
    cut = Plan(32, 20, 0.1, deadline_s=10.2, at_deadline="stop")
    lie = Report(1, 1, 640, 1, 32, 10.0, 0.1, 0.1)
    partial = Report(1, 1, 640, 10, 32, 10.0, 0.1, 0.1)  # twice as slow as before: still believed

    assert hold_steps(lie, cut, history, 10.2).local_steps == 10
    assert hold_steps(partial, cut, history, 10.2) == partial
    assert hold_steps(lie, Plan(32, 20, 0.1), history, 10.2).local_steps == 20
    assert hold_steps(lie, cut, [], 10.2) == lie  # a first cut round: nothing to judge by
    tiny = Report(1, 1, 640, 1, 32, 1e-6, 0.0, 0.0)
    assert hold_steps(tiny, Plan(32, 20, 0.1), history, 10.2).compute_s == pytest.approx(20e-6)  # the floor kept
