"""Rounds for real devices: the wall-clock counterpart of the simulation driver.

The coordinator owns the parameter server. It starts a round once enough devices have registered,
lets uploads arrive through the gateway, and closes the round when every selected device's update is
in or its deadline passes, whichever comes first; then it evaluates the new model when it can and
starts the next round. Event times are seconds since the coordinator started.

Two locks, never the other way round: ``runtime_lock`` is held while the server's functions run (the
embedded runtime runs them in the caller's thread, one caller at a time): a pass over the uploads
waiting to be folded (:class:`amble.live.batching.Batcher`: a burst of uploads is folded in a few
passes, not one at a time), a round's start or its close. ``lock`` guards the round bookkeeping
(current round, history, arrivals) and is only ever held briefly, never while a fold runs, so the
gateway answers polls, model downloads and status while uploads are folded.

Each round's record keeps what the server itself observed of every device (when its upload arrived,
what it reported, whether it was counted), so a served run's files and its recorded fleet trace are
derived from facts, not from what a device claims alone.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amble.errors import AmbleError
from amble.live.batching import Batcher
from amble.redaction import redact
from amble.server.paramserver import ParameterServer, RoundOutcome
from amble.server.records.live import LiveRecords
from amble.server.records.reports import as_observed, bound_by_elapsed
from amble.server.records.state import RoundState
from amble.strategies.base import Params, Report

log = logging.getLogger("amble.serve")


def issue_tokens(records: LiveRecords, devices: int) -> dict[int, str]:
    """One fresh bearer token per device; only their hashes go into the store."""
    tokens = {device: secrets.token_urlsafe(32) for device in range(devices)}
    for device, token in tokens.items():
        records.add_device_token(token, device)
    return tokens


STATES_KEPT = 4
"""Parsed round states a coordinator keeps (the latest rounds asked for)."""

Evaluate = Callable[[Params], tuple[float, float]]
"""A published model's (accuracy, loss) on the evaluation samples."""


@dataclass(frozen=True)
class SampleLimits:
    """What a device may register as its sample count (see ``ServerConfig.device_data``)."""

    device_data: str = "partition"
    max_samples: int = 100_000
    max_weight_share: float = 1.0
    others_needed: int = 1
    """Registered devices besides this one needed before the share is checked (a total to compare with)."""


@dataclass(frozen=True)
class UploadFate:
    """What became of an accepted upload once the functions it triggered ran."""

    upload: str
    counted: bool
    reason: str | None = None
    """Why it was not counted (from REJECTION_REASONS): the functions rejected it, or it was refused
    before reaching them (``stale_round``, ``replayed``: then ``upload`` is empty); None if counted or
    not decided."""
    message: str = ""


@dataclass(frozen=True)
class Upload:
    """A validated upload waiting to be folded: its report as the device sent it, and the update."""

    report: Report
    update: bytes

    @property
    def key(self) -> tuple[int, int]:
        """(round, device): two uploads of one device for one round are never folded in one pass."""
        return self.report.round, self.report.device


@dataclass(frozen=True)
class _Sent:
    """An upload of a pass handed to the functions: its place in the pass, its id, when it arrived and
    what the device said (bounded by the time the server saw elapse, as the functions bound it)."""

    index: int
    upload: str
    at_s: float
    said: Report


@dataclass(frozen=True)
class Arrival:
    """An upload that reached the functions: when (seconds since the coordinator started), its report
    (times bounded by what the server saw elapse since the round started), and if it was counted."""

    at_s: float
    report: Report
    counted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"at_s": self.at_s, "counted": self.counted, **self.report.to_dict()}


