"""The thesis' instance-reuse experiment, with real processes: keep-alive with reuse vs a fresh instance per event.

A Redis run whose functions run on the elastic worker pool (``server.autoscale``, from zero, at most
``max_instances``) plays rounds in which every device uploads an update as one burst; between rounds
the devices "train" for ``--gap-s`` wall seconds. Two settings of the same pool:

- **reuse**: an instance stays warm ``keep_alive_s`` (longer than the gap), so after the first burst
  the events find warm instances;
- **fresh**: ``reuse: false``, every event gets a new process (``amble worker --max-events 1``).

Measured on the wall clock, per setting: real cold starts (processes that ran an event) and their
latency (process start to first event done, ms), the latency from the last upload returning to the
published model, and instance-seconds per round (worker processes alive, summed; and the function
seconds they really ran). Beside each, what the virtual clock predicted for the same rounds: the
embedded server with the same pool settings, charging ``cold_start_s`` per cold start and
``invocation_s`` per event.

    python benchmarks/instance_reuse.py                 # 6 rounds x 8 devices, LeNet-5 (~2-4 minutes)
    python benchmarks/instance_reuse.py --quick         # 2 rounds (smoke test)

Results go to ``benchmarks/results/instance_reuse.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregation_throughput import SIZES, Workload, make_workload
from processes import redis_server
from provenance import provenance

from amble.config import config_from_dict
from amble.server import ParameterServer, RunSettings
from amble.server.factory import build_server, release_server
from amble.strategies.base import Report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLD_START_S, INVOCATION_S = 0.25, 0.02
"""What the virtual clock charges (the config's defaults)."""
SETTINGS = {"reuse": {"reuse": True, "keep_alive_s": 30.0}, "fresh": {"reuse": False, "keep_alive_s": 30.0}}


@dataclass
class Measured:
    latency_s: list[float]
    """Per round: last upload returned -> the round's model published (wall clock; virtual when predicted)."""
    cold_starts: int
    warm_starts: int
    busy_s: float
    """Function seconds really spent (measured by whoever ran the functions)."""
    charged_s: float
    """Function seconds the virtual clock charges: ``cold_start_s`` per cold start, ``invocation_s`` per event."""
    real: dict[str, Any] | None


def play(server: ParameterServer, workload: Workload, rounds: int, gap_s: float, wall: bool) -> list[float]:
    """Plan, upload every device's update as one burst, close; ``gap_s`` of training between rounds."""
    latencies, now_s = [], 0.0
    devices = sorted(workload.num_samples)
    for r in range(rounds):
        plans, planned_s = server.start_round(r, devices, now_s)
        last_at_s = planned_s + 1.0
        for k, plan in sorted(plans.items()):
            report = Report(r, k, workload.num_samples[k], plan.local_steps, plan.batch_size, 1.0, 0.1, 0.1)
            server.upload(report, workload.updates[k], last_at_s)
        uploaded = time.perf_counter()
        outcome = server.close_round(r, planned_s + 600.0)
        if outcome.status != "finalized" or len(outcome.counted) != len(devices):
            raise RuntimeError(f"round {r}: {outcome.status}, counted {outcome.counted}")
        latencies.append(time.perf_counter() - uploaded if wall else outcome.ended_at_s - last_at_s)
        now_s = outcome.ended_at_s + gap_s
        if wall:
            time.sleep(gap_s)
    return latencies


def measure(store: str, setting: str, workload: Workload, rounds: int, gap_s: float, max_instances: int) -> Measured:
    devices = len(workload.num_samples)
    raw = {
        "name": "instance-reuse",
        "data": {"dataset": "synthetic", "num_devices": devices},
        "devices_per_round": devices,
        "strategies": ["fedavg"],
        "server": {
            "store": store,
            "quorum": 1.0,
            "max_instances": max_instances,
            "invocation_s": INVOCATION_S,
            "cold_start_s": COLD_START_S,
            **({"workers": 0, "autoscale": True} if store != "memory" else {}),
            **SETTINGS[setting],
        },
    }
    config = config_from_dict(raw, source="the instance reuse benchmark")
    server = build_server(config, 0, f"reuse-{uuid.uuid4().hex[:8]}")
    try:
        settings = RunSettings(seed=0, devices_per_round=devices, quorum=1.0, max_update_bytes=1 << 30)
        server.initialize(workload.params, workload.num_samples, settings)
        latencies = play(server, workload, rounds, gap_s, wall=store != "memory")
        stats = server.runtime.stats()
    finally:
        release_server(server)  # the pool's processes stop: their lifetimes are counted
    charged_s = stats.cold_starts * COLD_START_S + stats.invocations * INVOCATION_S
    real = server.runtime.real_instances()
    return Measured(latencies, stats.cold_starts, stats.warm_starts, stats.busy_s, charged_s, real)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--gap-s", type=float, default=2.0)
    parser.add_argument("--max-instances", type=int, default=4)
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    workload = make_workload(SIZES["lenet"], args.devices)
    rows = []
    with redis_server() as url:
        for setting in SETTINGS:
            print(f"{setting}: real pool on Redis ...", file=sys.stderr)
            real = measure(url, setting, workload, rounds, args.gap_s, args.max_instances)
            virtual = measure("memory", setting, workload, rounds, args.gap_s, args.max_instances)
            rows.append(row(setting, real, virtual, rounds))
    command = " ".join(["python", "benchmarks/instance_reuse.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(rows, provenance(command), rounds, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instance_reuse.md").write_text(text)
    print(text)
    return 0


def row(setting: str, real: Measured, virtual: Measured, rounds: int) -> dict[str, Any]:
    figures = real.real or {}
    return {
        "setting": setting,
        "real_cold_starts": figures.get("instances_that_ran"),
        "processes_started": figures.get("started"),
        "virtual_cold_starts": virtual.cold_starts,
        "real_cold_start_ms": figures.get("cold_start_ms_median"),
        "virtual_cold_start_ms": 1000 * COLD_START_S,
        "real_latency_s": statistics.median(real.latency_s),
        "virtual_latency_s": statistics.median(virtual.latency_s),
        "first_latency_s": (real.latency_s[0], virtual.latency_s[0]),
        "real_instance_s_per_round": figures.get("instance_s", 0.0) / rounds,
        "real_busy_s_per_round": real.busy_s / rounds,
        "virtual_charged_s_per_round": virtual.charged_s / rounds,
        "events_per_instance": figures.get("events_per_instance"),
    }


def render(rows: list[dict[str, Any]], source: dict[str, Any], rounds: int, args: argparse.Namespace) -> str:
    lines = [
        "# Instance reuse with real processes vs the virtual clock",
        "",
        f"{rounds} rounds x {args.devices} devices (LeNet-5 updates), {args.gap_s:g} s between rounds, "
        f"the pool from zero up to {args.max_instances} instances, keep-alive 30 s.",
        "",
        "| setting | cold starts real (processes) / virtual | cold start ms real (median) / virtual | "
        "latency s real / virtual (median; round 0) | instance-s per round: real alive / real busy / virtual |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cold_ms = r["real_cold_start_ms"]
        lines.append(
            f"| {r['setting']} | {r['real_cold_starts']} ({r['processes_started']}) / {r['virtual_cold_starts']} "
            f"| {'-' if cold_ms is None else f'{cold_ms:,.0f}'} / {r['virtual_cold_start_ms']:.0f} "
            f"| {r['real_latency_s']:.3f} / {r['virtual_latency_s']:.3f} "
            f"({r['first_latency_s'][0]:.2f} / {r['first_latency_s'][1]:.2f}) "
            f"| {r['real_instance_s_per_round']:.1f} / {r['real_busy_s_per_round']:.2f} "
            f"/ {r['virtual_charged_s_per_round']:.2f} |"
        )
    lines += ["", "Events per real instance: " + "; ".join(f"{r['setting']} {r['events_per_instance']}" for r in rows)]
    lines += ["", "```", *(f"{k}: {v}" for k, v in source.items()), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
