"""Gateway load benchmark: N devices upload a small model's update at once, over real HTTP on loopback.

It runs what ``amble serve`` runs (``amble.live.serve.prepare``: FedAvg on the synthetic dataset, every
device selected) with uvicorn on a free loopback port and the coordinator in a thread, registers N
devices, waits until round 0 has planned them all, and then fires the N uploads (safetensors delta +
``X-Amble-Report``, each valid for its device's plan, built before the clock starts) from a separate
load-generator process (so the client does not share the server's GIL), at most ``--concurrency`` in
flight. It measures on the wall clock:

- **throughput**: uploads/s and MB/s of update bodies, over the burst's wall time (first upload sent
  -> last response received; the last one returns after the round's aggregation is finalised);
- **latency** of each upload request (sent -> response), p50/p90/p99/max.

and then checks that every upload was accepted exactly once: all answered 202, round 0 counted N,
``amble_updates_accepted_total`` is N, no rejection was counted, and the published model moved by
exactly the FedAvg of the N updates (an update folded twice or lost would show). Replays are then
refused: round-0 uploads sent again after the round closed, and in round 1 duplicates racing their
originals and sent again after them, each answered 409, while the round still counts N.

    python benchmarks/gateway_load.py --quick                    # smoke test: 50 devices, < 1 min
    python benchmarks/gateway_load.py                            # 500 devices, all at once and 64 in flight
    python benchmarks/gateway_load.py --devices 1000 --concurrency 1000 128 16 --model lenet

Each ``--concurrency`` value is a fresh server (a new run). Results go to
``benchmarks/results/gateway_load.md``.
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
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastapi
import httpx
import torch
import uvicorn
from provenance import commit, cpu_name

from amble.config import ExperimentConfig, config_from_dict
from amble.live.serve import Served, http_config, prepare
from amble.server.factory import release_server
from amble.server.records.reports import num_samples
from amble.server.runtime.base import RuntimeStats
from amble.server.tensors import encode
from amble.strategies.base import Params, Plan, Report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 1e6
DISTINCT_UPDATES = 16
"""Random deltas built per run; device ``d`` uploads number ``d % 16`` (the server cannot tell)."""
REPLAYS = 5
"""Devices whose uploads are replayed in the exactly-once checks."""
WARMUP_DEVICES = 20
"""An untimed run first, so the first measured one does not pay for first calls (torch, FastAPI, the client)."""
HTTP_TIMEOUT_S = 300.0
WAIT_S = 300.0
ROUND_TIMEOUT_S = 900.0
"""The coordinator's round deadline: far beyond any burst, so a round closes only when all N are in."""

Shapes = dict[str, tuple[tuple[int, ...], str]]


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


def make_deltas(shapes: Shapes, seed: int, count: int) -> list[Params]:
    """``count`` random small deltas with the model's floating tensors (the same for the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(count):
        delta = {}
        for name in sorted(shapes):
            shape, dtype = shapes[name]
            delta[name] = (0.01 * torch.randn(shape, generator=generator)).to(getattr(torch, dtype))
        deltas.append(delta)
    return deltas


@dataclass(frozen=True)
class UploadJob:
    device: int
    token: str
    report: str
    """The JSON of the update's :class:`Report`, matching the device's plan and registration."""

    @property
    def body_index(self) -> int:
        return self.device % DISTINCT_UPDATES


def upload_job(device: int, token: str, round_index: int, plan: Plan, samples: int) -> UploadJob:
    report = Report(round_index, device, samples, plan.local_steps, plan.batch_size, 0.5, 0.05, 0.05)
    return UploadJob(device, token, json.dumps(report.to_dict()))


# -- the load generator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    device: int
    began_s: float
    """Seconds after the burst started."""
    latency_s: float
    status: int
    """The HTTP status; 0 when the request failed without a response."""
    reason: str
    """The gateway's error code (or the transport error); empty for a 202."""


@dataclass(frozen=True)
class Burst:
    sent: list[Sent]
    wall_s: float
    body_bytes: int


@dataclass(frozen=True)
class BurstSpec:
    url: str
    round: int
    jobs: list[UploadJob]
    shapes: Shapes
    seed: int
    concurrency: int


async def post_updates(
    url: str, round_index: int, jobs: Sequence[UploadJob], bodies: Sequence[bytes], concurrency: int
) -> Burst:
    """Upload every job's update, at most ``concurrency`` at a time (in job order), timing each request.

    The connections are opened first (``concurrency`` concurrent health checks), so the measured
    requests use warm keep-alive connections, as devices that polled for their task would.
    """
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=HTTP_TIMEOUT_S) as client:
        await asyncio.gather(*(client.get("/v1/health") for _ in range(min(concurrency, len(jobs)))))
        origin = time.perf_counter()

        async def send(job: UploadJob) -> Sent:
            headers = {
                "Authorization": f"Bearer {job.token}",
                "X-Amble-Report": job.report,
                "Content-Type": "application/octet-stream",
            }
            async with gate:
                began = time.perf_counter()
                try:
                    response = await client.post(
                        f"/v1/rounds/{round_index}/update", content=bodies[job.body_index], headers=headers
                    )
                    status, reason = response.status_code, error_code(response)
                except httpx.HTTPError as exc:
                    status, reason = 0, type(exc).__name__
                ended = time.perf_counter()
            return Sent(job.device, began - origin, ended - began, status, reason)

        sent = await asyncio.gather(*(send(job) for job in jobs))
        wall_s = time.perf_counter() - origin
    return Burst(list(sent), wall_s, sum(len(bodies[job.body_index]) for job in jobs))


