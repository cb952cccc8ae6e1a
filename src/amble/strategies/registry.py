"""From a config's strategy entries to strategy objects (the one place that maps names to classes)."""

from __future__ import annotations

from amble.config import (
    AdaBatchConfig,
    AmbleConfig,
    AnyStrategyConfig,
    DeadlineConfig,
    ExperimentConfig,
    FedNovaConfig,
    FedProxConfig,
)
from amble.strategies.adabatch import AdaBatch, AdaBatchSettings
from amble.strategies.amble import Amble, AmbleSettings
from amble.strategies.base import Aggregator, BaseWork, Strategy
from amble.strategies.deadline import DeadlineFedAvg, DeadlineSettings
from amble.strategies.fedavg import FedAvg, FedAvgAggregator
from amble.strategies.fednova import FedNova, FedNovaAggregator
from amble.strategies.fedprox import FedProx, PartialWorkSettings

AGGREGATORS: dict[str, type[Aggregator]] = {"fedavg": FedAvgAggregator, "fednova": FedNovaAggregator}


def base_work(config: ExperimentConfig) -> BaseWork:
    return BaseWork(config.train.batch_size, config.train.local_epochs, config.train.lr)


def build_strategy(strategy: AnyStrategyConfig, config: ExperimentConfig) -> Strategy:
    """The strategy object a config entry names, with the run's base work and aggregator."""
    chosen = strategy.aggregator or config.aggregator  # None: the strategy's own (FedNova's for fednova)
    aggregator = AGGREGATORS[chosen]() if chosen else None
    knobs = strategy.model_dump(exclude={"name", "label", "aggregator"})
    base = base_work(config)
    if isinstance(strategy, AmbleConfig):
        return Amble(base, AmbleSettings(**knobs), aggregator)
    if isinstance(strategy, DeadlineConfig):
        return DeadlineFedAvg(base, DeadlineSettings(**knobs), aggregator)
    if isinstance(strategy, FedProxConfig):
        return FedProx(base, PartialWorkSettings(**knobs), aggregator)
    if isinstance(strategy, FedNovaConfig):
        return FedNova(base, PartialWorkSettings(**knobs), aggregator)
    if isinstance(strategy, AdaBatchConfig):
        return AdaBatch(base, AdaBatchSettings(**knobs), aggregator)
    return FedAvg(base, aggregator)
