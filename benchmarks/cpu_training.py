"""Per-step training time of the convolutional models under PyTorch CPU configurations, side by side.

One SGD step (forward, cross-entropy, backward, ``torch.optim.SGD`` step) of LeNet-5 on (1, 28, 28)
and the CIFAR CNN on (3, 32, 32), random data, at batch 32 and 64, under each configuration:

- ``channels_last``: eager mode, weights and activations channels-last (the models' default, what
  AMBLE's local training runs);
- ``nchw``: eager mode, weights and activations in the contiguous NCHW format;
- ``no-onednn``: channels-last with ``torch.backends.mkldnn`` disabled (ATen's own kernels);
- ``compile``: ``torch.compile`` (inductor, CPU) of the whole step; its compile time is reported apart.

All run on ``--threads`` torch threads (default 1, as the simulator trains). Thread counts are compared
by separate invocations, not within one: a block on two threads was measured to slow the one-thread
block after it (by 1.1-2.4x), which would charge one configuration for another's threads.

The configurations alternate block by block (``--blocks`` blocks of ``--steps`` steps each, the
process-wide settings made before each block and one untimed step after), so a loaded machine slows
all alike; the figure is the median over blocks of the per-step mean.

    python benchmarks/cpu_training.py --out benchmarks/results/cpu_training.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from provenance import write_record

from amble.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"lenet": (1, 28, 28), "cifar-cnn": (3, 32, 32)}
CONFIGS = ("channels_last", "nchw", "no-onednn", "compile")

Step = Callable[[], None]


def make_step(name: str, batch: int, config: str) -> tuple[Step, float]:
    """One training step of model ``name`` under ``config``; the seconds its first call took."""
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 10)
    x, y = torch.randn(batch, *SHAPES[name]), torch.randint(0, 10, (batch,))
    if config == "nchw":
        model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        model.nhwc = lambda batch: batch  # the models' own input conversion, bypassed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    run: Step = torch.compile(step) if config == "compile" else step
    tic = time.perf_counter()
    configure(config)
    run()
    return run, time.perf_counter() - tic


def configure(config: str) -> None:
    """Set the process-wide part of ``config`` (oneDNN on or off), once per block of steps: setting the
    oneDNN flag around every step was measured to slow the steps themselves."""
    torch.backends.mkldnn.enabled = config != "no-onednn"


def measure(name: str, batch: int, configs: list[str], blocks: int, steps: int) -> dict[str, Any]:
    made = {config: make_step(name, batch, config) for config in configs}
    per_step: dict[str, list[float]] = {config: [] for config in configs}
    for block in range(blocks):
        for config in configs[block % len(configs) :] + configs[: block % len(configs)]:
            step = made[config][0]
            configure(config)
            step()  # not timed: the first step after a switch
            tic = time.perf_counter()
            for _ in range(steps):
                step()
            per_step[config].append((time.perf_counter() - tic) / steps)
    base = statistics.median(per_step[configs[0]])
    return {
        config: {
            "step_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "vs_first": statistics.median(times) / base,
            "first_call_s": made[config][1],
        }
        for config, times in per_step.items()
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every configuration")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_training.json")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        for batch in args.batches:
            found = measure(name, batch, args.configs, args.blocks, args.steps)
            results[f"{name}/{batch}"] = found
            for config, stats in found.items():
                print(
                    f"{name:<10} batch {batch:<4} {config:<14} {stats['step_ms']:8.2f} ms/step "
                    f"({stats['vs_first']:.2f}x {args.configs[0]}; first call {stats['first_call_s']:.1f} s)",
                    flush=True,
                )
    command = "python benchmarks/cpu_training.py " + " ".join(argv)
    write_record(args.out, "cpu_training", command, began, threads=args.threads, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
