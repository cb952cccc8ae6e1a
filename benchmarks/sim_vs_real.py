"""Fidelity of the virtual clock: a real local fleet, then the simulator replaying its recorded trace.

For each strategy (FedAvg, AMBLE): ``amble serve CONFIG --local-devices 6 --slowdowns 1,1,2,3,5,8``
(six real ``amble device`` processes on this machine, one torch thread each) writes the run's files
and ``fleet_trace.json``; then ``amble run CONFIG --set fleet.kind=trace --set fleet.trace=...``
simulates the same config on that recorded fleet. Compared, predicted (simulated) against measured
(served):

- **round time**: the served round's duration (planned -> model published; the server's evaluation
  between rounds is left out, as the simulator has none) against the simulated round's (the
  difference of consecutive virtual times), per round; the table gives the median and largest
  relative error and the ratio of the sums;
- **time to target**: ``time_to_target_s`` of both summaries. The served figure includes the
  evaluation pauses (wall clock since the first round started); the ratio is also given with them
  taken out (``measured - eval_s`` of the rounds before the target).

The config (Fashion-MNIST, Dirichlet 0.5, MLP, 6 devices all selected, 8 rounds) charges no cold
start (``server.cold_start_s: 0``: the served run's embedded functions have none) and, in the
replay, the served run's mean function seconds per invocation (``recorded.invocation_s`` of the
trace). ``uptime``'s load is recorded before and after each served
run: the served times are wall-clock and anything else running on the machine is in them.

    python benchmarks/sim_vs_real.py            # the full comparison (about 5 minutes on 2 cores)
    python benchmarks/sim_vs_real.py --quick    # synthetic data, 3 devices, 3 rounds: a smoke test

Results go to ``benchmarks/results/sim_vs_real.md`` and ``.json`` (``--quick``: ``sim_vs_real_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from provenance import commit, cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STRATEGIES: list[Any] = ["fedavg", {"name": "amble"}]
SLOWDOWNS = (1, 1, 2, 3, 5, 8)


def full_config() -> dict[str, Any]:
    return {
        "name": "sim-vs-real",
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "partition": {"kind": "dirichlet", "alpha": 0.5}, "num_devices": 6},
        "model": "mlp",
        "rounds": 8,
        "devices_per_round": 6,
        "train": {"batch_size": 32, "local_epochs": 1, "lr": 0.05},
        "server": {"cold_start_s": 0.0},
        "eval": {"every": 1, "target_accuracy": 0.7, "test_samples": 2000},
    }


def quick_config() -> dict[str, Any]:
    return {
        "name": "sim-vs-real-quick",
        "seed": 0,
        "data": {"dataset": "synthetic", "partition": {"kind": "dirichlet", "alpha": 0.5}, "num_devices": 3},
        "model": "mlp",
        "rounds": 3,
        "devices_per_round": 3,
        "train": {"batch_size": 16, "local_epochs": 1, "lr": 0.05},
        "server": {"cold_start_s": 0.0},
        "eval": {"every": 1, "target_accuracy": 0.2},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load() -> str:
    """``uptime``'s load averages (1, 5, 15 minutes)."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def amble(*args: str) -> None:
    command = [sys.executable, "-m", "amble", *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(real_dir: Path, sim_dir: Path, label: str) -> dict[str, Any]:
    """Per-round and time-to-target comparison of one strategy's served and replayed runs."""
    real = read_jsonl(real_dir / "metrics.jsonl")
    sim = read_jsonl(sim_dir / "metrics.jsonl")
    measured_s = [row["round_s"] for row in real]
    ends = [row["virtual_time_s"] for row in sim]
    predicted_s = [end - start for start, end in zip([0.0, *ends], ends, strict=False)]
    errors = [abs(p - m) / m for p, m in zip(predicted_s, measured_s, strict=True)]
    real_summary = json.loads((real_dir / "summary.json").read_text())["strategies"][label]
    sim_summary = json.loads((sim_dir / "summary.json").read_text())["strategies"][label]
    target_real, target_sim = real_summary["time_to_target_s"], sim_summary["time_to_target_s"]
    rounds_to_target = real_summary["rounds_to_target"]
    eval_before_s = sum(row["eval_s"] for row in real[: (rounds_to_target or 1) - 1])
    return {
        "strategy": label,
        "round_s_measured": measured_s,
        "round_s_predicted": predicted_s,
        "round_error_median": statistics.median(errors),
        "round_error_max": max(errors),
        "total_ratio": sum(predicted_s) / sum(measured_s),
        "time_to_target_measured_s": target_real,
        "time_to_target_predicted_s": target_sim,
        "time_to_target_ratio": target_sim / target_real if target_real and target_sim else None,
        "time_to_target_ratio_without_eval": (
            target_sim / (target_real - eval_before_s) if target_real and target_sim else None
        ),
        "rounds_to_target": [rounds_to_target, sim_summary["rounds_to_target"]],
        "final_accuracy": [real_summary["final_accuracy"], sim_summary["final_accuracy"]],
        "eval_s": real_summary["eval_s"],
        "fleet_ready_s": real_summary["fleet_ready_s"],
    }


def run_strategy(strategy: Any, base: dict[str, Any], work: Path, slowdowns: tuple[int, ...]) -> dict[str, Any]:
    label = strategy if isinstance(strategy, str) else strategy["name"]
    config = work / f"{label}.yaml"
    config.write_text(yaml.safe_dump({**base, "strategies": [strategy]}))
    real_dir, sim_dir = work / f"real-{label}", work / f"sim-{label}"
    load_before = load()
    amble(
        "serve", str(config), "--out", str(real_dir), "--port", str(free_port()), "--linger-s", "1",
        "--local-devices", str(len(slowdowns)), "--slowdowns", ",".join(map(str, slowdowns)),
    )  # fmt: skip
    load_after = load()
    trace = real_dir / "fleet_trace.json"
    # The served run's own function time per invocation: "measured" would charge the simulator's, which
    # on a loaded machine with two torch threads took 0.1-0.4 s per fold against the server's 8 ms.
    invocation_s = json.loads(trace.read_text())["recorded"]["invocation_s"]
    amble("run", str(config), "--out", str(sim_dir), "--no-progress", "--set", "fleet.kind=trace",
          "--set", f"fleet.trace={trace}", "--set", f"server.invocation_s={invocation_s}")  # fmt: skip
    result = compare(real_dir, sim_dir, label)
    result["load_before"], result["load_after"] = load_before, load_after
    result["trace"] = json.loads(trace.read_text())["devices"]
    return result


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(results: list[dict[str, Any]], command: str, base: dict[str, Any]) -> str:
    lines = [
        "# Simulated vs real: the virtual clock against a recorded local fleet",
        "",
        f"Command: `{command}`; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {cpu_name()}, {os.cpu_count()} CPUs; "
        f"{commit()}. Config: {base['data']['dataset']}, {base['data']['partition']}, {base['model']}, "
        f"{base['data']['num_devices']} devices all selected, {base['rounds']} rounds, target "
        f"{base['eval']['target_accuracy']}.",
        "",
        "| strategy | load before / after | round time: median error | largest error | sum predicted / measured "
        "| time to target, measured -> predicted (s) | ratio | ratio without eval pauses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {r['load_before']} / {r['load_after']} | {percent(r['round_error_median'])} "
            f"| {percent(r['round_error_max'])} | {r['total_ratio']:.2f} "
            f"| {seconds(r['time_to_target_measured_s'])} -> {seconds(r['time_to_target_predicted_s'])} "
            f"| {ratio(r['time_to_target_ratio'])} | {ratio(r['time_to_target_ratio_without_eval'])} |"
        )
    lines += ["", "Per round (seconds, measured / predicted):", ""]
    for r in results:
        pairs = ", ".join(
            f"{m:.2f} / {p:.2f}" for m, p in zip(r["round_s_measured"], r["round_s_predicted"], strict=True)
        )
        lines.append(f"- {r['strategy']}: {pairs}")
    lines += ["", "Recorded fleets (per device: slowdown vs t_ref, link s down + up, jitter):", ""]
    for r in results:
        devices = "; ".join(
            f"{d['device']}: {d['slowdown']:.2f}x, {d.get('download_s', 0):.3f}+{d.get('upload_s', 0):.3f} s, "
            f"{d.get('jitter', 0):.2f}"
            for d in r["trace"]
        )
        lines.append(f"- {r['strategy']}: {devices}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic data, 3 devices, 3 rounds")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this directory")
    args = parser.parse_args()
    base = quick_config() if args.quick else full_config()
    slowdowns = (1, 1, 2) if args.quick else SLOWDOWNS
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results = [run_strategy(strategy, base, work, slowdowns) for strategy in STRATEGIES]
    command = "python benchmarks/sim_vs_real.py" + (" --quick" if args.quick else "")
    stem = "sim_vs_real_quick" if args.quick else "sim_vs_real"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results, command, base)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
