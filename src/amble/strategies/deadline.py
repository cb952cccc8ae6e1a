"""Deadline-FedAvg: FedAvg's fixed work, but the round closes at ``T_r`` and late devices are dropped.

The common straggler fix the thesis argues against: it bounds the round time by wasting the
stragglers' work (and biasing the model towards the fast devices' data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amble.strategies.base import Aggregator, BaseWork, DeviceState, Plan, Strategy
from amble.strategies.fedavg import FedAvgAggregator
from amble.strategies.rounds import base_plan, estimate_round


@dataclass(frozen=True)
class DeadlineSettings:
    deadline_quantile: float = 0.8
    deadline_s: float | None = None
    speed_decay: float = 0.7
    speed_window: int = 8


class DeadlineFedAvg(Strategy):
    name = "deadline"

    def __init__(self, base: BaseWork, settings: DeadlineSettings, aggregator: Aggregator | None = None) -> None:
        self.base = base
        self.settings = settings
        self.aggregator = aggregator or FedAvgAggregator()

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        s = self.settings
        estimate = estimate_round(
            devices, self.base, s.deadline_quantile, decay=s.speed_decay, window=s.speed_window, cap_s=s.deadline_s
        )
        if estimate is None:  # nobody measured yet: FedAvg, waiting for everyone
            return {d.device: base_plan(self.base, d) for d in devices}
        return {d.device: base_plan(self.base, d, deadline_s=estimate.deadline_s, at_deadline="drop") for d in devices}
