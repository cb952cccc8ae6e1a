"""Deadline-FedAvg: FedAvg's fixed work, but the round closes at ``T_r`` and late devices are dropped.

The common straggler fix the thesis argues against: it bounds the round time by wasting the
stragglers' work (and biasing the model towards the fast devices' data).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from amble.strategies.base import DeviceState, Plan, Strategy
from amble.strategies.rounds import SpeedSettings, base_plan, estimate_round


class DeadlineSettings(SpeedSettings):
    deadline_quantile: float = Field(0.8, gt=0, le=1)
    """``T_r`` is this quantile of the selected devices' predicted FedAvg times."""
    deadline_s: float | None = Field(None, gt=0)
    """An absolute cap on ``T_r`` in seconds (None: none)."""


class DeadlineFedAvg(Strategy):
    """FedAvg that drops the devices not done by ``T_r``."""

    name = "deadline"
    settings_model = DeadlineSettings
    settings: DeadlineSettings

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        s = self.settings
        estimate = estimate_round(
            devices, self.base, s.deadline_quantile, decay=s.speed_decay, window=s.speed_window, cap_s=s.deadline_s
        )
        if estimate is None:  # nobody measured yet: FedAvg, waiting for everyone
            return {d.device: base_plan(self.base, d) for d in devices}
        return {d.device: base_plan(self.base, d, deadline_s=estimate.deadline_s, at_deadline="drop") for d in devices}
