"""AdaBatch / DBS (Ye et al. 2020): batch proportional to measured throughput, fixed epochs, lr unchanged.

The batch rule AMBLE borrows, without AMBLE's other two levers: local steps do not fill the
deadline (every device runs ``E0`` epochs) and the learning rate does not follow the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from amble.strategies.base import DeviceState, Plan, Strategy
from amble.strategies.rounds import SpeedSettings, base_plan, estimate_round, round_batch


class AdaBatchSettings(SpeedSettings):
    batch_min: int = Field(16, ge=1)
    batch_max: int = Field(256, ge=1)
    batch_multiple: int = Field(8, ge=1)


class AdaBatch(Strategy):
    name = "adabatch"
    settings_model = AdaBatchSettings
    settings: AdaBatchSettings

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
