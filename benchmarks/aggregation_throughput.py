"""Aggregation throughput benchmark: how fast the parameter server folds updates, embedded vs Redis.

For each model size (LeNet-5, 0.25 MB; the CNN, 6.6 MB; ResNet-18's tensor shapes with random values,
47 MB) and each backend (the embedded server, and the Redis one with 1, 2 and 4 ``amble worker``
processes), it plays rounds in which every device uploads a random update, and measures on the wall
clock:

- **throughput**: MB of updates folded per second, ``devices x update MB`` over the wall time from
  the first upload of a round until ``close_round`` returns with the new model published;
- **latency**: from the return of the round's last ``upload`` call to the published model, as the
  driver sees it (``close_round`` returns) and, on Redis, as the server stamped it (the id of the
  ``model_published`` event is Redis' own clock, so the driver's polling is not in it);

next to the machine's memory bandwidth measured in the same run (``torch`` copy and ``add_(alpha=)``
of a large buffer: the physical limit of folding).

    python benchmarks/aggregation_throughput.py --quick               # smoke test: small models, < 1 min
    python benchmarks/aggregation_throughput.py                       # full run (10-20 minutes on 2 cores)
    python benchmarks/aggregation_throughput.py --threads 1           # one torch thread per function process
    python benchmarks/aggregation_throughput.py --sizes cnn --workers 1 2

It starts its own ``redis-server`` (a free loopback port, a temp dir, no persistence) and its own
workers, and stops them at the end. Results go to ``benchmarks/results/aggregation_throughput.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
import torch
from processes import redis_server
from provenance import commit, cpu_name

from amble.config import ExperimentConfig, config_from_dict
from amble.models import build_model
from amble.server import ParameterServer, RunSettings, keys
from amble.server.events.base import decode_event
from amble.server.events.redis import RedisEventLog
from amble.server.factory import build_server, release_server
from amble.server.runtime.pool import stop_processes
from amble.server.runtime.workers import HEARTBEATS, worker_command
from amble.server.store.redis import connect
from amble.server.tensors import encode
from amble.strategies.base import Params, Report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 1e6


# -- workloads -------------------------------------------------------------------------------------


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """The float tensors of torchvision's ResNet-18 (1000 classes): 11.7 M parameters, 47 MB."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def batch_norm(prefix: str, channels: int) -> None:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{stat}"] = (channels,)

    batch_norm("bn1", 64)
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix, cin = f"layer{layer}.{block}", inplanes if block == 0 else planes
            shapes[f"{prefix}.conv1.weight"] = (planes, cin, 3, 3)
            batch_norm(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            batch_norm(f"{prefix}.bn2", planes)
            if cin != planes:
                shapes[f"{prefix}.downsample.0.weight"] = (planes, cin, 1, 1)
                batch_norm(f"{prefix}.downsample.1", planes)
        inplanes = planes
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 512), (1000,)
    return shapes


def model_shapes(name: str, input_shape: tuple[int, int, int]) -> Callable[[], dict[str, tuple[int, ...]]]:
    def shapes() -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in build_model(name, input_shape, 10).state_dict().items()}

    return shapes


@dataclass(frozen=True)
class Size:
    label: str
    shapes: Callable[[], dict[str, tuple[int, ...]]]
    rounds: int
    quick_rounds: int


SIZES = {
    "lenet": Size("LeNet-5", model_shapes("lenet", (1, 28, 28)), rounds=40, quick_rounds=3),
    "cnn": Size("CNN", model_shapes("cnn", (1, 28, 28)), rounds=20, quick_rounds=2),
    "resnet18": Size("ResNet-18 (synthetic)", resnet18_shapes, rounds=8, quick_rounds=2),
}
QUICK_SIZES = ["lenet", "cnn"]


@dataclass
class Workload:
    """A model, its devices (all selected every round) and one encoded update per device, reused every round."""

    params: Params
    num_samples: dict[int, int]
    updates: dict[int, bytes]
    expected_step: Params
    """What each round adds to the model: the sample-weighted mean of the updates (FedAvg)."""

    @property
    def update_mb(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.params.values()) / MB


def make_workload(size: Size, devices: int, seed: int = 0) -> Workload:
    generator = torch.Generator().manual_seed(seed)
    shapes = size.shapes()
    params = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    num_samples = {k: 600 + 37 * k for k in range(devices)}
    total = sum(num_samples.values())
    updates, step = {}, {name: torch.zeros(shape) for name, shape in shapes.items()}
    for k in range(devices):
        delta = {name: 0.01 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        for name in step:
            step[name] += delta[name] * (num_samples[k] / total)
        updates[k] = encode(delta)
    return Workload(params, num_samples, updates, step)


# -- memory bandwidth ------------------------------------------------------------------------------


def best_rate(op: Callable[[], object], nbytes: int, reps: int) -> float:
    """GB/s of ``nbytes`` over the fastest of ``reps`` runs of ``op`` (after one warm-up run)."""
    op()
    best = float("inf")
    for _ in range(reps):
        began = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - began)
    return nbytes / best / 1e9


