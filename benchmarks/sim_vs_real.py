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
- **time to target**, at a few accuracies (:data:`TARGETS`): the run clock at the first round at or
  above each. The served figure includes the evaluation pauses (wall clock since the first round
  started); the ratio is also given with them taken out (``eval_s`` of the rounds before).

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

from amble.fleet import StepTime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STRATEGIES: list[Any] = ["fedavg", {"name": "amble"}]
SLOWDOWNS = (1, 1, 2, 3, 5, 8)
TARGETS = (0.8, 0.83, 0.85)
"""Accuracies the time to target is compared at (the first served round was at 0.78)."""


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
        "eval": {"every": 1, "target_accuracy": 0.85, "test_samples": 2000},
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


def time_to(rows: list[dict[str, Any]], target: float) -> tuple[float, int] | None:
    """(time, round) at the first evaluation at or above ``target``; None if never reached."""
    row = next((r for r in rows if r["accuracy"] is not None and r["accuracy"] >= target), None)
    return None if row is None else (row["virtual_time_s"], row["round"])


def expected_rounds(sim_dir: Path, real_dir: Path, predicted_s: list[float]) -> list[float]:
    """The simulated rounds without the recorded jitter: each device at its median step time.

    The replay draws each device's noise independently; on a shared machine the real variation is
    mostly the machine's load, common to all devices and unpredictable. The expected round time is
    the prediction to judge a round by; the drawn one shows the spread. Same plans as the replay:
    the round's predicted time minus its slowest device's drawn time plus that at median speeds.
    """
    trace = {d["device"]: d for d in json.loads((real_dir / "fleet_trace.json").read_text())["devices"]}
    step_s = {k: StepTime.from_mapping({int(b): t for b, t in d["step_s"].items()}) for k, d in trace.items()}
    rows = [row for row in read_jsonl(sim_dir / "devices.jsonl") if row["compute_s"] is not None]
    expected = []
    for r, predicted in enumerate(predicted_s):
        this = [row for row in rows if row["round"] == r and row["status"] != "dropped"]
        drawn = max(row["compute_s"] + row["comm_s"] for row in this)
        median = max(
            trace[row["device"]]["download_s"]
            + row["local_steps"] * step_s[row["device"]](row["batch_size"])
            + trace[row["device"]]["upload_s"]
            for row in this
        )
        expected.append(predicted - drawn + median)
    return expected


def compare(real_dir: Path, sim_dir: Path, label: str, targets: tuple[float, ...]) -> dict[str, Any]:
    """Per-round and time-to-target comparison of one strategy's served and replayed runs."""
    real = read_jsonl(real_dir / "metrics.jsonl")
    sim = read_jsonl(sim_dir / "metrics.jsonl")
    measured_s = [row["round_s"] for row in real]
    ends = [row["virtual_time_s"] for row in sim]
    predicted_s = [end - start for start, end in zip([0.0, *ends], ends, strict=False)]
    errors = [abs(p - m) / m for p, m in zip(predicted_s, measured_s, strict=True)]
    expected_s = expected_rounds(sim_dir, real_dir, predicted_s)
    expected_errors = [abs(e - m) / m for e, m in zip(expected_s, measured_s, strict=True)]
    real_summary = json.loads((real_dir / "summary.json").read_text())["strategies"][label]
    to_targets = []
    for target in targets:
        measured, predicted = time_to(real, target), time_to(sim, target)
        entry: dict[str, Any] = {"target": target, "measured": measured, "predicted": predicted}
        if measured is not None and predicted is not None:
            without_eval_s = measured[0] - sum(row["eval_s"] for row in real[: measured[1]])
            entry["ratio"] = predicted[0] / measured[0]
            entry["ratio_without_eval"] = predicted[0] / without_eval_s
        to_targets.append(entry)
    return {
        "strategy": label,
        "round_s_measured": measured_s,
        "round_s_predicted": predicted_s,
        "round_error_median": statistics.median(errors),
        "round_error_max": max(errors),
        "total_ratio": sum(predicted_s) / sum(measured_s),
        "round_s_expected": expected_s,
        "expected_error_median": statistics.median(expected_errors),
        "expected_error_max": max(expected_errors),
        "expected_total_ratio": sum(expected_s) / sum(measured_s),
        "to_targets": to_targets,
        "accuracy_measured": [row["accuracy"] for row in real],
        "accuracy_predicted": [row["accuracy"] for row in sim],
        "eval_s": real_summary["eval_s"],
        "fleet_ready_s": real_summary["fleet_ready_s"],
    }


