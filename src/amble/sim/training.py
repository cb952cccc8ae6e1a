"""Where a round's devices train: in this process (the default) or on Ray actors.

The driver hands over a round's start model and one job per device (its plan and seed) and gets back
each device's update as the safetensors bytes it uploads. Local training is a pure function of
(start model, device data, plan, seed), and every backend trains on one torch thread
(:data:`TRAIN_THREADS`), so every backend computes the same updates, bit for bit, whatever thread
count the process had before: ``run.threads`` (default 1, as Ray's actors) in this process (a
reduction split over two threads sums in another order: a run trained on two threads ends on other
bits than on one).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from amble.client import LocalTrainer
from amble.config import ExperimentConfig
from amble.data import Dataset
from amble.problem import make_model
from amble.runsetup import DeviceData
from amble.server.tensors import encode
from amble.sim.vectorized import VectorizedTrainer, group_key, slower_vectorized, why_not_vectorized
from amble.strategies import Params, Plan

TRAIN_THREADS = 1
"""Torch threads local training runs on, in this process as on a Ray training actor. Pinned so that a
run is a function of its config and seed (not of the machine's cores or of what the process set
before); one thread is also the fastest for these models' small kernels on a shared machine, and a
run's cores go to strategies in parallel processes instead."""

VECTOR_GROUP = 128
"""Devices trained in one vectorised computation at most (their stacked parameters, gradients and
batches are held at once)."""


@dataclass(frozen=True)
class TrainJob:
    device: int
    plan: Plan
    seed: int
    correction: Params | None = None
    """SCAFFOLD's ``c - c_k`` for this device (None: none), added to every gradient."""


@dataclass(frozen=True)
class Trained:
    steps: int
    samples: int
    update: bytes
    """The delta as safetensors bytes: what the device uploads."""
    compute_s: float
    """Seconds spent inside local training (measured where it ran)."""


def local_trainer(config: ExperimentConfig, dataset: Dataset, model: nn.Module | None = None) -> LocalTrainer:
    """The trainer a config describes, on ``model`` (default: a new one; its initial weights never matter,
    every job loads its start state)."""
    if model is None:
        model = make_model(config, dataset)
    return LocalTrainer(model, config.train.momentum, config.train.weight_decay)


@contextmanager
def training_threads(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Torch's intra-op thread count pinned to ``threads`` inside, restored after."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def train_jobs(trainer: LocalTrainer, shards: DeviceData, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
    trained = {}
    for job in jobs:
        x, y = shards[job.device]
        tic = time.perf_counter()
        result = trainer.train(start, x, y, job.plan, job.seed, correction=job.correction)
        compute_s = time.perf_counter() - tic
        trained[job.device] = Trained(result.steps, result.samples, encode(result.delta), compute_s)
    return trained


class DeviceTrainers(ABC):
    @abstractmethod
    def train(self, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
        """Train every job's device from ``start``; results by device."""

    def close(self) -> None:  # noqa: B027 - optional hook; in-process training holds nothing to release
        """Release workers."""


class LocalDevices(DeviceTrainers):
    """Devices train in this process: one after another on one reused model object, or, with a
    ``vectorized`` trainer, devices sharing a :func:`group_key` (batch, lr schedule, FedProx term; their
    step counts may differ) in groups of up to ``VECTOR_GROUP`` at once."""

    def __init__(
        self,
        trainer: LocalTrainer,
        shards: DeviceData,
        vectorized: VectorizedTrainer | None = None,
        threads: int = TRAIN_THREADS,
    ) -> None:
        self.trainer = trainer
        self.shards = shards
        self.vectorized = vectorized
        self.threads = threads
        """Torch threads training runs on (``run.threads``): part of what it computes."""

    def train(self, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
        with training_threads(self.threads):
            if self.vectorized is None:
                return train_jobs(self.trainer, self.shards, start, jobs)
            return self._train_grouped(self.vectorized, start, jobs)

    def _train_grouped(self, vectorized: VectorizedTrainer, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
        groups: dict[tuple[object, ...], list[TrainJob]] = {}
        for job in jobs:
            groups.setdefault(group_key(job.plan, len(self.shards[job.device][1])), []).append(job)
        trained: dict[int, Trained] = {}
        for group in groups.values():
            if len(group) == 1:  # a plan of its own: nothing to stack it with
                trained.update(train_jobs(self.trainer, self.shards, start, group))
                continue
            for begin in range(0, len(group), VECTOR_GROUP):
                chunk = group[begin : begin + VECTOR_GROUP]
                tic = time.perf_counter()
                data = [self.shards[job.device] for job in chunk]
                corrections = [job.correction for job in chunk]
                plans, seeds = [job.plan for job in chunk], [job.seed for job in chunk]
                results = vectorized.train(start, data, plans, seeds, corrections)
                updates = [encode(result.delta) for result in results]
                elapsed_s = time.perf_counter() - tic
                total_steps = max(sum(result.steps for result in results), 1)
                for job, result, update in zip(chunk, results, updates, strict=True):
                    share_s = elapsed_s * result.steps / total_steps  # the group's time, split by steps
                    trained[job.device] = Trained(result.steps, result.samples, update, share_s)
        return trained


def local_devices(
    config: ExperimentConfig, dataset: Dataset, shards: DeviceData, model: nn.Module | None = None
) -> LocalDevices:
    """In-process training as the config asks: vectorised (``train.vectorize``) where the model allows it
    and it is faster (not for convolutional models)."""
    trainer = local_trainer(config, dataset, model)
    vectorized = None
    net = trainer.model
    if config.train.vectorize and why_not_vectorized(net) is None and slower_vectorized(net) is None:
        vectorized = VectorizedTrainer(trainer.model, config.train.momentum, config.train.weight_decay)
    return LocalDevices(trainer, shards, vectorized, config.run.threads)