def memory_bandwidth(nbytes: int, reps: int) -> dict[tuple[str, int], float]:
    """GB/s of ``dst.copy_(src)`` (bytes copied) and ``acc.add_(u, alpha=w)`` (update bytes folded)."""
    numel = nbytes // 4
    acc, src = torch.full((numel,), 1.0), torch.full((numel,), 2.0)
    threads = torch.get_num_threads()
    rates = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        rates["copy", count] = best_rate(lambda: acc.copy_(src), nbytes, reps)
        rates["fold", count] = best_rate(lambda: acc.add_(src, alpha=1e-3), nbytes, reps)
    torch.set_num_threads(threads)
    return rates


# -- redis-server and workers ----------------------------------------------------------------------


@contextmanager
def workers(url: str, count: int, threads: int | None) -> Iterator[None]:
    """``count`` ``amble worker`` processes serving every run registered in the Redis at ``url``.

    Started once and reused for every model size (each size is a fresh namespace they discover),
    so their start-up (importing torch) is paid once per worker count. ``threads`` is each one's
    torch thread count (``amble worker --threads``); None gives each one thread per CPU.
    """
    client = connect(url)
    command = worker_command(url, "--threads", str(threads or os.cpu_count() or 1))
    processes = [subprocess.Popen(command, stdin=subprocess.DEVNULL) for _ in range(count)]
    try:
        deadline = time.monotonic() + 120.0
        while int(client.hlen(HEARTBEATS)) < count:
            if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                raise RuntimeError(f"{count} amble worker(s) did not all start on {url}")
            time.sleep(0.1)
        yield
    finally:
        stop_processes(processes)
        client.delete(HEARTBEATS)
        client.close()


# -- measuring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundTiming:
    upload_s: float
    """First upload began -> last upload returned (the driver storing the blobs)."""
    total_s: float
    """First upload began -> ``close_round`` returned with the model published."""
    latency_s: float
    """Last upload returned -> ``close_round`` returned."""
    stamped_latency_s: float | None
    """Last upload returned -> the ``model_published`` event's Redis timestamp (None: embedded)."""
    function_s: float
    """Busy function-seconds of the round's aggregate and finalize invocations."""
    conflicts: float
    """Folds redone because another instance committed to the round's meta record first."""


@dataclass
class Result:
    size: str
    backend: str
    workers: int | None
    update_mb: float
    devices: int
    rounds: list[RoundTiming] = field(default_factory=list)

    def throughputs(self) -> list[float]:
        return [self.devices * self.update_mb / r.total_s for r in self.rounds]


def experiment_config(store: str, devices: int) -> ExperimentConfig:
    """A valid config for ``build_server`` (the workers rebuild FedAvg from it; nothing loads data)."""
    raw = {
        "name": "aggregation-throughput",
        "data": {"dataset": "synthetic", "num_devices": devices},
        "devices_per_round": devices,
        "strategies": ["fedavg"],
        "server": {"store": store, "workers": 0, "invocation_s": "measured", "cold_start_s": 0.0, "quorum": 1.0},
    }
    return config_from_dict(raw, source="the aggregation throughput benchmark")


def published_at(server: ParameterServer) -> float | None:
    """Unix time (ms resolution) Redis appended the last ``model_published`` event; None when embedded,
    or when the stream was already trimmed (every consumer had acknowledged it)."""
    events = server.events
    if not isinstance(events, RedisEventLog):
        return None
    last: list[tuple[bytes, dict[bytes, bytes]]] = events.client.xrevrange(  # type: ignore[assignment]
        events.stream(keys.PUBLISHED_TOPIC), count=1
    )
    if not last:
        return None
    [(event_id, fields)] = last
    event = decode_event(event_id.decode(), keys.PUBLISHED_TOPIC, fields[b"e"], 1)
    if event.type != "model_published":
        raise RuntimeError(f"the last published event is {event.type}, not model_published")
    return int(event_id.split(b"-")[0]) / 1000  # a stream id is "<ms since the epoch>-<sequence>"


