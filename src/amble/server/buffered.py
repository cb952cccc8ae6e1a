"""Buffered asynchronous aggregation (FedBuff) on the event-driven parameter server.

There are no rounds. Three functions, each triggered by one event, stateless between events:

- ``plan_task`` (``task_start``): picks a device from the idle available ones (deterministic in the
  seed and the task id) and writes its task record (``keys.task``): the plan, the model version it
  trains from (the latest) and when it started; a second run of it changes nothing;
- ``fold_task`` (``task_uploaded``): folds the update into the open *buffer* with the staleness
  weight ``s(v - base version)``. A buffer is a round of the synchronous machinery keyed by the model
  version ``v`` it builds on: the same meta record (``keys.round_meta(v)``), per-instance shards of
  exact partial sums (``partialsum``) and the same atomic ``commit``, which here also marks the task
  record as counted, so a redelivered upload counts once. The fold that brings the buffer to K
  counted seals it in the same commit: a buffer closes at exactly K, and later uploads go to the next;
- ``publish_buffer`` (``buffer_ready``): sums the sealed buffer's shards in a fixed order, applies
  the FedBuff aggregator to model ``v`` and publishes ``v + 1`` with one compare-and-set on the
  buffer's state (``keys.round_state(v)``), like ``finalize``; a rerun publishes the same bytes.

An update trained from a model more than ``max_staleness`` versions older than its buffer's is
refused (``too_stale``) and changes nothing; the store keeps the models and norm references of the
last ``max_staleness + 1`` versions (what a task may still train from), nothing older.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass
from typing import Any

from amble.errors import AmbleError, ConfigError, UpdateRejected
from amble.server import keys
from amble.server.events.base import Event
from amble.server.functions import (
    CAS_RETRIES,
    ServerFunctions,
    _Folded,
    _meta,
    record_rejection,
    select_devices,
)
from amble.server.paramserver import DRIVER_GROUP, ParameterServer
from amble.server.partialsum import FoldRecord
from amble.server.reports import check_report
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation
from amble.server.state import RoundState, RoundStatus
from amble.server.store.base import Store, read_json
from amble.server.tensors import all_finite, encode, l2_norm
from amble.strategies.base import Plan, Report, Strategy
from amble.strategies.fedbuff import FedBuff, FedBuffAggregator


@dataclass(frozen=True)
class Task:
    """One device's asynchronous task, as ``plan_task`` wrote it."""

    task: int
    device: int
    plan: Plan
    base_version: int
    started_at_s: float
    buffer: int | None = None
    """The buffer (model version it built on) the task's update was counted in; None until then."""

    def to_json(self) -> bytes:
        data = {
            "task": self.task,
            "device": self.device,
            "plan": self.plan.to_dict(),
            "base_version": self.base_version,
            "started_at_s": self.started_at_s,
            "buffer": self.buffer,
        }
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> Task:
        data = json.loads(blob)
        return cls(
            task=int(data["task"]),
            device=int(data["device"]),
            plan=Plan.from_dict(data["plan"]),
            base_version=int(data["base_version"]),
            started_at_s=float(data["started_at_s"]),
            buffer=None if data.get("buffer") is None else int(data["buffer"]),
        )


def read_task(store: Store, task_id: int) -> Task | None:
    blob = store.get(keys.task(task_id))
    return None if blob is None else Task.from_json(blob)


