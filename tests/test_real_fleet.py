"""A real fleet gets the same files as a simulated one, and the simulator replays it (issue 17).

The unit tests build a served run's round records by hand and check the rows and the fleet trace
derived from them against hand-computed values. The end-to-end test serves a small synthetic config
to a local fleet of three real ``amble device`` processes (``--local-devices``), then replays the
trace it recorded with ``amble run``: the rows and the replay's step times are checked against
each other, never against a clock.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from amble.cli import main
from amble.config import FleetConfig, config_from_dict
from amble.errors import AmbleError, ConfigError
from amble.fleet import StepTime, VirtualClock, load_trace
from amble.live.coordinator import RoundRecord
from amble.live.localfleet import LocalFleet, parse_slowdowns
from amble.live.record import TRACE_FILE, device_rows, fleet_trace, metrics_row
from amble.sim import run_experiment
from tests.conftest import free_port
from tests.test_sim import SMALL

REFERENCE = StepTime.from_mapping({16: 0.002, 32: 0.003, 64: 0.005})


def plan(batch_size: int, local_steps: int) -> dict[str, Any]:
    return {"batch_size": batch_size, "local_steps": local_steps, "lr": 0.05}


def arrival(
    device: int, at_s: float, batch_size: int, steps: int, compute_s: float, download_s: float, counted: bool = True
) -> dict[str, Any]:
    return {
        "at_s": at_s,
        "counted": counted,
        "round": 0,
        "device": device,
        "num_samples": 100,
        "local_steps": steps,
        "batch_size": batch_size,
        "compute_s": compute_s,
        "download_s": download_s,
        "upload_s": 0.0,
    }


def record(
    r: int, started_s: float, closed_s: float, plans: dict[str, Any], arrivals: dict[str, Any], available: list[int]
) -> RoundRecord:
    counted = sum(1 for a in arrivals.values() if a["counted"])
    return RoundRecord(
        r, "finalized", r + 1, counted, len(plans), closed_s, 0.5, plans, 1.0, started_s, closed_s, 0.0, available, 0,
        arrivals,
    )  # fmt: skip


def test_a_round_splits_into_compute_comm_and_idle_per_device_and_one_metrics_row() -> None:
    plans = {"0": plan(16, 10), "1": plan(16, 10), "2": plan(32, 5)}
    arrivals = {
        "0": arrival(0, 11.0, 16, 10, 0.8, 0.05),  # 1 s after the start: 0.8 computing, 0.2 on the link
        "1": arrival(1, 11.5, 16, 4, 1.0, 0.05),  # 4 of 10 steps (cut at a deadline)
        "2": arrival(2, 11.25, 32, 5, 0.5, 0.05, counted=False),  # arrived, not counted
    }
    rows = device_rows(record(0, 10.0, 12.0, plans, arrivals, [0, 1, 2, 3]), "fedavg", {0: 100, 1: 100, 2: 100}, 1)
    rows.append(device_rows(record(0, 10.0, 12.0, {"3": plan(16, 10)}, {}, [3]), "fedavg", {3: 100}, 1)[0])

    assert [(r["device"], r["status"]) for r in rows] == [(0, "ok"), (1, "partial"), (2, "failed"), (3, "dropped")]
    assert [(r["compute_s"], r["comm_s"], r["idle_s"]) for r in rows[:3]] == [
        (0.8, pytest.approx(0.2), 1.0),
        (1.0, 0.5, 0.5),
        (0.5, 0.75, 0.75),
    ]
    assert (rows[3]["compute_s"], rows[3]["comm_s"], rows[3]["idle_s"]) == (None, None, None)  # unknown: null
    assert [r["epochs"] for r in rows] == [1.6, 0.64, 1.6, 1.6]
    metrics = metrics_row(record(0, 10.0, 12.0, plans, arrivals, [0, 1, 2]), "fedavg", 4.0, rows[:3])
    assert (metrics["virtual_time_s"], metrics["wall_time_s"], metrics["round_s"]) == (8.0, 12.0, 2.0)
    assert (metrics["participants"], metrics["completed"], metrics["dropped"]) == (3, 2, 0)
    assert metrics["samples_processed"] == 10 * 16 + 4 * 16


def test_the_trace_carries_each_devices_measured_step_times_links_and_presence(tmp_path: Path) -> None:
    config = config_from_dict({**SMALL, "data": {**SMALL["data"], "num_devices": 3}, "devices_per_round": 2})
    rounds = [
        record(
            0, 100.0, 101.0, {"0": plan(16, 10), "1": plan(16, 5)},
            {"0": arrival(0, 100.06, 16, 10, 0.04, 0.01), "1": arrival(1, 100.05, 16, 5, 0.05, 0.0)}, [0, 1],
        ),
        record(1, 102.0, 103.0, {"0": plan(32, 10), "1": plan(16, 5)}, {"0": arrival(0, 102.1, 32, 10, 0.06, 0.02)},
               [0, 1]),
    ]  # fmt: skip

    trace = fleet_trace(rounds, REFERENCE, config, "fedavg")

    zero, one, two = trace["devices"]
    # Device 0: 0.004 s/step at batch 16 (2x the reference) and 0.006 at 32 (2x): measured points
    # kept, 64 from the reference's shape past the largest measured batch: 0.006 * 0.005 / 0.003.
    assert zero["step_s"] == {"16": pytest.approx(0.004), "32": pytest.approx(0.006), "64": pytest.approx(0.01)}
    assert (zero["slowdown"], zero["download_s"], zero["upload_s"]) == pytest.approx((2.0, 0.015, 0.015))
    assert (zero["p_dropout"], zero["availability"], zero["jitter"]) == (0.0, 1.0, 0.0)
    # Device 1: 0.01 s/step at 16 only (5x); it sent nothing in round 1 of the two it was selected in.
    assert one["step_s"] == {"16": pytest.approx(0.01), "32": pytest.approx(0.015), "64": pytest.approx(0.025)}
    assert (one["slowdown"], one["p_dropout"]) == pytest.approx((5.0, 0.5))
    # Device 2 never registered: never available, the median measured slowdown, no step times.
    assert (two["availability"], two["slowdown"], "step_s" in two) == (0.0, 3.5, False)

    path = tmp_path / TRACE_FILE
    path.write_text(json.dumps(trace))
    fleet = load_trace(path, FleetConfig(kind="trace", trace=str(path)), 3)
    clock = VirtualClock(StepTime.from_mapping({16: 1.0, 64: 1.0}), model_bytes=10**9, seed=0)  # never used
    timing = clock.timing(fleet[0], 0, 0, batch_size=64, steps=3)
    assert (timing.compute_s, timing.download_s, timing.upload_s) == pytest.approx((0.03, 0.015, 0.015))
    assert clock.timing(fleet[1], 0, 1, batch_size=32, steps=2).compute_s == pytest.approx(0.03)
    assert not any(clock.is_available(fleet[2], r, 2) for r in range(50))


def test_a_device_that_never_delivered_is_replayed_as_always_dropping(tmp_path: Path) -> None:
    # Prepare: device 1 was selected twice and sent nothing either time (crashed, or always too slow)
    config = config_from_dict({**SMALL, "data": {**SMALL["data"], "num_devices": 2}, "devices_per_round": 2})
    rounds = [
        record(r, 10.0 * r, 10.0 * r + 1, {"0": plan(16, 10), "1": plan(16, 5)},
               {"0": arrival(0, 10.0 * r + 0.5, 16, 10, 0.04, 0.01)}, [0, 1])
        for r in range(2)
    ]  # fmt: skip

    # Execute: its own trace, loaded for a replay
    trace = fleet_trace(rounds, REFERENCE, config, "fedavg")
    path = tmp_path / TRACE_FILE
    path.write_text(json.dumps(trace))
    fleet = load_trace(path, FleetConfig(kind="trace", trace=str(path)), 2)

    # Assert: what was measured (it always dropped) replays as it was, instead of being refused
    assert trace["devices"][1]["p_dropout"] == 1.0
    assert fleet[1].p_dropout == 1.0 and fleet[0].p_dropout == 0.0


def test_what_slows_every_device_at_once_is_recorded_as_shared_jitter_and_replayed_as_one_draw(
    tmp_path: Path,
) -> None:
    """Both devices take twice as long in round 1 (a load on the machine they share): that is one
    factor for the fleet, not noise of each device's own."""
    config = config_from_dict({**SMALL, "data": {**SMALL["data"], "num_devices": 2}, "devices_per_round": 2})
    plans = {"0": plan(16, 10), "1": plan(16, 10)}
    rounds = [
        record(r, 10.0 * r, 10.0 * r + 5, plans, {
            "0": arrival(0, 10.0 * r + 1, 16, 10, 0.04 * factor, 0.0),
            "1": arrival(1, 10.0 * r + 1, 16, 10, 0.1 * factor, 0.0),
        }, [0, 1])
        for r, factor in enumerate((1, 2, 1))
    ]  # fmt: skip

    trace = fleet_trace(rounds, REFERENCE, config, "fedavg")

    # Log factors by round: 0, ln 2, 0 for both devices; their medians are 0.004 and 0.01 s per step.
    assert trace["shared_jitter"] == pytest.approx(math.log(2) / math.sqrt(3))
    assert [d["jitter"] for d in trace["devices"]] == [pytest.approx(0.0, abs=1e-12)] * 2
    assert [d["step_s"]["16"] for d in trace["devices"]] == [pytest.approx(0.004), pytest.approx(0.01)]
    path = tmp_path / TRACE_FILE
    path.write_text(json.dumps(trace))
    fleet = load_trace(path, FleetConfig(kind="trace", trace=str(path)), 2)
    clock = VirtualClock(REFERENCE, model_bytes=1000, seed=0)
    factors = [
        [clock.timing(fleet[k], r, k, 16, 10).compute_s / (10 * fleet[k].step_s(16)) for k in (0, 1)]  # type: ignore[misc]
        for r in range(20)
    ]
    assert all(a == pytest.approx(b) for a, b in factors)  # one draw per round for the fleet
    assert len({round(a, 9) for a, _ in factors}) == 20  # a new one each round


