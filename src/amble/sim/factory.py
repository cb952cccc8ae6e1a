"""Builds strategies and parameter-server parts from a config (the only place that maps names to classes)."""

from __future__ import annotations

from amble.config import AmbleConfig, ExperimentConfig, FedAvgConfig, ServerConfig
from amble.server import LocalRuntime, MemoryEventLog, MemoryStore, ParameterServer, PoolSettings, ServerFunctions
from amble.strategies import AGGREGATORS, Amble, AmbleSettings, BaseWork, FedAvg, Strategy


def base_work(config: ExperimentConfig) -> BaseWork:
    return BaseWork(config.train.batch_size, config.train.local_epochs, config.train.lr)


def build_strategy(strategy: FedAvgConfig | AmbleConfig, config: ExperimentConfig) -> Strategy:
    aggregator = AGGREGATORS[strategy.aggregator or config.aggregator]()
    if isinstance(strategy, AmbleConfig):
        settings = AmbleSettings(
            **strategy.model_dump(exclude={"name", "label", "aggregator"}),
        )
        return Amble(base_work(config), settings, aggregator)
    return FedAvg(base_work(config), aggregator)


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
