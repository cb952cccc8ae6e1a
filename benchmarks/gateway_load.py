"""Gateway load benchmark: N devices upload a small model's update at once, over real HTTP on loopback.

It runs what ``amble serve`` runs (``amble.live.serve.prepare``: FedAvg on the synthetic dataset, every
device selected) with uvicorn on a free loopback port and the coordinator in a thread, registers N
devices, waits until round 0 has planned them all, and then fires the N uploads (safetensors delta +
``X-Amble-Report``, each valid for its device's plan, built before the clock starts) from a separate
load-generator process (so the client does not share the server's GIL), at most ``--concurrency`` in
flight. It measures on the wall clock:

- **throughput**: uploads/s and MB/s of update bodies, over the burst's wall time (first upload sent
  -> last response received; the last one returns after the round's aggregation is finalised);
- **latency** of each upload request (sent -> response), p50/p90/p99/max;
- **server CPU** per upload: the server process's CPU time over the burst (every thread), divided by N.

and then checks that every upload was accepted exactly once: all answered 202, round 0 counted N,
``amble_updates_accepted_total`` is N, no rejection was counted, and the published model moved by
exactly the FedAvg of the N updates (an update folded twice or lost would show). Replays are then
refused: round-0 uploads sent again after the round closed, and in round 1 duplicates racing their
originals and sent again after them, each answered 409, while the round still counts N.

    python benchmarks/gateway_load.py --quick                    # smoke test: 50 devices, < 1 min
    python benchmarks/gateway_load.py                            # 500 devices, all at once and 64 in flight
    python benchmarks/gateway_load.py --devices 1000 --concurrency 1000 128 16 --model lenet

Each ``--concurrency`` value is a fresh server (a new run). Results go to
``benchmarks/results/gateway_load.md`` (and, with ``--json``, as JSON: ``gateway_compare.py`` runs this
script side by side against another checkout's code).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastapi
import httpx
import torch
import uvicorn
from gateway_loadgen import (
    DISTINCT_UPDATES,
    Burst,
    BurstSpec,
    Sent,
    Shapes,
    UploadJob,
    await_plans,
    burst_process,
    make_deltas,
    post_updates,
    register_all,
    running_gateway,
    scrape,
    upload_job,
    wait_round_closed,
)
from provenance import commit, cpu_name

import amble
from amble.config import ExperimentConfig, config_from_dict
from amble.live.serve import Served, prepare

try:
    from amble.server.records.reports import num_samples
except ImportError:  # the code before issue 23's re-cut of server/, run as a baseline by gateway_compare.py
    from amble.server.reports import num_samples  # type: ignore[import-not-found,no-redef]
from amble.server.runtime.base import RuntimeStats
from amble.server.tensors import encode
from amble.strategies.base import Params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 1e6
REPLAYS = 5
"""Devices whose uploads are replayed in the exactly-once checks."""
WARMUP_DEVICES = 20
"""An untimed run first, so the first measured one does not pay for first calls (torch, FastAPI, the client)."""
ROUND_TIMEOUT_S = 900.0
"""The coordinator's round deadline: far beyond any burst, so a round closes only when all N are in."""


# -- the workload ----------------------------------------------------------------------------------


def experiment_config(devices: int, model: str, seed: int) -> ExperimentConfig:
    """Two FedAvg rounds of ``devices`` devices, all selected (round 1 is for the replay checks)."""
    raw = {
        "name": "gateway-load",
        "seed": seed,
        # Quantity skew: devices hold different sample counts, so plans (steps) and FedAvg weights differ.
        "data": {"dataset": "synthetic", "num_devices": devices, "partition": {"kind": "quantity"}},
        "model": model,
        "rounds": 2,
        "devices_per_round": devices,
        "strategies": ["fedavg"],
        "server": {"quorum": 1.0},
        "eval": {"test_samples": 200},
    }
    return config_from_dict(raw, source="the gateway load benchmark")


# -- one run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


@dataclass
class Run:
    devices: int
    concurrency: int
    update_mb: float
    burst: Burst
    function_s: float
    """Busy function-seconds (aggregate + finalize) during round 0."""
    server_cpu_s: float
    """CPU seconds of the server's process (every thread) during the burst: less sensitive than the
    wall time to what else the machine runs."""
    checks: list[Check] = field(default_factory=list)

    def latencies_ms(self) -> list[float]:
        return [s.latency_s * 1000 for s in self.burst.sent]

    def statuses(self) -> Counter[str]:
        return Counter(f"{s.status}" + (f" {s.reason}" if s.reason else "") for s in self.burst.sent)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)


