"""Rounds for real devices: the wall-clock counterpart of the simulation driver.

The coordinator owns the parameter server and a lock around it (the embedded runtime runs functions
in the caller's thread). It starts a round once enough devices have registered, lets uploads arrive
through the gateway (each is an event, folded at once), and closes the round when every selected
device's update is in or its deadline passes, whichever comes first; then it evaluates the new model
when it can and starts the next round. Event times are seconds since the coordinator started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amble.errors import AmbleError
from amble.server import keys
from amble.server.paramserver import ParameterServer, RoundOutcome
from amble.server.store.base import Store, read_json
from amble.strategies.base import Params

log = logging.getLogger("amble.serve")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_tokens(store: Store, devices: int) -> dict[int, str]:
    """One fresh bearer token per device; only their hashes go into the store."""
    tokens = {device: secrets.token_urlsafe(32) for device in range(devices)}
    for device, token in tokens.items():
        store.put(keys.device_token(token_hash(token)), str(device).encode())
    return tokens


def device_of(store: Store, token: str) -> int | None:
    blob = store.get(keys.device_token(token_hash(token)))
    return None if blob is None else int(blob)


Evaluate = Callable[[Params], float]


@dataclass
class RoundRecord:
    round: int
    status: str
    version: int
    counted: int
    expected: int
    wall_s: float
    accuracy: float | None
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each selected device's plan (batch size, local steps, lr, ...), by device id."""


@dataclass
class Coordinator:
    server: ParameterServer
    rounds: int
    min_devices: int
    round_timeout_s: float
    evaluate: Evaluate | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    changed: threading.Condition = field(init=False)
    current: int | None = None
    finished: bool = False
    history: list[RoundRecord] = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def now_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def store(self) -> Store:
        return self.server.store

    # -- called by the gateway --------------------------------------------------------------------

    def register(self, device: int, num_samples: int) -> None:
        with self.lock:
            known = read_json(self.store, keys.device_info(device))
            if known is not None and int(known["num_samples"]) != num_samples:
                raise AmbleError(f"device {device} registered {known['num_samples']} samples before, not {num_samples}")
            if known is None:
                self.store.put(keys.device_info(device), json.dumps({"num_samples": num_samples}).encode())
            self.store.add_to_set(keys.REGISTERED, str(device))
            self.changed.notify_all()

    def accept(self, upload: Callable[[float], str]) -> str:
        """Store an already validated update and run the functions it triggers."""
        with self.lock:
            upload_id = upload(self.now_s())
            self.server.runtime.drain()
            self.changed.notify_all()
            return upload_id

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "round": self.current,
                "rounds": self.rounds,
                "model_version": self.server.latest_version(),
                "registered": len(self.store.set_members(keys.REGISTERED)),
                "finished": self.finished,
                "history": [r.__dict__ for r in self.history],
            }

    # -- the round loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            self.changed.notify_all()

    def run(self) -> None:
        """Play every round; returns when done or stopped."""
        for r in range(self.rounds):
            if not self._wait(lambda: len(self.store.set_members(keys.REGISTERED)) >= self.min_devices, None):
                return
            with self.lock:
                available = sorted(int(d) for d in self.store.set_members(keys.REGISTERED))
                self.server.start_round(r, available, self.now_s())
                self.current = r
                deadline = time.monotonic() + self.round_timeout_s
                self.changed.notify_all()
            log.info(json.dumps({"event": "round_started", "round": r, "available": len(available)}))
            self._wait(lambda r=r: self._decided(r), deadline)  # type: ignore[misc]
            if self._stop.is_set():
                return
            with self.lock:
                outcome = self.server.close_round(r, self.now_s())
            self._record(outcome)
        with self.lock:
            self.finished = True
            self.current = None
            self.changed.notify_all()

    def _decided(self, r: int) -> bool:
        state = self.server.round_state(r)
        return state is not None and not state.is_open

    def _wait(self, condition: Callable[[], bool], deadline: float | None) -> bool:
        with self.lock:
            while not condition():
                if self._stop.is_set():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.changed.wait(timeout=0.5 if remaining is None else min(remaining, 0.5))
            return True

    def _record(self, outcome: RoundOutcome) -> None:
        accuracy = None
        if outcome.status == "finalized" and self.evaluate is not None:
            accuracy = self.evaluate(self.server.model(outcome.version))
        state = self.server.round_state(outcome.round)
        record = RoundRecord(
            outcome.round,
            outcome.status,
            outcome.version,
            len(outcome.counted),
            len(state.expected) if state else 0,
            self.now_s(),
            accuracy,
            {str(d): p.to_dict() for d, p in state.plans.items()} if state else {},
        )
        with self.lock:
            self.history.append(record)
            self.store.incr(keys.rounds_counter(outcome.status))
        log.info(json.dumps({"event": "round_closed", **record.__dict__}))
        if self.on_round is not None:
            self.on_round(record)
