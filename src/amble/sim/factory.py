"""Builds strategies and parameter-server parts from a config (the only place that maps names to classes)."""

from __future__ import annotations

from amble.config import (
    AdaBatchConfig,
    AmbleConfig,
    AnyStrategyConfig,
    DeadlineConfig,
    ExperimentConfig,
    FedNovaConfig,
    FedProxConfig,
    ServerConfig,
)
from amble.server import LocalRuntime, MemoryEventLog, MemoryStore, ParameterServer, PoolSettings, ServerFunctions
from amble.strategies import (
    AGGREGATORS,
    AdaBatch,
    AdaBatchSettings,
    Amble,
    AmbleSettings,
    BaseWork,
    DeadlineFedAvg,
    DeadlineSettings,
    FedAvg,
    FedNova,
    FedProx,
    PartialWorkSettings,
    Strategy,
)


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


def pool_settings(server: ServerConfig) -> PoolSettings:
    return PoolSettings(
        max_instances=server.max_instances,
        keep_alive_s=server.keep_alive_s,
        reuse=server.reuse,
        cold_start_s=server.cold_start_s,
        invocation_s=None if server.invocation_s == "measured" else server.invocation_s,
        max_attempts=server.max_attempts,
    )


def build_embedded_server(strategy: Strategy, server: ServerConfig) -> ParameterServer:
    """The embedded parameter server: in-memory Store and EventLog, in-process Runtime."""
    store = MemoryStore()
    events = MemoryEventLog()
    functions = ServerFunctions(store, strategy)
    runtime = LocalRuntime(store, events, functions.handlers(), pool_settings(server))
    return ParameterServer(store, events, runtime)