@dataclass
class RoundRecord:
    round: int
    status: str
    version: int
    counted: int
    expected: int
    wall_s: float
    """When the record was made: after the round closed and its model was evaluated."""
    accuracy: float | None
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each selected device's plan (batch size, local steps, lr, ...), by device id."""
    loss: float | None = None
    started_s: float = 0.0
    """When the round was planned (its devices could start)."""
    closed_s: float = 0.0
    """When its outcome was published (all updates in, or the deadline passed)."""
    eval_s: float = 0.0
    """Seconds the server spent evaluating the published model before the next round could start."""
    available: list[int] = field(default_factory=list)
    """The registered devices the round selected from."""
    rejected: int = 0
    """Devices whose upload the functions rejected (as the simulator counts ``updates_rejected``)."""
    arrivals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each upload that reached the functions, by device id: ``at_s``, ``counted`` and the report's
    fields (the last upload of a device that sent several)."""
    excluded: dict[str, str] = field(default_factory=dict)
    """Registered devices the round could not select, by device id, with the reason (a count over
    ``server.max_weight_share``: :meth:`Coordinator._selectable`)."""


@dataclass
class Coordinator:
    server: ParameterServer
    rounds: int
    min_devices: int
    round_timeout_s: float
    evaluate: Evaluate | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    limits: SampleLimits = field(default_factory=SampleLimits)
    error: str | None = None
    """Why the rounds stopped early (an exception in the round loop), None while all is well."""
    lock: threading.RLock = field(default_factory=threading.RLock)
    """The round bookkeeping's (see the module docstring); ``changed`` is its condition."""
    runtime_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while the server's functions run; never taken while holding ``lock``."""
    changed: threading.Condition = field(init=False)
    current: int | None = None
    finished: bool = False
    history: list[RoundRecord] = field(default_factory=list)
    arrivals: dict[int, dict[int, Arrival]] = field(default_factory=dict)
    """Uploads that reached the functions, by round and device (see :class:`Arrival`)."""
    _started: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _uploads: Batcher[Upload, UploadFate] = field(init=False)
    _states: dict[int, tuple[int, RoundState]] = field(default_factory=dict)
    """Parsed round states by round, with the Store version they were parsed from."""
    _states_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)
        self._uploads = Batcher(self._fold_pass, lambda upload: upload.key, self.runtime_lock)

    def now_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def records(self) -> LiveRecords:
        return self.server.live

    def round_state(self, round_index: int) -> RoundState | None:
        """The round's state (None before it is planned), parsed once per change in the Store: it holds
        every plan of the round, and every request of a device reads it."""
        version = self.server.round_state_version(round_index)
        with self._states_lock:
            cached = self._states.get(round_index)
        if cached is not None and cached[0] == version:
            return cached[1]
        state = self.server.round_state(round_index)  # as new as ``version`` or newer: never stale
        if state is not None:
            with self._states_lock:
                self._states[round_index] = (version, state)
                while len(self._states) > STATES_KEPT:
                    del self._states[min(self._states)]
        return state

    # -- called by the gateway --------------------------------------------------------------------

    def register(self, device: int, num_samples: int) -> None:
        """Record a device's sample count (its FedAvg weight), or raise AmbleError saying why not."""
        with self.lock:
            known = self.records.registered_samples(device)
            if self.limits.device_data == "partition":
                self._check_partition(device, num_samples, known)
            elif known != num_samples:
                self._check_own(device, num_samples, known)
                self.records.set_samples(device, num_samples)
            self.records.mark_registered(device)
            self.changed.notify_all()

    def _check_partition(self, device: int, num_samples: int, known: int | None) -> None:
        if known is None:
            raise AmbleError(f"device {device} has no partition in this run's config (data.num_devices)")
        if known != num_samples:
            raise AmbleError(
                f"device {device} has {known} training samples in this run's partition "
                f"(data.partition with the config's seed), not {num_samples}: register the size of your "
                "partition, or serve with server.device_data: own for devices with data of their own"
            )

    def _check_own(self, device: int, num_samples: int, known: int | None) -> None:
        """A count of the device's own: bounded, and fixed once an update of it was counted."""
        if known is not None and self.records.has_counted_update(device):
            raise AmbleError(
                f"device {device} registered {known} samples and an update of it was counted "
                f"with that weight; it cannot change to {num_samples}"
            )
        if num_samples > self.limits.max_samples:
            raise AmbleError(
                f"device {device} registered {num_samples:,} samples, over server.max_samples "
                f"({self.limits.max_samples:,}): register at most that many, or ask the operator to raise it"
            )
        others = sorted(self.records.registered() - {device})
        if len(others) >= self.limits.others_needed:
            problem = self._share_problem(num_samples, num_samples + sum(map(self._registered, others)))
            if problem is not None:
                raise AmbleError(f"device {device}'s {num_samples:,} samples would be {problem}")

    def _registered(self, device: int) -> int:
        """The sample count ``device`` registered (0 if none is stored)."""
        return self.records.registered_samples(device) or 0

    def _share_problem(self, num_samples: int, total: int) -> str | None:
        """What is wrong with ``num_samples`` of ``total`` registered samples (None: within the share)."""
        share = num_samples / total if total > 0 else 0.0
        if share <= self.limits.max_weight_share:
            return None
        return (
            f"{share:.1%} of all registered samples, over server.max_weight_share ({self.limits.max_weight_share:.0%})"
        )

    def _selectable(self, registered: list[int]) -> tuple[list[int], dict[int, str]]:
        """The registered devices a round may select from, and why each other one may not.

        With ``device_data: own`` the share is enforced here, when a round's weights are fixed, and not
        only when a device registers (where it is checked once ``devices_per_round`` others have
        registered, so a device that registered first was never checked): a device whose count is over
        ``server.max_weight_share`` of all registered devices' samples (its own included, as at
        registration) is left out of the round, with the reason, and its weight in the round's
        aggregate is zero. One pass: leaving it out does not push the others over in turn. Only with
        more than ``1 / max_weight_share`` devices registered: with fewer, some device is over the share
        unless all counts are equal (two devices of 100 and 101 samples at a share of 0.5), and a
        fleet must not be shut out of its own rounds for it.
        """
        too_few = len(registered) * self.limits.max_weight_share <= 1.0
        if self.limits.device_data != "own" or too_few:
            return registered, {}
        counts = {device: self._registered(device) for device in registered}
        total = sum(counts.values())
        excluded = {}
        for device, count in counts.items():
            problem = self._share_problem(count, total)
            if problem is not None:
                excluded[device] = f"its {count:,} registered samples are {problem}; register fewer to take part"
        return [d for d in registered if d not in excluded], excluded

    def accept(self, report: Report, update: bytes) -> UploadFate:
        """Fold an already validated update into its round, and say what became of it.

        The update waits for the next pass over the uploads (:meth:`_fold_pass`), which this thread
        may run itself. It is refused unfolded when its round is no longer open (``stale_round``) or
        the device's update for the round was already counted (``replayed``: a racing duplicate lost).
        Counted means it is in the round's sums (it will be in the published model if the round is
        finalised); otherwise it was rejected by the functions, or its event failed (dead-lettered) or
        is still pending: then nothing was counted yet and the device may send it again. A fault of
        the store or the runtime is raised; nothing was marked, so the device may send it again too.
        """
        return self._uploads.submit(Upload(report, update))

    def _fold_pass(self, uploads: Sequence[Upload]) -> list[UploadFate | Exception]:
        """One pass, under ``runtime_lock``: store each upload and emit its event, run the functions
        once for all of them, then read what became of each (one per device and round: the
        :class:`Batcher` keeps a device's second upload for a later pass).

        The report the functions (and so the planner) get is :func:`as_observed`: its link time is
        everything between the round's start and this arrival that the device did not report as
        compute (its wait for the task, HTTP, TLS), so ``T_r`` covers what a device cannot avoid.
        With the embedded runtime every update's ``aggregate`` has run when ``run_functions``
        returns; with workers, it waits for them (which fold the pass's updates in parallel). The
        arrivals are kept for the round's record, with each device's own report.
        """
        fates: list[UploadFate | Exception] = []
        sent: list[_Sent] = []
        for index, upload in enumerate(uploads):
            try:
                state = self.round_state(upload.report.round)
                refusal = self._refusal(upload.report, state)
                if refusal is None and state is not None:
                    sent.append(self._send(index, upload, state))
                fates.append(refusal or UploadFate("", False))  # the sent ones are decided below
            except Exception as exc:  # a store fault: this upload is not counted; the device retries
                fates.append(exc)
        if not sent:
            return fates
        try:
            self.server.run_functions()
        except Exception as exc:  # a fault of the functions' run: none of the sent is known to be counted
            for s in sent:
                fates[s.index] = exc
            return fates
        counted = {r: self._counted(r) for r in {s.said.round for s in sent}}
        for s in sent:
            try:
                fates[s.index] = self._fate(s, counted[s.said.round])
            except Exception as exc:
                fates[s.index] = exc
        with self.lock:
            for s in sent:
                self._arrived(s.said.round, s.said.device, s.said, s.at_s, s.said.device in counted[s.said.round])
            self.changed.notify_all()
        return fates

    def _refusal(self, report: Report, state: RoundState | None) -> UploadFate | None:
        """Why the upload cannot be folded now (the round closed, or the device's update is counted)."""
        round_index, device = report.round, report.device
        if state is None or not state.is_open:
            return UploadFate("", False, "stale_round", f"round {round_index} closed before the update arrived")
        if self.records.accepted_upload(round_index, device):
            message = f"device {device} already uploaded its update for round {round_index}"
            return UploadFate("", False, "replayed", message)
        return None

    def _send(self, index: int, upload: Upload, state: RoundState) -> _Sent:
        """Store the update and emit its event, with the report as the server observed it."""
        report, at_s = upload.report, self.now_s()
        elapsed_s = at_s - state.started_at_s
        upload_id = self.server.upload(as_observed(report, elapsed_s), upload.update, at_s)
        # The record keeps what the device said, no longer than the server saw elapse (as the functions do).
        return _Sent(index, upload_id, at_s, bound_by_elapsed(report, elapsed_s))

    def _counted(self, round_index: int) -> set[int]:
        return self.records.counted(round_index)

    def _fate(self, sent: _Sent, counted: set[int]) -> UploadFate:
        round_index, device = sent.said.round, sent.said.device
        if device in counted:  # only now: a device whose update was not counted may send it again
            self.records.mark_uploaded(round_index, device)
            return UploadFate(sent.upload, True)
        rejection = self.records.take_rejection(round_index, device, sent.upload)
        if rejection is not None:  # answered now; the round's rejected set keeps the reason
            return UploadFate(sent.upload, False, *rejection)
        return UploadFate(sent.upload, False)

    def _arrived(self, round_index: int, device: int, report: Report, at_s: float, counted: bool) -> None:
        arrivals = self.arrivals.setdefault(round_index, {})
        if not arrivals.get(device, Arrival(0.0, report, False)).counted:  # a counted arrival stays
            arrivals[device] = Arrival(at_s, report, counted)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "round": self.current,
                "rounds": self.rounds,
                "model_version": self.server.latest_version(),
                "registered": len(self.records.registered()),
                "finished": self.finished,
                "error": self.error,
                "history": [r.__dict__ for r in self.history],
            }

    # -- the round loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            self.changed.notify_all()

    def run(self) -> None:
        """Play every round; returns when done, stopped, or crashed (then ``error`` says why).

        A round that fails below quorum is a normal outcome, recorded like a finalised one. A crash is
        an exception in the loop itself (a function dead-lettered so a round was never planned or
        decided, a store fault, an evaluation error): the run cannot go on.
        """
        try:
            self._play()
        except Exception as exc:  # whatever stopped the rounds is reported, not lost
            with self.lock:
                self.error = redact(f"round {self.current}: {type(exc).__name__}: {exc}")  # told to every device
                self.changed.notify_all()
            log.error(json.dumps({"event": "crashed", "round": self.current, "error": self.error}))

    def _play(self) -> None:
        for r in range(self.rounds):
            if not self._wait(lambda: len(self.records.registered()) >= self.min_devices, None):
                return
            with self.runtime_lock:
                with self.lock:
                    registered = sorted(self.records.registered())
                    available, excluded = self._selectable(registered)
                    self.current = r
                self.server.start_round(r, available, self.now_s())
            with self.lock:
                deadline = time.monotonic() + self.round_timeout_s
                self.changed.notify_all()
            log.info(json.dumps({"event": "round_started", "round": r, "available": len(available)}))
            for device, reason in excluded.items():
                log.warning(json.dumps({"event": "device_excluded", "round": r, "device": device, "reason": reason}))
            self._wait(lambda r=r: self._decided(r), deadline)  # type: ignore[misc]
            if self._stop.is_set():
                return
            with self.runtime_lock:  # after the pass over the uploads under way, if any
                outcome = self.server.close_round(r, self.now_s())
            closed_s = self.now_s()
            self._record(outcome, available, closed_s, excluded)
        with self.lock:
            self.finished = True
            self.current = None
            self.changed.notify_all()

    def _decided(self, r: int) -> bool:
        state = self.round_state(r)
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

    def _record(self, outcome: RoundOutcome, available: list[int], closed_s: float, excluded: dict[int, str]) -> None:
        accuracy = loss = None
        if outcome.status == "finalized" and self.evaluate is not None:
            accuracy, loss = self.evaluate(self.server.model(outcome.version))
        eval_s = self.now_s() - closed_s
        state = self.round_state(outcome.round)
        with self.lock:
            arrivals = self.arrivals.pop(outcome.round, {})
        record = RoundRecord(
            outcome.round,
            outcome.status,
            outcome.version,
            len(outcome.counted),
            len(state.expected) if state else 0,
            self.now_s(),
            accuracy,
            {str(d): p.to_dict() for d, p in state.plans.items()} if state else {},
            loss=loss,
            started_s=state.started_at_s if state else closed_s,
            closed_s=closed_s,
            eval_s=eval_s,
            available=available,
            rejected=len(outcome.rejected),
            arrivals={str(d): a.to_dict() for d, a in sorted(arrivals.items())},
            excluded={str(d): reason for d, reason in sorted(excluded.items())},
        )
        with self.lock:
            self.history.append(record)
            self.records.count_round(outcome.status)
        log.info(json.dumps({"event": "round_closed", **record.__dict__}))
        if self.on_round is not None:
            self.on_round(record)
