"""What every strategy is: plans for a round, and how updates combine into the next model.

Strategies are close to pure: they read reports and return new values. They know nothing of the
parameter server; the server knows them only through :class:`Strategy` and :class:`Aggregator`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from amble.strategies.serveropt import NO_SERVER_OPTIMIZER, ServerOptimizerSettings

if TYPE_CHECKING:  # at run time only a name: importing the strategies (and the config) needs no torch
    import torch


@dataclass(frozen=True)
class BaseWork:
    """The base hyper-parameters ``(B0, E0, lr0)``: what FedAvg does and AMBLE scales from."""

    batch_size: int
    local_epochs: int
    lr: float

    def steps_for(self, num_samples: int) -> int:
        """Local steps of ``E0`` epochs at ``B0``: ``E0 * ceil(n / B0)``."""
        return self.local_epochs * -(-num_samples // self.batch_size)


@dataclass(frozen=True)
class Plan:
    """One device's local work for one round."""

    batch_size: int
    local_steps: int
    lr: float
    deadline_s: float | None = None
    prox_mu: float = 0.0
    lr_warmup_steps: int = 0
    lr_warmup_from: float | None = None
    """Learning rate at the first step of the warm-up (linear ramp up to ``lr``)."""
    at_deadline: str = "continue"
    """What the device does if its work would run past ``deadline_s`` (seconds from the round's start):
    ``continue`` (the round waits), ``stop`` (send the steps done so far: partial work), ``probe``
    (as ``stop``, but at least one step whatever the time: a device the planner has not measured yet,
    whose report is what it learns from) or ``drop`` (send nothing)."""

    def to_dict(self) -> dict[str, Any]:
        # Flat fields only: a shallow copy, not asdict's recursive deep copy (called once per upload).
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def step_lr(plan: Plan, step: int) -> float:
    """The learning rate of ``step``: a linear warm-up from ``lr_warmup_from`` over ``lr_warmup_steps``
    (step 0 runs at ``lr_warmup_from``), then ``lr``. The devices train with it and the server sums it
    (SCAFFOLD's ``eta``), so it lives with the plan."""
    if plan.lr_warmup_steps and step < plan.lr_warmup_steps and plan.lr_warmup_from is not None:
        ramp = step / plan.lr_warmup_steps
        return plan.lr_warmup_from + (plan.lr - plan.lr_warmup_from) * ramp
    return plan.lr


@dataclass(frozen=True)
class Report:
    """What a device sends with its update: the measurements the planner learns from."""

    round: int
    device: int
    num_samples: int
    local_steps: int
    batch_size: int
    compute_s: float
    download_s: float
    upload_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s / max(self.local_steps, 1)

    def to_dict(self) -> dict[str, Any]:
        # Flat fields only: a shallow copy, not asdict's recursive deep copy (called once per upload).
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DeviceState:
    """What the planner may know of a device: its sample count and its own past reports."""

    device: int
    num_samples: int
    reports: tuple[Report, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Contribution:
    """How one update enters the streaming fold: ``sum += weight * delta`` and ``stats += stats``."""

    weight: float
    stats: Mapping[str, float]


Params = dict[str, "torch.Tensor"]


class Aggregator(ABC):
    """Combines updates in one streaming pass, so a stateless function can fold them one at a time."""

    name: str

    @abstractmethod
    def contribution(self, report: Report) -> Contribution:
        """The weight and statistics this update adds to the round's running sums."""

    @abstractmethod
    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        """The next global model from the current one and the folded sums; inputs are not mutated."""


class FedAvgAggregator(Aggregator):
    """``x_{r+1} = x_r + sum_k p_k Delta_k`` with ``p_k = n_k / sum n``: every strategy's default.

    Here rather than in ``fedavg.py`` because :class:`Strategy` falls back on it.
    """

    name = "fedavg"

    def contribution(self, report: Report) -> Contribution:
        return Contribution(weight=float(report.num_samples), stats={"num_samples": float(report.num_samples)})

    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        """Computed in float64 and rounded to each parameter's dtype once, at the end."""
        total = stats["num_samples"]
        return {
            name: (value.double() + weighted_sum[name].double() / total).to(value.dtype)
            if name in weighted_sum
            else value.clone()
            for name, value in global_params.items()
        }


class StrategySettings(BaseModel):
    """A strategy's own settings, declared once: the fields, defaults and checks of its config entry.

    A strategy's entry in a config's ``strategies`` list takes exactly these keys (besides ``name``,
    ``label`` and ``aggregator``), so a typo fails when the config loads. Frozen, unknown keys refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, base: BaseWork) -> None:
        """Raise ``ValueError`` saying what to change if these settings cannot work with the base work."""


class Strategy(ABC):
    """Decides each selected device's plan; its aggregator decides how updates combine.

    Built from a config entry as ``cls(base, settings, aggregator)``: ``settings`` an instance of
    :attr:`settings_model`, ``aggregator`` None for the strategy's own (:meth:`own_aggregator`).
    """

    name: ClassVar[str]
    """What a config calls a built-in strategy (a strategy of the user's own is named by its import path)."""
    server_optimizer: ServerOptimizerSettings = NO_SERVER_OPTIMIZER
    """How the parameter server turns the aggregate into the published model (``none``: unchanged).
    A class gives its default; :func:`~amble.strategies.registry.build_strategy` sets a config entry's."""
    settings_model: ClassVar[type[StrategySettings]] = StrategySettings
    """The strategy's settings (none by default)."""
    plans_from_peers: ClassVar[bool] = False
    """True: :meth:`plan` takes a keyword ``peers``, the states (with reports) of devices that took part
    in recent rounds but are not selected now, for a prior on the devices it has never seen."""

    def __init__(
        self, base: BaseWork, settings: StrategySettings | None = None, aggregator: Aggregator | None = None
    ) -> None:
        if settings is not None and not isinstance(settings, StrategySettings):
            raise TypeError(
                f"{type(self).__name__}: settings must be a StrategySettings, got {type(settings).__name__}"
            )
        self.base = base
        self.settings = settings if settings is not None else self.settings_model()
        self.aggregator = aggregator if aggregator is not None else self.own_aggregator()

    def own_aggregator(self) -> Aggregator:
        """The aggregator used unless the config names one: FedAvg's sample-weighted mean."""
        return FedAvgAggregator()

    @abstractmethod
    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        """Plans for the devices selected this round, keyed by device id (with
        :attr:`plans_from_peers`, also given ``peers=``)."""

    def uses_control_variates(self) -> bool:
        """Whether devices train with SCAFFOLD's correction ``c - c_k`` and the server keeps the control
        variates (``amble.server.functions.controlvariates``): a strategy's ``control_variates`` setting, if any (a
        strategy of a user's own may not have called ``Strategy.__init__``: then none)."""
        return bool(getattr(getattr(self, "settings", None), "control_variates", False))
