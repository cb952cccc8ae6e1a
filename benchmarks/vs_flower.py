"""Simulator overhead against Flower: one FedAvg workload in AMBLE, Flower's simulation and a plain loop.

The workload is the tiny one where a simulator's own cost shows: AMBLE's ``mlp-small`` (784-64-10,
50,890 parameters), 256 synthetic samples per client (AMBLE's ``synthetic`` data, IID partition),
batch 32, one local epoch (8 SGD steps, lr 0.05, no momentum), FedAvg over every client of the fleet
each round, 20 rounds, at 10 and at 100 clients. The three contenders train the identical thing:

- **amble**: AMBLE's simulator (``Experiment`` of ``amble.sim.driver``, memory store, ``fleet.t_ref``
  set so nothing is calibrated), every update through its parameter server;
- **amble-vmap**: the same with ``train.vectorize``: each round's devices (one plan: FedAvg) train as
  one ``torch.func.vmap`` computation over stacked parameters;
- **flower**: Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend) with a
  ServerApp running FedAvg and a ClientApp per SuperNode, in its own venv (``.venv-flower``, created
  on first use);
- **plain**: a sequential PyTorch loop: for each client load the global weights into one model,
  train, add to a weighted average.

Flower and the plain loop run ``flower_app.train_local`` on a workload file written from AMBLE's own
``Experiment`` (its partition, initial model and per-(round, client) batch-order seeds), so all three
draw the same batches: their final models agree to float rounding, which is checked.

Every run is a fresh process (so start-up and peak memory are per run); the three alternate, their
order rotating each repetition. Per run it records: wall time per round (from the framework's own
loop: round begun -> new global model), start-up (process spawned -> first round begun), peak memory
of the whole process tree (Ray's processes included; RSS and PSS summed over the tree, sampled from
/proc every 0.1 s), the final model's accuracy on the held-out set, and the samples and local steps
trained per round, which must be equal for the three.

    python benchmarks/vs_flower.py                                        # 10 and 100 clients, 3 reps
    python benchmarks/vs_flower.py --reps 1 --rounds 3 --clients 10 \\
        --out benchmarks/results/vs_flower_smoke.json                     # smoke test, ~1 min

Results: printed, and written as JSON to ``--out`` (default ``benchmarks/results/vs_flower.json``).
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from flower_app import RESULT_MARKER, RoundLog, Workload, accuracy, print_result
from processes import run_measured
from provenance import provenance

from amble.client import derive_seed
from amble.config import ExperimentConfig, config_from_dict
from amble.report import RunWriter
from amble.server.tensors import decode
from amble.sim.driver import Experiment
from amble.strategies.base import BaseWork

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FLOWER_VENV = ROOT / ".venv-flower"
# torch pinned to the CPU build on disk: a bare "torch" pulls a multi-GB CUDA build.
FLOWER_REQUIREMENTS = ["flwr[simulation]==1.42.0", "torch==2.13.0", "safetensors"]
FRAMEWORKS = ("amble", "amble-vmap", "flower", "plain")
"""``amble-vmap`` is AMBLE with ``train.vectorize``: the round's devices trained as one vmap computation."""
SAMPLES_PER_CLIENT = 256
TEST_SAMPLES = 2000
BATCH_SIZE = 32
LOCAL_EPOCHS = 1
LR = 0.05
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}  # no network calls from the runs


def experiment_config(clients: int, rounds: int, seed: int, vectorize: bool = False) -> ExperimentConfig:
    """FedAvg over all ``clients`` devices every round; one evaluation, after the last round."""
    raw = {
        "name": f"vs-flower-{clients}",
        "seed": seed,
        "data": {
            "dataset": "synthetic",
            "synthetic_size": [SAMPLES_PER_CLIENT * clients, TEST_SAMPLES],
            "partition": {"kind": "iid"},
            "num_devices": clients,
        },
        "model": "mlp-small",
        "fleet": {"t_ref": {BATCH_SIZE: 0.001}},  # virtual step time given: no calibration run
        "rounds": rounds,
        "devices_per_round": clients,
        "train": {"batch_size": BATCH_SIZE, "local_epochs": LOCAL_EPOCHS, "lr": LR, "vectorize": vectorize},
        "strategies": ["fedavg"],
        "server": {"store": "memory"},
        "eval": {"every": rounds},
    }
    return config_from_dict(raw, source="the vs_flower benchmark")


