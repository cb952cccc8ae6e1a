"""FedAvg (McMahan et al. 2017): fixed local work, updates averaged by sample count."""

from __future__ import annotations

from collections.abc import Sequence

from amble.strategies.base import DeviceState, FedAvgAggregator, Plan, Strategy
from amble.strategies.rounds import base_plan

__all__ = ["FedAvg", "FedAvgAggregator"]


class FedAvg(Strategy):
    """Every device runs ``E0`` epochs at ``B0`` with ``lr0``; the round waits for the slowest."""

    name = "fedavg"

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        return {d.device: base_plan(self.base, d) for d in devices}