def run_strategy(
    strategy: Any, base: dict[str, Any], work: Path, slowdowns: tuple[int, ...], targets: tuple[float, ...]
) -> dict[str, Any]:
    label = strategy if isinstance(strategy, str) else strategy["name"]
    config = work / f"{label}.yaml"
    config.write_text(yaml.safe_dump({**base, "strategies": [strategy]}))
    real_dir, sim_dir = work / f"real-{label}", work / f"sim-{label}"
    if (sim_dir / "summary.json").is_file():  # --keep DIR of an earlier invocation: compare again only
        result = compare(real_dir, sim_dir, label, targets)
        result.update(json.loads((work / f"{label}.load.json").read_text()))
        result["trace"] = json.loads((real_dir / "fleet_trace.json").read_text())["devices"]
        return result
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
    (work / f"{label}.load.json").write_text(json.dumps({"load_before": load_before, "load_after": load_after}))
    result = compare(real_dir, sim_dir, label, targets)
    result["load_before"], result["load_after"] = load_before, load_after
    result["trace"] = json.loads(trace.read_text())["devices"]
    return result


def target_cells(entry: dict[str, Any]) -> str:
    measured, predicted = entry["measured"], entry["predicted"]
    text = " -> ".join("not reached" if t is None else f"{t[0]:.1f} (r{t[1]})" for t in (measured, predicted))
    return f"{text} | {ratio(entry.get('ratio'))} | {ratio(entry.get('ratio_without_eval'))}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(results: list[dict[str, Any]], command: str, base: dict[str, Any]) -> str:
    lines = [
        "# Simulated vs real: the virtual clock against a recorded local fleet",
        "",
        f"Command: `{command}`; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {cpu_name()}, {os.cpu_count()} CPUs; "
        f"{commit()}. Config: {base['data']['dataset']}, {base['data']['partition']}, {base['model']}, "
        f"{base['data']['num_devices']} devices all selected, {base['rounds']} rounds, slowdowns "
        f"{', '.join(map(str, SLOWDOWNS if base['data']['num_devices'] == len(SLOWDOWNS) else (1, 1, 2)))}.",
        "",
        "| strategy | load before / after | replay | round time: median error | largest error "
        "| sum predicted / measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {r['load_before']} / {r['load_after']} | with recorded jitter "
            f"| {percent(r['round_error_median'])} | {percent(r['round_error_max'])} | {r['total_ratio']:.2f} |"
        )
        lines.append(
            f"| {r['strategy']} | | expected (median speeds) | {percent(r['expected_error_median'])} "
            f"| {percent(r['expected_error_max'])} | {r['expected_total_ratio']:.2f} |"
        )
    lines += [
        "",
        "| strategy | target | time to target, measured -> predicted (s, round) | ratio | ratio without eval pauses |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for entry in r["to_targets"]:
            lines.append(f"| {r['strategy']} | {entry['target']} | {target_cells(entry)} |")
    lines += ["", "Per round (seconds, measured / predicted / expected):", ""]
    for r in results:
        pairs = ", ".join(
            f"{m:.1f} / {p:.1f} / {e:.1f}"
            for m, p, e in zip(r["round_s_measured"], r["round_s_predicted"], r["round_s_expected"], strict=True)
        )
        lines.append(f"- {r['strategy']}: {pairs}")
    lines += ["", "Accuracy per round (measured / predicted):", ""]
    for r in results:
        pairs = ", ".join(
            f"{m:.3f} / {p:.3f}" for m, p in zip(r["accuracy_measured"], r["accuracy_predicted"], strict=True)
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
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the runs in this directory (runs already in it: compare only)"
    )
    args = parser.parse_args()
    base = quick_config() if args.quick else full_config()
    slowdowns = (1, 1, 2) if args.quick else SLOWDOWNS
    targets = (0.3, 0.5) if args.quick else TARGETS
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results = [run_strategy(strategy, base, work, slowdowns, targets) for strategy in STRATEGIES]
    command = "python benchmarks/sim_vs_real.py" + (" --quick" if args.quick else "")
    stem = "sim_vs_real_quick" if args.quick else "sim_vs_real"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results, command, base)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
