"""Buffered asynchronous aggregation (FedBuff) on the event-driven parameter server.

There are no rounds. Three functions, each triggered by one event, stateless between events:

- ``plan_task`` (``task_start``): picks a device from the idle available ones (deterministic in the
  seed and the task id) and writes its task record (``keys.task``): the plan, the model version it
  trains from (the latest) and when it started; a second run of it changes nothing;
- ``fold_task`` (``task_uploaded``): folds the update into the open *buffer* with the staleness
  weight ``s(v - base version)``. A buffer is a round of the synchronous machinery keyed by the model
  version ``v`` it builds on: the same meta record (``keys.round_meta(v)``), the same fold
  (``common.FunctionsBase.fold_once``) whose atomic ``commit`` here also marks the task record as
  counted, so a redelivered upload counts once. The fold that brings the buffer to K
  counted seals it in the same commit: a buffer closes at exactly K, and later uploads go to the next;
- ``publish_buffer`` (``buffer_ready``): sums the sealed buffer's shards in a fixed order, applies
  the FedBuff aggregator to model ``v`` and publishes ``v + 1`` with one compare-and-set on the
  buffer's state (``keys.round_state(v)``), through the same publish as ``finalize``; a rerun
  publishes the same bytes.

An update trained from a model more than ``max_staleness`` versions older than its buffer's is
refused (``too_stale``) and changes nothing; the store keeps the models and norm references of the
last ``max_staleness + 1`` versions (what a task may still train from), nothing older.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from typing import Any

from amble.errors import AmbleError, ConfigError, UpdateRejected
from amble.server import keys
from amble.server.events.base import Event
from amble.server.functions.common import (
    KEEP_ROUNDS,
    RETRY,
    FoldTarget,
    FunctionsBase,
    broken_tensors,
    read_meta,
    record_rejection,
)
from amble.server.functions.planning import select_devices
from amble.server.records.reports import check_report
from amble.server.records.state import RoundState, RoundStatus
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation
from amble.server.store.base import Store, read_json
from amble.strategies.base import Plan, Strategy
from amble.strategies.fedbuff import FedBuff


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

    def as_round(self) -> RoundState:
        """The task as a one-device open round: what a report is checked against."""
        return RoundState("open", self.base_version, (self.device,), {self.device: self.plan}, self.started_at_s)


def read_task(store: Store, task_id: int) -> Task | None:
    blob = store.get(keys.task(task_id))
    return None if blob is None else Task.from_json(blob)


class BufferedFunctions(FunctionsBase):
    """FedBuff's functions: the shared reads, fold and publish, with tasks and buffers for rounds."""

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
        return self.strategy.settings.buffer_size_for(self.settings(inv).devices_per_round)

    # -- plan_task ------------------------------------------------------------------------------

    def plan_task(self, event: Event, inv: Invocation) -> None:
        """Pick the task's device among ``available`` and write its task record, once."""
        task_id = int(event.payload["task"])
        key = keys.task(task_id)
        if self.store.get(key) is None:
            available = [int(d) for d in event.payload["available"]]
            if not available:
                raise ValueError(f"task {task_id} was started with no available device")
            (device,) = select_devices(self.settings(inv).seed, task_id, available, 1)
            plans, excluded = self.planner.plan_devices(task_id, [device])
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
        device, upload = int(payload["device"]), str(payload["upload"])
        update_key = payload.get("update_key")
        try:
            reader = _TaskReader(self, inv, payload, event.at_s)
            target = self.fold_once(inv, reader.read, update_key, payload)
        except UpdateRejected as rejection:
            record_rejection(self.store, self.open_buffer(), device, upload, rejection.reason, str(rejection))
            if update_key:
                self.store.delete(update_key)
            return
        if target is not None and target.meta["sealed"]:
            inv.emit(FUNCTIONS_TOPIC, "buffer_ready", {"buffer": target.group})

    def open_buffer(self) -> int:
        """The buffer folds go to: the one building on the latest model, or past it while it is sealed
        (full, its model being published)."""
        buffer = int(read_json(self.store, keys.LATEST)["version"])
        while read_meta(self.store.get(keys.round_meta(buffer)))["sealed"]:
            buffer += 1
        return buffer

    def finish_counted(self, inv: Invocation, task: Task, payload: Any, arrived_at_s: float) -> None:
        """What a crash after a task's counting commit may have cut: its report in the device's history,
        and, when its fold sealed a buffer that is not published yet, the ``buffer_ready`` announcement
        (without it no later buffer could be published: each builds on the model before it)."""
        if task.buffer is None:
            return
        with contextlib.suppress(UpdateRejected):  # what the planner learns is checked and bounded too
            report = check_report(
                self.store, task.task, task.device, payload.get("report"), task.as_round(), arrived_at_s
            )
            self.record_report(inv, report)
        if (
            read_meta(self.store.get(keys.round_meta(task.buffer)))["sealed"]
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
        meta = read_meta(self.store.get(keys.round_meta(buffer)))
        if not meta["sealed"]:
            raise LookupError(f"buffer {buffer} is not full yet: nothing to publish")
        base = self.model(inv, buffer)  # raises LookupError (and the event is retried) until it is published
        sums, new_params = self.combine(meta, base, self.strategy.buffer_aggregator)
        broken = broken_tensors(new_params)
        counted = tuple(int(t) for t in meta["counted"])
        status: RoundStatus = "finalized"
        failure = None
        if broken:
            failure = (
                f"the aggregate of {len(counted)} updates holds NaN or infinite values in {broken[:5]}; model "
                f"version {buffer + 1} is version {buffer} unchanged: lower server.max_update_norm"
            )
            new_params, status = base, "failed"
        self.write_model(inv, buffer + 1, new_params, sums)
        outcome = RoundState(
            status, buffer, counted, {}, started_at_s=event.at_s, counted=counted, version=buffer + 1, failure=failure
        )
        if self.store.compare_and_set(state_key, outcome.to_json(), 0):
            self._announce_buffer(inv, outcome)

    def _announce_buffer(self, inv: Invocation, state: RoundState) -> None:
        version = state.version if state.version is not None else state.base_version + 1
        self.advance_latest(version)
        self.drop_shards(keys.round_meta(state.base_version))
        max_staleness = self.strategy.settings.max_staleness
        self.drop_versions_before(version - max_staleness)  # what a task may still train from stays
        # A task's record stays KEEP_ROUNDS versions past the last it could count on (a late upload of
        # it is refused as too stale, saying so), and a buffer's while a task counted in it may be there
        # (the record is the proof against a redelivery): a task counts only in a buffer from its base on.
        oldest_base = version - max_staleness - KEEP_ROUNDS
        self._compact_tasks(oldest_base)
        self.compact_before(oldest_base - 1)
        kind = "model_published" if state.status == "finalized" else "round_failed"
        payload = {"round": state.base_version, "version": version, "counted": len(state.counted)}
        inv.emit(keys.PUBLISHED_TOPIC, kind, {**payload, "failure": state.failure})

    def _compact_tasks(self, oldest_base: int) -> None:
        """Drop the records of the tasks that trained from a version below ``oldest_base``: too stale to
        count, so a redelivered upload of one is refused (``unknown_task``) whether its record is there
        or not. Tasks are numbered in the order they start, from a non-decreasing latest version, so
        the dead ones are a prefix, walked from the mark one task a step."""
        below = int((read_json(self.store, keys.TASKS_COMPACTED) or {"below": 0})["below"])
        while (task := read_task(self.store, below)) is not None and task.base_version < oldest_base:
            below += 1
        self.advance_mark(keys.TASKS_COMPACTED, below, lambda task_id: self.store.delete(keys.task(task_id)))


class _TaskReader:
    """What a fold into a buffer reads before each commit attempt (``FunctionsBase.fold_once``)."""

    def __init__(self, functions: BufferedFunctions, inv: Invocation, payload: Any, arrived_at_s: float) -> None:
        self.functions, self.inv, self.payload, self.arrived_at_s = functions, inv, payload, arrived_at_s
        self.task_id, self.device = int(payload["task"]), int(payload["device"])

    def read(self) -> FoldTarget | str | None:
        functions, store, task_id, device = self.functions, self.functions.store, self.task_id, self.device
        task_key = keys.task(task_id)
        current_task = store.get_versioned(task_key)
        if current_task is None:
            raise UpdateRejected("unknown_task", f"task {task_id} was never started: ask for a task first")
        task = Task.from_json(current_task.value)
        if task.device != device:
            raise UpdateRejected("not_selected", f"task {task_id} belongs to device {task.device}, not {device}")
        if task.buffer is not None:  # a duplicate or a redelivery: counted already
            functions.finish_counted(self.inv, task, self.payload, self.arrived_at_s)
            return None
        buffer = functions.open_buffer()
        staleness = buffer - task.base_version
        max_staleness = functions.strategy.settings.max_staleness
        if staleness > max_staleness:
            raise UpdateRejected(
                "too_stale",
                f"task {task_id} trained from model version {task.base_version}, {staleness} versions behind "
                f"the buffer building on version {buffer} (max_staleness {max_staleness}): start a new task "
                "from the latest model",
            )
        report = check_report(store, task_id, device, self.payload.get("report"), task.as_round(), self.arrived_at_s)
        meta_key = keys.round_meta(buffer)
        current_meta = store.get_versioned(meta_key)
        meta = read_meta(current_meta.value if current_meta else None)
        if meta["sealed"]:
            return RETRY  # filled by another instance since: the next read folds into the next buffer
        shard_key = keys.round_shard(buffer, self.inv.shard)
        meta["counted"].append(task_id)
        if shard_key not in meta["shards"]:
            meta["shards"].append(shard_key)
        meta["sealed"] = len(meta["counted"]) >= functions.buffer_size(self.inv)
        return FoldTarget(
            group=buffer,
            item=task_id,
            device=device,
            base_version=task.base_version,
            report=report,
            contribution=functions.strategy.buffer_aggregator.stale_contribution(report, staleness),
            meta_key=meta_key,
            shard_key=shard_key,
            meta=meta,
            meta_version=current_meta.version if current_meta else 0,
            what=f"buffer {buffer}",
            extra_writes={task_key: (replace(task, buffer=buffer).to_json(), current_task.version)},
        )


__all__ = ["BufferedFunctions", "Task", "read_task"]
