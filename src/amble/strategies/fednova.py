"""FedNova's normalised aggregation (Wang et al. 2020) for devices that ran unequal local steps."""

from __future__ import annotations

from collections.abc import Mapping

from amble.strategies.base import Aggregator, Contribution, Params, Report


class FedNovaAggregator(Aggregator):
    """``x_{r+1} = x_r + (sum_k p_k tau_k) * sum_k p_k Delta_k / tau_k`` (plain local SGD).

    Folded as two running sums: ``S = sum n_k Delta_k / tau_k`` and the scalars ``N = sum n_k``,
    ``T = sum n_k tau_k``; then ``x_{r+1} = x_r + (T / N) * S / N``.
    """

    name = "fednova"

    def contribution(self, report: Report) -> Contribution:
        steps = max(report.local_steps, 1)
        n = float(report.num_samples)
        return Contribution(weight=n / steps, stats={"num_samples": n, "sample_steps": n * steps})

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        total = stats["num_samples"]
        effective_steps = stats["sample_steps"] / total
        return {
            name: value + (weighted_sum[name] * (effective_steps / total)).to(value.dtype)
            if name in weighted_sum
            else value.clone()
            for name, value in global_params.items()
        }
