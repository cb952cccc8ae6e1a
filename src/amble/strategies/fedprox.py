"""FedProx (Li et al. 2020): fixed work plus the proximal term ``mu/2 ||w - w_r||^2``; stragglers send
the partial work they finished by ``T_r`` instead of being dropped."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from amble.strategies.base import BaseWork, DeviceState, Plan, Strategy
from amble.strategies.deadline import DeadlineSettings
from amble.strategies.rounds import base_plan, estimate_round


class PartialWorkSettings(DeadlineSettings):
    prox_mu: float = Field(0.01, ge=0)
    """The proximal term ``mu/2 ||w - w_r||^2`` in every device's objective (0: none)."""


def partial_work_plans(base: BaseWork, s: PartialWorkSettings, devices: Sequence[DeviceState]) -> dict[int, Plan]:
    """FedAvg's work with the proximal term, cut at ``T_r`` (until a deadline can be estimated, none)."""
    estimate = estimate_round(
        devices, base, s.deadline_quantile, decay=s.speed_decay, window=s.speed_window, cap_s=s.deadline_s
    )
    if estimate is None:
        return {d.device: base_plan(base, d, prox_mu=s.prox_mu) for d in devices}
    return {
        d.device: base_plan(base, d, prox_mu=s.prox_mu, deadline_s=estimate.deadline_s, at_deadline="stop")
        for d in devices
    }


class FedProx(Strategy):
    """Proximal term ``prox_mu``; devices past ``T_r`` send the partial work they finished."""

    name = "fedprox"
    settings_model = PartialWorkSettings
    settings: PartialWorkSettings

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        return partial_work_plans(self.base, self.settings, devices)