def counted_once(sent: Sequence[Sent], devices: Sequence[int]) -> tuple[bool, str]:
    """Every device got exactly one 202."""
    accepted = Counter(s.device for s in sent if s.status == 202)
    wrong = {d: accepted.get(d, 0) for d in devices if accepted.get(d, 0) != 1}
    return not wrong, "every device exactly one 202" if not wrong else f"202s per device, wrong ones: {wrong}"


def outcome(sent: Sequence[Sent]) -> str:
    counts = Counter(f"{s.status} {s.reason}".strip() for s in sent)
    return ", ".join(f"{n} × {what}" for what, n in sorted(counts.items()))


def fedavg_step(deltas: Sequence[Params], devices: Sequence[int], samples: Mapping[int, int]) -> Params:
    """What a FedAvg round of these devices' updates adds to the model: the sample-weighted mean."""
    total = sum(samples[d] for d in devices)
    step = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in deltas[0].items()}
    for device in devices:
        delta, weight = deltas[device % DISTINCT_UPDATES], samples[device] / total
        for name in step:
            step[name] += weight * delta[name].double()
    return step


@dataclass(frozen=True)
class Load:
    """A served run under load: the gateway's URL and what the checks compare against."""

    served: Served
    url: str
    devices: list[int]
    samples: dict[int, int]
    """Each device's partition size (the synthetic data split by the config): its registration and weight."""
    deltas: list[Params]
    bodies: list[bytes]
    initial: Params

    @property
    def setup_concurrency(self) -> int:
        return min(len(self.devices), 64)

    def jobs(self, round_index: int) -> dict[int, UploadJob]:
        """Each device's upload for the round, once the round has planned them all."""
        tokens = self.served.tokens
        plans = asyncio.run(await_plans(self.url, tokens, round_index, self.setup_concurrency))
        return {d: upload_job(d, tokens[d], round_index, plans[d], self.samples[d]) for d in self.devices}

    def post(self, round_index: int, jobs: Sequence[UploadJob], concurrency: int = 1) -> list[Sent]:
        return asyncio.run(post_updates(self.url, round_index, jobs, self.bodies, concurrency)).sent

    def rejected(self) -> tuple[float, dict[str, float]]:
        """``amble_updates_accepted_total`` and the non-zero ``amble_updates_rejected_total`` series."""
        metrics = scrape(self.url, self.served.operator_token)
        rejected = {k: v for k, v in metrics.items() if k.startswith("amble_updates_rejected_total") and v}
        return metrics["amble_updates_accepted_total"], rejected


def play(config: ExperimentConfig, concurrency: int, seed: int, pool: ProcessPoolExecutor) -> Run:
    """One fresh server: the timed burst in round 0, then the exactly-once and replay checks."""
    n = config.data.num_devices
    with tempfile.TemporaryDirectory(prefix="amble-gateway-load-") as directory:
        served = prepare(config, Path(directory), round_timeout_s=ROUND_TIMEOUT_S)
        initial = served.coordinator.server.model(0)
        floating = {name: t for name, t in initial.items() if t.is_floating_point()}
        shapes: Shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in floating.items()}
        update_mb = sum(t.numel() * t.element_size() for t in floating.values()) / MB
        deltas = make_deltas(shapes, seed, DISTINCT_UPDATES)
        devices = sorted(served.tokens)
        samples = {d: num_samples(served.coordinator.server.store, d) for d in devices}
        with running_gateway(served) as url:
            load = Load(served, url, devices, samples, deltas, [encode(d) for d in deltas], initial)
            asyncio.run(register_all(url, served.tokens, samples, load.setup_concurrency))
            jobs = load.jobs(0)
            busy_before = RuntimeStats.from_store(served.coordinator.server.store).busy_s
            spec = BurstSpec(url, 0, list(jobs.values()), shapes, seed, concurrency)
            cpu_before = time.process_time()
            burst = pool.submit(burst_process, spec).result()
            server_cpu_s = time.process_time() - cpu_before
            record = wait_round_closed(served, 0)
            function_s = RuntimeStats.from_store(served.coordinator.server.store).busy_s - busy_before
            run = Run(n, concurrency, update_mb, burst, function_s, server_cpu_s)
            run.checks += check_burst(load, burst, record)
            run.checks += check_replays(load, jobs, concurrency)
    return run