def error_code(response: httpx.Response) -> str:
    if response.status_code < 400:
        return ""
    try:
        return str(response.json().get("error"))
    except ValueError:
        return response.text[:80]


def burst_process(spec: BurstSpec) -> Burst:
    """The load generator's process: build the updates, then time the burst."""
    torch.set_num_threads(1)
    bodies = [encode(delta) for delta in make_deltas(spec.shapes, spec.seed, DISTINCT_UPDATES)]
    return asyncio.run(post_updates(spec.url, spec.round, spec.jobs, bodies, spec.concurrency))


# -- the gateway -----------------------------------------------------------------------------------


@contextmanager
def running_gateway(served: Served) -> Iterator[str]:
    """uvicorn serving ``served.app`` on a free loopback port and the coordinator's rounds; yields the URL."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    server = uvicorn.Server(http_config(served.app, "127.0.0.1", port))
    http = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    rounds = threading.Thread(target=served.coordinator.run, daemon=True)
    http.start()
    try:
        deadline = time.monotonic() + 30.0
        while not server.started:
            if not http.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {port}")
            time.sleep(0.02)
        rounds.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        served.coordinator.stop()
        server.should_exit = True
        http.join(timeout=30)
        if rounds.is_alive():
            rounds.join(timeout=30)
        listener.close()
        release_server(served.coordinator.server)


async def register_all(url: str, tokens: Mapping[int, str], samples: Mapping[int, int], concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=HTTP_TIMEOUT_S) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/register", json={"num_samples": samples[d]}, headers={"Authorization": f"Bearer {t}"})
                for d, t in tokens.items()
            )
        )
    failed = [r for r in responses if r.status_code != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} registrations failed, first: {failed[0].status_code} {failed[0].text}")


async def await_plans(url: str, tokens: Mapping[int, str], round_index: int, concurrency: int) -> dict[int, Plan]:
    """Poll ``GET /v1/task`` for every device until each is told to train in ``round_index``; their plans."""
    plans: dict[int, Plan] = {}
    limits = httpx.Limits(max_connections=concurrency)
    deadline = time.monotonic() + WAIT_S
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=HTTP_TIMEOUT_S) as client:
        while len(plans) < len(tokens):
            waiting = [d for d in tokens if d not in plans]
            tasks = await asyncio.gather(
                *(client.get("/v1/task", headers={"Authorization": f"Bearer {tokens[d]}"}) for d in waiting)
            )
            for device, response in zip(waiting, tasks, strict=True):
                task = response.raise_for_status().json()
                if task["state"] == "train" and task["round"] == round_index:
                    plans[device] = Plan.from_dict(task["plan"])
            if len(plans) < len(tokens):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"round {round_index}: only {len(plans)} of {len(tokens)} devices got a plan")
                await asyncio.sleep(0.1)
    return plans


def wait_round_closed(served: Served, round_index: int) -> dict[str, Any]:
    """The coordinator's record of ``round_index`` (``status()["history"]``), once it has closed."""
    deadline = time.monotonic() + WAIT_S
    while True:
        history: list[dict[str, Any]] = served.coordinator.status()["history"]
        if len(history) > round_index:
            return history[round_index]
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {round_index} did not close within {WAIT_S:.0f} s")
        time.sleep(0.02)


