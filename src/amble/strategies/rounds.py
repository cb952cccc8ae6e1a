"""What speed-aware strategies estimate about a round, from the devices' own reports only.

Shared by AMBLE and the baselines that need a deadline or relative speeds (deadline-FedAvg,
FedProx and FedNova with partial work, AdaBatch), so they all see the same ``T_r`` for the same
reports and a comparison between them is about the rule, not the estimate.

One device cannot steer the others: a device's predicted FedAvg time enters ``T_r`` clipped to within
:data:`FEDAVG_TIME_SPREAD` of the median of the round's other seen devices' times, and its throughput
enters ``v_ref`` clipped to within :data:`THROUGHPUT_SPREAD` of the others' median. So whatever one
device reports, ``T_r`` is at most ``max(the others' largest time, 32 x the others' median)`` (and at
least ``1/32`` of that median), and ``v_ref`` likewise with 128: another device's plan moves no
further than that (its own estimate is its own). The factors sit well above the spread of honest
fleets, so honest plans are unchanged: on the benchmarks' fleets (tiers 1x/3x/10x, lognormal sigma
0.92 and 1.0, uniform 1-10x; iid, shards and Dirichlet 0.1/0.5 partitions of 60,000 samples over 100
devices; 10 seeds x 100 rounds of 10) the largest ratio of a device's FedAvg time to the others'
median was 13.5 and of its throughput 48.9. A legitimate device beyond 32x (a trace fleet, say) is
planned as a straggler of a round of 32x the median: at q = 1 it does fewer steps, as with q < 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from amble.strategies.base import BaseWork, DeviceState, Plan, StrategySettings
from amble.strategies.speed import SpeedModel, fit_speed

FEDAVG_TIME_SPREAD = 32.0
"""How far a device's FedAvg time may sit from the others' median where it sets ``T_r``."""
THROUGHPUT_SPREAD = 128.0
"""How far a device's throughput may sit from the others' median where it sets ``v_ref``."""


class SpeedSettings(StrategySettings):
    """How a speed-aware strategy fits each device's speed from its reports (:func:`fit_speed`)."""

    speed_decay: float = Field(0.7, gt=0, le=1)
    """Weight of a report one round older than the next (exponential forgetting)."""
    speed_window: int = Field(8, ge=1)
    """Reports per device the fit uses, newest first."""


def quantile_index(values: Sequence[float], q: float) -> int:
    """Index of the q-quantile element (inverted CDF: always an actual element; q=1 is the max)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    rank = max(math.ceil(q * len(values)) - 1, 0)
    return order[rank]


def clip_to_others(values: Sequence[float], spread: float) -> list[float]:
    """Each value clipped to ``[m / spread, m * spread]``, ``m`` the median of the *other* values.

    Leave-one-out, so nothing a device reports moves its own bounds. With a single value there is
    nothing to compare with and it is returned as is. ``O(n log n)``: one sort, then each
    leave-one-out median is read off the sorted values.
    """
    if len(values) < 2:
        return list(values)
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranked = [values[i] for i in order]
    others = len(values) - 1

    def without(rank: int, k: int) -> float:  # the k-th smallest value once ``rank`` is taken out
        return ranked[k if k < rank else k + 1]

    clipped = list(values)
    for rank, i in enumerate(order):
        if others % 2:
            median = without(rank, others // 2)
        else:
            median = (without(rank, others // 2 - 1) + without(rank, others // 2)) / 2
        clipped[i] = min(max(values[i], median / spread), median * spread)
    return clipped


def base_plan(base: BaseWork, device: DeviceState, **extra: object) -> Plan:
    """FedAvg's work for one device: ``E0`` epochs at ``B0`` (a batch never exceeds the data) with ``lr0``."""
    return Plan(
        batch_size=min(base.batch_size, device.num_samples),
        local_steps=base.steps_for(device.num_samples),
        lr=base.lr,
        **extra,  # type: ignore[arg-type]
    )


def round_batch(raw: float, num_samples: int, multiple: int, lowest: int, highest: int) -> int:
    """``raw`` rounded to a multiple, clipped to ``[lowest, highest]`` and to the device's data."""
    rounded = max(multiple, round(raw / multiple) * multiple)
    return min(max(rounded, lowest), highest, num_samples)


