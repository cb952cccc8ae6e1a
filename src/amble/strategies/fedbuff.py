"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation, with no round barrier.

``concurrency`` devices train at once, each from the latest model when it starts; every upload is
folded into the open buffer with a staleness weight, and every ``buffer_size`` (K) counted updates
the server publishes the next model:

    x_{v+1} = x_v + server_lr * sum_i s(tau_i) n_i delta_i / sum_i n_i,    s(tau) = 1 / sqrt(1 + tau)

with ``tau_i = v - (the version device i trained from)`` and ``n_i`` its sample count. This is the
paper's ``(1/K) sum_i s(tau_i) delta_i`` with FedAvg's sample weights in place of ``1/K`` (the two
agree when devices hold equal data). The staleness weight is *not* renormalised: dividing by
``sum s(tau_i) n_i`` would cancel it whenever a buffer's updates are about equally stale, which with
``concurrency ~ 2K`` is the usual case, and the paper's damping of stale work would be lost.

Defaults, chosen once from the paper (not tuned per benchmark cell): ``server_lr`` 1.0 (the paper's
``eta_g`` for its vision tasks); ``buffer_size`` ``ceil(concurrency / 2)``: the paper runs K = 10 at
concurrency 1000, which here (concurrency ~ 10) would make every publish wait for all but none of
the devices in flight; half of the devices in flight per publish keeps the mean staleness near one
version (each task spans about ``concurrency / K`` publishes) while still averaging several devices'
updates per step, which non-IID data needs. ``max_staleness`` 20: ``s(20) = 0.22``, past which an
update adds little; it bounds the models the store keeps (one per version a task may still train
from) and admits the default fleet's 10x tier, whose tasks span about ``2 x 10`` publishes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

from pydantic import Field

from amble.errors import ConfigError
from amble.strategies.base import (
    Aggregator,
    BaseWork,
    Contribution,
    DeviceState,
    Params,
    Plan,
    Report,
    Strategy,
    StrategySettings,
)
from amble.strategies.fedavg import FedAvgAggregator
from amble.strategies.rounds import base_plan


def staleness_weight(staleness: int) -> float:
    """The paper's polynomial staleness weight ``1 / sqrt(1 + tau)``."""
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuffSettings(StrategySettings):
    """FedBuff's keys in a ``strategies`` entry."""

    buffer_size: int | None = Field(None, ge=1)
    """K: counted updates per published model; None: ``ceil(concurrency / 2)``."""
    concurrency: int | None = Field(None, ge=1)
    """Devices training at once; None: the config's ``devices_per_round``."""
    server_lr: float = Field(1.0, gt=0)
    """Server learning rate ``eta_g`` applied to the buffer's weighted mean update."""
    max_staleness: int = Field(20, ge=0)
    """An update trained from a model more than this many versions older than the one its buffer
    builds on is refused (reason ``too_stale``) and changes nothing."""

    def concurrency_for(self, devices_per_round: int) -> int:
        return self.concurrency if self.concurrency is not None else devices_per_round

    def buffer_size_for(self, devices_per_round: int) -> int:
        if self.buffer_size is not None:
            return self.buffer_size
        return max(1, math.ceil(self.concurrency_for(devices_per_round) / 2))


class FedBuffAggregator(Aggregator):
    """``x + server_lr * sum s(tau) n delta / sum n``; the staleness comes from the buffered fold."""

    name = "fedbuff"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def contribution(self, report: Report) -> Contribution:
        return self.stale_contribution(report, 0)

    def stale_contribution(self, report: Report, staleness: int) -> Contribution:
        """Weight ``s(tau) * n``; the statistic is the plain sample count (the weight is not renormalised)."""
        samples = float(report.num_samples)
        return Contribution(weight=staleness_weight(staleness) * samples, stats={"num_samples": samples})

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        """Computed in float64 and rounded to each parameter's dtype once, at the end."""
        scale = self.server_lr / stats["num_samples"]
        return {
            name: (value.double() + weighted_sum[name].double() * scale).to(value.dtype)
            if name in weighted_sum
            else value.clone()
            for name, value in global_params.items()
        }


class FedBuff(Strategy):
    """Every task is FedAvg's base plan (``E0`` epochs at ``B0``, ``lr0``); no round waits for anyone."""

    name = "fedbuff"
    asynchronous: ClassVar[bool] = True
    """Run by the buffered functions (:mod:`amble.server.functions.buffered`) and the simulator's asynchronous
    clock (:mod:`amble.sim.asyncdriver`), not by rounds."""
    settings_model = FedBuffSettings
    settings: FedBuffSettings

    def __init__(
        self, base: BaseWork, settings: StrategySettings | None = None, aggregator: Aggregator | None = None
    ) -> None:
        if type(aggregator) is FedAvgAggregator:  # FedAvg's sample weights are FedBuff's own (with staleness)
            aggregator = None
        if aggregator is not None and not isinstance(aggregator, FedBuffAggregator):
            raise ConfigError(
                f"strategy fedbuff folds updates with its own staleness-weighted aggregator, not "
                f"'{aggregator.name}' (it weights by sample count as fedavg does): remove 'aggregator' from its "
                "entry, or set it (and the config's top-level one) to fedavg"
            )
        super().__init__(base, settings, aggregator)

    def own_aggregator(self) -> Aggregator:
        return FedBuffAggregator(self.settings.server_lr)

    @property
    def buffer_aggregator(self) -> FedBuffAggregator:
        aggregator = self.aggregator
        if not isinstance(aggregator, FedBuffAggregator):  # __init__ refuses any other; a later assignment
            raise ConfigError("strategy fedbuff needs its own FedBuffAggregator; do not replace its aggregator")
        return aggregator

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        return {d.device: base_plan(self.base, d) for d in devices}


def is_asynchronous(strategy: Strategy | type[Strategy]) -> bool:
    """Whether a strategy runs without rounds (buffered aggregation)."""
    return bool(getattr(strategy, "asynchronous", False))
