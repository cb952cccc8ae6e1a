"""Time-to-accuracy benchmark: AMBLE against the baselines, side by side.

Every cell of the matrix (dataset x partition x fleet x model) runs all strategies on the identical
partition, fleet, device selection and seed (one ``amble run`` per cell, seed and strategy), then
reports per strategy: virtual time to a target accuracy, final and best accuracy within a common
virtual-time budget, rounds to target, the idle share of device time, samples processed, function
invocations and cold starts, and the ratio ``time_to_target(strategy) / time_to_target(amble)``.

The target of a cell is 95% of FedAvg's best accuracy in that cell (mean over seeds), rounded down
to a hundredth: the level FedAvg itself reaches, so each ratio says how much sooner (or later) a
strategy gets to where FedAvg gets; a second, higher target is FedAvg's best itself. Both are
computed after the runs from ``metrics.jsonl``, the same numbers for every strategy of the cell;
nothing is tuned per cell. FedBuff's "rounds" are its published models (see PUBLISHES_PER_ROUND).

    python benchmarks/time_to_accuracy.py --reduced --reuse --jobs 2  # one seed, four cells (the README's)
    python benchmarks/time_to_accuracy.py --reduced --variants --seeds 0 1 2 --jobs 2  # with the fixes tried
    python benchmarks/time_to_accuracy.py --jobs 2           # the full matrix, 3 seeds (many hours on 2 cores)
    PYTHONPATH=examples/tabular python benchmarks/time_to_accuracy.py --config examples/tabular/tabular.yaml \
        --seeds 0 1 2 --rounds 25 --jobs 2                   # one cell from your own config (data, model, fleet)

With ``--config`` the cell is a config of the user's (its data, model, partition, fleet and training
settings; its code importable as for ``amble run``): the benchmark replaces its strategies with the
ones below, its seed and rounds with the benchmark's, and pins its step times (calibrated here once,
on the config's own model and data, unless the config gives ``fleet.t_ref``).

``--jobs N`` runs N ``amble run`` processes at a time with cpus/N torch threads each. Virtual times do
not depend on it (the clock's step times are pinned in every config); torch may round differently
on another number of threads, so compare runs made with the same ``--jobs``. Runs land in
``runs/bench/<cell>/seed<k>-r<rounds>/<strategy label>/`` (a finished run is reused when its config
and the code match, or with ``--reuse-any-code`` whatever code made it: the results then list the
code versions); tables and plots go to ``benchmarks/results/`` and are what BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from provenance import commit, cpu_name

from amble.config import ExperimentConfig, config_from_dict, config_to_dict, load_config
from amble.fleet import StepTime, calibrate
from amble.models import build_model
from amble.report.progress import STALLED_EXIT_STATUS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CIFAR_ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"

STRATEGIES: list[Any] = [
    "fedavg",
    # AMBLE as shipped: whatever its settings' defaults are at the commit that runs it.
    {"name": "amble"},
    # The shipped planner without the prior for unseen devices (issue 16): their first selection is a
    # profiling round at the base plan, and T_r is over the devices already seen.
    {"name": "amble", "label": "amble-profile", "unseen_devices": "profile"},
    # SPEC 3's q = 1 (the default before issue 16): rounds never shorter than FedAvg's would be.
    {"name": "amble", "label": "amble-q1", "deadline_quantile": 1.0},
    # Fixes tried on top of AMBLE q = 0.8 in issue 3 (run only with --variants; BENCHMARKS.md reports each).
    {"name": "amble", "label": "amble-q0.8-nova", "deadline_quantile": 0.8, "aggregator": "fednova"},
    {"name": "amble", "label": "amble-q0.8-warmup", "deadline_quantile": 0.8, "lr_warmup_steps": 5},
    {"name": "amble", "label": "amble-q0.8-prox", "deadline_quantile": 0.8, "prox_mu": 0.01},
    {"name": "amble", "label": "amble-q0.8-e2", "deadline_quantile": 0.8, "epochs_max": 2},
    {"name": "deadline", "deadline_quantile": 0.8},
    {"name": "fedprox", "deadline_quantile": 0.8, "prox_mu": 0.01},
    {"name": "fednova", "deadline_quantile": 0.8},
    {"name": "adabatch"},
    # Issue 16's rivals, each with its own defaults: drift control (server optimizers, control variates)
    # and buffered asynchronous aggregation.
    "fedavgm",
    "fedadam",
    "scaffold",
    "fedbuff",
    # AMBLE with each drift control, the rest of its settings as shipped.
    {"name": "amble", "label": "amble-fedavgm", "server_optimizer": {"kind": "momentum"}},
    {"name": "amble", "label": "amble-scaffold", "control_variates": True},
]
PUBLISHES_PER_ROUND = {"fedbuff": 6}
"""A FedBuff run's ``rounds`` are published models of K = 5 updates, each about a quarter of a FedAvg
round's virtual time (0.4 s vs 1.7 s on the quickstart): six per synchronous round, so that its run
covers at least the virtual time of the others and its time to target is measured, not cut off."""
# The fixes tried on top of AMBLE q = 0.8 in issue 3 (BENCHMARKS.md reports each): run only with --variants.
VARIANTS = {"amble-q0.8-nova", "amble-q0.8-warmup", "amble-q0.8-prox", "amble-q0.8-e2"}


def entry_label(entry: Any) -> str:
    """A strategy entry's label: its ``label``, else its name."""
    return str(entry) if isinstance(entry, str) else str(entry.get("label") or entry["name"])


