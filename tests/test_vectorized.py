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
from amble.sim.vectorized import VectorizedTrainer, slower_vectorized, why_not_vectorized
from amble.strategies import Plan
from tests.test_sim import SMALL, read_jsonl

U64 = 2.0**-53
"""float64's unit roundoff."""
SUM_OF_ABS_TERMS = 1.0
"""A bound on sum|terms| of any gradient element of these models on this data (0.35 measured at the start)."""
PIXELS = 28 * 28


def in_float64(
    model: torch.nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The comparisons run in float64 (``model`` is converted in place; the shards are returned converted).

    Both paths compute the same SGD and differ only in the order of the sums inside each gradient
    (batched matrix products and convolutions instead of per-device ones). In float32 that order
    difference can put a ReLU or max-pool input on the other side of zero, which changes a gradient by
    a finite amount no rounding bound covers (so a float32 comparison was red on AMD EPYC AVX2: 2.2e-5
    apart). In float64 that takes an input within about 1e-13 of zero: it does not happen here."""
    model.double()
    return [(x.double(), y) for x, y in shards]


def order_bound(plan: Plan, momentum: float) -> float:
    """How far apart two float64 runs of one plan can end that differ only in the order of their sums.

    A sum of K terms taken in two orders differs by at most 2 K u sum|terms| (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 4.2; u = 2**-53). The longest sums are over the batch times
    28 x 28 positions (lenet's first convolution; the MLP's first layer sums 784 inputs). Each step
    moves the weights by lr times a velocity that carries at most 1 / (1 - momentum) gradients, so
    after ``local_steps`` steps: ``steps * lr / (1 - momentum) * 2 K u * SUM_OF_ABS_TERMS`` (to first
    order: the few steps here barely propagate an error through later gradients). E.g. 16 samples,
    5 steps at lr 0.05, momentum 0.9: 7e-12 (measured: under 5e-17 with AVX-512, AVX2 and no SIMD,
    1 and 2 threads)."""
    terms = plan.batch_size * PIXELS
    return plan.local_steps * plan.lr / (1 - momentum) * 2 * terms * U64 * SUM_OF_ABS_TERMS


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
    shards = in_float64(model, _devices(5))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seeds = [11, 12, 13, 14, 15]
    bound = order_bound(plan, momentum)

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
            torch.testing.assert_close(got.delta[name], want.delta[name], rtol=0, atol=bound)
        assert max(float(d.abs().max()) for d in want.delta.values()) > 1e-3  # it did train


@pytest.mark.parametrize("model_name", ["mlp-small", "lenet"])
def test_devices_with_different_step_counts_train_in_one_group(model_name: str) -> None:
    # Setup: AMBLE-like plans: one batch and lr, 1 to 6 steps; momentum, weight decay and SCAFFOLD
    # corrections (one device without), so each device's velocity and shift must follow its own rows
    torch.manual_seed(0)
    model = build_model(model_name, (1, 28, 28), 10)
    shards = in_float64(model, _devices(6))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps = [3, 6, 1, 4, 6, 2]
    plans = [Plan(batch_size=16, local_steps=n, lr=0.05, lr_warmup_steps=2, lr_warmup_from=0.01) for n in steps]
    seeds = [21, 22, 23, 24, 25, 26]
    corrections: list[dict[str, torch.Tensor] | None] = [
        None if k == 2 else {n: torch.randn_like(v) * 0.01 for n, v in start.items()} for k in range(6)
    ]
    trainer = VectorizedTrainer(model, momentum=0.9, weight_decay=1e-3)

    # Execute
    grouped = trainer.train(start, shards, plans, seeds, corrections)
    looped = [
        LocalTrainer(model, 0.9, 1e-3).train(start, x, y, plan, seed, correction=c)
        for (x, y), plan, seed, c in zip(shards, plans, seeds, corrections, strict=True)
    ]

    # Assert: each device took its own steps (in the order given, not the longest-first of the group)
    assert [(r.steps, r.samples) for r in grouped] == [(n, 16 * n) for n in steps]
    for got, want, plan in zip(grouped, looped, plans, strict=True):
        for name in want.delta:
            torch.testing.assert_close(got.delta[name], want.delta[name], rtol=0, atol=order_bound(plan, 0.9))
    with pytest.raises(ValueError, match="share batch, lr"):
        trainer.train(start, shards[:2], [plans[0], replace(plans[1], lr=0.2)], seeds[:2])


def test_devices_with_their_own_plan_or_a_batchnorm_model_train_per_device() -> None:
    # Setup: five devices, two plans shared by two devices each and one plan of its own
    config = config_from_dict({**SMALL, "model": "mlp-small", "train": {**SMALL["train"], "vectorize": True}})
    dataset, shards = device_shards(config)
    configured = local_devices(config, dataset, shards)
    assert configured.vectorized is not None
    shards64 = in_float64(configured.trainer.model, shards)
    devices = LocalDevices(configured.trainer, shards64, configured.vectorized)
    torch.manual_seed(0)
    start = {k: v.detach().clone() for k, v in devices.trainer.model.state_dict().items()}
    a, b = Plan(batch_size=16, local_steps=3, lr=0.05), Plan(batch_size=8, local_steps=4, lr=0.02)
    plans = [a, a, b, b, replace(a, lr=0.07)]
    jobs = [TrainJob(k, plan, 100 + k) for k, plan in enumerate(plans)]

    # Execute
    grouped = devices.train(start, jobs)
    one_by_one = LocalDevices(devices.trainer, shards64).train(start, jobs)

    # Assert
    assert grouped.keys() == one_by_one.keys() == set(range(5))
    for k in grouped:
        got, want = decode(grouped[k].update), decode(one_by_one[k].update)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=order_bound(plans[k], momentum=0.0))
    assert why_not_vectorized(build_model("resnet20", (3, 32, 32), 10)) is not None
    assert "dropout" in (why_not_vectorized(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())) or "")
    resnet = config_from_dict({**config.model_dump(), "model": "resnet20"})
    with pytest.raises(ValueError, match="buffers"):
        VectorizedTrainer(build_model("resnet20", (3, 32, 32), 10))
    assert local_devices(resnet, dataset, shards).vectorized is None  # falls back to per-device training
    lenet = config_from_dict({**config.model_dump(), "model": "lenet"})
    assert local_devices(lenet, dataset, shards).vectorized is None  # convolutions: faster per device
    assert slower_vectorized(build_model("lenet", (1, 28, 28), 10)) is not None
    assert slower_vectorized(build_model("mlp", (1, 28, 28), 10)) is None


def test_devices_whose_data_is_smaller_than_the_batch_group_by_their_effective_batch() -> None:
    # Setup: effective batch 20 for all three (20 samples at batch 32, 20 at 20, 57 at 20)
    torch.manual_seed(0)
    model = build_model("mlp-small", (1, 28, 28), 10)
    shards = in_float64(model, _devices(3, sizes=(20, 20, 57)))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
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
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=order_bound(plans[k], momentum=0.0))


def test_a_vectorized_run_matches_the_per_device_run(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {**SMALL, "model": "mlp-small"}
    vectorized = {**raw, "train": {**raw["train"], "vectorize": True}}
    groups: list[int] = []
    step_counts: list[set[int]] = []
    original = VectorizedTrainer.train

    def counted(self: VectorizedTrainer, *args: Any, **kwargs: Any) -> Any:
        groups.append(len(args[1]))
        step_counts.append({plan.local_steps for plan in args[2]})
        return original(self, *args, **kwargs)

    run_experiment(config_from_dict(raw), tmp_path / "loop", progress=False)  # type: ignore[operator]
    monkeypatch.setattr(VectorizedTrainer, "train", counted)
    run_experiment(config_from_dict(vectorized), tmp_path / "vmap", progress=False)  # type: ignore[operator]
    assert groups and max(groups) >= 2  # devices did train stacked (FedAvg: one plan per round)
    assert max(len(counts) for counts in step_counts) >= 2  # AMBLE's plans: different steps in one group
    keys = ("strategy", "round", "device", "batch_size", "local_steps", "lr", "status")
    rows = {name: read_jsonl(tmp_path / name / "devices.jsonl") for name in ("loop", "vmap")}  # type: ignore[operator]
    assert [tuple(r[k] for k in keys) for r in rows["loop"]] == [tuple(r[k] for k in keys) for r in rows["vmap"]]
    metrics = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("loop", "vmap")}  # type: ignore[operator]
    # Not a float tolerance but a count: the two float32 runs' models end about 1e-7 apart (3e-8 to 6e-8
    # measured with AVX-512, AVX2 and no SIMD), which changes a prediction only for a test sample within
    # rounding of a decision boundary; up to 5 of the 1,000 test samples may (0 measured).
    for a, b in zip(metrics["loop"], metrics["vmap"], strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.005)


@pytest.mark.parametrize("vectorize", [False, True])
def test_training_gives_the_same_bits_whatever_threads_the_process_had(vectorize: bool) -> None:
    # Setup: two threads sum a gradient's reduction in another order than one, so unpinned, a run's
    # bits depended on what the process (a test, a benchmark, the CLI) had set before it trained
    config = config_from_dict({**SMALL, "train": {**SMALL["train"], "vectorize": vectorize}})
    dataset, shards = device_shards(config)
    torch.manual_seed(0)
    devices = local_devices(config, dataset, shards)
    start = {k: v.detach().clone() for k, v in devices.trainer.model.state_dict().items()}
    jobs = [TrainJob(k, Plan(batch_size=32, local_steps=2 + k, lr=0.05), 50 + k) for k in range(4)]
    before = torch.get_num_threads()

    # Execute
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            runs.append(({k: t.update for k, t in devices.train(start, jobs).items()}, torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)

    # Assert: the same bytes; the process keeps its own thread count
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert [threads for _, threads in runs] == [1, 2, 1]
