"""What a run starts from, computed the same way by the simulator and by ``amble serve``.

The dataset and each device's partition, the initial model (from the seed), the parameter server's
run settings and the evaluation subset (a seeded sample of the test set). Both paths build it here,
so a simulated and a live run of one config start from the same weights, plan for the same sample
counts and report accuracies on the same test samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from amble.client.trainer import evaluate
from amble.config import ExperimentConfig
from amble.data import Dataset
from amble.models import ModelFactory
from amble.problem import load_data, make_model, partition
from amble.server.records.settings import RunSettings
from amble.strategies.base import Params

DeviceData = list[tuple[torch.Tensor, torch.Tensor]]
"""Each device's (x, y) training tensors, by device id."""


@dataclass
class RunSetup:
    config: ExperimentConfig
    dataset: Dataset
    device_data: DeviceData
    model: nn.Module
    """A model of the config's architecture, holding ``initial`` (a scratch copy for evaluation)."""
    initial: Params
    settings: RunSettings
    test: tuple[torch.Tensor, torch.Tensor]
    """The evaluation samples: ``eval.test_samples`` of the test set, chosen by the seed."""
    model_factory: ModelFactory | None = None
    """The Python API's in-memory model factory, in place of the config's import path (this process only)."""

    @cached_property
    def num_samples(self) -> dict[int, int]:
        """Each device's training samples: its FedAvg weight, known to the server from the config."""
        return {device: len(y) for device, (_, y) in enumerate(self.device_data)}

    def build_model(self) -> nn.Module:
        return make_model(self.config, self.dataset, self.model_factory)

    def score(self, params: Params, model: nn.Module | None = None) -> tuple[float, float]:
        """Accuracy and loss of ``params`` on the evaluation samples."""
        scratch = self.model if model is None else model
        scratch.load_state_dict(params)
        return evaluate(scratch, *self.test, batch_size=self.config.eval.batch_size)


def run_settings(config: ExperimentConfig) -> RunSettings:
    return RunSettings(
        seed=config.seed,
        devices_per_round=config.devices_per_round,
        quorum=config.server.quorum,
        max_update_bytes=int(config.server.max_update_mb * 2**20),
        max_update_norm=config.server.max_update_norm,
        max_update_norm_ratio=config.server.max_update_norm_ratio,
    )


def device_shards(config: ExperimentConfig) -> tuple[Dataset, DeviceData]:
    """The dataset and each device's pre-sliced (x, y) tensors: no DataLoader, no per-step indexing
    into the full set. A function of the config and seed, so every process computes the same split."""
    dataset = load_data(config)
    indices = partition(config, dataset)
    shards = [(dataset.x_train[torch.as_tensor(i)], dataset.y_train[torch.as_tensor(i)]) for i in indices]
    return dataset, shards


def evaluation_samples(config: ExperimentConfig, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``eval.test_samples`` test samples drawn by the seed (all of them when unset)."""
    test_x, test_y = dataset.x_test, dataset.y_test
    if config.eval.test_samples is not None and config.eval.test_samples < len(test_y):
        keep = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(config.seed))
        test_x, test_y = test_x[keep[: config.eval.test_samples]], test_y[keep[: config.eval.test_samples]]
    return test_x, test_y


def run_namespace(config: ExperimentConfig, out_dir: Path) -> str:
    """Where a run's state lives in a shared store: one name per config name and output directory."""
    digest = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:10]
    return f"{config.name}-{digest}"


def prepare_run(config: ExperimentConfig, model_factory: ModelFactory | None = None) -> RunSetup:
    """What a run starts from; ``model_factory`` (Python API) builds the model instead of ``config.model``."""
    dataset, device_data = device_shards(config)
    torch.manual_seed(config.seed)
    model = make_model(config, dataset, model_factory)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    test = evaluation_samples(config, dataset)
    return RunSetup(config, dataset, device_data, model, initial, run_settings(config), test, model_factory)