def chosen_strategies(variants: bool, only: list[str] | None = None) -> list[Any]:
    """The entries a run covers: all but the variants (unless asked), or only the labels in ``only``."""
    if only:
        return [s for s in STRATEGIES if entry_label(s) in only]
    return [s for s in STRATEGIES if variants or entry_label(s) not in VARIANTS]


TIERS = {"kind": "tiers"}  # 50% 1x, 30% 3x, 20% 10x
# sigma 0.92: the slowest of 100 devices (about +2.5 sigma) is ~10x the median.
LOGNORMAL = {"kind": "lognormal", "sigma": 0.92}
# Input shape and classes of each dataset, to calibrate its models' step times before any run.
SHAPES = {"fashion-mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


@dataclass(frozen=True)
class Cell:
    name: str
    dataset: str
    partition: dict[str, Any]
    model: str
    fleet: dict[str, Any]
    rounds: int
    lr: float = 0.05

    def config(self, seed: int, rounds: int | None = None, strategies: list[Any] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"dataset": self.dataset, "partition": self.partition, "num_devices": 100}
        if self.dataset == "cifar10" and CIFAR_ARCHIVE.is_file():
            data["root"] = str(CIFAR_ARCHIVE)
        return {
            "name": self.name,
            "seed": seed,
            "data": data,
            "model": self.model,
            # The reference step times are part of the config: every seed and every job of the matrix
            # runs on the same virtual clock, whatever the threads or load of the process running it.
            "fleet": {**self.fleet, "t_ref": reference_step_times(self.model, self.dataset)},
            "rounds": rounds or self.rounds,
            "devices_per_round": 10,
            "train": {"batch_size": 32, "local_epochs": 1, "lr": self.lr},
            "strategies": strategies if strategies is not None else chosen_strategies(False),
            "eval": {"every": 1, "target_accuracy": 0.99, "test_samples": 2000},
        }


@dataclass(frozen=True)
class ConfigCell:
    """A cell made from a user's config (``--config``): everything but strategies, seed, rounds and t_ref."""

    name: str
    base: dict[str, Any]
    rounds: int

    def config(self, seed: int, rounds: int | None = None, strategies: list[Any] | None = None) -> dict[str, Any]:
        raw = json.loads(json.dumps(self.base))
        raw.update(seed=seed, rounds=rounds or self.rounds)
        raw["strategies"] = strategies if strategies is not None else chosen_strategies(False)
        raw["fleet"] = {**raw["fleet"], "t_ref": config_step_times(json.dumps(self.base, sort_keys=True))}
        return raw


@functools.cache
def config_step_times(base: str) -> dict[int, float]:
    """``t_ref(B)`` of a user config's model on its own data: calibrated once here with one torch thread
    (cached on disk)."""
    from amble.problem import load_data, make_model, model_key, sample_batch

    config = config_from_dict(json.loads(base), "the --config cell")
    if config.fleet.t_ref is not None:
        return dict(config.fleet.t_ref)
    dataset = load_data(config)
    model = make_model(config, dataset)
    key = model_key(config, model)
    # One torch thread: a small model's steps are too short to share, and on a loaded machine two threads
    # waiting for each other make the timings noisy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape, classes = dataset.input_shape, dataset.num_classes
        step_time = calibrate(lambda: make_model(config, dataset), key, shape, classes, inputs=sample_batch(dataset))
    finally:
        torch.set_num_threads(threads)
    return {int(b): t for b, t in step_time.to_json().items()}


AnyCell = Cell | ConfigCell

SHARDS = {"kind": "shards", "shards_per_device": 2}
FULL_MATRIX = [
    Cell(f"fmnist-{part_name}-{fleet_name}-{model}", "fashion-mnist", part, model, fleet, rounds)
    for model, rounds in (("lenet", 60), ("cnn", 40))
    for part_name, part in (
        ("iid", {"kind": "iid"}),
        ("shards2", SHARDS),
        ("dir0.1", {"kind": "dirichlet", "alpha": 0.1}),
        ("dir0.5", {"kind": "dirichlet", "alpha": 0.5}),
    )
    for fleet_name, fleet in (("tiers", TIERS), ("lognormal", LOGNORMAL))
] + [
    Cell(f"cifar10-{part_name}-{fleet_name}-cifar-cnn", "cifar10", part, "cifar-cnn", fleet, 40, lr=0.05)
    for part_name, part in (("iid", {"kind": "iid"}), ("dir0.5", {"kind": "dirichlet", "alpha": 0.5}))
    for fleet_name, fleet in (("tiers", TIERS), ("lognormal", LOGNORMAL))
]
REDUCED = {
    "fmnist-shards2-tiers-lenet": 30,
    "fmnist-dir0.1-tiers-lenet": 30,
    "fmnist-iid-lognormal-lenet": 20,
    "cifar10-dir0.5-tiers-cifar-cnn": 15,
}


# -- running ---------------------------------------------------------------------------------------


@functools.cache
def reference_step_times(model: str, dataset: str) -> dict[int, float]:
    """``t_ref(B)`` of the model, calibrated once on this machine by the main process (cached on disk)."""
    shape, classes = SHAPES[dataset]
    step_time = calibrate(lambda: build_model(model, shape, classes), model, shape, classes)
    return {int(b): t for b, t in step_time.to_json().items()}


def code_version() -> str:
    """The tree of src/ plus a digest of its uncommitted changes: a finished run is reused only by the same code."""
    head = subprocess.run(["git", "rev-parse", "HEAD:src"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], capture_output=True, cwd=ROOT).stdout
    return f"{head}+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else head


def reusable(out: Path, config: ExperimentConfig, version: str | None) -> bool:
    """A finished run in ``out`` made from the same config by code ``version`` (None: by any code)."""
    summary_path, stamp = out / "summary.json", out / "code_version.txt"
    if not (summary_path.is_file() and stamp.is_file()) or version not in (None, stamp.read_text()):
        return False
    stored = json.loads(summary_path.read_text()).get("config")
    return bool(without_unset(stored) == without_unset(config_to_dict(config)))


def without_unset(value: Any) -> Any:
    """``value`` without the keys whose value is None (unset), at any depth: a config written before a key
    existed reads the same as one that has it unset."""
    if isinstance(value, dict):
        return {k: without_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_unset(v) for v in value]
    return value


def run_in_process(config: ExperimentConfig, out: Path, threads: int, version: str) -> None:
    """``amble run`` of the config in a process of its own with ``threads`` torch threads; its output
    goes to ``out/run.log``. The config crosses as a JSON file, the results come back as files, stamped
    with ``version``: the code as it was when the run started."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "bench_config.json"
    config_path.write_text(json.dumps(config_to_dict(config), indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "amble", "run", str(config_path), "--out", str(out), "--no-progress"]
    with (out / "run.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    if done.returncode not in (0, STALLED_EXIT_STATUS):  # a stalled strategy is a result: its files are written
        raise RuntimeError(f"{out}: amble run exited with {done.returncode}; see {out / 'run.log'}")
    (out / "code_version.txt").write_text(version)


def run_all(runs: list[tuple[str, ExperimentConfig, Path]], parallel: int, any_code: bool = False) -> None:
    """Each (label, config, out) as one ``amble run``, ``parallel`` at a time, each in its own process with
    ``cpus // parallel`` torch threads; a run finished by the same code with the same config is reused
    (with ``any_code``, by any code: each run's ``code_version.txt`` says which, and the results list them)."""
    threads = threads_per_run(parallel)
    version = code_version()
    # Seed by seed (a run cut short still has whole seeds), longest first within a seed, so that the last
    # runs to finish are short ones and no worker idles long at the end.
    pending = [
        (label, config, out) for label, config, out in runs if not reusable(out, config, None if any_code else version)
    ]
    pending.sort(key=lambda run: (run[1].seed, -expected_cost(run[1])))

    def one(label: str, config: ExperimentConfig, out: Path) -> None:
        began = time.perf_counter()
        run_in_process(config, out, threads, version)
        print(f"  {label}: {time.perf_counter() - began:,.0f} s wall", flush=True)

    print(f"{len(pending)} of {len(runs)} runs to do, {parallel} at a time, {threads} torch thread(s) each", flush=True)
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        for future in [pool.submit(one, *run) for run in pending]:
            future.result()
    except BaseException:  # a failed run or Ctrl-C: start no more runs
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def expected_cost(config: ExperimentConfig) -> float:
    """Rounds times the reference device's base step: proportional to a run's time, for ordering runs."""
    t_ref = config.fleet.t_ref or {1: 1.0}
    return config.rounds * StepTime.from_mapping(t_ref)(config.train.batch_size)


def threads_per_run(parallel: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // parallel)


def run_cells(
    jobs: list[tuple[AnyCell, int, int | None]],
    out_root: Path,
    parallel: int,
    strategies: list[Any],
    any_code: bool = False,
) -> dict[str, list[list[Path]]]:
    """One ``amble run`` per (cell, seed, strategy); the run directories by cell, one list per seed.

    A strategy's run does not depend on which others run beside it (same partition, fleet, selection
    and seed), so each is a run of its own: one can be added or rerun without the others."""
    by_cell: dict[str, list[list[Path]]] = {}
    runs = []
    for cell, seed, rounds in jobs:
        seed_dir = out_root / cell.name / f"seed{seed}-r{rounds or cell.rounds}"
        outs = [seed_dir / entry_label(entry) for entry in strategies]
        by_cell.setdefault(cell.name, []).append(outs)
        for entry, out in zip(strategies, outs, strict=True):
            raw = cell.config(seed, rounds, [entry])
            raw["rounds"] *= PUBLISHES_PER_ROUND.get(entry_label(entry), 1)
            config = config_from_dict(raw, source=f"benchmark cell {cell.name}")
            runs.append((f"{cell.name} seed {seed} {entry_label(entry)}", config, out))
    run_all(runs, parallel, any_code)
    return by_cell


def code_versions(by_cell: dict[str, list[list[Path]]]) -> dict[str, int]:
    """How many of the runs each code version made (from their ``code_version.txt``)."""
    versions: dict[str, int] = {}
    for seeds in by_cell.values():
        for outs in seeds:
            for out in outs:
                stamp = out / "code_version.txt"
                version = stamp.read_text() if stamp.is_file() else "unknown"
                versions[version] = versions.get(version, 0) + 1
    return versions


# -- analysis --------------------------------------------------------------------------------------


@dataclass
class StrategyStats:
    time_to_target_s: list[float | None] = field(default_factory=list)
    rounds_to_target: list[int | None] = field(default_factory=list)
    final_at_budget: list[float | None] = field(default_factory=list)
    best_at_budget: list[float | None] = field(default_factory=list)
    """None where the strategy had no evaluated round within the budget."""
    samples: list[int] = field(default_factory=list)
    invocations: list[int] = field(default_factory=list)
    cold_starts: list[int] = field(default_factory=list)
    ratio_to_amble: list[float | None] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)
    """The whole run in virtual seconds: a lower bound on the time to a target the strategy never reached."""
    idle_share: list[float | None] = field(default_factory=list)
    """Of the selected devices' time (compute + communication + idle), the share spent idle, waiting for
    the round to end (from devices.jsonl; None without it)."""


@dataclass
class CellResult:
    cell: str
    target: float
    budget_s: list[float]
    seeds: int
    strategies: dict[str, StrategyStats]
    curves: dict[str, list[list[tuple[float, float]]]]
    """Per strategy, each seed's (virtual time, accuracy) points: the plot shows their mean."""
    fraction: float = 0.95
    """The target is this fraction of FedAvg's best accuracy."""


def read_metrics(run: Path) -> dict[str, list[dict[str, Any]]]:
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_strategy.setdefault(row["strategy"], []).append(row)
    return by_strategy


def idle_shares(run: Path) -> dict[str, float]:
    """Per strategy, idle seconds over all seconds of the selected devices (devices.jsonl rows)."""
    path = run / "devices.jsonl"
    if not path.is_file():
        return {}
    totals: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        idle, busy = float(row.get("idle_s") or 0.0), float(row["compute_s"]) + float(row["comm_s"])
        total = totals.setdefault(row["strategy"], [0.0, 0.0])
        total[0] += idle
        total[1] += idle + busy
    return {name: idle / whole for name, (idle, whole) in totals.items() if whole > 0}


def read_seed(runs: Path | list[Path]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], dict[str, float]]:
    """One seed's metrics rows, summaries and idle shares by strategy, from one run or one per strategy."""
    metrics: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, Any] = {}
    idle: dict[str, float] = {}
    for run in [runs] if isinstance(runs, Path) else runs:
        metrics.update(read_metrics(run))
        summaries.update(json.loads((run / "summary.json").read_text())["strategies"])
        idle.update(idle_shares(run))
    return metrics, summaries, idle


