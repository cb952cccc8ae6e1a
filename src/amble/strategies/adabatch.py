"""AdaBatch / DBS (Ye et al. 2020): batch proportional to measured throughput, fixed epochs, lr unchanged.

The batch rule AMBLE borrows, without AMBLE's other two levers: local steps do not fill the
deadline (every device runs ``E0`` epochs) and the learning rate does not follow the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amble.strategies.base import Aggregator, BaseWork, DeviceState, Plan, Strategy
from amble.strategies.fedavg import FedAvgAggregator
from amble.strategies.rounds import base_plan, estimate_round, round_batch


@dataclass(frozen=True)
class AdaBatchSettings:
    batch_min: int = 16
    batch_max: int = 256
    batch_multiple: int = 8
    speed_decay: float = 0.7
    speed_window: int = 8


class AdaBatch(Strategy):
    name = "adabatch"

    def __init__(self, base: BaseWork, settings: AdaBatchSettings, aggregator: Aggregator | None = None) -> None:
        self.base = base
        self.settings = settings
        self.aggregator = aggregator or FedAvgAggregator()

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        s, base = self.settings, self.base
        plans = {d.device: base_plan(base, d) for d in devices if not d.reports}
        estimate = estimate_round(devices, base, 1.0, decay=s.speed_decay, window=s.speed_window)
        if estimate is None:
            return plans
        for seen in estimate.seen:
            d = seen.state
            raw = base.batch_size * seen.speed.throughput(base.batch_size) / estimate.ref_throughput
            batch = round_batch(raw, d.num_samples, s.batch_multiple, s.batch_min, s.batch_max)
            plans[d.device] = Plan(
                batch_size=batch, local_steps=base.local_epochs * -(-d.num_samples // batch), lr=base.lr
            )
        return plans