def play_round(server: ParameterServer, workload: Workload, r: int, now_s: float) -> tuple[RoundTiming, float]:
    """Plan a round, upload every device's update as one burst, close it; returns the timing and its end."""
    plans, planned_s = server.start_round(r, sorted(workload.num_samples), now_s)
    reports = [
        Report(r, k, workload.num_samples[k], plan.local_steps, plan.batch_size, 1.0, 0.1, 0.1)
        for k, plan in sorted(plans.items())
    ]
    busy_before, conflicts_before = server.runtime.stats().busy_s, server.store.counter(keys.FOLD_CONFLICTS)
    began = time.perf_counter()
    for report in reports:
        server.upload(report, workload.updates[report.device], planned_s + 1.0)
    uploaded, uploaded_wall = time.perf_counter(), time.time()
    outcome = server.close_round(r, planned_s + 60.0)
    ended = time.perf_counter()
    if outcome.status != "finalized" or len(outcome.counted) != len(reports):
        raise RuntimeError(f"round {r}: {outcome.status}, counted {outcome.counted}, rejected {outcome.rejected}")
    stamp = published_at(server)
    timing = RoundTiming(
        upload_s=uploaded - began,
        total_s=ended - began,
        latency_s=ended - uploaded,
        stamped_latency_s=None if stamp is None else stamp - uploaded_wall,
        function_s=server.runtime.stats().busy_s - busy_before,
        conflicts=server.store.counter(keys.FOLD_CONFLICTS) - conflicts_before,
    )
    return timing, outcome.ended_at_s


def check_model(server: ParameterServer, workload: Workload) -> None:
    """The last round must have added exactly the weighted mean update: the folds were real."""
    version = server.latest_version()
    before, after = server.model(version - 1), server.model(version)
    for name, step in workload.expected_step.items():
        if not torch.allclose(after[name] - before[name], step, atol=1e-5):
            raise RuntimeError(f"model version {version}: tensor '{name}' is not the FedAvg of the updates")


def measure(store: str, namespace: str, workload: Workload, rounds: int) -> list[RoundTiming]:
    """``rounds`` measured rounds after one warm-up round (cold instances, workers finding the run)."""
    devices = len(workload.num_samples)
    config = experiment_config(store, devices)
    server = build_server(config, 0, namespace)  # a private Redis: the namespace is new
    try:
        settings = RunSettings(
            seed=0,
            devices_per_round=devices,
            quorum=1.0,
            max_update_bytes=int(config.server.max_update_mb * 2**20),
        )
        server.initialize(workload.params, workload.num_samples, settings)
        timings, now_s = [], 0.0
        for r in range(rounds + 1):
            timing, now_s = play_round(server, workload, r, now_s)
            timings.append(timing)
        check_model(server, workload)
    finally:
        release_server(server)
    return timings[1:]


# -- reporting -------------------------------------------------------------------------------------


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):,.{digits}f} ({min(scaled):,.{digits}f}–{max(scaled):,.{digits}f})"