def first_reach(rows: list[dict[str, Any]], target: float) -> tuple[float, int] | None:
    for row in rows:
        if row["accuracy"] is not None and row["accuracy"] >= target:
            return float(row["virtual_time_s"]), int(row["round"]) + 1
    return None


def analyse(cell: str, runs: list[Path] | list[list[Path]], fraction: float = 0.95) -> CellResult:
    """Per strategy and seed, the times to a target of ``fraction`` of FedAvg's best accuracy (the mean
    over seeds, rounded down to a hundredth); ``runs`` holds one run per seed, or one list of runs
    (one per strategy) per seed."""
    seeds = [read_seed(run) for run in runs]
    metrics = [m for m, _, _ in seeds]
    fedavg_best = statistics.mean(max(r["accuracy"] for r in m["fedavg"] if r["accuracy"] is not None) for m in metrics)
    target = math.floor(fraction * fedavg_best * 100 + 1e-9) / 100
    result = CellResult(cell, target, [], len(runs), {}, {}, fraction)
    for m, summary, idle in seeds:
        budget = min(rows[-1]["virtual_time_s"] for rows in m.values())
        result.budget_s.append(budget)
        amble = first_reach(m["amble"], target)
        for name, rows in m.items():
            stats = result.strategies.setdefault(name, StrategyStats())
            reach = first_reach(rows, target)
            stats.time_to_target_s.append(reach[0] if reach else None)
            stats.rounds_to_target.append(reach[1] if reach else None)
            within = [r["accuracy"] for r in rows if r["virtual_time_s"] <= budget and r["accuracy"] is not None]
            stats.final_at_budget.append(within[-1] if within else None)
            stats.best_at_budget.append(max(within) if within else None)
            stats.samples.append(summary[name]["samples_processed"])
            stats.invocations.append(summary[name]["function_invocations"])
            stats.cold_starts.append(summary[name]["cold_starts"])
            stats.ratio_to_amble.append(reach[0] / amble[0] if reach and amble else None)
            stats.run_s.append(float(rows[-1]["virtual_time_s"]))
            stats.idle_share.append(idle.get(name))
    for m in metrics:
        for name, rows in m.items():
            curve = [(r["virtual_time_s"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
            result.curves.setdefault(name, []).append(curve)
    return result


def mean_curve(per_seed: list[list[tuple[float, float]]], points: int = 200) -> tuple[list[float], list[float]]:
    """The mean over seeds of each seed's latest accuracy at each time, from the last seed's first
    evaluation to the first seed's end (where every seed has a value)."""
    start = max(curve[0][0] for curve in per_seed)
    end = min(curve[-1][0] for curve in per_seed)
    grid = [start + (end - start) * i / (points - 1) for i in range(points)] if end > start else [start]
    times = [[point[0] for point in curve] for curve in per_seed]
    means = []
    for t in grid:
        latest = [curve[bisect.bisect_right(ts, t) - 1][1] for curve, ts in zip(per_seed, times, strict=True)]
        means.append(statistics.mean(latest))
    return grid, means


# Fixed colours, so a strategy looks the same in every plot and panel.
COLOURS = {
    "fedavg": "#1f77b4",
    "amble": "#ff7f0e",
    "amble-profile": "#d62728",
    "amble-q1": "#ffbb78",
    "fedavgm": "#aec7e8",
    "fedadam": "#98df8a",
    "scaffold": "#c5b0d5",
    "fedbuff": "#c49c94",
    "amble-fedavgm": "#f7b6d2",
    "amble-scaffold": "#dbdb8d",
    "deadline": "#7f7f7f",
    "fedprox": "#2ca02c",
    "fednova": "#9467bd",
    "adabatch": "#8c564b",
    "amble-q0.8-nova": "#17becf",
    "amble-q0.8-warmup": "#bcbd22",
    "amble-q0.8-prox": "#e377c2",
    "amble-q0.8-e2": "#000000",
}


@dataclass
class AimCheck:
    """One AMBLE variant against FedAvg and the best baseline of each seed (SPEC's aim, issue 3)."""

    variant: str
    vs_fedavg: list[float] = field(default_factory=list)
    vs_best: list[float] = field(default_factory=list)
    """Per seed: the fastest baseline's time to target over the variant's. A baseline that never reached
    the target counts with its whole run, so where it is the fastest the ratio is a lower bound."""
    best: list[str] = field(default_factory=list)
    """Per seed: the fastest baseline that reached the target ("none" if none did)."""
    censored_fedavg: int = 0
    """Seeds where FedAvg never reached the target: its whole run is counted (the ratio is a lower bound)."""
    censored_best: int = 0
    missed: int = 0
    """Seeds where the variant itself never reached the target: left out of the ratios; the aim fails."""
    final: float = 0.0
    final_fedavg: float = 0.0
    final_best: float = 0.0

    def verdict(self, vs_fedavg: float = 2.0, vs_best: float = 1.3) -> str:
        """``yes``, ``no``, or ``undetermined`` when a ratio below its aim is only a lower bound."""
        if self.missed or not self.vs_fedavg or self.final < max(self.final_fedavg, self.final_best):
            return "no"
        short_fedavg = statistics.mean(self.vs_fedavg) < vs_fedavg
        short_best = statistics.mean(self.vs_best) < vs_best
        if (short_fedavg and not self.censored_fedavg) or (short_best and not self.censored_best):
            return "no"
        return "undetermined (lower bound)" if short_fedavg or short_best else "yes"


def aim_checks(result: CellResult) -> list[AimCheck]:
    """Per AMBLE variant, per seed: how many times sooner than FedAvg and than the fastest baseline
    of that seed it reaches the target, and its final accuracy at the budget against theirs."""
    baselines = {name: stats for name, stats in result.strategies.items() if not name.startswith("amble")}
    checks = []
    for variant, own in result.strategies.items():
        if not variant.startswith("amble"):
            continue
        check = AimCheck(variant)
        finals: tuple[list[float | None], list[float | None]] = ([], [])
        for seed, time_s in enumerate(own.time_to_target_s):
            reached = {name: s.time_to_target_s[seed] for name, s in baselines.items()}
            # Time to target, or the whole run (a lower bound) for a baseline that never got there.
            bound = {name: t if t is not None else baselines[name].run_s[seed] for name, t in reached.items()}
            fastest = min(bound, key=bound.__getitem__)
            got_there = [name for name, t in reached.items() if t is not None]
            best = min(got_there, key=bound.__getitem__) if got_there else None
            finals[0].append(baselines["fedavg"].final_at_budget[seed])
            if best is not None:
                finals[1].append(baselines[best].final_at_budget[seed])
            else:  # nobody reached the target: hold the variant to the most accurate baseline
                finals[1].append(max((s.final_at_budget[seed] or 0.0) for s in baselines.values()))
            if time_s is None:
                check.missed += 1
                continue
            check.best.append(best or "none")
            check.vs_fedavg.append(bound["fedavg"] / time_s)
            check.vs_best.append(bound[fastest] / time_s)
            check.censored_fedavg += reached["fedavg"] is None
            check.censored_best += reached[fastest] is None
        check.final = present_mean(own.final_at_budget)
        check.final_fedavg, check.final_best = present_mean(finals[0]), present_mean(finals[1])
        checks.append(check)
    return checks


def present_mean(values: Iterable[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else math.nan


def render_aims(results: list[CellResult]) -> str:
    level = "95% of FedAvg's best" if results and results[0].fraction < 1 else "FedAvg's best itself"
    lines = [
        f"### The aim at {level}: AMBLE at least 2x sooner than FedAvg and 1.3x sooner than the best baseline",
        "",
        "Per seed, the ratio is the fastest baseline's time to the target over the AMBLE variant's; mean ±",
        "sd over the seeds where the variant reached the target. `≥`: in some seed the strategy compared",
        'never reached the target, so its whole run is counted and the ratio is a lower bound. "Best',
        'baseline" names, per seed, the fastest baseline that did reach the target. Final accuracy is at',
        "the cell's budget, means over seeds. Met: both ratios at their aim, the target reached in every",
        "seed, and final accuracy at least FedAvg's and the best baseline's; `undetermined`: a ratio below",
        "its aim is only a lower bound.",
        "",
        "| cell | AMBLE variant | sooner than FedAvg | sooner than the best baseline | best baseline (seeds) "
        "| final acc: AMBLE / FedAvg / best baseline | aim met |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for c in aim_checks(result):
            missed = f" (missed the target in {c.missed} seed(s))" if c.missed else ""
            fedavg = ("≥ " if c.censored_fedavg else "") + mean_spread(c.vs_fedavg, 2) + missed
            best_ratio = ("≥ " if c.censored_best else "") + mean_spread(c.vs_best, 2) + missed
            best = ", ".join(f"{name} {c.best.count(name)}" for name in sorted(set(c.best))) or "-"
            lines.append(
                f"| {result.cell} | {c.variant} | {fedavg} | {best_ratio} | {best} "
                f"| {c.final:.3f} / {c.final_fedavg:.3f} / {c.final_best:.3f} | {c.verdict()} |"
            )
    return "\n".join(lines) + "\n"


def mean_spread(values: Iterable[float | int | None], digits: int = 3, unit: str = "") -> str:
    items = list(values)
    present = [float(v) for v in items if v is not None]
    missing = len(items) - len(present)
    if not present:
        return "not reached"
    text = f"{statistics.mean(present):.{digits}f}{unit}"
    if len(present) > 1:
        text += f" ± {statistics.stdev(present):.{digits}f}"
    if missing:
        text += f" ({missing} not reached)"
    return text


def render_cell(result: CellResult, plot: str, high_result: CellResult | None = None) -> str:
    seconds_digits = 0 if min(result.budget_s) >= 100 else 2  # a cell of short rounds (tabular) needs decimals
    high = f"; FedAvg's best {high_result.target:.2f}" if high_result else ""
    lines = [
        f"### {result.cell}",
        "",
        f"Target accuracy {result.target:.2f} (95% of FedAvg's best{high}); budget "
        f"{mean_spread(result.budget_s, seconds_digits, ' s')} "
        f"of virtual time (the shortest strategy's total); {result.seeds} seed(s), mean ± sd.",
        "",
        "| strategy | time to target (s) | ratio to amble | rounds to target | time to FedAvg's best (s) "
        "| final acc @budget | best acc @budget | idle share of device time | samples processed | invocations "
        "| cold starts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    high = {name: s.time_to_target_s for name, s in (high_result.strategies.items() if high_result else ())}
    for name, s in result.strategies.items():
        cells = [
            mean_spread(s.time_to_target_s, seconds_digits),
            mean_spread(s.ratio_to_amble, 2),
            mean_spread(s.rounds_to_target, 1),
            mean_spread(high.get(name, []), seconds_digits),
            mean_spread(s.final_at_budget),
            mean_spread(s.best_at_budget),
            mean_spread(s.idle_share, 2),
            mean_spread(s.samples, 0),
            mean_spread(s.invocations, 0),
            mean_spread(s.cold_starts, 0),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"![{result.cell}]({plot})", ""]
    return "\n".join(lines)


def plot_cell(result: CellResult, path: Path) -> None:
    """Accuracy against virtual time, mean over seeds: AMBLE against the baselines, and (when run)
    AMBLE against the variants tried as fixes, in a second panel with FedAvg for reference."""
    variants = [name for name in result.curves if name in VARIANTS]
    panels = [("AMBLE and the baselines", [name for name in result.curves if name not in VARIANTS])]
    if variants:
        panels.append(("AMBLE and the fixes tried", ["fedavg", "amble", *variants]))
    fig = Figure(figsize=(6.2 * len(panels), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            times, accuracy = mean_curve(result.curves[name])
            baseline = not name.startswith("amble")
            ax.plot(
                times,
                accuracy,
                label=name,
                color=COLOURS.get(name),
                linestyle="--" if baseline else "-",
                linewidth=1.2 if baseline else 2.0,
            )
        ax.axhline(result.target, color="grey", linestyle=":", linewidth=1, label=f"target {result.target:.2f}")
        ax.set_xlabel("virtual time (s)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel(f"test accuracy, mean of {result.seeds} seed(s)")
    fig.suptitle(result.cell, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# -- instance reuse --------------------------------------------------------------------------------

REUSE_VARIANTS = {
    "reuse, keep-alive 60 s": {"reuse": True, "keep_alive_s": 60},
    "reuse, keep-alive 1 s": {"reuse": True, "keep_alive_s": 1},
    "reuse, keep-alive 0 s": {"reuse": True, "keep_alive_s": 0},
    "no reuse": {"reuse": False, "keep_alive_s": 60},
}


def reuse_experiment(out_root: Path, rounds: int) -> str:
    """The thesis' "reusing serverless instance" experiment: same AMBLE run, pool settings varied.

    The functions' time is measured (``invocation_s: measured``), so these runs go one at a time."""
    cell = Cell("reuse", "fashion-mnist", SHARDS, "lenet", TIERS, rounds)
    lines = [
        "| pool | cold starts | warm starts | aggregation latency at round end (s) | busy function-s "
        "| virtual time (s) |",
        "|---|---|---|---|---|---|",
    ]
    runs = []
    for label, pool in REUSE_VARIANTS.items():
        raw = cell.config(0, rounds)
        raw["strategies"] = [{"name": "amble"}]
        raw["server"] = {**pool, "invocation_s": "measured", "cold_start_s": 0.25, "max_instances": 4}
        runs.append((label, config_from_dict(raw), out_root / "reuse" / label.replace(",", "").replace(" ", "-")))
    run_all(runs, parallel=1)
    for label, _, out in runs:
        s = json.loads((out / "summary.json").read_text())["strategies"]["amble"]
        lines.append(
            f"| {label} | {s['cold_starts']} | {s['warm_starts']} | {s['aggregation_latency_s']:.3f} "
            f"| {s['function_busy_s']:.3f} | {s['virtual_time_s']:.1f} |"
        )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def machine(jobs: int, calibration_threads: int | None = None) -> str:
    threads = threads_per_run(jobs)
    return (
        f"{cpu_name()}, {jobs} run(s) at a time with {threads} torch thread(s) each (step times calibrated with "
        f"{calibration_threads or torch.get_num_threads()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="one seed, the README's cells, fewer rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--cells", nargs="+", default=None, help="only cells whose name contains one of these")
    parser.add_argument("--reuse", action="store_true", help="also run the instance-reuse experiment")
    parser.add_argument("--variants", action="store_true", help="also the AMBLE variants tried as fixes (VARIANTS)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each in its own process with cpus/jobs torch threads"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every cell (default: the cell's own)")
    parser.add_argument("--strategies", nargs="+", default=None, help="only these strategy labels (see STRATEGIES)")
    parser.add_argument(
        "--reuse-any-code",
        action="store_true",
        help="reuse a finished run of the same config whatever code made it (the results list the code versions)",
    )
    parser.add_argument("--run-only", action="store_true", help="make the runs, write no results")
    parser.add_argument("--tag", default=None, help="results go to time_to_accuracy_TAG.md (default: by mode)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument(
        "--config", type=Path, default=None, help="benchmark this config of your own instead of the matrix's cells"
    )
    args = parser.parse_args(argv)

    default_seeds = [0] if args.reduced else [0, 1, 2]
    seeds = args.seeds or default_seeds
    # Results of another number of seeds than the mode's default go beside its files, not over them.
    suffix = ("_reduced" if args.reduced else "") + ("" if len(seeds) == len(default_seeds) else f"_{len(seeds)}seeds")
    if args.tag:
        suffix = f"_{args.tag}"
    cells: list[AnyCell] = [c for c in FULL_MATRIX if not args.reduced or c.name in REDUCED]
    if args.config is not None:
        user = load_config(args.config)
        cells = [ConfigCell(user.name, config_to_dict(user), user.rounds)]
        if not args.tag:
            suffix = f"_{user.name}" + ("" if len(seeds) == len(default_seeds) else f"_{len(seeds)}seeds")
    if args.cells:
        cells = [c for c in cells if any(part in c.name for part in args.cells)]
    if not cells:
        parser.error(
            f"no cell matches --cells {' '.join(args.cells)}; the cells: {', '.join(c.name for c in FULL_MATRIX)}"
        )
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    began = time.perf_counter()
    jobs = [
        (cell, seed, args.rounds or (REDUCED.get(cell.name) if args.reduced else None))
        for cell in cells
        for seed in seeds
    ]
    strategies = chosen_strategies(args.variants, args.strategies)
    if args.strategies and len(strategies) != len(args.strategies):
        known = ", ".join(entry_label(s) for s in STRATEGIES)
        parser.error(f"--strategies: unknown label(s) among {' '.join(args.strategies)}; the labels: {known}")
    runs = run_cells(jobs, args.out.resolve(), args.jobs, strategies, args.reuse_any_code)
    if args.run_only:
        return 0
    calibration_threads = 1 if args.config is not None else None  # config_step_times calibrates with one
    sections, results, highs = [], [], []
    for cell in cells:
        results.append(analyse(cell.name, runs[cell.name]))
        highs.append(analyse(cell.name, runs[cell.name], fraction=1.0))
        plot = f"{cell.name}{suffix}.png"
        plot_cell(results[-1], RESULTS / plot)
        sections.append(render_cell(results[-1], plot, highs[-1]))
        print(sections[-1], flush=True)
    sections.append(render_aims(results))
    sections.append(render_aims(highs))
    print(sections[-2] + sections[-1], flush=True)
    versions = code_versions(runs)
    reuse = reuse_experiment(args.out.resolve(), 20) if args.reuse else ""
    command = "python benchmarks/time_to_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine(args.jobs, calibration_threads)}, {commit()}.",
        f"Command: `{command.strip()}` ({time.perf_counter() - began:,.0f} s wall, including reused runs).",
        "Runs by code version (`git rev-parse HEAD:src`, + a digest of uncommitted changes): "
        + ", ".join(f"{version} ({count})" for version, count in versions.items())
        + ".",
        "",
    ]
    body = "\n".join(header + sections)
    if reuse:
        body += "\n### Instance reuse (AMBLE, fmnist-shards2-tiers-lenet, 20 rounds, seed 0)\n\n" + reuse + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"time_to_accuracy{suffix}.md"
    (RESULTS / name).write_text(body)
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
