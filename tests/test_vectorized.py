"""Vectorised training equals the per-device path up to float rounding, and falls back where it cannot apply."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from amble.client import LocalTrainer
from amble.config import config_from_dict
from amble.data import make_synthetic
from amble.models import build_model
from amble.runsetup import device_shards
from amble.server.tensors import decode
from amble.sim.driver import run_experiment
from amble.sim.training import LocalDevices, TrainJob, local_devices
from amble.sim.vectorized import VectorizedTrainer, why_not_vectorized
from amble.strategies import Plan
from tests.test_sim import SMALL, read_jsonl

TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
"""float32 sums taken in another order (batched matrix products): about 1e-7 apart after a few steps."""


def _devices(count: int, sizes: tuple[int, ...] = (40, 57, 64)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = make_synthetic(num_train=sum(sizes) * count, num_test=10, seed=1)
    shards, begin = [], 0
    for k in range(count):
        size = sizes[k % len(sizes)]
        shards.append((data.x_train[begin : begin + size], data.y_train[begin : begin + size]))
        begin += size
    return shards


@pytest.mark.parametrize("model_name", ["mlp-small", "lenet"])
@pytest.mark.parametrize(
    ("plan", "momentum", "weight_decay"),
    [
        (Plan(batch_size=16, local_steps=5, lr=0.05), 0.0, 0.0),
        (Plan(batch_size=16, local_steps=5, lr=0.05), 0.9, 1e-3),
        (Plan(batch_size=32, local_steps=4, lr=0.1, prox_mu=0.1, lr_warmup_steps=2, lr_warmup_from=0.01), 0.5, 0.0),
    ],
)
def test_vectorized_matches_per_device_training(
    model_name: str, plan: Plan, momentum: float, weight_decay: float
) -> None:
    # Setup
    torch.manual_seed(0)
    model = build_model(model_name, (1, 28, 28), 10)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards = _devices(5)
    seeds = [11, 12, 13, 14, 15]

    # Execute
    vectorized = VectorizedTrainer(model, momentum, weight_decay).train(start, shards, plan, seeds)
    looped = [
        LocalTrainer(model, momentum, weight_decay).train(start, x, y, plan, seed)
        for (x, y), seed in zip(shards, seeds, strict=True)
    ]

    # Assert
    for got, want in zip(vectorized, looped, strict=True):
        assert (got.steps, got.samples) == (want.steps, want.samples)
        assert got.delta.keys() == want.delta.keys()
        for name in want.delta:
            torch.testing.assert_close(got.delta[name], want.delta[name], **TOLERANCE)
        assert max(float(d.abs().max()) for d in want.delta.values()) > 1e-3  # it did train


def test_devices_with_their_own_plan_or_a_batchnorm_model_train_per_device() -> None:
    # Setup: five devices, two plans shared by two devices each and one plan of its own
    config = config_from_dict({**SMALL, "model": "mlp-small", "train": {**SMALL["train"], "vectorize": True}})
    dataset, shards = device_shards(config)
    devices = local_devices(config, dataset, shards)
    torch.manual_seed(0)
    start = {k: v.detach().clone() for k, v in devices.trainer.model.state_dict().items()}
    a, b = Plan(batch_size=16, local_steps=3, lr=0.05), Plan(batch_size=8, local_steps=4, lr=0.02)
    plans = [a, a, b, b, replace(a, lr=0.07)]
    jobs = [TrainJob(k, plan, 100 + k) for k, plan in enumerate(plans)]

    # Execute
    assert devices.vectorized is not None
    grouped = devices.train(start, jobs)
    one_by_one = LocalDevices(devices.trainer, shards).train(start, jobs)

    # Assert
    assert grouped.keys() == one_by_one.keys() == set(range(5))
    for k in grouped:
        got, want = decode(grouped[k].update), decode(one_by_one[k].update)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOLERANCE)
    assert why_not_vectorized(build_model("resnet20", (3, 32, 32), 10)) is not None
    assert "dropout" in (why_not_vectorized(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())) or "")
    resnet = config_from_dict({**config.model_dump(), "model": "resnet20"})
    with pytest.raises(ValueError, match="buffers"):
        VectorizedTrainer(build_model("resnet20", (3, 32, 32), 10))
    assert local_devices(resnet, dataset, shards).vectorized is None  # falls back to per-device training


def test_devices_whose_data_is_smaller_than_the_batch_group_by_their_effective_batch() -> None:
    # Setup: effective batch 20 for all three (20 samples at batch 32, 20 at 20, 57 at 20)
    torch.manual_seed(0)
    model = build_model("mlp-small", (1, 28, 28), 10)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards = _devices(3, sizes=(20, 20, 57))
    plans = [Plan(batch_size=32, local_steps=3, lr=0.05), Plan(20, 3, 0.05), Plan(20, 3, 0.05)]
    jobs = [TrainJob(k, plan, 7 + k) for k, plan in enumerate(plans)]
    devices = LocalDevices(LocalTrainer(model), shards, VectorizedTrainer(model))

    # Execute
    grouped = devices.train(start, jobs)
    one_by_one = LocalDevices(LocalTrainer(model), shards).train(start, jobs)

    # Assert
    for k in range(3):
        assert (grouped[k].steps, grouped[k].samples) == (one_by_one[k].steps, one_by_one[k].samples) == (3, 60)
        got, want = decode(grouped[k].update), decode(one_by_one[k].update)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOLERANCE)


def test_a_vectorized_run_matches_the_per_device_run(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {**SMALL, "model": "mlp-small"}
    vectorized = {**raw, "train": {**raw["train"], "vectorize": True}}
    groups: list[int] = []
    original = VectorizedTrainer.train

    def counted(self: VectorizedTrainer, *args: Any, **kwargs: Any) -> Any:
        groups.append(len(args[1]))
        return original(self, *args, **kwargs)

    run_experiment(config_from_dict(raw), tmp_path / "loop", progress=False)  # type: ignore[operator]
    monkeypatch.setattr(VectorizedTrainer, "train", counted)
    run_experiment(config_from_dict(vectorized), tmp_path / "vmap", progress=False)  # type: ignore[operator]
    assert groups and max(groups) >= 2  # devices did train stacked (FedAvg: one plan per round)
    keys = ("strategy", "round", "device", "batch_size", "local_steps", "lr", "status")
    rows = {name: read_jsonl(tmp_path / name / "devices.jsonl") for name in ("loop", "vmap")}  # type: ignore[operator]
    assert [tuple(r[k] for k in keys) for r in rows["loop"]] == [tuple(r[k] for k in keys) for r in rows["vmap"]]
    metrics = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("loop", "vmap")}  # type: ignore[operator]
    for a, b in zip(metrics["loop"], metrics["vmap"], strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.005)
