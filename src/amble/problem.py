"""What a config trains: its dataset, each device's share of it, and a fresh model of its architecture.

Resolved here, the same way, by every process that trains: the simulator, the Ray training actors,
``amble serve`` and ``amble device``. A model or loader named by an import path is imported from the
code installed on the machine at hand (:mod:`amble.imports`), never sent by a server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from amble.config import BUILTIN_MODELS, ExperimentConfig, is_user_data_path
from amble.data import Dataset, load_dataset, split_for
from amble.data.partition import IndexArray
from amble.fleet import StepTime, calibrate
from amble.models import ModelFactory, build_model


def load_data(config: ExperimentConfig, data_root: str | None = None) -> Dataset:
    """The config's dataset; ``data_root`` (a device's ``--data-root``) says where it is on this machine.

    A user's file or folder is where ``data.dataset`` says unless ``data_root`` says otherwise
    (``data.root`` is the built-in datasets' search folder and does not apply to it)."""
    data = config.data
    root = data_root or ("auto" if is_user_data_path(data.dataset) else data.root)
    return load_dataset(
        data.dataset,
        root,
        seed=config.seed,
        synthetic_size=data.synthetic_size,
        test_fraction=data.test_fraction,
    )


def partition(config: ExperimentConfig, dataset: Dataset) -> list[IndexArray]:
    """Each device's training-sample indices, a function of the config and seed alone."""
    owners = None if dataset.owner_train is None else dataset.owner_train.numpy()
    return split_for(config.data, dataset.y_train.numpy(), config.seed, owners)


def make_model(config: ExperimentConfig, dataset: Dataset, factory: ModelFactory | None = None) -> nn.Module:
    """A new model of the config's architecture for this dataset (``factory``: the Python API's in-memory one)."""
    return build_model(
        config.model,
        dataset.input_shape,
        dataset.num_classes,
        model_args=config.model_args,
        input_dtype=dataset.x_train.dtype,
        factory=factory,
    )


def model_key(config: ExperimentConfig, model: nn.Module) -> str:
    """Names the architecture for the step-time calibration cache: model, its arguments and its size."""
    size = sum(p.numel() for p in model.parameters())
    args = json.dumps(config.model_args, sort_keys=True) if config.model_args else ""
    return f"{config.model}{args}#{size}" if args or config.model not in BUILTIN_MODELS else config.model


def sample_batch(dataset: Dataset, count: int = 512) -> torch.Tensor:
    """Up to ``count`` real training samples: what the clock's calibration times steps on."""
    return dataset.x_train[:count]


def reference_step_time(
    config: ExperimentConfig,
    dataset: Dataset,
    build: Callable[[], nn.Module],
    model: nn.Module,
    cache_dir: Path | None = None,
) -> StepTime:
    """The reference device's seconds per step by batch size: ``fleet.t_ref`` when the config sets it,
    else this machine's calibration of the config's model on real samples (cached by :func:`model_key`)."""
    if config.fleet.t_ref is not None:
        return StepTime.from_mapping(config.fleet.t_ref)
    key = model_key(config, model)
    return calibrate(build, key, dataset.input_shape, dataset.num_classes, cache_dir, inputs=sample_batch(dataset))