def scrape(url: str, operator_token: str) -> dict[str, float]:
    """``GET /metrics`` (with the operator token) as ``{'name{labels}': value}``."""
    auth = {"Authorization": f"Bearer {operator_token}"}
    text = httpx.get(f"{url}/metrics", headers=auth, timeout=HTTP_TIMEOUT_S).raise_for_status().text
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            metrics[name] = float(value)
    return metrics


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
        bodies = [encode(delta) for delta in deltas]
        tokens, devices = served.tokens, sorted(served.tokens)
        # Each device's partition size (the synthetic data split by the config): its registration and weight.
        samples = {d: num_samples(served.coordinator.store, d) for d in devices}
        with running_gateway(served) as url:
            setup_concurrency = min(n, 64)
            asyncio.run(register_all(url, tokens, samples, setup_concurrency))
            plans = asyncio.run(await_plans(url, tokens, 0, setup_concurrency))
            jobs = {d: upload_job(d, tokens[d], 0, plans[d], samples[d]) for d in devices}
            busy_before = RuntimeStats.from_store(served.coordinator.store).busy_s
            spec = BurstSpec(url, 0, list(jobs.values()), shapes, seed, concurrency)
            burst = pool.submit(burst_process, spec).result()
            record = wait_round_closed(served, 0)
            function_s = RuntimeStats.from_store(served.coordinator.store).busy_s - busy_before
            run = Run(n, concurrency, update_mb, burst, function_s)
            checks = run.checks

            def check(what: str, ok: bool, detail: str) -> None:
                checks.append(Check(what, ok, detail))

            # Round 0: each of the N uploads accepted, and counted, exactly once.
            check("burst: every upload answered 202", all(s.status == 202 for s in burst.sent), outcome(burst.sent))
            check("burst: one 202 per device", *counted_once(burst.sent, devices))
            check(
                "round 0 finalized, `status()['history'][0]['counted']` = N",
                record["status"] == "finalized" and record["counted"] == n and record["expected"] == n,
                f"status {record['status']}, counted {record['counted']} of {record['expected']} expected",
            )
            metrics = scrape(url, served.operator_token)
            rejected = {k: v for k, v in metrics.items() if k.startswith("amble_updates_rejected_total") and v}
            check(
                "`amble_updates_accepted_total` = N, no rejection counted",
                metrics["amble_updates_accepted_total"] == n and not rejected,
                f"accepted {metrics['amble_updates_accepted_total']:.0f}, rejected {rejected or 'none'}",
            )
            published = served.coordinator.server.model(1)
            step = fedavg_step(deltas, devices, samples)
            error = max(float((published[k].double() - initial[k].double() - step[k]).abs().max()) for k in step)
            check(
                "model v1 = v0 + FedAvg of the N updates (none lost or folded twice)",
                error < 1e-5,
                f"max abs error {error:.1e}",
            )

            # Replays after the round closed.
            replayed = devices[:REPLAYS]
            late = asyncio.run(post_updates(url, 0, [jobs[d] for d in replayed], bodies, 1)).sent
            check(
                f"round 0 closed: {len(replayed)} replays answered 409 replayed",
                all(s.status == 409 and s.reason == "replayed" for s in late),
                outcome(late),
            )

            # Round 1: duplicates racing their originals, then replays, while the round is still open.
            plans = asyncio.run(await_plans(url, tokens, 1, setup_concurrency))
            jobs = {d: upload_job(d, tokens[d], 1, plans[d], samples[d]) for d in devices}
            held = devices[-1]
            order = [d for d in replayed for _ in range(2)] + [d for d in devices[len(replayed) : -1]]
            racing = asyncio.run(post_updates(url, 1, [jobs[d] for d in order], bodies, concurrency)).sent
            ok, detail = counted_once(racing, devices[:-1])
            duplicates_refused = sum(s.status == 409 and s.reason == "replayed" for s in racing) == len(replayed)
            check(
                f"round 1: N-1 uploads + {len(replayed)} racing duplicates: one 202 per device, "
                f"the duplicates 409 replayed",
                ok and duplicates_refused,
                f"{outcome(racing)}; {detail}",
            )
            again = asyncio.run(post_updates(url, 1, [jobs[d] for d in replayed], bodies, 1)).sent
            check(
                f"round 1 open: {len(replayed)} replays answered 409 replayed",
                all(s.status == 409 and s.reason == "replayed" for s in again),
                outcome(again),
            )
            last = asyncio.run(post_updates(url, 1, [jobs[held]], bodies, 1)).sent
            record = wait_round_closed(served, 1)
            metrics = scrape(url, served.operator_token)
            expected_rejections = {'amble_updates_rejected_total{reason="replayed"}': 3.0 * len(replayed)}
            rejected = {k: v for k, v in metrics.items() if k.startswith("amble_updates_rejected_total") and v}
            check(
                "round 1 finalized with N counted; accepted total = 2N; rejections = the replays",
                last[0].status == 202
                and record["status"] == "finalized"
                and record["counted"] == n
                and metrics["amble_updates_accepted_total"] == 2 * n
                and rejected == expected_rejections,
                f"last upload {outcome(last)}; status {record['status']}, counted {record['counted']}; "
                f"accepted {metrics['amble_updates_accepted_total']:.0f}; rejected {rejected}",
            )
    return run


# -- reporting -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def render_runs(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| uploads | in flight | update MB | wall s | uploads/s | MB/s | latency ms p50 | p90 | p99 | max "
        "| function ms/update | responses | exactly once |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
  (`httpx.AsyncClient`, keep-alive connections opened beforehand) sends every device's update at once,
  at most *in flight* requests at a time. Each update is a random delta of the model's tensors
  (safetensors) with a report that matches the device's plan and registration.
- **wall s**: first upload sent → last response received. The round closes inside the last accepted
  upload (its aggregation runs in that request), so it includes the whole round's folding and the
  finalisation; **uploads/s** and **MB/s** (update bodies) are over it.
- **latency**: one upload request, sent → response, once the load generator let it go (queueing behind the
  *in flight* limit is not in it; queueing in the server is). With all uploads in flight at once, the
  latencies spread over the burst: the gateway folds one update at a time under the coordinator's lock.
- **function ms/update**: busy function-seconds of round 0 (aggregate and finalize, run in the request
  that accepted the upload) per update; the rest of a request's cost is HTTP, auth and validation.
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
    print("\n".join(render_runs(runs)))
    print(f"wrote {args.out}")
    return 0 if all(run.passed for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
