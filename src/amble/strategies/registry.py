"""Names to strategy and aggregator classes: the built-in ones, or the user's own by import path.

The one place a config's ``name`` or ``aggregator`` becomes a class; the config builds its
``strategies`` entries from here, and every path that runs a strategy (simulator, ``amble serve``,
``amble worker`` processes, Ray) builds it with :func:`build_strategy`.

A strategy of the user's own is named ``"package.module:Class"``. It is imported from what is
installed on (or on the ``PYTHONPATH`` of) the machine that reads the config: the operator's config
is local, and nothing here imports code because a remote party named it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol, cast

from amble.errors import ConfigError
from amble.imports import import_module_of, is_import_path
from amble.strategies.adabatch import AdaBatch
from amble.strategies.amble import Amble
from amble.strategies.base import Aggregator, BaseWork, Strategy, StrategySettings
from amble.strategies.deadline import DeadlineFedAvg
from amble.strategies.fedavg import FedAvg, FedAvgAggregator
from amble.strategies.fedbuff import FedBuff
from amble.strategies.fednova import FedNova, FedNovaAggregator
from amble.strategies.fedopt import FedAdam, FedAvgM
from amble.strategies.fedprox import FedProx
from amble.strategies.scaffold import Scaffold
from amble.strategies.serveropt import ServerOptimizerSettings


class StrategyEntry(Protocol):
    """What :func:`build_strategy` reads of a config's strategy entry (``amble.config.StrategyEntry``:
    declared here by shape, since the config builds its entries from this module)."""

    @property
    def name(self) -> str: ...
    @property
    def aggregator(self) -> str | None: ...
    @property
    def server_optimizer(self) -> ServerOptimizerSettings | None: ...
    def settings(self) -> StrategySettings: ...


class _Train(Protocol):
    @property
    def batch_size(self) -> int: ...
    @property
    def local_epochs(self) -> int: ...
    @property
    def lr(self) -> float: ...


class ExperimentConfig(Protocol):
    """What :func:`build_strategy` reads of a run's config (``amble.config.ExperimentConfig``)."""

    @property
    def train(self) -> _Train: ...
    @property
    def aggregator(self) -> str | None: ...


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (FedAvg, Amble, DeadlineFedAvg, FedProx, FedNova, AdaBatch, Scaffold, FedAvgM, FedAdam, FedBuff)
}
"""The built-in strategies by name; each declares its settings once, as its ``settings_model``."""
AGGREGATORS: dict[str, type[Aggregator]] = {a.name: a for a in (FedAvgAggregator, FedNovaAggregator)}
"""The built-in aggregators by name."""

ENTRY_KEYS = ("name", "label", "aggregator", "server_optimizer")
"""The keys every strategy entry takes besides its settings (so no settings model may declare them)."""


def import_class(path: str, kind: type[object], what: str) -> type[object]:
    """The class ``path`` (``package.module:Class``) names, checked to be a concrete subclass of ``kind``."""
    module, attribute = import_module_of(path, what, "Class")
    module_name = module.__name__
    found = getattr(module, attribute, None)
    if found is None:
        offered = sorted(
            name
            for name, value in vars(module).items()
            if inspect.isclass(value) and issubclass(value, kind) and not inspect.isabstract(value)
        )
        hint = f" (it has: {', '.join(offered)})" if offered else ""
        raise ConfigError(f"{what} '{path}': module '{module_name}' has no attribute '{attribute}'{hint}")
    if not (inspect.isclass(found) and issubclass(found, kind)):
        raise ConfigError(
            f"{what} '{path}' is {_describe(found)}, not a subclass of amble.strategies.{kind.__name__}: "
            f"subclass {kind.__name__} (see the README, 'Writing a strategy')"
        )
    if inspect.isabstract(found):
        missing = ", ".join(sorted(getattr(found, "__abstractmethods__", ())))
        raise ConfigError(f"{what} '{path}' does not implement {missing}: define it in {attribute}")
    return found


def _describe(value: object) -> str:
    if inspect.isclass(value):
        return f"the class {value.__name__}"
    if callable(value):
        return f"the callable {getattr(value, '__name__', repr(value))}"
    return f"a {type(value).__name__}"


def _named_class(name: str, built_in: Mapping[str, type[Any]], kind: type[Any], what: str) -> type[Any]:
    """The built-in class ``name`` names, or a user's ``package.module:Class`` (a subclass of ``kind``)."""
    if name in built_in:
        return built_in[name]
    if not is_import_path(name):
        raise ConfigError(
            f"unknown {what} '{name}': use one of {', '.join(sorted(built_in))}, or an import path "
            f"'package.module:Class' to your own subclass of {kind.__name__}"
        )
    return import_class(name, kind, what)


def strategy_class(name: str) -> type[Strategy]:
    """The strategy ``name`` names: a built-in, or a user's ``package.module:Class``."""
    found = cast(type[Strategy], _named_class(name, STRATEGIES, Strategy, "strategy"))
    if name in STRATEGIES:
        return found
    settings = getattr(found, "settings_model", None)
    if not (inspect.isclass(settings) and issubclass(settings, StrategySettings)):
        raise ConfigError(
            f"strategy '{name}': its settings_model must be a subclass of amble.strategies.StrategySettings, "
            f"got {_describe(settings)}"
        )
    clashes = sorted(set(ENTRY_KEYS) & set(settings.model_fields))
    if clashes:
        raise ConfigError(
            f"strategy '{name}': its settings {settings.__name__} declare {', '.join(clashes)}, which every "
            f"strategy entry uses already; rename them"
        )
    return found


def aggregator_class(name: str) -> type[Aggregator]:
    """The aggregator ``name`` names: a built-in, or a user's ``package.module:Class``."""
    return cast(type[Aggregator], _named_class(name, AGGREGATORS, Aggregator, "aggregator"))


def base_work(config: ExperimentConfig) -> BaseWork:
    return BaseWork(config.train.batch_size, config.train.local_epochs, config.train.lr)


def build_strategy(strategy: StrategyEntry, config: ExperimentConfig) -> Strategy:
    """The strategy object a config entry names, with the run's base work and aggregator."""
    chosen = strategy.aggregator or config.aggregator  # None: the strategy's own (FedNova's for fednova)
    aggregator = None
    if chosen:
        try:
            aggregator = aggregator_class(chosen)()
        except TypeError as exc:
            raise ConfigError(
                f"aggregator '{chosen}' cannot be built without arguments ({exc}); give its __init__ defaults"
            ) from None
    built = strategy_class(strategy.name)(base_work(config), strategy.settings(), aggregator)
    built.server_optimizer = server_optimizer_of(strategy)
    return built


def server_optimizer_of(strategy: StrategyEntry) -> ServerOptimizerSettings:
    """The entry's ``server_optimizer`` over its strategy's own (``none`` but for fedavgm and fedadam)."""
    own = strategy_class(strategy.name).server_optimizer
    return own if strategy.server_optimizer is None else strategy.server_optimizer.over(own)
