"""Batched training of many devices (``train.vectorize``) against one device at a time, side by side.

Both through ``amble.sim.training.LocalDevices`` (one torch thread, as the simulator trains): the
per-device ``LocalTrainer`` loop, and the vectorised trainer (devices grouped by batch and lr, step
counts free). Two workloads of ``--devices`` devices with 256 synthetic samples each:

- ``fedavg``: every device the same plan (batch 32, 8 steps, lr 0.05): FedAvg's work;
- ``amble``: each device its own plan, as AMBLE's planner gives them: batch 32, 48 or 64 (lr scaled by
  the square root of the batch ratio), 2 to 12 steps, drawn from a seeded RNG.

Each workload's two trainers alternate ``--reps`` times in one process (so a loaded machine slows
both alike); the figure is the fastest repetition and the median, with vectorised / per-device.

    python benchmarks/batched_training.py --model mlp-small --devices 100
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import write_record

from amble.client import LocalTrainer
from amble.data import make_synthetic
from amble.models import build_model
from amble.sim.training import LocalDevices, TrainJob
from amble.sim.vectorized import VectorizedTrainer
from amble.strategies import Plan

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 256


def workloads(devices: int) -> dict[str, list[TrainJob]]:
    rng = random.Random(0)
    amble = []
    for k in range(devices):
        batch = rng.choice([32, 48, 64])
        amble.append(TrainJob(k, Plan(batch, rng.randint(2, 12), 0.05 * (batch / 32) ** 0.5), 1000 + k))
    return {"fedavg": [TrainJob(k, Plan(32, 8, 0.05), 1000 + k) for k in range(devices)], "amble": amble}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp-small")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batched_training.json")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    data = make_synthetic(num_train=SAMPLES * args.devices, num_test=10, seed=1)
    shards = [
        (data.x_train[k * SAMPLES : (k + 1) * SAMPLES], data.y_train[k * SAMPLES : (k + 1) * SAMPLES])
        for k in range(args.devices)
    ]
    torch.manual_seed(0)
    model = build_model(args.model, data.input_shape, data.num_classes)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainers = {
        "per-device": LocalDevices(LocalTrainer(model), shards),
        "vectorised": LocalDevices(LocalTrainer(model), shards, VectorizedTrainer(model)),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for trainer in trainers.values():
        trainer.train(start, workloads(4)["amble"])  # warm-up
    for _ in range(args.reps):
        for workload, jobs in workloads(args.devices).items():
            for name, trainer in trainers.items():
                tic = time.perf_counter()
                trainer.train(start, jobs)
                times.setdefault((workload, name), []).append(time.perf_counter() - tic)
    results = {}
    for workload in ("fedavg", "amble"):
        fastest = {name: min(times[workload, name]) for name in trainers}
        median = {name: statistics.median(times[workload, name]) for name in trainers}
        ratio_min, ratio_median = (t["vectorised"] / t["per-device"] for t in (fastest, median))
        results[workload] = {"min_s": fastest, "median_s": median, "ratio_min": ratio_min, "ratio_median": ratio_median}
        print(
            f"{args.model} {args.devices} devices {workload}: per-device {fastest['per-device']:.3f} s, vectorised "
            f"{fastest['vectorised']:.3f} s (fastest of {args.reps}); vectorised/per-device {ratio_min:.2f} fastest, "
            f"{ratio_median:.2f} median",
            flush=True,
        )
    command = "python benchmarks/batched_training.py " + " ".join(argv)
    write_record(args.out, "batched_training", command, began, model=args.model, devices=args.devices, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
