"""Does a long run's state stay flat? A 2,000-round synthetic run on the embedded server.

A tiny model (a 64 x 10 layer), 3 devices a round, FedAvg, one malformed upload a round (so rejection
records are made too), the driver's checkpoint saved after every round as ``amble run`` does. At
rounds 100 and 2,000 (and between): the store's keys and bytes, set members, events the log still
holds, the checkpoint's bytes on disk, and the median time of one round's checkpoint over the ten
rounds before.

Side by side in one run: this checkout's code and, with ``--baseline-src DIR`` (the ``src/`` of
another checkout, e.g. ``git worktree add /tmp/base <commit>``), that code, each in its own process.

    python benchmarks/state_growth.py --baseline-src /tmp/base/src      # ~2-4 minutes
    python benchmarks/state_growth.py --rounds 300 --at 100 300        # a quick check

Results go to ``benchmarks/results/state_growth.md``.
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
from pathlib import Path
from typing import Any

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = {0: 64, 1: 192, 2: 128}


def measure(rounds: int, at: list[int], checkpoint: Path) -> list[dict[str, Any]]:
    """Play ``rounds`` rounds in this process, with whichever ``amble`` is importable; figures at ``at``."""
    import torch

    from amble.server import (
        LocalRuntime,
        MemoryEventLog,
        MemoryStore,
        ParameterServer,
        PoolSettings,
        RunSettings,
        ServerFunctions,
        keys,
    )
    from amble.server.tensors import encode
    from amble.strategies import BaseWork, FedAvg, Report

    store, events = MemoryStore(), MemoryEventLog()
    functions = ServerFunctions(store, FedAvg(BaseWork(32, 1, 0.1)))
    runtime = LocalRuntime(store, events, functions.handlers(), PoolSettings(max_instances=2, invocation_s=0.02))
    server = ParameterServer(store, events, runtime)
    initial = {"w": torch.zeros(64, 10), "b": torch.zeros(10)}
    server.initialize(initial, SAMPLES, RunSettings(seed=0, devices_per_round=3, quorum=0.5, max_update_bytes=1 << 20))
    generator = torch.Generator().manual_seed(0)
    save_s: list[float] = []
    rows = []
    for r in range(rounds):
        server.start_round(r, [0, 1, 2], r * 10.0)
        server.upload(Report(r, 1, SAMPLES[1], 6, 32, 1.0, 0.1, 0.1), b"malformed", r * 10.0)
        for device, count in SAMPLES.items():
            update = {name: 0.01 * torch.randn(t.shape, generator=generator) for name, t in initial.items()}
            report = Report(r, device, count, count // 32, 32, 1.0, 0.1, 0.1)
            server.upload(report, encode(update), r * 10.0 + 1 + device)
        outcome = server.close_round(r, r * 10.0 + 5)
        assert outcome.status == "finalized", outcome
        began = time.perf_counter()
        store.put(keys.CHECKPOINT, json.dumps({"round": r}).encode())
        store.save(checkpoint)
        save_s.append(time.perf_counter() - began)
        if r + 1 in at:
            rows.append({"round": r + 1, **footprint(store, events), **on_disk(checkpoint)})
            rows[-1]["checkpoint_ms"] = 1000 * statistics.median(save_s[-10:])
    return rows


def footprint(store: Any, events: Any) -> dict[str, int]:
    """What the store and the event log hold (read through what both versions of the code have)."""
    names = store.keys("")
    topics = getattr(events, "_topics", {})
    return {
        "keys": len(names),
        "bytes": sum(len(store.get(name) or b"") for name in names),
        "set_members": sum(len(m) for m in getattr(store, "_sets", {}).values()),
        "events_held": sum(len(log) for log in topics.values()),
    }


def on_disk(checkpoint: Path) -> dict[str, int]:
    files = [checkpoint, checkpoint.with_name(checkpoint.name + ".journal")]
    return {"checkpoint_bytes": sum(f.stat().st_size for f in files if f.is_file())}


def run_in(src: Path, rounds: int, at: list[int]) -> list[dict[str, Any]]:
    """:func:`measure` in a fresh process importing ``amble`` from ``src``."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONPATH": str(src)}
        command = [sys.executable, __file__, "--measure", "--rounds", str(rounds), "--checkpoint", scratch + "/s"]
        done = subprocess.run([*command, "--at", *map(str, at)], env=env, capture_output=True, text=True, check=True)
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    columns = ["round", "keys", "bytes", "set_members", "events_held", "checkpoint_bytes", "checkpoint_ms"]
    lines = ["| code | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for code, rows in results.items():
        for row in rows:
            cells = [f"{row[c]:.2f}" if c == "checkpoint_ms" else f"{row[c]:,}" for c in columns]
            lines.append(f"| {code} | " + " | ".join(cells) + " |")
    for code, rows in results.items():
        first, last = rows[0], rows[-1]
        growth = {c: last[c] / max(first[c], 1e-9) for c in ("bytes", "checkpoint_bytes", "checkpoint_ms")}
        lines.append(
            f"\n{code}: round {last['round']} vs round {first['round']}: store bytes x{growth['bytes']:.2f}, "
            f"checkpoint bytes x{growth['checkpoint_bytes']:.2f}, checkpoint time x{growth['checkpoint_ms']:.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--at", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--baseline-src", type=Path, help="the src/ of the code to compare against")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.rounds, sorted(args.at), args.checkpoint)))
        return
    results = {"this checkout": run_in(ROOT / "src", args.rounds, sorted(args.at))}
    if args.baseline_src is not None:
        results[f"baseline ({args.baseline_src})"] = run_in(args.baseline_src, args.rounds, sorted(args.at))
    command = " ".join(["python benchmarks/state_growth.py", *sys.argv[1:]])
    lines = ["# State growth over a long run", "", f"`{json.dumps(provenance(command))}`", "", *table(results)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "state_growth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
