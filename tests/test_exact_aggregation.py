"""The published model does not depend on how updates reach the functions.

The same 40 updates (magnitudes from 1e-8 to 1e4, pairs that nearly cancel, non-integer FedNova
weights) are folded in different orders into different shards, with warm and cold instances, as
worker processes and Ray actors would; every run must publish the same bits, and those bits must
be the exact (correctly rounded) weighted sum computed here with ``math.fsum``. A float32 running
sum fails this test: it differs in the last bits from one order to the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch

from amble.server import (
    Invocation,
    LocalRuntime,
    MemoryEventLog,
    MemoryStore,
    ParameterServer,
    PoolSettings,
    RunSettings,
    ServerFunctions,
)
from amble.server.records.partialsum import PRECISION_BITS, FoldRecord, PartialSum
from amble.server.runtime.base import FUNCTIONS_GROUP, FUNCTIONS_TOPIC
from amble.server.tensors import TensorSpec, encode, l2_norm
from amble.strategies import BaseWork, DeviceState, FedAvg, FedNova, Plan, Report, Strategy
from amble.strategies.fedprox import PartialWorkSettings

DEVICES = list(range(40))
SAMPLES = {d: 32 * (1 + (7 * d) % 23) for d in DEVICES}  # 32 to 736 samples: 1 to 23 steps at B0 = 32
SHAPES = {"w": (64, 50), "b": (50,)}


def make_initial() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def make_updates() -> dict[int, dict[str, torch.Tensor]]:
    """Updates of widely different exponents; every odd device nearly cancels its even neighbour's
    weighted update, so the sum is small against its terms (where summation order shows most)."""
    rng = np.random.default_rng(7)
    updates: dict[int, dict[str, torch.Tensor]] = {}
    for d in DEVICES:
        if d % 2 == 0:
            scale = 10.0 ** rng.uniform(-8, 4)
            updates[d] = {n: torch.from_numpy(rng.standard_normal(s) * scale).float() for n, s in SHAPES.items()}
        else:
            ratio = SAMPLES[d - 1] / SAMPLES[d]
            noise = 10.0 ** rng.uniform(-6, 0)
            updates[d] = {
                n: (-updates[d - 1][n].double() * ratio + torch.from_numpy(rng.standard_normal(s) * noise)).float()
                for n, s in SHAPES.items()
            }
    return updates


def steps_of(d: int) -> int:
    """Local steps reported: the plan's (n / 32) for even devices, fewer for odd ones, stopped at their
    deadline (FedNova weights n / steps that are not integers)."""
    planned = SAMPLES[d] // 32
    return planned if d % 2 == 0 else max(1, planned * 2 // 3)


def fedavg() -> Strategy:
    return FedAvg(BaseWork(32, 1, 0.1))


class CutFedNova(FedNova):
    """FedNova whose plans stop at a deadline, so a device may send fewer steps than planned (the
    server holds the steps of a plan without one to the plan's)."""

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        plans = super().plan(round_index, devices)
        return {d: replace(p, deadline_s=10.0, at_deadline="stop") for d, p in plans.items()}


def fednova() -> Strategy:
    return CutFedNova(BaseWork(32, 1, 0.1), PartialWorkSettings())


Order = list[tuple[int, int, bool]]
"""(device, shard, warm): fold the device's update into ``shard``, with that shard's warm cache or a
cold instance (which loads the shard from the Store)."""


def publish(strategy: Callable[[], Strategy], order: Order) -> dict[str, torch.Tensor]:
    """Run one round, folding the uploads in ``order``, and return the published model."""
    store, events = MemoryStore(), MemoryEventLog()
    functions = ServerFunctions(store, strategy())
    runtime = LocalRuntime(store, events, functions.handlers(), PoolSettings(max_instances=1))
    server = ParameterServer(store, events, runtime)
    settings = RunSettings(seed=0, devices_per_round=len(DEVICES), quorum=1.0, max_update_bytes=10**7)
    server.initialize(make_initial(), SAMPLES, settings)
    server.start_round(0, DEVICES, 0.0)
    updates = make_updates()
    for d in DEVICES:
        server.upload(Report(0, d, SAMPLES[d], steps_of(d), 32, 1.0, 0.1, 0.1), encode(updates[d]), 1.0)
    uploaded = {int(e.payload["device"]): e for e in events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, "test", 1000)}
    caches: dict[int, dict[str, object]] = {}
    for d, shard, warm in order:
        cache = caches.setdefault(shard, {}) if warm else {}
        functions.aggregate(uploaded[d], Invocation(shard, not warm, cache, shard=shard))
        events.ack(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, uploaded[d].id)
    outcome = server.close_round(0, 2.0)
    assert (outcome.status, sorted(outcome.counted)) == ("finalized", DEVICES)
    return server.model()


