"""A strategy and an aggregator of a user's own, named in configs by import path (``tests.user_strategies:...``).

Written as a user would, against the public API only: ``amble.strategies``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from amble.strategies import DeviceState, FedAvgAggregator, Params, Plan, Strategy, StrategySettings


class ParitySettings(StrategySettings):
    steps: int = Field(2, ge=1)
    """Local steps in round 0; one more every round."""
    lr_factor: float = Field(1.0, gt=0)
    """Every device's learning rate is ``lr_factor * lr0``."""


class ParityPlans(Strategy):
    """Plans anyone can compute by hand: batch 8 on even devices, 16 on odd ones; ``steps + round``
    local steps; ``lr_factor * lr0``."""

    settings_model = ParitySettings
    settings: ParitySettings

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        s = self.settings
        return {
            d.device: Plan(
                batch_size=8 if d.device % 2 == 0 else 16,
                local_steps=s.steps + round_index,
                lr=s.lr_factor * self.base.lr,
            )
            for d in devices
        }


class HalfStep(FedAvgAggregator):
    """FedAvg's mean update, applied at half length: ``x + 0.5 * sum_k p_k Delta_k``."""

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        total = stats["num_samples"]
        return {
            name: (value.double() + 0.5 * weighted_sum[name].double() / total).to(value.dtype)
            if name in weighted_sum
            else value.clone()
            for name, value in global_params.items()
        }


NOT_A_CLASS = 3
