"""Selecting devices and asking the strategy for their plans: what ``plan_round`` and ``plan_task`` share.

Deterministic in the run's seed and the round (or task) and in what the Store holds, so a rerun of a
planning function, or a resumed run, plans the same. A device whose data breaks planning is left out
with the reason, not the whole round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from amble.server import keys
from amble.server.records.reports import device_history, num_samples
from amble.server.records.state import RoundState
from amble.server.store.base import Store
from amble.strategies.base import DeviceState, Plan, Strategy

PEER_ROUNDS = 8
"""How many earlier rounds a strategy's prior for unseen devices looks back over (``peers``)."""
PEER_LIMIT = 64
"""At most this many peers are read per round: the prior is a median, and reads cost store round trips."""


def select_devices(seed: int, round_index: int, available: list[int], count: int) -> list[int]:
    """Deterministic in ``(seed, round)`` and the available set, so a resumed run replays exactly."""
    rng = np.random.default_rng([seed, round_index])
    pool = sorted(available)
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return sorted(pool[int(i)] for i in chosen)


class Planner:
    """The strategy's plans for chosen devices, read from the devices' registrations and histories."""

    def __init__(self, store: Store, strategy: Strategy) -> None:
        self.store = store
        self.strategy = strategy

    def plan_devices(self, round_index: int, chosen: list[int]) -> tuple[dict[int, Plan], dict[int, str]]:
        """Valid plans for the chosen devices, and the reason each one left out was left out.

        A device is left out when its registration cannot be read, when planning raises on it (found
        by planning each device alone once the joint planning raised), or when its plan is invalid.
        """
        excluded: dict[int, str] = {}
        states: dict[int, DeviceState] = {}
        for device in chosen:
            try:
                states[device] = self.device_state(device)
            except (LookupError, ValueError, TypeError) as exc:  # not a store outage: that propagates
                excluded[device] = f"its registration could not be read ({exc}); register it again"
        peers = self._peers(round_index, set(chosen)) if self.strategy.plans_from_peers else None
        plans, _ = self._try_plan(round_index, list(states.values()), peers)
        if plans is None:
            for device, device_state in list(states.items()):
                _, alone = self._try_plan(round_index, [device_state], peers)
                if alone is not None:
                    excluded[device] = f"planning it raised {alone}; its reports may be corrupt"
                    del states[device]
            plans = self._call_plan(round_index, list(states.values()), peers)  # raises if no one device is to blame
        valid: dict[int, Plan] = {}
        for device, device_state in states.items():
            plan = plans.get(device)
            problem = "the strategy gave it no plan" if plan is None else plan_problem(plan, device_state.num_samples)
            if problem is None and plan is not None:
                valid[device] = plan
            else:
                excluded[device] = f"{problem}; its reports may be corrupt"
        return valid, excluded

    def device_state(self, device: int) -> DeviceState:
        return DeviceState(device, num_samples(self.store, device), tuple(device_history(self.store, device)))

    def _try_plan(
        self, round_index: int, states: list[DeviceState], peers: list[DeviceState] | None
    ) -> tuple[dict[int, Plan] | None, str | None]:
        """The strategy's plans, or None and what it raised (a strategy is pure: nothing to undo)."""
        try:
            return self._call_plan(round_index, states, peers), None
        except Exception as exc:  # whatever a device's data made the strategy raise
            return None, f"{type(exc).__name__}: {exc}"

    def _call_plan(
        self, round_index: int, states: list[DeviceState], peers: list[DeviceState] | None
    ) -> dict[int, Plan]:
        if peers is None:
            return self.strategy.plan(round_index, states)
        plan: Any = self.strategy.plan  # declared with a ``peers`` keyword (Strategy.plans_from_peers)
        plans: dict[int, Plan] = plan(round_index, states, peers=peers)
        return plans

    def _peers(self, round_index: int, chosen: set[int]) -> list[DeviceState]:
        """Devices counted in the last :data:`PEER_ROUNDS` rounds and not chosen now, newest first, at most
        :data:`PEER_LIMIT`: what a strategy's prior for devices it has never seen is made of. A peer whose
        registration or history cannot be read is left out (it is not being planned)."""
        peers: dict[int, DeviceState] = {}
        for earlier in range(round_index - 1, max(round_index - 1 - PEER_ROUNDS, -1), -1):
            try:
                blob = self.store.get(keys.round_state(earlier))
                counted = RoundState.from_json(blob).counted if blob is not None else ()
            except (ValueError, TypeError, KeyError):
                continue
            for device in counted:
                if device in chosen or device in peers:
                    continue
                try:
                    peers[device] = self.device_state(device)
                except (LookupError, ValueError, TypeError):
                    continue
                if len(peers) >= PEER_LIMIT:
                    return list(peers.values())
        return list(peers.values())


def plan_problem(plan: Plan, num_samples: int) -> str | None:
    """What makes a plan unusable for a device with ``num_samples`` samples (None: nothing)."""
    if type(plan.batch_size) is not int or not 1 <= plan.batch_size <= num_samples:
        return f"its plan's batch size {plan.batch_size!r} is not in [1, its {num_samples} samples]"
    if type(plan.local_steps) is not int or plan.local_steps < 1:
        return f"its plan's local steps {plan.local_steps!r} are not a whole number >= 1"
    if not (isinstance(plan.lr, int | float) and math.isfinite(plan.lr) and plan.lr > 0):
        return f"its plan's learning rate {plan.lr!r} is not a finite positive number"
    if plan.deadline_s is not None and not (math.isfinite(plan.deadline_s) and plan.deadline_s > 0):
        return f"its plan's deadline {plan.deadline_s!r} is not a finite positive number of seconds"
    return None