class BufferedFunctions(ServerFunctions):
    """FedBuff's functions; reuses the synchronous ones' reads, update checks and shard folds."""

    strategy: FedBuff

    def __init__(self, store: Store, strategy: Strategy) -> None:
        if not isinstance(strategy, FedBuff):
            raise ConfigError(
                f"strategy {type(strategy).__name__} is asynchronous, but buffered aggregation runs FedBuff "
                "(amble.strategies.FedBuff) and its subclasses only: subclass FedBuff"
            )
        super().__init__(store, strategy)

    def handlers(self) -> dict[str, Handler]:
        return {"task_start": self.plan_task, "task_uploaded": self.fold_task, "buffer_ready": self.publish_buffer}

    def buffer_size(self, inv: Invocation) -> int:
        return self.strategy.settings.buffer_size_for(self._settings(inv).devices_per_round)

    # -- plan_task ------------------------------------------------------------------------------

    def plan_task(self, event: Event, inv: Invocation) -> None:
        """Pick the task's device among ``available`` and write its task record, once."""
        task_id = int(event.payload["task"])
        key = keys.task(task_id)
        if self.store.get(key) is None:
            available = [int(d) for d in event.payload["available"]]
            if not available:
                raise ValueError(f"task {task_id} was started with no available device")
            (device,) = select_devices(self._settings(inv).seed, task_id, available, 1)
            plans, excluded = self._plan_devices(task_id, [device])
            if device not in plans:
                raise AmbleError(f"device {device} could not be planned for task {task_id}: {excluded.get(device)}")
            latest = int(read_json(self.store, keys.LATEST)["version"])
            task = Task(task_id, device, plans[device], latest, event.at_s)
            self.store.compare_and_set(key, task.to_json(), 0)
        inv.emit(keys.PUBLISHED_TOPIC, "task_planned", {"task": task_id})

    # -- fold_task ------------------------------------------------------------------------------

    def fold_task(self, event: Event, inv: Invocation) -> None:
        """Fold one task's update into the open buffer, exactly once in effect."""
        payload = event.payload
        task_id, device, upload = int(payload["task"]), int(payload["device"]), str(payload["upload"])
        update_key = payload.get("update_key")
        try:
            self._fold_task(inv, task_id, device, update_key, payload, event.at_s)
        except UpdateRejected as rejection:
            buffer = self._open_buffer()
            record_rejection(self.store, buffer, device, upload, rejection.reason, str(rejection))
            if update_key:
                self.store.delete(update_key)

    def _open_buffer(self) -> int:
        """The buffer folds go to: the one building on the latest model, or past it while it is sealed
        (full, its model being published)."""
        buffer = int(read_json(self.store, keys.LATEST)["version"])
        while _meta(self.store.get(keys.round_meta(buffer)))["sealed"]:
            buffer += 1
        return buffer

    def _fold_task(
        self, inv: Invocation, task_id: int, device: int, update_key: str | None, payload: Any, arrived_at_s: float
    ) -> None:
        task_key = keys.task(task_id)
        aggregator: FedBuffAggregator = self.strategy.buffer_aggregator
        settings = self.strategy.settings
        folded: tuple[int, _Folded] | None = None  # (buffer, fold) prepared, not yet committed
        for _ in range(CAS_RETRIES):
            current_task = self.store.get_versioned(task_key)
            if current_task is None:
                raise UpdateRejected("unknown_task", f"task {task_id} was never started: ask for a task first")
            task = Task.from_json(current_task.value)
            if task.device != device:
                raise UpdateRejected("not_selected", f"task {task_id} belongs to device {task.device}, not {device}")
            if task.buffer is not None:  # a duplicate or a redelivery: counted already
                if update_key:
                    self.store.delete(update_key)
                self._finish_counted(inv, task, device, payload, arrived_at_s)
                return
            buffer = self._open_buffer()
            staleness = buffer - task.base_version
            if staleness > settings.max_staleness:
                raise UpdateRejected(
                    "too_stale",
                    f"task {task_id} trained from model version {task.base_version}, {staleness} versions behind "
                    f"the buffer building on version {buffer} (max_staleness {settings.max_staleness}): start a "
                    "new task from the latest model",
                )
            as_round = RoundState("open", task.base_version, (device,), {device: task.plan}, task.started_at_s)
            report = check_report(self.store, task_id, device, payload.get("report"), as_round, arrived_at_s)
            meta_key, shard_key = keys.round_meta(buffer), keys.round_shard(buffer, inv.shard)
            if folded is None or folded[0] != buffer or self.store.version(shard_key) != folded[1].shard_version:
                delta = self._load_update(inv, device, update_key, payload)
                norm = l2_norm(delta)
                self._check_norm(inv, as_round, norm)
                sums, shard_version = self._shard_sums(inv, shard_key)
                contribution = aggregator.stale_contribution(report, staleness)
                inv.cache.pop("shard", None)  # folded in place: the warm copy is stale until committed
                if not sums.add(task_id, delta, contribution.weight, FoldRecord(norm, contribution.stats)):
                    raise UpdateRejected(
                        "overflow",
                        f"update (L2 norm {norm:.4g}, weight {contribution.weight:g}) would make the buffer's "
                        "sum non-finite: it was not counted; lower server.max_update_norm to refuse such updates",
                    )
                folded = (buffer, _Folded(shard_version, sums, sums.to_value()))
                continue
            current_meta = self.store.get_versioned(meta_key)
            meta = _meta(current_meta.value if current_meta else None)
            if meta["sealed"]:
                continue  # filled by another instance since: the next pass folds into the next buffer
            meta["counted"].append(task_id)
            if shard_key not in meta["shards"]:
                meta["shards"].append(shard_key)
            meta["sealed"] = len(meta["counted"]) >= self.buffer_size(inv)
            counted_task = Task(task_id, device, task.plan, task.base_version, task.started_at_s, buffer)
            writes = {
                meta_key: (json.dumps(meta).encode(), current_meta.version if current_meta else 0),
                shard_key: (folded[1].blob, folded[1].shard_version),
                task_key: (counted_task.to_json(), current_task.version),
            }
            if self.store.commit(writes):
                inv.cache["shard"] = (shard_key, folded[1].shard_version + 1, folded[1].sums)
                if update_key:
                    self.store.delete(update_key)
                self._record_report(inv, report)
                if meta["sealed"]:
                    inv.emit(FUNCTIONS_TOPIC, "buffer_ready", {"buffer": buffer})
                return
            self.store.incr(keys.FOLD_CONFLICTS)
        raise RuntimeError(f"could not fold task {task_id}: too much contention")

    def _finish_counted(self, inv: Invocation, task: Task, device: int, payload: Any, arrived_at_s: float) -> None:
        """What a crash after a task's counting commit may have cut: its report in the device's history,
        and, when its fold sealed a buffer that is not published yet, the ``buffer_ready`` announcement
        (without it no later buffer could be published: each builds on the model before it)."""
        if task.buffer is None:
            return
        as_round = RoundState("open", task.base_version, (device,), {device: task.plan}, task.started_at_s)
        with contextlib.suppress(UpdateRejected):  # what the planner learns is checked and bounded too
            self._record_report(
                inv, check_report(self.store, task.task, device, payload.get("report"), as_round, arrived_at_s)
            )
        if (
            _meta(self.store.get(keys.round_meta(task.buffer)))["sealed"]
            and self.store.get(keys.round_state(task.buffer)) is None
        ):
            inv.emit(FUNCTIONS_TOPIC, "buffer_ready", {"buffer": task.buffer})

    # -- publish_buffer -------------------------------------------------------------------------

    def publish_buffer(self, event: Event, inv: Invocation) -> None:
        """Publish model ``buffer + 1`` from the sealed buffer; a rerun completes what a crash cut.

        A buffer whose aggregate would hold a NaN or an infinity is published as the unchanged model
        (status ``failed``, saying why), so later buffers still have a version to build on.
        """
        buffer = int(event.payload["buffer"])
        state_key = keys.round_state(buffer)
        decided = self.store.get(state_key)
        if decided is not None:
            self._announce_buffer(inv, RoundState.from_json(decided))
            return
        meta = _meta(self.store.get(keys.round_meta(buffer)))
        if not meta["sealed"]:
            raise LookupError(f"buffer {buffer} is not full yet: nothing to publish")
        base = self._model(inv, buffer)  # raises LookupError (and the event is retried) until it is published
        sums = self._merge_shards(meta["shards"], meta["counted"])
        new_params = self.strategy.buffer_aggregator.apply(base, sums.total(), sums.stats())
        broken = sorted(n for n, t in new_params.items() if t.is_floating_point() and not all_finite(t))
        counted = [int(t) for t in meta["counted"]]
        status: RoundStatus = "finalized"
        failure = None
        if broken:
            failure = (
                f"the aggregate of {len(counted)} updates holds NaN or infinite values in {broken[:5]}; model "
                f"version {buffer + 1} is version {buffer} unchanged: lower server.max_update_norm"
            )
            new_params = base
            status = "failed"
        reference = {"median_norm": statistics.median(sums.norms()), "updates": len(counted)}
        self.store.put(keys.model(buffer + 1), encode(new_params))
        self.store.put(keys.norm_reference(buffer + 1), json.dumps(reference).encode())
        inv.cache["model"] = (buffer + 1, new_params)
        outcome = RoundState(
            status,
            buffer,
            tuple(counted),
            {},
            started_at_s=event.at_s,
            counted=tuple(counted),
            version=buffer + 1,
            failure=failure,
        )
        if self.store.compare_and_set(state_key, outcome.to_json(), 0):
            self._announce_buffer(inv, outcome)

    def _announce_buffer(self, inv: Invocation, state: RoundState) -> None:
        version = state.version if state.version is not None else state.base_version + 1
        self._advance_latest(version)
        for shard in _meta(self.store.get(keys.round_meta(state.base_version)))["shards"]:
            self.store.delete(shard)
        oldest_kept = version - self.strategy.settings.max_staleness
        if oldest_kept >= 1:  # models a task may still train from stay; the one before them goes
            self.store.delete(keys.model(oldest_kept - 1))
            self.store.delete(keys.norm_reference(oldest_kept - 1))
        kind = "model_published" if state.status == "finalized" else "round_failed"
        payload = {"round": state.base_version, "version": version, "counted": len(state.counted)}
        inv.emit(keys.PUBLISHED_TOPIC, kind, {**payload, "failure": state.failure})


