"""The gateway load benchmark's harness: the gateway served on loopback, and the devices' side of it.

The uploads are sent at most so many at a time, timed, by a process of their own (``burst_process``),
so the client does not share the server's GIL; registration and task polls are not timed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import torch
import uvicorn

from amble.live.serve import Served, http_config
from amble.server.factory import release_server
from amble.server.tensors import encode
from amble.strategies.base import Params, Plan, Report

DISTINCT_UPDATES = 16
"""Random deltas built per run; device ``d`` uploads number ``d % 16`` (the server cannot tell)."""
HTTP_TIMEOUT_S = 300.0
WAIT_S = 300.0

Shapes = dict[str, tuple[tuple[int, ...], str]]


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

    Each of the ``concurrency`` lanes is a client of its own with one keep-alive connection, opened
    first (a health check), so the measured requests use warm connections, as devices that polled for
    their task would. One client with a pool of ``concurrency`` connections would scan the whole pool
    for every request (httpcore), so at 500 in flight the load generator, not the server, set the pace.
    """
    lanes = min(concurrency, len(jobs))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=HTTP_TIMEOUT_S) for _ in range(lanes)]
    sent: list[Sent | None] = [None] * len(jobs)
    waiting = iter(range(len(jobs)))
    try:
        await asyncio.gather(*(client.get("/v1/health") for client in clients))
        origin = time.perf_counter()

        async def send(client: httpx.AsyncClient, job: UploadJob) -> Sent:
            headers = {
                "Authorization": f"Bearer {job.token}",
                "X-Amble-Report": job.report,
                "Content-Type": "application/octet-stream",
            }
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

        async def lane(client: httpx.AsyncClient) -> None:
            for index in waiting:  # the next job not yet taken by any lane
                sent[index] = await send(client, jobs[index])

        await asyncio.gather(*(lane(client) for client in clients))
        wall_s = time.perf_counter() - origin
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return Burst([s for s in sent if s is not None], wall_s, sum(len(bodies[job.body_index]) for job in jobs))


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
