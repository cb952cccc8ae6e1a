"""Strategies: per-round plans and how updates combine. One algorithm per file."""

from amble.strategies.adabatch import AdaBatch, AdaBatchSettings
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
    StrategySettings,
)
from amble.strategies.deadline import DeadlineFedAvg, DeadlineSettings
from amble.strategies.fedavg import FedAvg, FedAvgAggregator
from amble.strategies.fednova import FedNova, FedNovaAggregator, FedNovaSettings
from amble.strategies.fedprox import FedProx, PartialWorkSettings
from amble.strategies.registry import AGGREGATORS, STRATEGIES, base_work, build_strategy
from amble.strategies.speed import SpeedModel, fit_speed

__all__ = [
    "AGGREGATORS",
    "STRATEGIES",
    "AdaBatch",
    "AdaBatchSettings",
    "Aggregator",
    "Amble",
    "AmbleSettings",
    "BaseWork",
    "Contribution",
    "DeadlineFedAvg",
    "DeadlineSettings",
    "DeviceState",
    "FedAvg",
    "FedAvgAggregator",
    "FedNova",
    "FedNovaAggregator",
    "FedNovaSettings",
    "FedProx",
    "Params",
    "PartialWorkSettings",
    "Plan",
    "Report",
    "SpeedModel",
    "Strategy",
    "StrategySettings",
    "base_work",
    "build_strategy",
    "fit_speed",
]
