"""Ray against the embedded simulator on one machine, and a scale-out estimate for a cluster.

1. **Quickstart, local Ray vs embedded.** ``amble run examples/quickstart.yaml`` as it is, and again
   with ``server.runtime: ray`` (functions on Ray actors, devices trained on one Ray training actor
   per CPU, state in a Redis this script starts). Alternated, ``--reps`` times each, every run a
   fresh process: wall time, peak memory of the whole process tree (Ray's daemons and actors
   included, sampled from /proc), and the results (the same plans must give the same accuracies).
2. **Per-round time against training actors**, measured with 1 and 2 local training actors on a
   training-heavy round (``--devices`` per round, one strategy), next to the per-call overhead of a
   Ray actor and the round's total training compute; then a model of the round time on ``n`` actors,

       T(n) = F + W / n + c * n,

   with ``W`` the round's training compute (measured inside the actors), ``c`` the per-actor-call
   overhead (measured: a call carrying the model, round trip) and ``F`` the rest of the round (the
   driver's planning, aggregation and evaluation), fitted from the 1-actor run. The 2-actor
   measurement checks the model; beyond 2 it is an extrapolation, floored at the largest single
   device's share of ``W`` (a device is never split over actors) and capped at one actor per device.

    python benchmarks/ray_scaling.py                       # both parts (about 15 minutes on 2 cores)
    python benchmarks/ray_scaling.py --rounds 4 --reps 1   # smoke test

Results: printed, and written as JSON to ``--out`` (default ``benchmarks/results/ray_scaling.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
from processes import MB, redis_server, run_measured
from provenance import provenance

from amble.runsetup import device_shards
from amble.server.tensors import encode

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
QUIET = {"RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class Run:
    label: str
    wall_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    most_processes: int
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    devices: list[dict[str, Any]]

    def round_wall_s(self, strategy: str) -> list[float]:
        """Wall seconds of each round of ``strategy`` (its rows' cumulative ``wall_time_s``, differenced)."""
        times = [row["wall_time_s"] for row in self.rounds if row["strategy"] == strategy]
        return [b - a for a, b in zip([0.0, *times], times, strict=False)]


def amble_run(label: str, overrides: list[str], work: Path) -> Run:
    """One ``amble run`` of the quickstart with ``overrides``, in a fresh process, measured from outside."""
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "amble", "run", str(QUICKSTART), "--out", str(out), "--no-progress"]
    for override in overrides:
        command += ["--set", override]
    done = run_measured(command, work / f"{label}.log", {**os.environ, **QUIET}, ROOT)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    devices = [json.loads(line) for line in (out / "devices.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())["strategies"]
    return Run(label, done.wall_s, done.peak_rss_mb, done.peak_pss_mb, done.most_processes, summary, rows, devices)


def plans(run: Run) -> list[tuple[Any, ...]]:
    return [(d["strategy"], d["round"], d["device"], d["batch_size"], d["local_steps"]) for d in run.devices]


def quickstart(args: argparse.Namespace, redis_url: str, work: Path) -> dict[str, Any]:
    on_ray = [f"server.store={redis_url}", "server.runtime=ray", f"ray.num_cpus={args.cpus}"]
    base = [f"rounds={args.rounds}"]
    runs: dict[str, list[Run]] = {"embedded": [], "ray": []}
    for rep in range(args.reps):
        for label in ("embedded", "ray") if rep % 2 == 0 else ("ray", "embedded"):
            run = amble_run(f"quickstart-{label}-{rep}", base + (on_ray if label == "ray" else []), work)
            runs[label].append(run)
            print(f"  quickstart {label} rep {rep}: {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB", flush=True)
    embedded, on_ray_runs = runs["embedded"], runs["ray"]
    same_plans = all(plans(r) == plans(embedded[0]) for r in embedded + on_ray_runs)
    accuracy = {
        label: {s: [r.summary[s]["final_accuracy"] for r in group] for s in group[0].summary}
        for label, group in runs.items()
    }

    def median(group: list[Run], field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in group))

    return {
        "rounds_per_strategy": args.rounds,
        "wall_s": {label: [r.wall_s for r in group] for label, group in runs.items()},
        "peak_rss_mb": {label: [r.peak_rss_mb for r in group] for label, group in runs.items()},
        "peak_pss_mb": {label: [r.peak_pss_mb for r in group] for label, group in runs.items()},
        "most_processes": {label: max(r.most_processes for r in group) for label, group in runs.items()},
        "ratio_wall_ray_over_embedded": median(on_ray_runs, "wall_s") / median(embedded, "wall_s"),
        "ratio_peak_pss_ray_over_embedded": median(on_ray_runs, "peak_pss_mb") / median(embedded, "peak_pss_mb"),
        "final_accuracy": accuracy,
        "same_plans": same_plans,
        "virtual_time_s": {
            label: {s: group[0].summary[s]["virtual_time_s"] for s in group[0].summary} for label, group in runs.items()
        },
    }


def call_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Round trip of one actor call that carries the model by reference (what a training call costs
    besides training), and of putting the model into the object store, on a local Ray instance."""
    from amble.config import load_config
    from amble.models import build_model

    config = load_config(QUICKSTART, [])
    dataset, _ = device_shards(config)
    blob = encode(build_model(config.model, dataset.input_shape, dataset.num_classes).state_dict())

    @ray.remote(num_cpus=1)
    class Echo:
        def call(self, model: bytes, jobs: str) -> tuple[str, list[bytes]]:
            return jobs, []

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="warning")
    try:
        echo = Echo.remote()  # type: ignore[attr-defined]
        ray.get(echo.call.remote(b"", "[]"))  # started
        puts, calls = [], []
        for _ in range(200):
            tic = time.perf_counter()
            ref = ray.put(blob)
            puts.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            ray.get(echo.call.remote(ref, json.dumps([{"device": 1, "seed": 2, "plan": {}}] * 5)))
            calls.append(time.perf_counter() - tic)
    finally:
        ray.shutdown()
    return {"put_model_s": statistics.median(puts), "call_s": statistics.median(calls), "model_mb": len(blob) / MB}


def scale_out(args: argparse.Namespace, redis_url: str, work: Path) -> dict[str, Any]:
    heavy = [
        f"server.store={redis_url}",
        "server.runtime=ray",
        f"ray.num_cpus={args.cpus}",
        f"rounds={args.scale_rounds}",
        f"devices_per_round={args.devices}",
        "strategies=[fedavg]",
        f"eval.every={args.scale_rounds}",  # evaluate once, at the end: rounds are mostly training
    ]
    measured: dict[int, list[float]] = {}
    runs: dict[int, Run] = {}
    for actors in (1, 2):
        run = amble_run(f"scale-{actors}", [*heavy, f"ray.trainers={actors}"], work)
        runs[actors] = run
        measured[actors] = run.round_wall_s("fedavg")[1:-1]  # no first (actors start) or last (evaluation) round
        print(f"  scale-out, {actors} training actor(s): {statistics.median(measured[actors]):.3f} s/round", flush=True)
    overhead = call_overhead(args)
    # W: a round's training compute, measured inside the actors, over the rounds timed above.
    work_s = statistics.median(row["train_compute_s"] for row in runs[1].rounds[1:-1])
    work_2_s = statistics.median(row["train_compute_s"] for row in runs[2].rounds[1:-1])
    c = overhead["call_s"]
    t1 = statistics.median(measured[1])
    fixed_s = t1 - work_s - c  # F
    # The largest device's share of a round's work (planned steps x batch size): no split below it.
    shares: dict[int, list[float]] = {}
    for row in runs[1].devices:
        shares.setdefault(row["round"], []).append(row["local_steps"] * row["batch_size"])
    largest_share = statistics.median(max(s) / sum(s) for s in shares.values())

    def model(n: int) -> float:
        return fixed_s + max(work_s / n, work_s * largest_share) + c * n

    predicted = {n: model(n) for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.devices}
    return {
        "config": {"devices_per_round": args.devices, "rounds": args.scale_rounds, "strategy": "fedavg"},
        "measured_round_s": {str(n): statistics.median(v) for n, v in measured.items()},
        "measured_round_s_all": {str(n): v for n, v in measured.items()},
        "train_compute_per_round_s": work_s,
        "train_compute_per_round_s_with_2": work_2_s,
        "per_call_overhead": overhead,
        "fixed_per_round_s": fixed_s,
        "largest_device_share": largest_share,
        "modelled_round_s": {str(n): t for n, t in predicted.items()},
        "model_error_at_2": predicted[2] / statistics.median(measured[2]) - 1 if 2 in predicted else None,
        # The same check with the compute measured at 2 actors, which shared this machine's cores:
        "model_error_at_2_with_its_compute": (fixed_s + work_2_s / 2 + 2 * c) / statistics.median(measured[2]) - 1,
        "modelled_speedup": {str(n): predicted[1] / t for n, t in predicted.items()},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="quickstart rounds per strategy")
    parser.add_argument("--reps", type=int, default=2, help="runs of each of embedded and Ray, alternated")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray instance")
    parser.add_argument("--devices", type=int, default=40, help="devices per round in the scale-out runs")
    parser.add_argument("--scale-rounds", type=int, default=8, help="rounds of each scale-out run")
    parser.add_argument("--skip", choices=("quickstart", "scale"), action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_scaling.json")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "ray_scaling",
        "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "provenance": provenance("python benchmarks/ray_scaling.py " + " ".join(argv), ray=ray.__version__),
    }
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as tmp:
        work = Path(tmp)
        with redis_server() as url:
            if "quickstart" not in args.skip:
                result["quickstart"] = quickstart(args, url, work)
            if "scale" not in args.skip:
                result["scale_out"] = scale_out(args, url, work)
    result["provenance"]["wall_s"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