def test_a_recorded_trace_that_is_not_one_is_refused_with_what_it_needs(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"devices": [{"device": 0, "slowdown": 2}]}))
    with pytest.raises(ConfigError, match='needs "format": "amble-fleet-trace/1"'):
        load_trace(path, FleetConfig(kind="trace", trace=str(path)), 2)
    path.write_text(json.dumps({"format": "amble-fleet-trace/1", "devices": [{"device": 0, "step_s": {"16": -1}}]}))
    with pytest.raises(ConfigError, match=r"devices\[0\]: 'step_s' must map batch sizes >= 1 to positive seconds"):
        load_trace(path, FleetConfig(kind="trace", trace=str(path)), 2)


def test_local_fleet_options_are_checked_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_slowdowns("1,2,3", 3) == [1.0, 2.0, 3.0]
    assert parse_slowdowns("2", 3) == [2.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match="gives 2 values for 3 --local-devices"):
        parse_slowdowns("1,2", 3)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))  # devices_per_round 4

    status = main(["serve", str(config), "--out", str(tmp_path / "out"), "--local-devices", "3"])

    assert status == 2
    assert "--local-devices 3 is fewer than devices_per_round (4)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_device_of_the_local_fleet_that_fails_fails_the_fleet(tmp_path: Path) -> None:
    log = tmp_path / "device_1.log"
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    with log.open("w") as output:  # the child keeps its own handle
        failing = subprocess.Popen([sys.executable, "-c", "import sys; print('no data'); sys.exit(3)"], stdout=output)
    fleet = LocalFleet({0: ok, 1: failing}, {0: tmp_path / "device_0.log", 1: log})

    with pytest.raises(AmbleError, match=r"device 1 exited with status 3 \(log: .*device_1.log; last line: no data\)"):
        fleet.finish(timeout_s=60)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_a_served_local_fleet_writes_the_run_files_and_a_trace_that_amble_run_replays(tmp_path: Path) -> None:
    raw = {
        **SMALL,
        "data": {**SMALL["data"], "num_devices": 3},
        "devices_per_round": 3,
        "rounds": 2,
        "strategies": ["fedavg"],
    }
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "served"
    command = [sys.executable, "-m", "amble", "serve", str(config), "--out", str(out), "--port", str(free_port())]
    command += ["--linger-s", "1", "--local-devices", "3", "--slowdowns", "1,1,2"]

    served = subprocess.run(command, capture_output=True, timeout=600)

    assert served.returncode == 0, served.stderr.decode()[-3000:]
    metrics, devices = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "devices.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [(m["strategy"], m["round"], m["status"], m["completed"]) for m in metrics] == [
        ("fedavg", 0, "finalized", 3),
        ("fedavg", 1, "finalized", 3),
    ]
    # FedAvg: batch 16, one epoch of each device's 2,000 / 3 samples (666 or 667): 42 steps
    assert [(d["round"], d["device"], d["batch_size"], d["local_steps"], d["status"]) for d in devices] == [
        (r, k, 16, 42, "ok") for r in (0, 1) for k in (0, 1, 2)
    ]
    for row in devices:  # each device's time adds up to its round's
        round_s = metrics[row["round"]]["round_s"]
        assert row["compute_s"] + row["comm_s"] + row["idle_s"] == pytest.approx(round_s)
    assert summary["clock"] == "wall" and summary["strategies"]["fedavg"]["updates_aggregated"] == 6
    assert summary["strategies"]["fedavg"]["virtual_time_s"] == metrics[-1]["virtual_time_s"]
    assert (out / "report.html").is_file() and (out / "timeline_fedavg.png").is_file()
    assert main(["report", str(out)]) == 0
    assert "Time to target (measured)" in (out / "report.html").read_text()

    trace = json.loads((out / TRACE_FILE).read_text())
    measured_step_s = {k: [d["compute_s"] / d["local_steps"] for d in devices if d["device"] == k] for k in (0, 1, 2)}
    for entry in trace["devices"]:  # two reports each: the median is their mean; too few for a jitter
        assert entry["step_s"]["16"] == pytest.approx(sum(measured_step_s[entry["device"]]) / 2)
        assert (entry["availability"], entry["p_dropout"], entry["jitter"]) == (1.0, 0.0, 0.0)

    replay = config_from_dict(
        {**raw, "fleet": {**raw["fleet"], "kind": "trace", "trace": str(out / TRACE_FILE)}}, "replay"
    )
    run_experiment(replay, tmp_path / "replayed", progress=False)

    replayed = read_jsonl(tmp_path / "replayed" / "devices.jsonl")
    assert [(d["round"], d["device"], d["batch_size"]) for d in replayed] == [
        (r, k, 16) for r in (0, 1) for k in (0, 1, 2)
    ]
    by_device = {entry["device"]: entry for entry in trace["devices"]}
    for row in replayed:
        entry = by_device[row["device"]]
        assert row["compute_s"] == pytest.approx(row["local_steps"] * entry["step_s"]["16"], rel=1e-9)
        assert row["comm_s"] == pytest.approx(entry["download_s"] + entry["upload_s"], rel=1e-9)
