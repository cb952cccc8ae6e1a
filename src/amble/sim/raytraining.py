"""Device training on Ray: a few long-lived training actors, each with one CPU and its own copy of the data.

Each actor loads the dataset and computes the partition itself from the experiment config (so the
data must be readable at the same ``data.root`` on every node), once, when it starts. Per round the
driver puts the start model into Ray's object store once (safetensors bytes; every actor reads the
same object) and sends each actor one call with its share of the devices (as JSON), balanced by
planned work (steps x batch size, largest first): a handful of calls per round however many
devices train, so per-task overhead stays small. An actor returns each device's update as the
safetensors bytes it uploads.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from amble.config import ExperimentConfig, config_from_dict, config_to_dict
from amble.errors import AmbleError, ConfigError
from amble.raycluster import cpus, import_ray
from amble.runsetup import device_shards
from amble.server.tensors import decode, encode
from amble.sim.training import DeviceTrainers, Trained, TrainJob, local_devices
from amble.strategies import Params, Plan

SCAFFOLD_ON_RAY = (
    "control variates (strategy scaffold, or control_variates: true) do not train on Ray yet: set ray.train: false "
    "(the parameter server's functions may still run on Ray)"
)


class TrainingActor:
    def __init__(self, config: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.config = config_from_dict(json.loads(config), "the run's config sent to a Ray training actor")
        dataset, shards = device_shards(self.config)
        self.devices = local_devices(self.config, dataset, shards)

    def ready(self) -> bool:
        return True

    def train(self, start: bytes, jobs: str) -> tuple[str, list[bytes]]:
        """Train the devices of ``jobs`` (JSON) from ``start`` (safetensors); (results JSON, updates)."""
        parsed = [TrainJob(int(j["device"]), Plan.from_dict(j["plan"]), int(j["seed"])) for j in json.loads(jobs)]
        trained = self.devices.train(decode(start), parsed)
        rows = [
            {"device": k, "steps": t.steps, "samples": t.samples, "compute_s": t.compute_s} for k, t in trained.items()
        ]
        return json.dumps(rows), [t.update for t in trained.values()]


def balance(jobs: list[TrainJob], groups: int) -> list[list[TrainJob]]:
    """Split jobs into ``groups`` of similar total work: largest first, each to the lightest group."""
    shares: list[list[TrainJob]] = [[] for _ in range(groups)]
    loads = [0] * groups
    for job in sorted(jobs, key=lambda j: (-j.plan.local_steps * j.plan.batch_size, j.device)):
        lightest = loads.index(min(loads))
        shares[lightest].append(job)
        loads[lightest] += job.plan.local_steps * job.plan.batch_size
    return shares


class RayDevices(DeviceTrainers):
    def __init__(self, config: ExperimentConfig, actors: int | None = None, start_timeout_s: float = 300.0) -> None:
        self.ray = import_ray()
        available = cpus()
        count = actors or available
        if count > available:  # an actor that can never get its CPU would leave every round waiting
            raise ConfigError(
                f"ray.trainers is {count} but the Ray cluster has {available} CPUs (one per training actor): "
                "lower ray.trainers, or add nodes"
            )
        actor_class = self.ray.remote(num_cpus=1)(TrainingActor)
        blob = json.dumps(config_to_dict(config))
        self.actors: list[Any] = [actor_class.remote(blob, 1) for _ in range(count)]
        self._wait_until_started(start_timeout_s)

    def _wait_until_started(self, timeout_s: float) -> None:
        """Every actor has loaded its data, or the run stops here with the reason (data missing on a
        node, CPUs held by other jobs) instead of waiting in its first round."""
        ray = self.ray
        try:
            ray.get([actor.ready.remote() for actor in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise AmbleError(
                f"the {len(self.actors)} Ray training actors did not all start within {timeout_s:g} s: the "
                "cluster's CPUs may be held by other jobs (see `ray status`); lower ray.trainers"
            ) from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise AmbleError(f"a Ray training actor could not start: {exc}") from None

    def train(self, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
        if any(job.correction is not None for job in jobs):  # the config refuses this; never train without it
            raise ConfigError(SCAFFOLD_ON_RAY)
        ray = self.ray
        model = ray.put(encode(start))  # once per round, whatever the number of devices
        calls = []
        for actor, share in zip(self.actors, balance(jobs, len(self.actors)), strict=True):
            if share:
                body = json.dumps([{"device": j.device, "plan": j.plan.to_dict(), "seed": j.seed} for j in share])
                calls.append(actor.train.remote(model, body))
        trained = {}
        for rows, updates in ray.get(calls):
            for row, update in zip(json.loads(rows), updates, strict=True):
                trained[int(row["device"])] = Trained(int(row["steps"]), int(row["samples"]), update, row["compute_s"])
        return trained

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
