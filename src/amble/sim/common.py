"""What the round driver (``driver.py``) and the asynchronous one (``asyncdriver.py``) share: the
experiment as they read it, a strategy's running totals, the device rows and the deadline rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from amble.config import ExperimentConfig
from amble.fleet import DeviceProfile, RoundTiming, VirtualClock
from amble.runsetup import DeviceData, RunSetup
from amble.server import ParameterServer, RoundOutcome
from amble.sim.training import DeviceTrainers
from amble.strategies import Params, Plan


@dataclass
class StrategyRun:
    label: str
    summary: dict[str, Any]


class ExperimentView(Protocol):
    """What a strategy's driver reads of the experiment (``driver.Experiment``) it runs in."""

    config: ExperimentConfig
    setup: RunSetup
    model: nn.Module
    initial: Params
    fleet: list[DeviceProfile]
    clock: VirtualClock
    device_data: DeviceData
    test: tuple[torch.Tensor, torch.Tensor]
    bar_position: int | None

    def devices(self) -> DeviceTrainers: ...


def device_row(
    label: str, round_index: int | None, device: int, plan: Plan, timing: RoundTiming, num_samples: int
) -> dict[str, Any]:
    """A ``devices.jsonl`` row: the plan as the device ran it (cut at its deadline if it had to), its
    compute and communication; idle and status are filled in when its round (or task) ends."""
    return {
        "strategy": label,
        "round": round_index,
        "device": device,
        "batch_size": plan.batch_size,
        "local_steps": plan.local_steps,
        "epochs": plan.local_steps * plan.batch_size / num_samples,
        "lr": plan.lr,
        "compute_s": timing.compute_s,
        "comm_s": timing.download_s + timing.upload_s,
        "idle_s": 0.0,
    }


def apply_deadline(plan: Plan, timing: RoundTiming) -> tuple[Plan, RoundTiming]:
    """A device whose work would run past its plan's deadline stops (partial work) or drops.

    The device knows its own speed, so it stops after the last whole step that still lets its
    upload arrive by the deadline; with no whole step possible it has nothing to send (``probe``: it
    sends its one step, late).
    """
    if plan.deadline_s is None or plan.at_deadline == "continue" or timing.total_s <= plan.deadline_s:
        return plan, timing
    if timing.dropped_at_s is not None:  # it was going to drop out anyway: by the deadline at the latest
        return plan, replace(timing, dropped_at_s=min(timing.dropped_at_s, plan.deadline_s))
    step_s = timing.compute_s / plan.local_steps
    steps = math.floor((plan.deadline_s - timing.download_s - timing.upload_s) / step_s + 1e-9)
    if plan.at_deadline == "probe":
        steps = max(steps, 1)
    if plan.at_deadline == "drop" or steps < 1:
        return plan, replace(timing, dropped_at_s=plan.deadline_s)
    return replace(plan, local_steps=steps), replace(timing, compute_s=steps * step_s)


@dataclass
class RoundRecord:
    outcome: RoundOutcome
    devices: list[dict[str, Any]]
    samples: int
    train_compute_s: float
    """Seconds spent inside this round's local training (summed over devices, wherever they ran)."""


@dataclass
class Tally:
    """Running totals of one strategy's run."""

    now_s: float = 0.0
    train_compute_s: float = 0.0
    samples: int = 0
    updates_aggregated: int = 0
    updates_rejected: int = 0
    rounds_failed: int = 0
    latencies: list[float] = field(default_factory=list)
    accuracies: list[tuple[int, float, float]] = field(default_factory=list)
    """(round, virtual time, accuracy) at each evaluation."""

    def reached(self, target: float) -> bool:
        """Whether an evaluation has reached ``target`` (only a full-set score can: see sim.evaluation)."""
        return any(accuracy >= target for _, _, accuracy in self.accuracies)

    def count(self, record: RoundRecord, last_arrival_s: float | None, end_s: float) -> None:
        """Add a decided round: ``last_arrival_s`` its last upload's arrival (None: none arrived)."""
        outcome = record.outcome
        finalized = outcome.status == "finalized"
        if last_arrival_s is not None:
            self.latencies.append(outcome.ended_at_s - last_arrival_s)
        self.updates_aggregated += len(outcome.counted) if finalized else 0
        self.updates_rejected += len(outcome.rejected)
        self.rounds_failed += not finalized
        self.samples += record.samples
        self.train_compute_s += record.train_compute_s
        self.now_s = end_s

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(**{**data, "accuracies": [(int(r), t, a) for r, t, a in data["accuracies"]]})

    def summary(self, server: ParameterServer, config: ExperimentConfig, wall_time_s: float) -> dict[str, Any]:
        stats = server.runtime.stats()
        target = config.eval.target_accuracy
        reached = next(((r, t) for r, t, a in self.accuracies if a >= target), None)
        return {
            "final_accuracy": self.accuracies[-1][2] if self.accuracies else None,
            "best_accuracy": max((a for _, _, a in self.accuracies), default=None),
            "target_accuracy": target,
            "time_to_target_s": reached[1] if reached else None,
            "rounds_to_target": reached[0] + 1 if reached else None,
            "virtual_time_s": self.now_s,
            "wall_time_s": wall_time_s,
            "train_compute_s": self.train_compute_s,
            "rounds": config.rounds,
            "rounds_failed": self.rounds_failed,
            "samples_processed": self.samples,
            "updates_aggregated": self.updates_aggregated,
            "updates_rejected": self.updates_rejected,
            "function_invocations": stats.invocations,
            "cold_starts": stats.cold_starts,
            "warm_starts": stats.warm_starts,
            "function_busy_s": stats.busy_s,
            "function_failures": stats.failures,
            "aggregation_latency_s": float(np.mean(self.latencies)) if self.latencies else None,
            "real_instances": server.runtime.real_instances(),
        }
