"""The gateway load benchmark, side by side: another checkout's code against this one's, in one run.

Runs ``gateway_load.py`` (this checkout's load generator and checks) alternately with the baseline's
``src/`` and with this checkout's on ``PYTHONPATH``, ``--repeat`` times each, every run a fresh
process, and writes each side's uploads/s and latency and the ratio of their medians. Alternating
spreads whatever else the machine is doing over both sides.

    git archive <commit> src | tar -x -C /tmp/before            # the code to compare against
    python benchmarks/gateway_compare.py --baseline /tmp/before/src
    python benchmarks/gateway_compare.py --baseline /tmp/before/src --devices 500 --concurrency 500 64 --repeat 3

Results go to ``benchmarks/results/gateway_compare.md`` (each run's full checks stay in its own
``gateway_load`` output, under a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from provenance import commit, cpu_name

ROOT = Path(__file__).resolve().parents[1]
LOAD = ROOT / "benchmarks" / "gateway_load.py"


def one_run(src: Path, devices: int, concurrency: list[int], model: str, work: Path, tag: str) -> list[dict[str, Any]]:
    """``gateway_load.py`` once with ``src`` first on the path: its runs' figures."""
    out = work / f"{tag}.json"
    command = [sys.executable, str(LOAD), "--devices", str(devices), "--model", model, "--json", str(out)]
    command += ["--concurrency", *map(str, concurrency), "--out", str(work / f"{tag}.md")]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if not out.exists():
        raise RuntimeError(f"gateway_load.py with {src} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    runs: list[dict[str, Any]] = json.loads(out.read_text())
    if any(Path(r["amble"]) != src.resolve() for r in runs):
        raise RuntimeError(f"the runs imported amble from {runs[0]['amble']}, not {src}")
    return runs


def render(runs: dict[str, list[dict[str, Any]]], concurrency: list[int]) -> list[str]:
    lines = [
        "| in flight | before: uploads/s | after: uploads/s | after / before (medians) "
        "| latency p50 ms, before -> after | p99 ms, before -> after | server CPU ms/upload, before -> after "
        "| every check passed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in concurrency:
        before = [r for r in runs["before"] if r["concurrency"] == c]
        after = [r for r in runs["after"] if r["concurrency"] == c]
        ratio = statistics.median(r["uploads_per_s"] for r in after) / statistics.median(
            r["uploads_per_s"] for r in before
        )

        def figures(side: list[dict[str, Any]], key: str) -> str:
            return ", ".join(f"{r[key]:,.0f}" for r in side)

        def latency(side: list[dict[str, Any]], q: str) -> str:
            return ", ".join(f"{r['latency_ms'][q]:,.0f}" for r in side)

        def cpu(side: list[dict[str, Any]]) -> str:
            return ", ".join(f"{r['server_cpu_ms_per_upload']:.1f}" for r in side)

        passed = all(r["passed"] for r in before + after)
        lines.append(
            f"| {c} | {figures(before, 'uploads_per_s')} | {figures(after, 'uploads_per_s')} | **{ratio:.2f}** "
            f"| {latency(before, 'p50')} -> {latency(after, 'p50')} | {latency(before, 'p99')} -> "
            f"{latency(after, 'p99')} | {cpu(before)} -> {cpu(after)} | {'yes' if passed else '**NO**'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the src/ directory of the code to compare with")
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[500, 64])
    parser.add_argument("--model", choices=["mlp", "lenet"], default="mlp")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side (alternating)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway_compare.md")
    args = parser.parse_args(argv)
    if not (args.baseline / "amble" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline} has no amble package: pass a checkout's src/ directory")
    began = time.perf_counter()
    sides = {"before": args.baseline, "after": ROOT / "src"}
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="amble-gateway-compare-") as directory:
        for attempt in range(args.repeat):
            for side, src in sides.items():
                figures = one_run(src, args.devices, args.concurrency, args.model, Path(directory), f"{side}{attempt}")
                runs[side] += figures
                print(side, [f"{r['concurrency']}: {r['uploads_per_s']:.0f}/s" for r in figures], flush=True)
    load = os.getloadavg()
    command = "python benchmarks/gateway_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = [
        "# Gateway load, side by side",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} CPUs, "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); "
        f"after: this checkout, {commit()}; "
        f"before: `{args.baseline}`.",
        f"Command: `{command.strip()}` ({time.perf_counter() - began:,.0f} s wall). {args.devices} devices, "
        f"the `{args.model}` model, {args.repeat} alternating runs per side, each a fresh `gateway_load.py` process.",
        "",
        *render(runs, args.concurrency),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(body))
    print("\n".join(body))
    return 0 if all(r["passed"] for side in runs.values() for r in side) else 1


if __name__ == "__main__":
    sys.exit(main())
