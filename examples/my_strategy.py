"""A strategy of one's own: FedAvg, except that devices faster than the round's median run more epochs.

Run:  PYTHONPATH=examples amble run examples/my_strategy.yaml   (the config names it my_strategy:FastDoMore)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from pydantic import Field

from amble.strategies import DeviceState, Plan, Strategy, StrategySettings


class FastDoMoreSettings(StrategySettings):
    """The keys this strategy's config entry takes, checked when the config loads."""

    fast_epochs: int = Field(2, ge=1)
    """Epochs for a device whose last step was faster than the median of the round's devices."""


class FastDoMore(Strategy):
    settings_model = FastDoMoreSettings
    settings: FastDoMoreSettings

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        base = self.base  # the config's train section: batch_size B0, local_epochs E0, lr lr0
        step_s = {d.device: max(d.reports, key=lambda r: r.round).step_s for d in devices if d.reports}
        median_s = statistics.median(step_s.values()) if step_s else 0.0
        plans = {}
        for d in devices:
            fast = d.device in step_s and step_s[d.device] < median_s
            epochs = self.settings.fast_epochs if fast else base.local_epochs
            batch = min(base.batch_size, d.num_samples)
            plans[d.device] = Plan(batch_size=batch, local_steps=epochs * -(-d.num_samples // batch), lr=base.lr)
        return plans
