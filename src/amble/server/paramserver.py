"""The parameter server as its callers see it: set up a run, start rounds or tasks, accept uploads.

The one door of ``sim/`` and ``live/`` into the server: they go through :class:`ParameterServer`'s
typed methods, never through Store keys. Devices (simulated or real) only download models and plans
and upload updates; everything else happens in functions triggered by events. In simulation this
object is also the gateway: devices call :meth:`ParameterServer.upload` directly instead of over HTTP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from amble.errors import AmbleError, ConfigError
from amble.server import keys
from amble.server.events.base import EventLog
from amble.server.functions import controlvariates
from amble.server.functions.buffered import Task, read_task
from amble.server.records.live import LiveRecords
from amble.server.records.partialsum import BYTES_PER_WEIGHT, shard_size_bound
from amble.server.records.settings import RunSettings, load_model, read_settings
from amble.server.records.state import RoundState
from amble.server.runtime.base import FUNCTIONS_TOPIC, Runtime
from amble.server.store.base import Store, read_json
from amble.server.store.memory import MemoryStore
from amble.server.tensors import TensorSpec, encode, template_of, template_to_json
from amble.strategies.base import Params, Plan, Report

DRIVER_GROUP = "driver"


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    status: str
    """``finalized`` or ``failed`` (below quorum at the deadline)."""
    version: int
    """The model version devices train from next."""
    ended_at_s: float
    """Virtual time the outcome was published (after aggregation and finalisation)."""
    counted: list[int]
    """Devices whose updates were folded (and, when finalised, are in the published model)."""
    rejected: dict[int, str]
    """Devices with a rejected upload, and a reason (a device may also be counted via another upload)."""


@dataclass(frozen=True)
class Published:
    """One buffer's outcome as announced: the model version it published, and when."""

    buffer: int
    version: int
    at_s: float
    status: str
    counted: int


def check_fits(store: Store, template: Mapping[str, TensorSpec], devices_per_round: int) -> None:
    """Refuse, before anything runs, a model whose largest value (a shard of a round's partial sums:
    up to ``BYTES_PER_WEIGHT`` per weight) is over what one value of ``store`` may hold."""
    limit = store.max_value_bytes()
    size = shard_size_bound(template, devices_per_round)
    if limit is None or size <= limit:
        return
    weights = sum(math.prod(spec.shape) for spec in template.values())
    mib = 2**20
    raise ConfigError(
        f"the model has {weights:,} weights: the server keeps a round's sums in int64 fixed point, up to "
        f"{size / mib:,.1f} MiB in one value, over the {limit / mib:,.1f} MiB one value may hold in this "
        f"store (Redis' proto-max-bulk-len; about {limit // BYTES_PER_WEIGHT:,} weights): raise it (redis-server "
        f"--proto-max-bulk-len {math.ceil(size / mib)}mb, or CONFIG SET), use the embedded store "
        "(server.store: memory), or a smaller model"
    )