def write_workload(config: ExperimentConfig, path: Path) -> Workload:
    """What Flower and the plain loop train on, taken from the ``Experiment`` AMBLE itself builds."""
    experiment = Experiment(config)
    base = BaseWork(config.train.batch_size, config.train.local_epochs, config.train.lr)
    steps = {base.steps_for(len(y)) for _, y in experiment.device_data}
    if len(steps) != 1:
        raise RuntimeError(f"clients would train different step counts {steps}: the partition is not even")
    seeds = torch.tensor(
        [[derive_seed(config.seed, r, k) for k in range(config.data.num_devices)] for r in range(config.rounds)]
    )
    workload = Workload(
        clients=experiment.device_data,
        x_test=experiment.test[0],
        y_test=experiment.test[1],
        initial=experiment.initial,
        seeds=seeds,
        lr=config.train.lr,
        batch_size=config.train.batch_size,
        local_steps=steps.pop(),
    )
    workload.save(path)
    return workload


# -- one run of one framework (a child process) ----------------------------------------------------


class TimedExperiment(Experiment):
    """AMBLE's simulator, stamping each round's begin and end and counting the work it trained."""

    log: RoundLog

    def _play_round(self, *args: Any, **kwargs: Any) -> Any:
        began = time.time()
        record = super()._play_round(*args, **kwargs)
        self.log.end.append(time.time())
        self.log.begin.append(began)
        self.log.samples.append(record.samples)
        self.log.steps.append(sum(row["local_steps"] for row in record.devices if row["status"] != "dropped"))
        return record


def run_amble(clients: int, rounds: int, seed: int, run_dir: Path, vectorize: bool) -> None:
    config = experiment_config(clients, rounds, seed, vectorize)
    experiment = TimedExperiment(config)
    experiment.log = RoundLog()
    with RunWriter(run_dir) as writer:
        summary = experiment.run(writer, progress=False)["fedavg"]
    print_result(
        "amble-vmap" if vectorize else "amble",
        experiment.log,
        run_dir / "model_fedavg.safetensors",
        reported_accuracy=summary["final_accuracy"],
        reported_wall_time_s=summary["wall_time_s"],
        reported_train_compute_s=summary["train_compute_s"],
    )


@dataclass
class Run:
    """One framework's run as measured: its own record plus what the parent saw from outside."""

    framework: str
    clients: int
    rep: int
    record: dict[str, Any]
    spawned_at: float
    wall_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    most_processes: int
    leftover_processes: int
    accuracy: float = float("nan")
    max_param_diff_vs_plain: float | None = None

    @property
    def round_s(self) -> list[float]:
        return [end - begin for begin, end in zip(self.record["round_begin"], self.record["round_end"], strict=True)]

    @property
    def steady_round_s(self) -> list[float]:
        """Every round but the first (Flower's first waits for Ray to start its actors)."""
        return self.round_s[1:] or self.round_s

    @property
    def training_threads(self) -> list[int]:
        """Torch threads where the clients trained (Flower: in its actors, not its driver)."""
        threads: list[int] = self.record.get("client_torch_threads", [self.record["torch_threads"]])
        return threads

    @property
    def startup_s(self) -> float:
        return float(self.record["round_begin"][0] - self.spawned_at)

    @property
    def first_model_s(self) -> float:
        return float(self.record["round_end"][0] - self.spawned_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "clients": self.clients,
            "rep": self.rep,
            "round_s": self.round_s,
            "startup_s": self.startup_s,
            "first_model_s": self.first_model_s,
            "process_wall_s": self.wall_s,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_pss_mb": self.peak_pss_mb,
            "self_peak_rss_mb": self.record["self_peak_rss_mb"],
            "most_processes": self.most_processes,
            "leftover_processes": self.leftover_processes,
            "accuracy": self.accuracy,
            "max_param_diff_vs_plain": self.max_param_diff_vs_plain,
            "samples_per_round": self.record["samples_per_round"],
            "steps_per_round": self.record["steps_per_round"],
            "training_threads": self.training_threads,
            "record": {k: v for k, v in self.record.items() if k not in ("round_begin", "round_end")},
        }


