"""SCAFFOLD (Karimireddy et al. 2020): FedAvg's plans, with control variates against client drift.

Every device runs FedAvg's base plan (``E0`` epochs at ``B0`` with ``lr0``) and corrects each
gradient by ``c - c_k``; the server keeps ``c`` and every ``c_k`` (option II, computed server-side
from the usual delta: :mod:`amble.server.functions.controlvariates`) and aggregates like FedAvg, so the model
moves by the sample-weighted mean delta (a global step size of 1; server-side optimizers apply on
top as for any strategy). AMBLE gets the same correction with ``control_variates: true``.
"""

from __future__ import annotations

from collections.abc import Sequence

from amble.strategies.base import DeviceState, Plan, Strategy
from amble.strategies.rounds import base_plan


class Scaffold(Strategy):
    name = "scaffold"

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        return {d.device: base_plan(self.base, d) for d in devices}

    def uses_control_variates(self) -> bool:
        return True