class ParameterServer:
    def __init__(self, store: Store, events: EventLog, runtime: Runtime) -> None:
        self.store = store
        self.events = events
        self.runtime = runtime
        self.live = LiveRecords(store)
        """What ``amble serve`` keeps besides rounds: tokens, registrations, the replay guard, counters."""
        self._settings: RunSettings | None = None

    def initialize(self, params: Params, num_samples: Mapping[int, int], settings: RunSettings) -> None:
        """Publish model version 0, the update template and the devices. Idempotent."""
        floating = {name: t for name, t in params.items() if t.is_floating_point()}
        check_fits(self.store, template_of(floating), settings.devices_per_round)
        if self.store.get(keys.LATEST) is not None:
            return
        self.store.put(keys.SETTINGS, settings.to_json())
        self.store.put(keys.TEMPLATE, template_to_json(template_of(floating)).encode())
        for device, count in num_samples.items():
            self.store.put(keys.device_info(device), json.dumps({"num_samples": int(count)}).encode())
        self.store.put(keys.model(0), encode(params))
        self.store.put(keys.LATEST, json.dumps({"version": 0}).encode())

    def latest_version(self) -> int:
        return int(read_json(self.store, keys.LATEST)["version"])

    def model(self, version: int | None = None) -> Params:
        return load_model(self.store, self.latest_version() if version is None else version)

    def round_state(self, round_index: int) -> RoundState | None:
        """A round's state (None before it is planned)."""
        blob = self.store.get(keys.round_state(round_index))
        return None if blob is None else RoundState.from_json(blob)

    def round_state_version(self, round_index: int) -> int:
        """The version of a round's state in the store (0 before it is planned): a cheap change check."""
        return self.store.version(keys.round_state(round_index))

    def start_round(self, round_index: int, available: list[int], at_s: float) -> tuple[dict[int, Plan], float]:
        """Trigger ``plan_round``; returns the plans it wrote and the virtual time they were ready."""
        self.events.publish(FUNCTIONS_TOPIC, "round_start", {"round": round_index, "available": available}, at_s)
        self.runtime.drain()
        planned_at_s = self._take_published().get(round_index, ("planned", -1, at_s))[2]
        state = self.round_state(round_index)
        if state is None:
            raise AmbleError(f"round {round_index} was not planned: {self._function_errors()}")
        return dict(state.plans), planned_at_s

    def upload(self, report: Report, update: bytes, at_s: float) -> str:
        """Store an update under a fresh upload id and emit the event that triggers its aggregation.

        An update over the size limit is not stored; its event still goes out, so the aggregate
        function records the rejection through the same path as every other one.
        """
        return self._store_upload("update_uploaded", report, update, at_s)

    def _store_upload(self, event_type: str, report: Report, update: bytes, at_s: float) -> str:
        """Store the update (unless over the size limit) and publish its event: one path for rounds and tasks."""
        upload = str(int(self.store.incr(keys.UPLOAD_COUNTER)))
        task = event_type == "task_uploaded"
        key = keys.task_update(report.round, upload) if task else keys.round_update(report.round, report.device, upload)
        update_key = None if len(update) > self._max_update_bytes() else key
        if update_key is not None:
            self.store.put(update_key, update)
        payload = {
            "task" if task else "round": report.round,
            "device": report.device,
            "upload": upload,
            "update_key": update_key,
            "size": len(update),
            "report": report.to_dict(),
        }
        self.events.publish(FUNCTIONS_TOPIC, event_type, payload, at_s)
        return upload

    # -- tasks (asynchronous strategies: no rounds) -----------------------------------------------

    def start_task(self, task_id: int, available: list[int], at_s: float) -> tuple[Task, list[Published]]:
        """Trigger ``plan_task``; the task it wrote (started at the virtual time it was planned) and any
        publishes announced meanwhile."""
        self.events.publish(FUNCTIONS_TOPIC, "task_start", {"task": task_id, "available": available}, at_s)
        self.runtime.drain()
        announced, planned_at_s = self.take_announced()
        task = read_task(self.store, task_id)
        if task is None:
            raise AmbleError(f"task {task_id} was not planned: {self._function_errors()}")
        return replace(task, started_at_s=planned_at_s.get(task_id, task.started_at_s)), announced

    def upload_task(self, report: Report, update: bytes, at_s: float) -> list[Published]:
        """Store a task's update (``report.round`` is the task id), trigger ``fold_task`` and run the
        functions; the publishes announced meanwhile, in order."""
        self._store_upload("task_uploaded", report, update, at_s)
        self.runtime.drain()
        announced, _ = self.take_announced()
        return announced

    def task(self, task_id: int) -> Task | None:
        return read_task(self.store, task_id)

    def take_announced(self) -> tuple[list[Published], dict[int, float]]:
        """Publishes, and tasks planned (task id -> virtual time), announced since the last call."""
        published: list[Published] = []
        planned: dict[int, float] = {}
        for event in self.events.read(keys.PUBLISHED_TOPIC, DRIVER_GROUP, "driver", count=1_000_000):
            payload = event.payload
            if event.type in ("model_published", "round_failed") and "counted" in payload:
                status = "finalized" if event.type == "model_published" else "failed"
                version, counted = int(payload["version"]), int(payload["counted"])
                published.append(Published(int(payload["round"]), version, event.at_s, status, counted))
            elif event.type == "task_planned":
                planned[int(payload["task"])] = event.at_s
            self.events.ack(keys.PUBLISHED_TOPIC, DRIVER_GROUP, event.id)
        unique = {p.buffer: p for p in published}  # a rerun announces the same outcome again
        return sorted(unique.values(), key=lambda p: p.buffer), planned

    # -- what the drivers read and keep ------------------------------------------------------------

    def corrections(self, devices: list[int], version: int) -> dict[int, Params] | None:
        """SCAFFOLD: each device's ``c - c_k`` for a round training from ``version`` (None: all zero)."""
        return controlvariates.corrections(self.store, devices, version)

    def save_checkpoint(self, state: dict[str, object], snapshot: Path | None = None) -> None:
        """The driver's own state after a completed round (JSON), kept in the store with the run; an
        embedded store (which dies with the process) is also saved to ``snapshot``."""
        self.store.put(keys.CHECKPOINT, json.dumps(state).encode())
        if snapshot is not None and isinstance(self.store, MemoryStore):
            self.store.save(snapshot)

    def _max_update_bytes(self) -> int:
        if self._settings is None:
            try:
                self._settings = read_settings(self.store)
            except LookupError:
                raise AmbleError("the parameter server is not initialised: call initialize() first") from None
        return self._settings.max_update_bytes

    def run_functions(self) -> None:
        """Run the functions on everything published so far (uploads are folded as they come)."""
        self.runtime.drain()

    def close_round(self, round_index: int, deadline_at_s: float) -> RoundOutcome:
        """Run the functions; if the round is still open, its deadline fires at ``deadline_at_s``."""
        self.runtime.drain()
        outcome = self._take_published().get(round_index)
        if outcome is None or outcome[0] == "planned":
            self.events.publish(FUNCTIONS_TOPIC, "round_deadline", {"round": round_index}, deadline_at_s)
            self.runtime.drain()
            outcome = self._take_published().get(round_index)
        if outcome is None or outcome[0] == "planned":
            raise AmbleError(f"round {round_index} neither finalised nor failed: {self._function_errors()}")
        status, version, ended_at_s = outcome
        state = self.round_state(round_index)
        rejected: dict[int, str] = {}
        for member in sorted(self.store.set_members(keys.round_rejected(round_index))):
            device, _, reason = member.split(":", 2)
            rejected.setdefault(int(device), reason)
        return RoundOutcome(round_index, status, version, ended_at_s, list(state.counted if state else ()), rejected)

    def _take_published(self) -> dict[int, tuple[str, int, float]]:
        """Outcomes announced on the published topic since the last call, by round."""
        outcomes = {}
        for event in self.events.read(keys.PUBLISHED_TOPIC, DRIVER_GROUP, "driver", count=1_000_000):
            if event.type == "model_published":
                outcomes[int(event.payload["round"])] = ("finalized", int(event.payload["version"]), event.at_s)
            elif event.type == "round_failed":
                outcomes[int(event.payload["round"])] = ("failed", int(event.payload["version"]), event.at_s)
            elif event.type == "round_planned":
                outcomes[int(event.payload["round"])] = ("planned", -1, event.at_s)
            self.events.ack(keys.PUBLISHED_TOPIC, DRIVER_GROUP, event.id)
        return outcomes

    def _function_errors(self) -> str:
        errors = [(self.store.get(k) or b"").decode() for k in self.store.keys(keys.DEAD_LETTER_PREFIX)]
        errors += [(self.store.get(k) or b"").decode() for k in self.store.keys(keys.LAST_ERROR_PREFIX)[-3:]]
        return "; ".join(errors) or "no function error was recorded"
