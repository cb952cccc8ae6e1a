"""The vs_flower benchmark's workload outside AMBLE: plain-PyTorch FedAvg pieces and the Flower apps.

Two programs use this module, neither with both AMBLE and Flower installed:

- ``vs_flower.py`` (in AMBLE's venv, no flwr) writes the workload file, and runs this file with
  ``--plain`` for the plain loop (so that run imports neither amble nor flwr);
- Flower's simulation runs this file in ``.venv-flower`` (flwr and torch, no amble): a ServerApp with
  FedAvg and a ClientApp whose ``train`` runs the same :func:`train_local` as the plain loop.

Only the Flower functions import flwr, so the module imports without it. Each program prints one
``RESULT_MARKER`` line of JSON: the wall-clock stamps of every round's begin and end (``time.time()``,
so the parent can subtract its own spawn time), the samples and steps trained per round, and the
file holding the final model.

    .venv-flower/bin/python benchmarks/flower_app.py --workload W.safetensors --rounds 20 --model-out final.safetensors
    .venv/bin/python benchmarks/flower_app.py --plain --workload W.safetensors --rounds 20 --model-out final.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from flwr.app import Context, Message

RESULT_MARKER = "vs_flower result: "
Params = dict[str, torch.Tensor]


# -- the workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Everything the three frameworks share, written once by ``vs_flower.py`` from AMBLE's own data."""

    clients: list[tuple[torch.Tensor, torch.Tensor]]
    """Each client's images ``(256, 1, 28, 28)`` and labels ``(256,)``: AMBLE's IID partition."""
    x_test: torch.Tensor
    y_test: torch.Tensor
    initial: Params
    """AMBLE's initial ``mlp-small`` state dict for the seed."""
    seeds: torch.Tensor
    """``(rounds, clients)`` int64: the seed of each client's batch order in each round (AMBLE's)."""
    lr: float
    batch_size: int
    local_steps: int

    def save(self, path: Path) -> None:
        """As safetensors (tensors) with JSON metadata (the rest): nothing pickled crosses processes."""
        tensors = {"x_test": self.x_test, "y_test": self.y_test, "seeds": self.seeds}
        for k, (x, y) in enumerate(self.clients):
            tensors[f"client/{k}/x"], tensors[f"client/{k}/y"] = x.contiguous(), y.contiguous()
        tensors.update({f"initial/{name}": value.contiguous() for name, value in self.initial.items()})
        meta = {"lr": self.lr, "batch_size": self.batch_size, "local_steps": self.local_steps}
        meta |= {"clients": len(self.clients), "initial": list(self.initial)}
        save_file(tensors, str(path), metadata={"workload": json.dumps(meta)})


@cache
def load_workload(path: str) -> Workload:
    """Read once per process (a Ray actor keeps it between messages)."""
    with safe_open(path, framework="pt") as opened:
        meta = json.loads(opened.metadata()["workload"])
        tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118 - not a dict
    return Workload(
        clients=[(tensors[f"client/{k}/x"], tensors[f"client/{k}/y"]) for k in range(meta["clients"])],
        x_test=tensors["x_test"],
        y_test=tensors["y_test"],
        initial={name: tensors[f"initial/{name}"] for name in meta["initial"]},
        seeds=tensors["seeds"],
        lr=float(meta["lr"]),
        batch_size=int(meta["batch_size"]),
        local_steps=int(meta["local_steps"]),
    )


