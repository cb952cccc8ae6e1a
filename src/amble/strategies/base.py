"""What every strategy is: plans for a round, and how updates combine into the next model.

Strategies are close to pure: they read reports and return new values. They know nothing of the
parameter server; the server knows them only through :class:`Strategy` and :class:`Aggregator`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    ``continue`` (the round waits), ``stop`` (send the steps done so far: partial work) or ``drop``
    (send nothing)."""

    def to_dict(self) -> dict[str, Any]:
        # Flat fields only: a shallow copy, not asdict's recursive deep copy (called once per upload).
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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


Params = dict[str, torch.Tensor]


class Aggregator(ABC):
    """Combines updates in one streaming pass, so a stateless function can fold them one at a time."""

    name: str

    @abstractmethod
    def contribution(self, report: Report) -> Contribution:
        """The weight and statistics this update adds to the round's running sums."""

    @abstractmethod
    def apply(self, global_params: Params, weighted_sum: Params, stats: Mapping[str, float]) -> Params:
        """The next global model from the current one and the folded sums; inputs are not mutated."""


class Strategy(ABC):
    """Decides each selected device's plan; its aggregator decides how updates combine."""

    name: str
    aggregator: Aggregator

    @abstractmethod
    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        """Plans for the devices selected this round, keyed by device id."""