def render_results(results: list[Result], fold_limit_gbs: float) -> list[str]:
    lines = [
        "| model | update MB | backend | rounds × updates | throughput MB/s | % of fold limit "
        "| latency ms (driver) | latency ms (Redis stamp) | upload ms/round | function ms/update | redone folds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rounds = result.rounds
        throughput = result.throughputs()
        stamped = [r.stamped_latency_s for r in rounds if r.stamped_latency_s is not None]
        backend = result.backend if result.workers is None else f"{result.backend}, {result.workers} worker(s)"
        cells = [
            result.size,
            f"{result.update_mb:.2f}",
            backend,
            f"{len(rounds)} × {result.devices}",
            spread(throughput),
            f"{100 * statistics.median(throughput) / (fold_limit_gbs * 1000):.1f}%",
            spread([r.latency_s for r in rounds], 1000),
            spread(stamped, 1000) if stamped else "= driver (synchronous)",
            spread([r.upload_s for r in rounds], 1000),
            spread([r.function_s / result.devices for r in rounds], 1000),
            f"{sum(r.conflicts for r in rounds) / (len(rounds) * result.devices):.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_bandwidth(rates: dict[tuple[str, int], float], nbytes: int) -> list[str]:
    threads = sorted({count for _, count in rates})
    lines = [
        f"Memory bandwidth, best of the runs over a {nbytes / 2**20:.0f} MiB float32 buffer "
        "(GB/s of the buffer's size; a copy moves 2x that over the bus, a fold 3x):",
        "",
        "| operation | " + " | ".join(f"{n} thread(s)" for n in threads) + " |",
        "|---|" + "---|" * len(threads),
        "| copy `dst.copy_(src)` | " + " | ".join(f"{rates['copy', n]:.2f}" for n in threads) + " |",
        "| fold `acc.add_(u, alpha=w)` | " + " | ".join(f"{rates['fold', n]:.2f}" for n in threads) + " |",
    ]
    return lines


NOTES = """\
How to read it (median over the measured rounds, min–max in brackets; one warm-up round per row is not counted):

- Every device of the run is selected every round; its update (random values, encoded once) is uploaded
  as one burst, all at the same virtual time, right after the round is planned. FedAvg folds each one.
- **throughput** = updates × update MB / (first upload began → `close_round` returned with the model
  published); it includes the driver storing the blobs (upload ms/round) and the finalisation.
- **% of fold limit** compares it with the best `acc.add_(u, alpha=w)` rate above: what folding an update
  into a running sum costs when nothing else is done (no decoding, no copies, no Store).
- **latency (driver)**: last `upload` returned → `close_round` returned. The embedded server runs its
  functions synchronously inside `close_round`, so there it includes *every* fold of the round, not only
  the last one (its uploads only store the blob and queue an event). On Redis the workers fold while the
  driver is still uploading, and the driver polls for the end (backing off to 50 ms), which this includes.
- **latency (Redis stamp)**: last `upload` returned → the Redis-server time at which the
  `model_published` event was appended (its stream id, ms resolution): the latency without the
  driver's polling.
- **function ms/update**: busy function-seconds of the round (its aggregates and its finalize) divided
  by the updates. On Redis it adds the transfers (each update is read from Redis and the worker's
  shard of the partial sums written back) and, with more processes than cores, time-sharing: the
  function's wall time grows while it waits for a core.
- **redone folds**: folds whose commit lost to another worker's on the round's small meta record
  (workers fold into their own shards, so only the meta record is shared), as a share of updates.
- The driver, the workers and redis-server share the machine's cores: on 2 cores, 4 workers contend
  with each other and with Redis. Each function process (the driver when embedded, each worker) uses the
  torch thread count in the header (torch's default unless `--threads`).
"""


def machine(redis_version: str, threads: int) -> str:
    cpu = cpu_name()
    return (
        f"{cpu} ({platform.system()} {platform.release()}), {os.cpu_count()} CPUs, {threads} torch thread(s) "
        f"per function process, Python {platform.python_version()}, torch {torch.__version__}, {redis_version}"
    )


def redis_server_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "no redis-server"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    version = next((part[2:] for part in out.split() if part.startswith("v=")), out.strip())
    return f"redis-server {version}, redis-py {redis.__version__}"


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, few rounds (a smoke test, < 1 min)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None, help="model sizes to run")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=None,
        help="Redis worker counts, default 1 2 4 (1 2 with --quick); none: embedded only",
    )
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded server")
    parser.add_argument("--devices", type=int, default=10, help="devices (= updates) per round")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per row (default: by size)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the driver and each worker (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "aggregation_throughput.md")
    args = parser.parse_args(argv)

    sizes = args.sizes or (QUICK_SIZES if args.quick else list(SIZES))
    worker_counts = args.workers if args.workers is not None else ([1, 2] if args.quick else [1, 2, 4])
    began = time.perf_counter()
    buffer_bytes = (64 if args.quick else 256) * 2**20
    rates = memory_bandwidth(buffer_bytes, reps=3 if args.quick else 8)
    fold_limit = max(rate for (op, _), rate in rates.items() if op == "fold")
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the embedded server's functions run in this process
    print("\n".join(render_bandwidth(rates, buffer_bytes)), flush=True)

    workloads = {name: make_workload(SIZES[name], args.devices) for name in sizes}
    rounds = {name: args.rounds or (SIZES[name].quick_rounds if args.quick else SIZES[name].rounds) for name in sizes}
    results: list[Result] = []

    def run(name: str, backend: str, count: int | None, store: str) -> None:
        workload = workloads[name]
        result = Result(SIZES[name].label, backend, count, workload.update_mb, args.devices)
        namespace = f"bench/{name}/{count}"
        result.rounds = measure(store, namespace, workload, rounds[name])
        results.append(result)
        print(render_results([result], fold_limit)[-1], flush=True)

    if not args.no_embedded:
        for name in sizes:
            run(name, "embedded", None, "memory")
    if worker_counts:
        with redis_server() as url:
            for count in worker_counts:
                with workers(url, count, args.threads):
                    for name in sizes:
                        run(name, "Redis", count, url)

    order = [SIZES[name].label for name in SIZES]
    results.sort(key=lambda r: order.index(r.size))  # by model size; embedded first, then by worker count
    command = "python benchmarks/aggregation_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    quick = " A quick smoke run (few rounds, small models): not the numbers to quote." if args.quick else ""
    where = machine(redis_server_version(), torch.get_num_threads())
    header = [
        "# Aggregation throughput",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {where}, {commit()}.",
        f"Command: `{command.strip()}` ({time.perf_counter() - began:,.0f} s wall).{quick}",
        "",
    ]
    body = [
        *header,
        *render_bandwidth(rates, buffer_bytes),
        "",
        f"Aggregation, {args.devices} updates per round (fold limit: {fold_limit:.2f} GB/s, the best fold above):",
        "",
        *render_results(results, fold_limit),
        "",
        NOTES,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(body))
    print("\n".join(render_results(results, fold_limit)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
