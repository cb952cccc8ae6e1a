"""Strategies: per-round plans and how updates combine. One algorithm per file."""

from amble.strategies.amble import Amble, AmbleSettings
from amble.strategies.base import (
    Aggregator,
    BaseWork,
    Contribution,
    DeviceState,
    Params,
    Plan,
    Report,
    Strategy,
)
from amble.strategies.fedavg import FedAvg, FedAvgAggregator
from amble.strategies.fednova import FedNovaAggregator
from amble.strategies.speed import SpeedModel, fit_speed

AGGREGATORS: dict[str, type[Aggregator]] = {"fedavg": FedAvgAggregator, "fednova": FedNovaAggregator}

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "Amble",
    "AmbleSettings",
    "BaseWork",
    "Contribution",
    "DeviceState",
    "FedAvg",
    "FedAvgAggregator",
    "FedNovaAggregator",
    "Params",
    "Plan",
    "Report",
    "SpeedModel",
    "Strategy",
    "fit_speed",
]
