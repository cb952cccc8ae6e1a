"""FedNova (Wang et al. 2020): normalised aggregation for devices that ran unequal local steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from amble.strategies.base import Aggregator, Contribution, DeviceState, Params, Plan, Report, Strategy
from amble.strategies.fedprox import PartialWorkSettings, partial_work_plans


class FedNovaSettings(PartialWorkSettings):
    prox_mu: float = Field(0.0, ge=0)
    """FedNova's normalisation handles unequal steps; no proximal term unless asked for."""


class FedNovaAggregator(Aggregator):
    """``x_{r+1} = x_r + (sum_k p_k tau_k) * sum_k p_k Delta_k / tau_k`` (plain local SGD).

    Folded as two running sums: ``S = sum n_k Delta_k / tau_k`` and the scalars ``N = sum n_k``,
    ``T = sum n_k tau_k``; then ``x_{r+1} = x_r + (T / N) * S / N``. ``tau_k`` is the report's steps,
    which the parameter server holds to what is plausible before they get here
    (``amble.server.records.reports.hold_steps``): a device cannot raise its weight by under-reporting them.
    """

    name = "fednova"

    def contribution(self, report: Report) -> Contribution:
        steps = max(report.local_steps, 1)
        n = float(report.num_samples)
        return Contribution(weight=n / steps, stats={"num_samples": n, "sample_steps": n * steps})

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        """Computed in float64 and rounded to each parameter's dtype once, at the end."""
        total = stats["num_samples"]
        scale = (stats["sample_steps"] / total) / total
        return {
            name: (value.double() + weighted_sum[name].double() * scale).to(value.dtype)
            if name in weighted_sum
            else value.clone()
            for name, value in global_params.items()
        }


class FedNova(Strategy):
    """FedProx-style partial work (stragglers stop at ``T_r``) with FedNova's normalised aggregation."""

    name = "fednova"
    settings_model = FedNovaSettings
    settings: PartialWorkSettings

    def own_aggregator(self) -> Aggregator:
        return FedNovaAggregator()

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        return partial_work_plans(self.base, self.settings, devices)