# -- the driver's side: what ParameterServer does for rounds, for tasks ---------------------------


@dataclass(frozen=True)
class Published:
    """One buffer's outcome as announced: the model version it published, and when."""

    buffer: int
    version: int
    at_s: float
    status: str
    counted: int


def start_task(
    server: ParameterServer, task_id: int, available: list[int], at_s: float
) -> tuple[Task, list[Published]]:
    """Trigger ``plan_task``; the task it wrote (started at the virtual time it was planned) and any
    publishes announced meanwhile."""
    server.events.publish(FUNCTIONS_TOPIC, "task_start", {"task": task_id, "available": available}, at_s)
    server.runtime.drain()
    announced, planned_at_s = take_announced(server)
    task = read_task(server.store, task_id)
    if task is None:
        raise AmbleError(f"task {task_id} was not planned: {server._function_errors()}")
    started_at_s = planned_at_s.get(task_id, task.started_at_s)
    return Task(task.task, task.device, task.plan, task.base_version, started_at_s, task.buffer), announced


def upload_task(server: ParameterServer, report: Report, update: bytes, at_s: float) -> list[Published]:
    """Store a task's update (``report.round`` is the task id), trigger ``fold_task`` and run the
    functions; the publishes announced meanwhile, in order."""
    upload = str(int(server.store.incr(keys.UPLOAD_COUNTER)))
    too_large = len(update) > server._max_update_bytes()
    update_key = None if too_large else keys.task_update(report.round, upload)
    if update_key is not None:
        server.store.put(update_key, update)
    payload = {
        "task": report.round,
        "device": report.device,
        "upload": upload,
        "update_key": update_key,
        "size": len(update),
        "report": report.to_dict(),
    }
    server.events.publish(FUNCTIONS_TOPIC, "task_uploaded", payload, at_s)
    server.runtime.drain()
    announced, _ = take_announced(server)
    return announced


def take_announced(server: ParameterServer) -> tuple[list[Published], dict[int, float]]:
    """Publishes, and tasks planned (task id -> virtual time), announced since the last call."""
    published: list[Published] = []
    planned: dict[int, float] = {}
    for event in server.events.read(keys.PUBLISHED_TOPIC, DRIVER_GROUP, "driver", count=1_000_000):
        payload = event.payload
        if event.type in ("model_published", "round_failed") and "counted" in payload:
            status = "finalized" if event.type == "model_published" else "failed"
            published.append(
                Published(int(payload["round"]), int(payload["version"]), event.at_s, status, int(payload["counted"]))
            )
        elif event.type == "task_planned":
            planned[int(payload["task"])] = event.at_s
        server.events.ack(keys.PUBLISHED_TOPIC, DRIVER_GROUP, event.id)
    unique = {p.buffer: p for p in published}  # a rerun announces the same outcome again
    return sorted(unique.values(), key=lambda p: p.buffer), planned


__all__ = [
    "BufferedFunctions",
    "Published",
    "Task",
    "read_task",
    "start_task",
    "take_announced",
    "upload_task",
]