def check_burst(load: Load, burst: Burst, record: dict[str, Any]) -> list[Check]:
    """Round 0: each of the N uploads accepted, and counted, exactly once."""
    n, devices = len(load.devices), load.devices
    accepted, rejected = load.rejected()
    published = load.served.coordinator.server.model(1)
    step = fedavg_step(load.deltas, devices, load.samples)
    error = max(float((published[k].double() - load.initial[k].double() - step[k]).abs().max()) for k in step)
    return [
        Check("burst: every upload answered 202", all(s.status == 202 for s in burst.sent), outcome(burst.sent)),
        Check("burst: one 202 per device", *counted_once(burst.sent, devices)),
        Check(
            "round 0 finalized, `status()['history'][0]['counted']` = N",
            record["status"] == "finalized" and record["counted"] == n and record["expected"] == n,
            f"status {record['status']}, counted {record['counted']} of {record['expected']} expected",
        ),
        Check(
            "`amble_updates_accepted_total` = N, no rejection counted",
            accepted == n and not rejected,
            f"accepted {accepted:.0f}, rejected {rejected or 'none'}",
        ),
        Check(
            "model v1 = v0 + FedAvg of the N updates (none lost or folded twice)",
            error < 1e-5,
            f"max abs error {error:.1e}",
        ),
    ]


def check_replays(load: Load, jobs: dict[int, UploadJob], concurrency: int) -> list[Check]:
    """Replays of round 0 after it closed; in round 1, duplicates racing their originals, then replays
    while the round is still open (its last device uploads only after them)."""
    n, devices = len(load.devices), load.devices
    replayed = devices[:REPLAYS]
    late = load.post(0, [jobs[d] for d in replayed])
    checks = [
        Check(
            f"round 0 closed: {len(replayed)} replays answered 409 replayed",
            all(s.status == 409 and s.reason == "replayed" for s in late),
            outcome(late),
        )
    ]
    jobs = load.jobs(1)
    held = devices[-1]
    order = [d for d in replayed for _ in range(2)] + [d for d in devices[len(replayed) : -1]]
    racing = load.post(1, [jobs[d] for d in order], concurrency)
    ok, detail = counted_once(racing, devices[:-1])
    duplicates_refused = sum(s.status == 409 and s.reason == "replayed" for s in racing) == len(replayed)
    again = load.post(1, [jobs[d] for d in replayed])
    last = load.post(1, [jobs[held]])
    record = wait_round_closed(load.served, 1)
    accepted, rejected = load.rejected()
    expected_rejections = {'amble_updates_rejected_total{reason="replayed"}': 3.0 * len(replayed)}
    checks += [
        Check(
            f"round 1: N-1 uploads + {len(replayed)} racing duplicates: one 202 per device, "
            f"the duplicates 409 replayed",
            ok and duplicates_refused,
            f"{outcome(racing)}; {detail}",
        ),
        Check(
            f"round 1 open: {len(replayed)} replays answered 409 replayed",
            all(s.status == 409 and s.reason == "replayed" for s in again),
            outcome(again),
        ),
        Check(
            "round 1 finalized with N counted; accepted total = 2N; rejections = the replays",
            last[0].status == 202
            and record["status"] == "finalized"
            and record["counted"] == n
            and accepted == 2 * n
            and rejected == expected_rejections,
            f"last upload {outcome(last)}; status {record['status']}, counted {record['counted']}; "
            f"accepted {accepted:.0f}; rejected {rejected}",
        ),
    ]
    return checks


# -- reporting -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_figures(run: Run) -> dict[str, Any]:
    """One run's figures as JSON (what ``render_runs`` shows), and which ``amble`` served it."""
    latency = run.latencies_ms()
    return {
        "amble": str(Path(amble.__file__).resolve().parents[1]),
        "devices": run.devices,
        "concurrency": run.concurrency,
        "wall_s": run.burst.wall_s,
        "uploads_per_s": run.devices / run.burst.wall_s,
        "latency_ms": {f"p{q}": percentile(latency, q) for q in (50, 90, 99)} | {"max": max(latency)},
        "function_ms_per_update": 1000 * run.function_s / run.devices,
        "server_cpu_ms_per_upload": 1000 * run.server_cpu_s / run.devices,
        "passed": run.passed,
        "failed_checks": [c.what for c in run.checks if not c.ok],
    }