def measure(framework: str, clients: int, rep: int, command: list[str], log_path: Path, threads: int) -> Run:
    """Spawn ``command``, sample its process tree until it exits, read its result line.

    AMBLE and the plain loop train with ``threads`` torch threads (0: torch's default, one per core);
    Flower's actors get Ray's default, as many as the CPUs they hold.
    """
    env = {**os.environ, **QUIET}
    if threads and framework != "flower":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    done = run_measured(command, log_path, env, ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        raise SystemExit(f"the {framework} run printed no result line; see {log_path}")
    return Run(
        framework,
        clients,
        rep,
        json.loads(lines[-1][len(RESULT_MARKER) :]),
        done.spawned_at,
        done.wall_s,
        done.peak_rss_mb,
        done.peak_pss_mb,
        done.most_processes,
        done.leftovers,
    )


# -- the Flower venv -------------------------------------------------------------------------------


def flower_python(venv: Path) -> Path:
    """The Flower venv's interpreter, after creating the venv and installing flwr into it if needed."""
    python = venv / "bin" / "python"
    if flower_versions(python) is None:
        print(f"installing {' '.join(FLOWER_REQUIREMENTS)} into {venv} (a few minutes, once) ...", flush=True)
        steps = [[sys.executable, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", *FLOWER_REQUIREMENTS]]
        for step in steps if not python.exists() else steps[1:]:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
                raise SystemExit(
                    f"could not install Flower: `{' '.join(step)}` failed (exit {done.returncode}):\n{tail}\n"
                    f"Fix the cause (network to PyPI, disk space) and run again, or remove {venv} to start over."
                )
        if flower_versions(python) is None:
            raise SystemExit(
                f"installed {FLOWER_REQUIREMENTS} into {venv}, but `import flwr, ray, safetensors, torch` still fails"
            )
    return python


def flower_versions(python: Path) -> dict[str, str] | None:
    """flwr, ray and torch versions in the venv of ``python``; None unless flwr is the pinned one."""
    if not python.exists():
        return None
    probe = (
        "import json, flwr, ray, safetensors, torch; "
        "print(json.dumps({m.__name__: m.__version__ for m in (flwr, ray, torch)}))"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env={**os.environ, **QUIET})
    if done.returncode != 0:
        return None
    versions: dict[str, str] = json.loads(done.stdout)
    pinned = FLOWER_REQUIREMENTS[0].split("==")[1]
    return versions if versions["flwr"] == pinned else None


# -- the benchmark ---------------------------------------------------------------------------------


@dataclass
class Setting:
    clients: int
    runs: list[Run] = field(default_factory=list)

    def of(self, framework: str) -> list[Run]:
        return [run for run in self.runs if run.framework == framework]


def commands(framework: str, clients: int, args: argparse.Namespace, work: Path, tag: str) -> list[str]:
    """The child process of one run: this file with ``--one amble``; flower_app.py for the plain loop
    (in this venv) and for Flower (in the Flower venv)."""
    here = Path(__file__).resolve()
    rounds = ["--rounds", str(args.rounds)]
    workload = str(work / f"workload-{clients}.safetensors")
    model_out = str(work / f"{framework}-{tag}.safetensors")
    if framework in ("amble", "amble-vmap"):
        amble = ["--clients", str(clients), "--seed", str(args.seed), "--run-dir", str(work / f"{framework}-{tag}")]
        return [sys.executable, str(here), "--one", framework, *rounds, *amble]
    app, files = str(here.with_name("flower_app.py")), ["--workload", workload, "--model-out", model_out]
    if framework == "plain":  # AMBLE's venv, without importing amble
        return [sys.executable, app, "--plain", *rounds, *files]
    return [str(args.flower_python), app, *rounds, "--client-cpus", str(args.client_cpus), *files]


def load_params(path: Path) -> dict[str, torch.Tensor]:
    return decode(path.read_bytes())


def score(setting: Setting, workload: Workload) -> None:
    """Each final model's accuracy on the held-out set (one function for all), and its distance to the
    plain loop's final model of the same repetition (float rounding apart, they train the same)."""
    finals = {(run.framework, run.rep): load_params(Path(run.record["model_path"])) for run in setting.runs}
    for run in setting.runs:
        params = finals[run.framework, run.rep]
        run.accuracy = accuracy(params, workload.x_test, workload.y_test)
        plain = finals.get(("plain", run.rep))
        if plain is not None:
            run.max_param_diff_vs_plain = max(float((params[k] - plain[k]).abs().max()) for k in plain)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(setting: Setting, expected_samples: int, expected_steps: int) -> dict[str, Any]:
    frameworks: dict[str, Any] = {}
    problems = []
    for name in FRAMEWORKS:
        runs = setting.of(name)
        if not runs:
            continue
        steady = [s for run in runs for s in run.steady_round_s]
        for run in runs:
            per_round = (set(run.record["samples_per_round"]), set(run.record["steps_per_round"]))
            if per_round != ({expected_samples}, {expected_steps}):
                problems.append(
                    f"{name} rep {run.rep}: samples {run.record['samples_per_round']}, "
                    f"steps {run.record['steps_per_round']} per round"
                )
        frameworks[name] = {
            "round_s": spread(steady),
            "first_round_s": spread([run.round_s[0] for run in runs]),
            "startup_s": spread([run.startup_s for run in runs]),
            "first_model_s": spread([run.first_model_s for run in runs]),
            "peak_rss_mb": spread([run.peak_rss_mb for run in runs]),
            "peak_pss_mb": spread([run.peak_pss_mb for run in runs]),
            "accuracy": [run.accuracy for run in runs],
            "max_param_diff_vs_plain": [run.max_param_diff_vs_plain for run in runs],
            "samples_per_run": [sum(run.record["samples_per_round"]) for run in runs],
            "steps_per_run": [sum(run.record["steps_per_round"]) for run in runs],
            "training_threads": sorted({n for run in runs for n in run.training_threads}),
            "processes": max(run.most_processes for run in runs),
        }
    median = {name: stats["round_s"]["median"] for name, stats in frameworks.items()}
    ratios = {}
    if "flower" in median and "amble" in median:
        ratios["flower/amble"] = median["flower"] / median["amble"]
    if "amble" in median and "plain" in median:
        ratios["amble/plain"] = median["amble"] / median["plain"]
    if "amble-vmap" in median and "plain" in median:
        ratios["amble-vmap/plain"] = median["amble-vmap"] / median["plain"]
    if "flower" in median and "amble-vmap" in median:
        ratios["flower/amble-vmap"] = median["flower"] / median["amble-vmap"]
    return {
        "clients": setting.clients,
        "expected_per_round": {"samples": expected_samples, "local_steps": expected_steps},
        "equal_work": not problems,
        "work_mismatches": problems,
        "frameworks": frameworks,
        "ratios_round_s_median": ratios,
        "runs": [run.to_json() for run in setting.runs],
    }


def render(summary: dict[str, Any]) -> str:
    def cell(stats: dict[str, float], digits: int = 3) -> str:
        return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"

    lines = [
        f"## {summary['clients']} clients per round (every device trains every round)",
        "",
        "| framework | s/round | first round s | start-up s | first model s | peak RSS MB | peak PSS MB "
        "| accuracy | samples/run | steps/run | training threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, stats in summary["frameworks"].items():
        cells = [
            name,
            cell(stats["round_s"], 4),
            cell(stats["first_round_s"]),
            cell(stats["startup_s"], 2),
            cell(stats["first_model_s"], 2),
            cell(stats["peak_rss_mb"], 0),
            cell(stats["peak_pss_mb"], 0),
            " ".join(f"{a:.4f}" for a in stats["accuracy"]),
            " ".join(str(n) for n in sorted(set(stats["samples_per_run"]))),
            " ".join(str(n) for n in sorted(set(stats["steps_per_run"]))),
            " ".join(str(n) for n in stats["training_threads"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ratios = ", ".join(f"{k} = {v:.2f}" for k, v in summary["ratios_round_s_median"].items())
    diffs = [d for stats in summary["frameworks"].values() for d in stats["max_param_diff_vs_plain"] if d is not None]
    work = "equal" if summary["equal_work"] else "NOT EQUAL: " + "; ".join(summary["work_mismatches"])
    lines += [
        "",
        f"Median s/round ratios: {ratios}. Work per round {work} "
        f"({summary['expected_per_round']['samples']} samples, {summary['expected_per_round']['local_steps']} steps); "
        f"final models within {max(diffs, default=0.0):.1e} of the plain loop's (max |difference|).",
    ]
    return "\n".join(lines)


NOTES = [
    "s/round: median (min–max) over every repetition's rounds but the first, each round timed by the "
    "framework's own loop from its begin to the new global model: AMBLE's Experiment._play_round (plan, "
    "train, upload, aggregate, publish), Flower's strategy from configure_train entered to aggregate_train "
    "returned, the plain loop's iteration.",
    "first round s: the first round alone (Flower's includes Ray starting its actor processes).",
    "start-up s: process spawned -> first round begun (AMBLE: imports, data, fleet, model, server; Flower: "
    "imports, workload file, Flower and Ray initialised, SuperNodes registered; plain: imports, workload file). "
    "first model s: process spawned -> first round's global model.",
    "peak RSS / PSS: the largest sum over the process tree (Ray's GCS, raylet and workers included), sampled "
    "every 0.1 s; RSS counts shared pages once per process, PSS splits them.",
    "accuracy: the final model on the 2000 held-out samples, computed by one function for all three.",
]


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> int:
    began = time.perf_counter()
    frameworks = args.frameworks
    flower = {}
    if "flower" in frameworks:
        args.flower_python = flower_python(args.flower_venv)
        flower = flower_versions(args.flower_python) or {}
    summaries = []
    exit_code = 0
    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        work = Path(tmp)
        for clients in args.clients:
            config = experiment_config(clients, args.rounds, args.seed)
            workload = write_workload(config, work / f"workload-{clients}.safetensors")
            setting = Setting(clients)
            for rep in range(args.reps):
                order = [frameworks[(rep + i) % len(frameworks)] for i in range(len(frameworks))]
                for name in order:
                    tag = f"{clients}-{rep}"
                    command = commands(name, clients, args, work, tag)
                    run = measure(name, clients, rep, command, work / f"{name}-{tag}.log", args.threads)
                    setting.runs.append(run)
                    print(
                        f"  {clients} clients, rep {rep}, {name}: {statistics.median(run.steady_round_s):.4f} s/round, "
                        f"start-up {run.startup_s:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB",
                        flush=True,
                    )
            score(setting, workload)
            expected_samples = clients * workload.local_steps * workload.batch_size
            summary = summarise(setting, expected_samples, clients * workload.local_steps)
            exit_code = exit_code or (0 if summary["equal_work"] else 1)
            summaries.append(summary)
            print(render(summary), flush=True)
    command = "python benchmarks/vs_flower.py " + " ".join(argv)
    result = {
        "benchmark": "vs_flower",
        "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "provenance": provenance(
            command, torch=torch.__version__, flower_venv=flower, wall_s=time.perf_counter() - began
        ),
        "workload": {
            "model": "mlp-small (784-64-10)",
            "dataset": "synthetic, IID",
            "samples_per_client": SAMPLES_PER_CLIENT,
            "test_samples": TEST_SAMPLES,
            "batch_size": BATCH_SIZE,
            "local_epochs": LOCAL_EPOCHS,
            "lr": LR,
            "strategy": "FedAvg, every client every round",
            "rounds": args.rounds,
            "reps": args.reps,
            "seed": args.seed,
            "torch_threads_amble_and_plain": args.threads or "torch's default",
        },
        "flower": {
            "api": "flwr.simulation.run_simulation, ServerApp + ClientApp (Message API), "
            "flwr.serverapp.strategy.FedAvg, Ray backend",
            "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
            "ray_num_cpus": os.cpu_count(),
            "concurrent_clients": int((os.cpu_count() or 1) // args.client_cpus),
        },
        "notes": NOTES,
        "settings": summaries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(f"- {note}" for note in NOTES))
    print(f"wrote {args.out}")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100], help="clients per round (= fleet)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3, help="runs of each framework per setting, alternated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per Flower ClientApp actor")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the AMBLE and plain runs (0: torch's default)"
    )
    parser.add_argument("--flower-venv", type=Path, default=FLOWER_VENV, help="created on first use")
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_flower.json")
    # One run of one framework, in the child process the benchmark spawns:
    # One AMBLE run, in the child process the benchmark spawns:
    parser.add_argument("--one", choices=("amble", "amble-vmap"), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        run_amble(args.clients[0], args.rounds, args.seed, args.run_dir, vectorize=args.one == "amble-vmap")
        return 0
    return run_benchmark(args, argv)


if __name__ == "__main__":
    sys.exit(main())