def exact_sums(strategy: Callable[[], Strategy]) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """Each product in float64, their sum correctly rounded (``math.fsum``); the statistics; and
    ``M = sum_k |w_k| * norm_k``, which the fixed-point sums' error bound is relative to."""
    updates, aggregator = make_updates(), strategy().aggregator
    contributions = {
        d: aggregator.contribution(Report(0, d, SAMPLES[d], steps_of(d), 32, 1.0, 0.1, 0.1)) for d in DEVICES
    }
    stats = {k: math.fsum(c.stats[k] for c in contributions.values()) for k in contributions[0].stats}
    sums = {}
    for name in SHAPES:
        products = np.stack([updates[d][name].double().numpy().ravel() * contributions[d].weight for d in DEVICES])
        summed = np.array([math.fsum(column) for column in products.T]).reshape(SHAPES[name])
        sums[name] = torch.from_numpy(summed)
    magnitude = math.fsum(abs(contributions[d].weight) * l2_norm(updates[d]) for d in DEVICES)
    return sums, stats, magnitude


def exact_range(strategy: Callable[[], Strategy]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The models the aggregator makes of the exact sum moved by the fixed-point error bound either
    way (``partialsum``: ``2**(1 - PRECISION_BITS) * (1 + 2**-9) * M``, plus the float64 rounding of the
    total): a published element must lie between them (both are the exact model's rounding unless
    the exact value sits that close to a float32 rounding boundary)."""
    sums, stats, magnitude = exact_sums(strategy)
    aggregator, initial = strategy().aggregator, make_initial()
    bound = 2.0 ** (1 - PRECISION_BITS) * (1 + 2.0**-9) * magnitude
    low = aggregator.apply(initial, {n: t - (bound + t.abs() * 2.0**-52) for n, t in sums.items()}, stats)
    high = aggregator.apply(initial, {n: t + (bound + t.abs() * 2.0**-52) for n, t in sums.items()}, stats)
    return low, high


def orders() -> dict[str, Order]:
    rng = np.random.default_rng(11)
    shuffled = [int(d) for d in rng.permutation(DEVICES)]
    return {
        "upload order, one shard (embedded)": [(d, 0, True) for d in DEVICES],
        "reversed, one shard": [(d, 0, True) for d in reversed(DEVICES)],
        "shuffled over 5 warm shards": [(d, i % 5, True) for i, d in enumerate(shuffled)],
        "shuffled over 3 shards, cold instances": [(d, 1000 + i % 3, False) for i, d in enumerate(reversed(shuffled))],
        "lopsided shards": [(d, 7 if d < 35 else d, True) for d in shuffled],
    }


@pytest.mark.parametrize("strategy", [fedavg, fednova], ids=["fedavg", "fednova"])
def test_every_order_and_shard_assignment_publishes_the_same_bits(strategy: Callable[[], Strategy]) -> None:
    # Prepare
    low, high = exact_range(strategy)

    # Execute
    published = {label: publish(strategy, order) for label, order in orders().items()}

    # Assert: bit for bit against each other, and within the error bound of the exact sum
    first = published["upload order, one shard (embedded)"]
    for label, model in published.items():
        for name in SHAPES:
            assert torch.equal(model[name], first[name]), (label, name)
            assert bool(
                (
                    (torch.minimum(low[name], high[name]) <= model[name])
                    & (model[name] <= torch.maximum(low[name], high[name]))
                ).all()
            ), (label, name)


def test_a_partial_sum_is_exact_where_float64_alone_loses_the_small_term() -> None:
    # Prepare: 2**53 + 1 rounds to 2**53 in float64, so a plain running sum of these is 0 or 1 by order
    template = {"x": TensorSpec((1,), "float32")}
    values = [2.0**53, 1.0, -(2.0**53)]

    # Execute: every order, one term per fold, and one order split across two merged shards
    totals = []
    for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0]):
        sums = PartialSum.zeros(template)
        for i in order:
            assert sums.add(i, {"x": torch.tensor([values[i]], dtype=torch.float64)}, 1.0, FoldRecord(1.0, {}))
        totals.append(float(sums.total()["x"]))
    left, right = PartialSum.zeros(template), PartialSum.zeros(template)
    left.add(0, {"x": torch.tensor([values[0]], dtype=torch.float64)}, 1.0, FoldRecord(1.0, {"n": 0.1}))
    left.add(1, {"x": torch.tensor([values[1]], dtype=torch.float64)}, 1.0, FoldRecord(2.0, {"n": 0.2}))
    right.add(2, {"x": torch.tensor([values[2]], dtype=torch.float64)}, 1.0, FoldRecord(3.0, {"n": 0.3}))
    merged = PartialSum.from_blob(left.to_blob()).merged(PartialSum.from_blob(right.to_blob()))

    # Assert
    assert totals == [1.0, 1.0, 1.0, 1.0]
    assert float(merged.total()["x"]) == 1.0
    assert merged.stats() == {"n": 0.6}  # fsum: 0.1 + 0.2 + 0.3 rounded once (a running sum gives 0.6000000000000001)
    assert merged.norms() == [1.0, 2.0, 3.0]


def test_a_fold_that_would_overflow_float64_reports_it() -> None:
    fine, huge = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3e38, 1.0])}

    # weight 1e300: 2e300 fits in float64, 3e338 does not
    fits = PartialSum.zeros({"x": TensorSpec((2,), "float32")}).add(0, fine, 1e300, FoldRecord(l2_norm(fine), {}))
    overflows = PartialSum.zeros({"x": TensorSpec((2,), "float32")}).add(0, huge, 1e300, FoldRecord(l2_norm(huge), {}))

    assert fits and not overflows


def adversarial_folds(count: int, seed: int) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Updates and weights whose scales spread over 2**40 and whose sum nearly cancels."""
    rng = np.random.default_rng(seed)
    folds = []
    for k in range(count):
        scale = 10.0 ** rng.uniform(-6, 6)
        values = rng.standard_normal(257) * scale
        if k % 2:
            values = -folds[-1][0]["x"].double().numpy() * folds[-1][1] + rng.standard_normal(257) * 1e-3
        folds.append(({"x": torch.from_numpy(values).float()}, float(rng.uniform(1, 500)) if not k % 2 else 1.0))
    return folds


def fold_all(folds: list[tuple[dict[str, torch.Tensor], float]], order: list[int], shards: int) -> PartialSum:
    """Fold ``order`` round-robin into ``shards`` sums, pass each through its encoded bytes, merge them."""
    template = {"x": TensorSpec((257,), "float32")}
    parts = [PartialSum.zeros(template) for _ in range(shards)]
    for i, k in enumerate(order):
        update, weight = folds[k]
        assert parts[i % shards].add(k, update, weight, FoldRecord(l2_norm(update), {"n": 1.0}))
    decoded = [PartialSum.from_blob(p.to_blob()) for p in parts]
    total = decoded[0]
    for part in decoded[1:]:
        total = total.merged(part)
    return total


def test_fixed_point_sums_are_the_same_bits_in_every_order_and_split() -> None:
    # Prepare: 24 folds over 2**40 of scales, cancelling in pairs
    folds = adversarial_folds(24, seed=3)
    rng = np.random.default_rng(5)
    orders = [list(range(24)), list(reversed(range(24)))] + [[int(k) for k in rng.permutation(24)] for _ in range(6)]

    # Execute
    totals = [t.total()["x"] for t in [fold_all(folds, order, shards) for order in orders for shards in (1, 2, 5)]]

    # Assert
    assert all(torch.equal(t, totals[0]) for t in totals)


def test_fixed_point_error_is_within_the_derived_bound() -> None:
    folds = adversarial_folds(24, seed=4)
    sums = fold_all(folds, list(range(24)), 3)

    exact = np.array([math.fsum(u["x"].double()[i].item() * w for u, w in folds) for i in range(257)])
    largest = math.fsum(abs(w) * float(u["x"].abs().max()) for u, w in folds)
    bound = 2.0 ** (1 - PRECISION_BITS) * (1 + 2.0**-11) * largest + np.abs(exact) * 2.0**-52
    error = np.abs(sums.total()["x"].numpy() - exact)

    assert (error <= bound).all()
    assert len(sums.blocks) > 1  # the spread put the folds in several blocks: their combination is covered


def test_a_fold_that_would_overflow_a_block_or_need_one_block_too_many_is_refused() -> None:
    template = {"x": TensorSpec((3,), "float32")}
    one = {"x": torch.tensor([1.0, -1.0, 0.5])}

    # about 2**21 folds of one scale fill a block: its bound passes 2**62 (each adds 2**41 + 3)
    full = PartialSum.zeros(template)
    assert full.add(0, one, 1.0, FoldRecord(l2_norm(one), {}))
    block = next(iter(full.blocks.values()))
    full.blocks = {key: replace(block, bound=2**62 - 2**40) for key in full.blocks}  # as after ~2**20 folds
    refused_by_bound = not full.add(1, one, 1.0, FoldRecord(l2_norm(one), {}))
    # scales 2**20 apart need a block each: a fifth is refused
    spread = PartialSum.zeros(template)
    accepted = [spread.add(k, one, 2.0 ** (20 * k), FoldRecord(l2_norm(one), {})) for k in range(5)]
    # a NaN is never folded
    nan = PartialSum.zeros(template).add(0, {"x": torch.tensor([1.0, math.nan, 0.0])}, 1.0, FoldRecord(1.0, {}))

    assert refused_by_bound
    assert accepted == [True, True, True, True, False]
    assert not nan


def test_shards_that_overflow_together_total_nan_and_a_store_value_is_the_blob() -> None:
    template = {"x": TensorSpec((3,), "float32")}
    one = {"x": torch.tensor([1.0, -1.0, 0.5])}
    left, right = PartialSum.zeros(template), PartialSum.zeros(template)
    left.add(0, one, 3.0, FoldRecord(l2_norm(one), {}))
    right.add(1, one, 5.0, FoldRecord(l2_norm(one), {}))

    big = replace(next(iter(left.blocks.values())), bound=2**62 - 2)
    left_big = PartialSum(left.template, {k: big for k in left.blocks}, dict(left.folds))
    value = right.to_value()

    assert torch.isnan(left_big.merged(right).total()["x"]).all()
    assert torch.equal(PartialSum.from_value(value).total()["x"], PartialSum.from_blob(bytes(value)).total()["x"])
    assert torch.equal(left.merged(right).total()["x"], torch.tensor([8.0, -8.0, 4.0], dtype=torch.float64))