def render_runs(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| uploads | in flight | update MB | wall s | uploads/s | MB/s | latency ms p50 | p90 | p99 | max "
        "| function ms/update | server CPU ms/upload | responses | exactly once |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        latency, burst = run.latencies_ms(), run.burst
        cells = [
            f"{run.devices}",
            f"{run.concurrency}",
            f"{run.update_mb:.2f}",
            f"{burst.wall_s:.2f}",
            f"{run.devices / burst.wall_s:,.0f}",
            f"{burst.body_bytes / MB / burst.wall_s:,.1f}",
            f"{statistics.median(latency):,.0f}",
            f"{percentile(latency, 90):,.0f}",
            f"{percentile(latency, 99):,.0f}",
            f"{max(latency):,.0f}",
            f"{1000 * run.function_s / run.devices:.2f}",
            f"{1000 * run.server_cpu_s / run.devices:.2f}",
            ", ".join(f"{n} × {what}" for what, n in sorted(run.statuses().items())),
            "yes" if run.passed else "**NO**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_checks(runs: Sequence[Run]) -> list[str]:
    lines = []
    for run in runs:
        lines += [f"Checks, {run.devices} uploads, {run.concurrency} in flight:", ""]
        lines += [f"- [{'x' if c.ok else ' '}] {c.what}: {c.detail}" for c in run.checks]
        lines.append("")
    return lines


NOTES = """\
How to read it:

- One row per run, each on a fresh server (`amble.live.serve.prepare`: FedAvg, the synthetic dataset, the
  embedded store, every device selected), served by uvicorn on loopback. The devices register and poll
  `GET /v1/task` until round 0 planned them all (not timed); then a separate load-generator process
  sends every device's update at once, at most *in flight* requests at a time, over *in flight* lanes,
  each an `httpx.AsyncClient` with one keep-alive connection opened beforehand (one client with a pool
  of 500 connections spent most of its time scanning the pool, and the client set the pace). Each
  update is a random delta of the model's tensors (safetensors) with a report that matches the
  device's plan and registration.
- **wall s**: first upload sent → last response received. The round closes inside the last accepted
  upload (its aggregation runs in that request's pass), so it includes the whole round's folding and
  the finalisation; **uploads/s** and **MB/s** (update bodies) are over it.
- **latency**: one upload request, sent → response, once the load generator let it go (queueing behind the
  *in flight* limit is not in it; queueing in the server is). With all uploads in flight at once, the
  latencies spread over the burst: the server folds the uploads waiting in passes, one pass at a time.
- **function ms/update**: busy function-seconds of round 0 (aggregate and finalize, run in the pass
  that folded the upload) per update; the rest of a request's cost is HTTP, auth and validation.
- **server CPU ms/upload**: CPU time of the server's process (all its threads) during the burst, per
  upload: what one upload costs the server, less sensitive than the wall time to other jobs on the machine.
- The load generator, uvicorn and the functions share the machine's cores. An untimed warm-up run of
  20 devices comes first (first calls into torch, FastAPI and httpx are slow in both processes).
- The checks after the burst: the replays of round 0 come after it closed (`stale_round`); round 1
  repeats the uploads with duplicates sent right next to their originals, replays them once the round
  has them, and only then lets the last device upload, so the round is open for every replay.
"""


def machine() -> str:
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    cpu = cpu_name()
    return (
        f"{cpu} ({platform.system()} {platform.release()}), {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__} ({http}), httpx {httpx.__version__}"
    )


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 devices (a smoke test, < 1 min)")
    parser.add_argument("--devices", type=int, default=None, help="devices = concurrent uploads (default 500)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="uploads in flight at once, one run per value (default: all of them, and 64; 16 with --quick)",
    )
    parser.add_argument("--model", choices=["mlp", "lenet"], default="mlp", help="the small model (default mlp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway_load.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs' figures here, as JSON")
    args = parser.parse_args(argv)

    devices = args.devices or (50 if args.quick else 500)
    if devices < REPLAYS + 2:
        parser.error(f"--devices must be at least {REPLAYS + 2}")
    wanted = args.concurrency or [devices, 16 if args.quick else 64]
    if min(wanted) < 1:
        parser.error("--concurrency must be at least 1")
    concurrencies = list(dict.fromkeys(min(c, devices) for c in wanted))
    began = time.perf_counter()
    config = experiment_config(devices, args.model, args.seed)
    runs: list[Run] = []
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        warmup = play(experiment_config(WARMUP_DEVICES, args.model, args.seed), 4, args.seed, pool)
        if not warmup.passed:
            print("warm-up run failed its checks:", *[c for c in warmup.checks if not c.ok], sep="\n  ")
        for concurrency in concurrencies:
            run = play(config, concurrency, args.seed, pool)
            runs.append(run)
            print(render_runs([run])[-1], flush=True)
            for failed in (c for c in run.checks if not c.ok):
                print(f"  FAILED {failed.what}: {failed.detail}", flush=True)

    command = "python benchmarks/gateway_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quick = " A quick smoke run (50 devices): not the numbers to quote." if args.quick else ""
    body = [
        "# Gateway load",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, {commit()}.",
        f"Command: `{command.strip()}` ({time.perf_counter() - began:,.0f} s wall).{quick}",
        "",
        f"{devices} devices upload one update of the `{args.model}` model each, over HTTP on loopback "
        f"(`POST /v1/rounds/0/update`):",
        "",
        *render_runs(runs),
        "",
        *render_checks(runs),
        NOTES,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(body))
    if args.json is not None:
        args.json.write_text(json.dumps([run_figures(run) for run in runs], indent=1))
    print("\n".join(render_runs(runs)))
    print(f"wrote {args.out}")
    return 0 if all(run.passed for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