class SmallMLP(nn.Module):
    """784-64-10 with ReLU: AMBLE's ``mlp-small``, the same parameter names, so its state dict loads strictly."""

    def __init__(self, in_features: int = 784, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc2(F.relu(self.fc1(x.flatten(1))))  # (B, num_classes)
        return logits


# -- local training and FedAvg ---------------------------------------------------------------------


def batch_order(num_samples: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` sample indices, one fresh permutation per epoch: the order AMBLE's
    trainer draws from the same seed, so the three frameworks train on identical batches."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch_size // num_samples)
    stream = torch.cat([torch.randperm(num_samples, generator=generator) for _ in range(epochs)])
    return stream[: steps * batch_size].view(steps, batch_size)


@dataclass(frozen=True)
class LocalResult:
    params: Params
    steps: int
    samples: int


def train_local(
    model: nn.Module, start: Params, x: torch.Tensor, y: torch.Tensor, seed: int, w: Workload
) -> LocalResult:
    """Plain SGD from ``start``: ``w.local_steps`` steps of ``w.batch_size`` samples at ``w.lr``."""
    model.load_state_dict(start)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=w.lr)
    order = batch_order(len(y), w.batch_size, w.local_steps, seed)
    for index in order:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    params = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return LocalResult(params, len(order), order.numel())


@torch.no_grad()
def accuracy(params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    model = SmallMLP()
    model.load_state_dict(params)
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


# -- what every run reports ------------------------------------------------------------------------


@dataclass
class RoundLog:
    """Wall-clock stamps and work of each round, as the framework's own loop saw them."""

    begin: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def print_result(framework: str, rounds: RoundLog, model_out: Path, **extra: Any) -> None:
    """The one line the parent reads: rounds, work, the final model's file, this process' own peak RSS."""
    record = {
        "framework": framework,
        "round_begin": rounds.begin,
        "round_end": rounds.end,
        "samples_per_round": rounds.samples,
        "steps_per_round": rounds.steps,
        "model_path": str(model_out),
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
    print(RESULT_MARKER + json.dumps(record), flush=True)


# -- the plain loop --------------------------------------------------------------------------------


def run_plain(workload_path: Path, rounds: int, model_out: Path) -> None:
    """The plain sequential loop: for each client load the global weights into one model, train, add to
    the sample-weighted average; the average is the next global model."""
    workload = load_workload(str(workload_path))
    model = SmallMLP()
    total = sum(len(y) for _, y in workload.clients)
    global_params = {name: value.clone() for name, value in workload.initial.items()}
    log = RoundLog()
    for r in range(rounds):
        log.begin.append(time.time())
        averaged = {name: torch.zeros_like(value) for name, value in global_params.items()}
        samples = steps = 0
        for k, (x, y) in enumerate(workload.clients):
            result = train_local(model, global_params, x, y, int(workload.seeds[r, k]), workload)
            for name, value in result.params.items():
                averaged[name].add_(value, alpha=len(y) / total)
            samples, steps = samples + result.samples, steps + result.steps
        global_params = averaged
        log.end.append(time.time())
        log.samples.append(samples)
        log.steps.append(steps)
    save_file({k: v.contiguous() for k, v in global_params.items()}, str(model_out))
    print_result("plain", log, model_out)


# -- Flower ----------------------------------------------------------------------------------------


@cache
def client_model() -> SmallMLP:
    """One model object per Ray actor, loaded with each message's start state (as AMBLE reuses one)."""
    return SmallMLP()


def client_train(msg: Message, context: Context) -> Message:
    """The ClientApp's ``train``: this node's partition, the round's seed, :func:`train_local`."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    workload = load_workload(str(config["workload"]))
    client = int(context.node_config["partition-id"])
    round_index = int(config["server-round"]) - 1  # Flower counts rounds from 1
    x, y = workload.clients[client]
    start = msg.content["arrays"].to_torch_state_dict()
    result = train_local(client_model(), start, x, y, int(workload.seeds[round_index, client]), workload)
    metrics = MetricRecord(
        {
            "num-examples": len(y),  # FedAvg's weight, as AMBLE weights by the device's sample count
            "samples": result.samples,
            "steps": result.steps,
            "torch-threads": torch.get_num_threads(),
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(result.params), "metrics": metrics}), reply_to=msg)


def run_flower(workload_path: Path, rounds: int, client_cpus: float, model_out: Path) -> None:
    """FedAvg over every node each round in Flower's simulation engine (Ray backend).

    A round is timed by the strategy: it begins when ``configure_train`` is entered and ends when
    ``aggregate_train`` has returned the new global model. Before the first round the ServerApp waits
    until Ray is initialised and every SuperNode is registered (Flower registers the nodes before it
    starts Ray), so start-up covers Flower's and Ray's initialisation; the actors' processes are
    started by Ray in the background and the first round waits for them.
    """
    import flwr
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    workload = load_workload(str(workload_path))
    clients = len(workload.clients)
    log = RoundLog()
    final: Params = {}
    threads: set[int] = set()

    class TimedFedAvg(FedAvg):
        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> list[Message]:
            log.begin.append(time.time())
            return list(super().configure_train(server_round, arrays, config, grid))

        def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            failed = [m.error.reason for m in replies if m.has_error()]
            if failed or len(replies) != clients:
                raise RuntimeError(f"round {server_round}: {len(replies)} of {clients} replies, errors: {failed[:3]}")
            log.samples.append(sum(int(m.content["metrics"]["samples"]) for m in replies))
            log.steps.append(sum(int(m.content["metrics"]["steps"]) for m in replies))
            threads.update(int(m.content["metrics"]["torch-threads"]) for m in replies)
            aggregated = super().aggregate_train(server_round, replies)
            log.end.append(time.time())
            return aggregated

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        while not ray.is_initialized() or len(list(grid.get_node_ids())) < clients:
            time.sleep(0.01)
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # evaluation is done once, on the final model, by the parent
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(workload.initial),
            num_rounds=rounds,
            train_config=ConfigRecord({"workload": str(workload_path)}),
        )
        final.update(result.arrays.to_torch_state_dict())

    client_app = ClientApp()
    client_app.train()(client_train)
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients, backend_config=backend_config)
    if len(log.end) != rounds or not final:
        raise RuntimeError(f"Flower's simulation ended after {len(log.end)} of {rounds} rounds")
    save_file({k: v.contiguous() for k, v in final.items()}, str(model_out))
    print_result(
        "flower",
        log,
        model_out,
        versions={"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__},
        backend_config=backend_config,
        actors=int((os.cpu_count() or 1) // client_cpus),
        client_torch_threads=sorted(threads),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, required=True, help="the file vs_flower.py wrote")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp actor")
    parser.add_argument("--model-out", type=Path, required=True, help="where to save the final state dict")
    parser.add_argument("--plain", action="store_true", help="run the plain PyTorch loop instead of Flower")
    args = parser.parse_args(argv)
    if args.plain:
        run_plain(args.workload, args.rounds, args.model_out)
    else:
        run_flower(args.workload, args.rounds, args.client_cpus, args.model_out)
    return 0


if __name__ == "__main__":
    # Re-enter as the module ``flower_app``: Ray's workers then import client_train by name (the
    # benchmarks folder is on the PYTHONPATH Flower gives them) and keep its caches between messages,
    # instead of unpickling a fresh copy of ``__main__``'s functions with every message.
    import flower_app

    sys.exit(flower_app.main())
