"""FedAvg (McMahan et al. 2017): fixed local work, updates averaged by sample count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from amble.strategies.base import Aggregator, Contribution, DeviceState, Params, Plan, Report, Strategy
from amble.strategies.rounds import base_plan


class FedAvgAggregator(Aggregator):
    """``x_{r+1} = x_r + sum_k p_k Delta_k`` with ``p_k = n_k / sum n``."""

    name = "fedavg"

    def contribution(self, report: Report) -> Contribution:
        return Contribution(weight=float(report.num_samples), stats={"num_samples": float(report.num_samples)})

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        """Computed in float64 and rounded to each parameter's dtype once, at the end."""
        total = stats["num_samples"]
        return {
            name: (value.double() + weighted_sum[name].double() / total).to(value.dtype)
            if name in weighted_sum
            else value.clone()
            for name, value in global_params.items()
        }


class FedAvg(Strategy):
    """Every device runs ``E0`` epochs at ``B0`` with ``lr0``; the round waits for the slowest."""

    name = "fedavg"

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        return {d.device: base_plan(self.base, d) for d in devices}