def steps_within(budget_s: float, speed: SpeedModel, batch_size: int) -> int:
    """Whole local steps at ``batch_size`` that fit in ``budget_s`` after communication."""
    return math.floor((budget_s - speed.comm_s) / speed.step_s(batch_size) + 1e-9)  # 1e-9: 3.0/0.3 = 9.999...


@dataclass(frozen=True)
class SeenDevice:
    state: DeviceState
    speed: SpeedModel
    fedavg_s: float
    """Predicted seconds for FedAvg's work: ``c_k + E0 ceil(n_k / B0) t_k(B0)``."""


@dataclass(frozen=True)
class RoundEstimate:
    seen: tuple[SeenDevice, ...]
    """The selected devices that have reports."""
    deadline_s: float
    """``T_r``: the q-quantile of the seen devices' FedAvg times (each clipped to within
    :data:`FEDAVG_TIME_SPREAD` of the others' median), capped by ``deadline_s`` if given."""
    ref_throughput: float
    """The q-quantile compute throughput at ``B0`` (each clipped to within :data:`THROUGHPUT_SPREAD` of
    the others' median), counted from the fastest (the slowest when q = 1)."""
    unseen: tuple[SeenDevice, ...] = ()
    """With a prior (:func:`estimate_round`'s ``peers``): the selected devices without reports, each at
    the prior speed, counted in ``T_r`` and ``v_ref`` like the seen ones. Empty without a prior (they
    are in their profiling round and ``T_r`` is over the seen devices only)."""


def prior_speed(population: Sequence[SpeedModel]) -> SpeedModel:
    """What a device not yet seen is assumed to be: the median intercept, per-sample time and
    communication time of the devices that have been seen (each median on its own, so one device's
    reports move it no further than the middle of the others')."""
    return SpeedModel(
        statistics.median(m.step_intercept_s for m in population),
        statistics.median(m.step_per_sample_s for m in population),
        statistics.median(m.comm_s for m in population),
    )


def estimate_round(
    devices: Sequence[DeviceState],
    base: BaseWork,
    quantile: float,
    *,
    decay: float = 0.7,
    window: int = 8,
    cap_s: float | None = None,
    peers: Sequence[DeviceState] | None = None,
) -> RoundEstimate | None:
    """Speeds, ``T_r`` and ``v_ref`` for the selected ``devices``; None when nothing is known.

    Without ``peers`` (None) only the devices with reports count: None when none has any. With
    ``peers`` (devices seen in recent rounds but not selected now, possibly empty), a device without
    reports gets :func:`prior_speed` of every seen device here (selected and peers) and counts in
    ``T_r`` and ``v_ref`` at that speed: an unseen straggler is no longer left out of the round's
    estimate. None only when no device here has reports.
    """
    seen = [d for d in devices if d.reports]
    speeds = [fit_speed(d.reports, decay, window) for d in seen]
    prior: SpeedModel | None = None
    if peers is not None and len(seen) < len(devices):
        population = speeds + [fit_speed(p.reports, decay, window) for p in peers if p.reports]
        prior = prior_speed(population) if population else None
    unseen = [d for d in devices if not d.reports] if prior is not None else []
    if not seen and not unseen:
        return None
    planned = seen + unseen
    models = speeds + ([prior] * len(unseen) if prior is not None else [])
    fedavg_s = [
        m.comm_s + base.steps_for(d.num_samples) * m.step_s(base.batch_size)
        for d, m in zip(planned, models, strict=True)
    ]
    bounded_s = clip_to_others(fedavg_s, FEDAVG_TIME_SPREAD)
    deadline_s = bounded_s[quantile_index(bounded_s, quantile)]
    if cap_s is not None:
        deadline_s = min(deadline_s, cap_s)
    # Not the deadline device's own throughput: a straggler slowed by its link must not shrink
    # everyone's batch below B0.
    slowness = [-v for v in clip_to_others([m.throughput(base.batch_size) for m in models], THROUGHPUT_SPREAD)]
    ref_throughput = -slowness[quantile_index(slowness, quantile)]
    entries = [SeenDevice(d, m, t) for d, m, t in zip(planned, models, fedavg_s, strict=True)]
    return RoundEstimate(tuple(entries[: len(seen)]), deadline_s, ref_throughput, tuple(entries[len(seen) :]))
