"""Where a round's devices train: in this process (the default) or on Ray actors.

The driver hands over a round's start model and one job per device (its plan and seed) and gets back
each device's update as the safetensors bytes it uploads. Local training is a pure function of
(start model, device data, plan, seed), so every backend computes the same updates, up to the
floating-point effects of torch's thread count.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from amble.client import LocalTrainer
from amble.config import ExperimentConfig
from amble.data import Dataset, load_dataset, split_for
from amble.models import build_model
from amble.server.tensors import encode
from amble.strategies import Params, Plan

DeviceData = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainJob:
    device: int
    plan: Plan
    seed: int


@dataclass(frozen=True)
class Trained:
    steps: int
    samples: int
    update: bytes
    """The delta as safetensors bytes: what the device uploads."""
    compute_s: float
    """Seconds spent inside local training (measured where it ran)."""


def device_shards(config: ExperimentConfig) -> tuple[Dataset, DeviceData]:
    """The dataset and each device's pre-sliced (x, y) tensors: no DataLoader, no per-step indexing
    into the full set. A function of the config and seed, so every process computes the same split."""
    data = config.data
    dataset = load_dataset(data.dataset, data.root, seed=config.seed, synthetic_size=data.synthetic_size)
    indices = split_for(data, dataset.y_train.numpy(), config.seed)
    shards = [(dataset.x_train[torch.as_tensor(i)], dataset.y_train[torch.as_tensor(i)]) for i in indices]
    return dataset, shards


def local_trainer(config: ExperimentConfig, dataset: Dataset, model: nn.Module | None = None) -> LocalTrainer:
    """The trainer a config describes, on ``model`` (default: a new one; its initial weights never matter,
    every job loads its start state)."""
    if model is None:
        model = build_model(config.model, dataset.input_shape, dataset.num_classes)
    return LocalTrainer(model, config.train.momentum, config.train.weight_decay)


def train_jobs(trainer: LocalTrainer, shards: DeviceData, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
    trained = {}
    for job in jobs:
        x, y = shards[job.device]
        tic = time.perf_counter()
        result = trainer.train(start, x, y, job.plan, job.seed)
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
    """Devices train one after another in this process, on one reused model object."""

    def __init__(self, trainer: LocalTrainer, shards: DeviceData) -> None:
        self.trainer = trainer
        self.shards = shards

    def train(self, start: Params, jobs: list[TrainJob]) -> dict[int, Trained]:
        return train_jobs(self.trainer, self.shards, start, jobs)
