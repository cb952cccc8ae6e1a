"""The parameter server's functions: ``plan_round``, ``aggregate`` and ``finalize``.

Each is triggered by one event and keeps no state between events except an instance's warm cache
(a copy of what is in the Store, used only while its Store version is unchanged). Every write that
matters is a compare-and-set on versioned keys, so running a function twice, or crashing it
half-way and running it again, has the effect of running it once:

- ``aggregate`` folds the update into its instance's *shard* of the round's partial sums and records
  the device as counted in the round's small *meta* record, both in one atomic ``commit``; a
  duplicate or redelivered update is seen as already counted and skipped. Instances fold into
  different shards, so parallel workers never redo each other's folds; they only serialise on
  the meta record, which is a few hundred bytes;
- ``finalize`` seals the meta record (no fold can commit after it), sums the shards, and moves the
  round from ``open`` to ``finalized`` with one compare-and-set; only the invocation that wins it
  publishes the next model version.

The sums are exact in effect (``partialsum``): float64 products, double-double shards merged in a
fixed order, the aggregator applied in float64 and rounded to the model's dtype once, so the model
published does not depend on which instance folded which update in which order: the embedded
server, worker processes and Ray publish the same bits. No update can make the sums non-finite:
each is bounded in L2 norm (absolute, and relative to the median norm of the updates that made the
model it trained from), a fold that would overflow is rejected, and a non-finite model is never
published (the round fails instead, saying why).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from amble.errors import UpdateRejected
from amble.server import controlvariates, keys
from amble.server.events.base import Event
from amble.server.partialsum import FoldRecord, PartialSum
from amble.server.reports import check_report, device_history, num_samples
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation
from amble.server.state import RoundState
from amble.server.store.base import Store, Value, read_json
from amble.server.tensors import (
    TensorSpec,
    all_finite,
    decode,
    encode,
    l2_norm,
    template_from_json,
    validate_update,
)
from amble.strategies.base import DeviceState, Params, Plan, Report, Strategy
from amble.strategies.serveropt import server_step

CAS_RETRIES = 100
PEER_ROUNDS = 8
"""How many earlier rounds a strategy's prior for unseen devices looks back over (``_peers``)."""
PEER_LIMIT = 64
"""At most this many peers are read per round: the prior is a median, and reads cost store round trips."""


@dataclass(frozen=True)
class _Folded:
    """An update folded into a copy of this instance's shard, ready to commit."""

    shard_version: int
    sums: PartialSum
    blob: Value


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings every function instance reads from the Store."""

    seed: int
    devices_per_round: int
    quorum: float
    max_update_bytes: int
    report_window: int = 16
    max_update_norm: float | None = None
    """Reject an update whose L2 norm (all its tensors together) is above this; None: no absolute bound.
    (None here so settings stored before the bounds existed still parse; the config sets both.)"""
    max_update_norm_ratio: float | None = None
    """Reject an update whose L2 norm is above this many times the median norm of the updates that
    made the model it trained from (the first model has none: only the absolute bound applies)."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> RunSettings:
        return cls(**json.loads(blob))


def select_devices(seed: int, round_index: int, available: list[int], count: int) -> list[int]:
    """Deterministic in ``(seed, round)`` and the available set, so a resumed run replays exactly."""
    rng = np.random.default_rng([seed, round_index])
    pool = sorted(available)
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return sorted(pool[int(i)] for i in chosen)


def norm_reference(store: Store, version: int) -> float | None:
    """The median update norm behind model ``version`` (None: the first model, or all updates zero).

    Stored by the ``finalize`` that published the version, so it is fixed before any update of a
    round that trains from it arrives: the relative bound does not depend on the order of arrival.
    """
    stored = read_json(store, keys.norm_reference(version))
    median = None if stored is None else float(stored["median_norm"])
    return median if median else None


def check_norm(norm: float, settings: RunSettings, reference: float | None, base_version: int) -> None:
    """Refuse (reason ``norm``) an update whose L2 norm is over the absolute bound, or over the ratio
    times ``reference``, the median norm behind ``base_version`` (see :func:`norm_reference`)."""
    bound, ratio = settings.max_update_norm, settings.max_update_norm_ratio
    if bound is not None and not norm <= bound:
        raise UpdateRejected(
            "norm",
            f"update's L2 norm is {norm:.4g}, over server.max_update_norm ({bound:g}): train with the "
            "round's plan (its learning rate and steps), or ask the operator to raise the bound",
        )
    if ratio is not None and reference is not None and not norm <= ratio * reference:
        raise UpdateRejected(
            "norm",
            f"update's L2 norm is {norm:.4g}, over {ratio:g} times the median norm {reference:.4g} of the "
            f"updates that made model version {base_version} (server.max_update_norm_ratio): train with "
            "the round's plan, or ask the operator to raise the ratio",
        )


def record_rejection(store: Store, round_index: int, device: int, upload: str, reason: str, message: str) -> None:
    """Record why an upload was rejected; the first reason recorded for an upload wins."""
    key = keys.round_rejection(round_index, device, upload)
    store.compare_and_set(key, json.dumps({"reason": reason, "message": message}).encode(), 0)
    stored = json.loads(store.get(key) or b"{}").get("reason", reason)
    store.add_to_set(keys.round_rejected(round_index), f"{device}:{upload}:{stored}")


def update_json(store: Store, key: str, change: Callable[[Any], Any], what: str) -> None:
    """Read-modify-write a JSON value with compare-and-set, retrying when someone wrote in between.

    ``change`` gets the current value (None when absent) and returns the new one, or None when
    there is nothing to write.
    """
    for _ in range(CAS_RETRIES):
        current = store.get_versioned(key)
        new = change(json.loads(current.value) if current else None)
        if new is None:
            return
        if store.compare_and_set(key, json.dumps(new).encode(), current.version if current else 0):
            return
    raise RuntimeError(f"could not update {what}: too much contention")


def load_model(store: Store, version: int) -> Params:
    blob = store.get(keys.model(version))
    if blob is None:
        raise LookupError(f"model version {version} is not in the store")
    return decode(blob)


class ServerFunctions:
    """Binds the functions to a Store and a strategy; holds no per-round state itself."""

    def __init__(self, store: Store, strategy: Strategy) -> None:
        self.store = store
        self.strategy = strategy

    def handlers(self) -> dict[str, Handler]:
        if getattr(self.strategy, "asynchronous", False):  # FedBuff: buffered aggregation, no rounds
            from amble.server.buffered import BufferedFunctions  # it builds on this module

            return BufferedFunctions(self.store, self.strategy).handlers()
        return {
            "round_start": self.plan_round,
            "update_uploaded": self.aggregate,
            "round_ready": self.finalize,
            "round_deadline": self.finalize,
        }

    # -- shared reads, cached per warm instance -------------------------------------------------

    def _settings(self, inv: Invocation) -> RunSettings:
        if "settings" not in inv.cache:
            blob = self.store.get(keys.SETTINGS)
            if blob is None:
                raise LookupError("run settings are missing: initialise the parameter server first")
            inv.cache["settings"] = RunSettings.from_json(blob)
        settings: RunSettings = inv.cache["settings"]
        return settings

    def _template(self, inv: Invocation) -> dict[str, TensorSpec]:
        if "template" not in inv.cache:
            blob = self.store.get(keys.TEMPLATE)
            if blob is None:
                raise LookupError("model template is missing: initialise the parameter server first")
            inv.cache["template"] = template_from_json(blob)
        template: dict[str, TensorSpec] = inv.cache["template"]
        return template

    def _round_state(self, inv: Invocation, round_index: int) -> RoundState | None:
        """The round's state (status, expected devices, every plan): parsed once per version per warm
        instance, not once per upload (it grows with the devices per round)."""
        key = keys.round_state(round_index)
        cached = inv.cache.get("state")
        if cached is not None and cached[0] == key and cached[1] == self.store.version(key):
            state: RoundState = cached[2]
            return state
        current = self.store.get_versioned(key)
        if current is None:
            return None
        state = RoundState.from_json(current.value)
        inv.cache["state"] = (key, current.version, state)
        return state

    def _model(self, inv: Invocation, version: int) -> Params:
        cached = inv.cache.get("model")
        if cached is None or cached[0] != version:
            cached = (version, load_model(self.store, version))
            inv.cache["model"] = cached
        params: Params = cached[1]
        return params

    # -- plan_round -----------------------------------------------------------------------------

    def plan_round(self, event: Event, inv: Invocation) -> None:
        """Select the round's devices and write their plans; a second run of it changes nothing.

        The plans and the expected devices are one value written with one compare-and-set, so two
        racing invocations can never leave plans for one selection and expectations of another. A
        selected device whose data breaks planning is left out of the round with the reason
        (``RoundState.excluded``), not expected, and the others are planned as usual.
        """
        round_index = int(event.payload["round"])
        state_key = keys.round_state(round_index)
        if self.store.get(state_key) is None:
            settings = self._settings(inv)
            latest = read_json(self.store, keys.LATEST)
            chosen = select_devices(
                settings.seed, round_index, [int(d) for d in event.payload["available"]], settings.devices_per_round
            )
            plans, excluded = self._plan_devices(round_index, chosen)
            state = RoundState(
                status="open",
                base_version=int(latest["version"]),
                expected=tuple(sorted(plans)),
                plans=plans,
                started_at_s=event.at_s,
                excluded=excluded,
            )
            self.store.compare_and_set(state_key, state.to_json(), 0)
        inv.emit(keys.PUBLISHED_TOPIC, "round_planned", {"round": round_index})

    def _plan_devices(self, round_index: int, chosen: list[int]) -> tuple[dict[int, Plan], dict[int, str]]:
        """Valid plans for the chosen devices, and the reason each one left out was left out.

        A device is left out when its registration cannot be read, when planning raises on it (found
        by planning each device alone once the joint planning raised), or when its plan is invalid.
        """
        excluded: dict[int, str] = {}
        states: dict[int, DeviceState] = {}
        for device in chosen:
            try:
                states[device] = self._device_state(device)
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
            problem = "the strategy gave it no plan" if plan is None else _plan_problem(plan, device_state.num_samples)
            if problem is None and plan is not None:
                valid[device] = plan
            else:
                excluded[device] = f"{problem}; its reports may be corrupt"
        return valid, excluded

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
                    peers[device] = self._device_state(device)
                except (LookupError, ValueError, TypeError):
                    continue
                if len(peers) >= PEER_LIMIT:
                    return list(peers.values())
        return list(peers.values())

    def _device_state(self, device: int) -> DeviceState:
        return DeviceState(device, num_samples(self.store, device), tuple(device_history(self.store, device)))

    # -- aggregate ------------------------------------------------------------------------------

    def aggregate(self, event: Event, inv: Invocation) -> None:
        """Fold one uploaded update into the round's partial aggregate, exactly once in effect."""
        payload = event.payload
        round_index, device, upload = int(payload["round"]), int(payload["device"]), str(payload["upload"])
        update_key = payload.get("update_key")
        try:
            self._fold(inv, round_index, device, update_key, payload, event.at_s)
        except UpdateRejected as rejection:
            record_rejection(self.store, round_index, device, upload, rejection.reason, str(rejection))
            if update_key:
                self.store.delete(update_key)

    def _fold(
        self, inv: Invocation, round_index: int, device: int, update_key: str | None, payload: Any, arrived_at_s: float
    ) -> None:
        state = self._round_state(inv, round_index)
        if state is None:
            raise UpdateRejected("unknown_round", f"round {round_index} was never planned")
        if device not in state.expected:
            raise UpdateRejected("not_selected", f"device {device} was not selected in round {round_index}")
        meta_key, shard_key = keys.round_meta(round_index), keys.round_shard(round_index, inv.shard)
        folded: _Folded | None = None
        for _ in range(CAS_RETRIES):
            current = self.store.get_versioned(meta_key)
            meta = _meta(current.value if current else None)
            if device in meta["counted"]:  # a duplicate or a redelivery: finish what a crash may have cut
                if update_key:
                    self.store.delete(update_key)
                with contextlib.suppress(UpdateRejected):  # what the planner learns is checked and bounded too
                    arrived = check_report(self.store, round_index, device, payload.get("report"), state, arrived_at_s)
                    self._record_report(inv, arrived)
                self._announce_if_complete(inv, round_index, meta, state)
                return
            if meta["sealed"] or not state.is_open:
                raise UpdateRejected("late", f"round {round_index} is already closed")
            report = check_report(self.store, round_index, device, payload.get("report"), state, arrived_at_s)
            if folded is None or self.store.version(shard_key) != folded.shard_version:
                # The heavy part, done once unless this shard itself moved: then loop to re-read the
                # meta record, which other instances may have changed in the meantime.
                delta = self._load_update(inv, device, update_key, payload)
                norm = l2_norm(delta)
                self._check_norm(inv, state, norm)
                if self.strategy.uses_control_variates():
                    self._write_variate(inv, state, round_index, device, str(payload["upload"]), report, delta)
                sums, shard_version = self._shard_sums(inv, shard_key)
                contribution = self.strategy.aggregator.contribution(report)
                # In place, so the warm copy leaves the cache until the commit puts it back: no path
                # that ends without committing (a duplicate, a late fold, a crash) can reuse it.
                inv.cache.pop("shard", None)
                if not sums.add(device, delta, contribution.weight, FoldRecord(norm, contribution.stats)):
                    raise UpdateRejected(
                        "overflow",
                        f"update (L2 norm {norm:.4g}, weight {contribution.weight:g}) would make the round's "
                        "sum non-finite: it was not counted; lower server.max_update_norm to refuse such updates",
                    )
                folded = _Folded(shard_version, sums, sums.to_value())
                continue
            meta["counted"].append(device)
            if self.strategy.uses_control_variates():  # which upload's control variate candidate counts
                meta.setdefault("uploads", {})[str(device)] = str(payload["upload"])
            if shard_key not in meta["shards"]:
                meta["shards"].append(shard_key)
            writes = {
                meta_key: (json.dumps(meta).encode(), current.version if current else 0),
                shard_key: (folded.blob, folded.shard_version),
            }
            if self.store.commit(writes):
                inv.cache["shard"] = (shard_key, folded.shard_version + 1, folded.sums)
                if update_key:
                    self.store.delete(update_key)
                self._record_report(inv, report)
                self._announce_if_complete(inv, round_index, meta, state)
                return
            self.store.incr(keys.FOLD_CONFLICTS)  # another instance committed first: re-read, commit again
            state = self._round_state(inv, round_index) or state
        raise RuntimeError(f"could not fold device {device} into round {round_index}: too much contention")

    def _write_variate(
        self,
        inv: Invocation,
        state: RoundState,
        round_index: int,
        device: int,
        upload: str,
        report: Report,
        delta: Params,
    ) -> None:
        """SCAFFOLD: this upload's candidate ``c_k+``, from the steps it reports (at most its plan's)."""
        eta = controlvariates.lr_sum(state.plans[device], report.local_steps)
        controlvariates.write_candidate(
            self.store, self._template(inv), round_index, device, upload, state.base_version, delta, eta
        )

    def _sample_shares(self, inv: Invocation, devices: list[int]) -> dict[int, float]:
        """Each device's share ``n_k / n`` of the samples of every registered device (the total is read
        once per warm instance: registrations do not change during a simulated run)."""
        if "total_samples" not in inv.cache:
            registered = [key for key in self.store.keys(keys.DEVICE_PREFIX) if key.endswith("/info")]
            inv.cache["total_samples"] = sum(
                int(json.loads(self.store.get(key) or b"{}")["num_samples"]) for key in registered
            )
        total = int(inv.cache["total_samples"])
        return {device: num_samples(self.store, device) / total for device in devices}

    def _load_update(self, inv: Invocation, device: int, update_key: str | None, payload: Any) -> Params:
        settings = self._settings(inv)
        if update_key is None:
            size, limit = payload.get("size", 0), settings.max_update_bytes
            raise UpdateRejected("too_large", f"update is {size:,} bytes, over the limit of {limit:,}")
        blob = self.store.get(update_key)
        if blob is None:
            raise UpdateRejected("missing_update", f"no update blob was stored for device {device}")
        return validate_update(blob, self._template(inv), settings.max_update_bytes)

    def _check_norm(self, inv: Invocation, state: RoundState, norm: float) -> None:
        """:func:`check_norm`, with the round's reference read once per warm instance."""
        settings = self._settings(inv)
        reference = None
        if settings.max_update_norm_ratio is not None:
            cached = inv.cache.get("norm_reference")
            if cached is None or cached[0] != state.base_version:
                cached = (state.base_version, norm_reference(self.store, state.base_version))
                inv.cache["norm_reference"] = cached
            reference = cached[1]
        check_norm(norm, settings, reference, state.base_version)

    def _announce_if_complete(self, inv: Invocation, round_index: int, meta: dict[str, Any], state: RoundState) -> None:
        if len(meta["counted"]) == len(state.expected) and not meta["sealed"]:
            inv.emit(FUNCTIONS_TOPIC, "round_ready", {"round": round_index})

    def _shard_sums(self, inv: Invocation, key: str) -> tuple[PartialSum, int]:
        """This instance's shard of the partial sums and its version (zeros at version 0 when new).

        The warm copy is used while the Store still holds its version: a cheap check, not a download.
        """
        version = self.store.version(key)
        cached = inv.cache.get("shard")
        if cached is not None and cached[0] == key and cached[1] == version:
            sums: PartialSum = cached[2]
            return sums, version
        if version == 0:
            return PartialSum.zeros(self._template(inv)), 0
        current = self.store.get_stored(key)
        if current is None:  # deleted in between (the round was compacted): the commit will fail and retry
            return self._shard_sums(inv, key)
        return PartialSum.from_value(current.value), current.version

    def _record_report(self, inv: Invocation, report: Report) -> None:
        """Append the report to the device's history (what the planner learns from), once."""
        window = self._settings(inv).report_window

        def append(history: Any) -> Any:
            history = history or []
            if any(r["round"] == report.round for r in history):
                return None
            return [*history, report.to_dict()][-window:]

        update_json(self.store, keys.device_reports(report.device), append, f"the reports of device {report.device}")

    # -- finalize -------------------------------------------------------------------------------

    def finalize(self, event: Event, inv: Invocation) -> None:
        """Publish the next model once every expected update is in, or at the deadline with a quorum.

        Order of writes: seal the partial (no fold can land after it), write the model blob, its norm
        reference and the server optimizer's state (their bytes follow from the sealed partial and the
        base version's model and state, so a rerun writes the same bytes),
        move the round state to ``finalized`` (the one decisive compare-and-set), advance ``latest``,
        announce. A rerun after a crash at any point completes the remaining steps.

        A round fails visibly, with the reason in its state's ``failure``, when it is below quorum at
        the deadline or when the new model would hold a NaN or an infinity (the aggregator's result
        overflowed the model's dtype): the model stays at the round's base version.
        """
        round_index = int(event.payload["round"])
        state_key = keys.round_state(round_index)
        current = self.store.get_versioned(state_key)
        if current is None:
            raise LookupError(f"finalize for round {round_index}, which was never planned")
        state = RoundState.from_json(current.value)
        if not state.is_open:
            self._announce_outcome(inv, round_index, state)
            return
        meta = self._seal(round_index, len(state.expected), closing=event.type == "round_deadline")
        if meta is None:
            return  # not every update is in and this is not the deadline
        counted = len(meta["counted"])
        quorum = max(1, math.ceil(self._settings(inv).quorum * len(state.expected)))
        base_version = state.base_version
        if counted < quorum:
            failure = (
                f"{counted} of {len(state.expected)} updates counted at the deadline, below the quorum of {quorum}"
            )
            outcome = state.decided("failed", meta["counted"], quorum=quorum, failure=failure)
        else:
            sums = self._merge_shards(meta["shards"], meta["counted"])
            base_params = self._model(inv, base_version)
            aggregate = self.strategy.aggregator.apply(base_params, sums.total(), sums.stats())
            new_params, optimizer_state = self._server_step(base_version, base_params, aggregate)
            broken = sorted(n for n, t in new_params.items() if t.is_floating_point() and not all_finite(t))
            if broken:
                failure = (
                    f"the aggregate of {counted} updates holds NaN or infinite values in {broken[:5]}; it was not "
                    f"published (the model stays at version {base_version}): lower server.max_update_norm"
                )
                optimizer = self.strategy.server_optimizer
                if optimizer.resolved_kind != "none":
                    failure += f" or the server_optimizer's lr (it is {optimizer.describe()})"
                outcome = state.decided("failed", meta["counted"], failure=failure)
            else:
                reference = {"median_norm": statistics.median(sums.norms()), "updates": counted}
                if self.strategy.uses_control_variates():  # c for the next version, before the round's CAS
                    controlvariates.publish_server_variate(
                        self.store,
                        self._template(inv),
                        round_index,
                        base_version,
                        controlvariates.counted_uploads(meta),
                        self._sample_shares(inv, meta["counted"]),
                    )
                self.store.put(keys.model(base_version + 1), encode(new_params))
                self.store.put(keys.norm_reference(base_version + 1), json.dumps(reference).encode())
                if optimizer_state:
                    self.store.put(keys.server_optimizer_state(base_version + 1), encode(optimizer_state))
                inv.cache["model"] = (base_version + 1, new_params)
                outcome = state.decided("finalized", meta["counted"], version=base_version + 1)
        if self.store.compare_and_set(state_key, outcome.to_json(), current.version):
            self._announce_outcome(inv, round_index, outcome)

    def _server_step(self, base_version: int, base: Params, aggregate: Params) -> tuple[Params, Params]:
        """The strategy's server optimizer applied to the aggregate: the model to publish and the
        optimizer's state to store with it (empty for ``none``, which publishes the aggregate itself).

        The state is read from the base version's key, which stays until the round after next is
        decided, so a rerun of this finalize reads the same state and writes the same bytes.
        """
        settings = self.strategy.server_optimizer
        if settings.resolved_kind == "none":
            return aggregate, {}
        blob = self.store.get(keys.server_optimizer_state(base_version))
        state = None if blob is None else decode(blob)
        return server_step(settings, base, aggregate, state)

    def _seal(self, round_index: int, expected: int, closing: bool) -> dict[str, Any] | None:
        """Close the round to further folds; returns its meta record (None: not yet time)."""
        key = keys.round_meta(round_index)
        for _ in range(CAS_RETRIES):
            current = self.store.get_versioned(key)
            meta = _meta(current.value if current else None)
            if meta["sealed"]:
                return meta
            if len(meta["counted"]) < expected and not closing:
                return None
            meta["sealed"] = True
            if self.store.compare_and_set(key, json.dumps(meta).encode(), current.version if current else 0):
                return meta
        raise RuntimeError(f"could not seal round {round_index}: too much contention")

    def _merge_shards(self, shards: list[str], counted: list[int]) -> PartialSum:
        """The sealed shards summed in a fixed (sorted) order, so a rerun computes the same bytes."""
        total: PartialSum | None = None
        for key in sorted(shards):
            stored = self.store.get_stored(key)
            if stored is None:
                raise LookupError(f"shard {key} of a sealed round is missing from the store")
            part = PartialSum.from_value(stored.value)
            total = part if total is None else total.merged(part)
        if total is None:
            raise LookupError("a round with counted updates has no shards")
        if sorted(total.folds) != sorted(counted):
            raise LookupError(f"the shards hold devices {sorted(total.folds)}, the round counted {sorted(counted)}")
        return total

    def _announce_outcome(self, inv: Invocation, round_index: int, state: RoundState) -> None:
        if self.strategy.uses_control_variates():  # before the next round can be planned
            self._settle_variates(round_index, state)
        if state.status == "finalized" and state.version is not None:
            self._advance_latest(state.version)
            self._compact(round_index, state.base_version)
            inv.emit(keys.PUBLISHED_TOPIC, "model_published", {"round": round_index, "version": state.version})
        elif state.status == "failed":
            payload = {
                "round": round_index,
                "counted": len(state.counted),
                "quorum": state.quorum,
                "failure": state.failure,
            }
            inv.emit(keys.PUBLISHED_TOPIC, "round_failed", {**payload, "version": state.base_version})

    def _settle_variates(self, round_index: int, state: RoundState) -> None:
        """SCAFFOLD, once the round is decided: counted devices' ``c_k`` move on, the rest is dropped."""
        meta = _meta(self.store.get(keys.round_meta(round_index)))
        finalized = state.status == "finalized"
        uploads = controlvariates.counted_uploads(meta) if finalized else {}
        controlvariates.settle_round(self.store, round_index, uploads, state.expected)
        if finalized and state.base_version >= 1:
            controlvariates.drop_server_variate(self.store, state.base_version - 1)

    def _compact(self, round_index: int, base_version: int) -> None:
        """Once a round is decided, drop what nobody reads again (idempotent, so reruns are fine).

        The shards go (the sealed meta record stays: a late or duplicate fold still sees the round
        closed) and so does the model before this round's base, with its norm reference and server
        optimizer state: the store keeps the latest two.
        """
        meta = _meta(self.store.get(keys.round_meta(round_index)))
        for shard in meta["shards"]:
            self.store.delete(shard)
        if base_version >= 1:
            self.store.delete(keys.model(base_version - 1))
            self.store.delete(keys.norm_reference(base_version - 1))
            self.store.delete(keys.server_optimizer_state(base_version - 1))

    def _advance_latest(self, version: int) -> None:
        def advance(latest: Any) -> Any:
            return None if latest is not None and latest["version"] >= version else {"version": version}

        update_json(self.store, keys.LATEST, advance, "the latest model version")


def _meta(blob: bytes | None) -> dict[str, Any]:
    """A round's aggregation record: devices counted, shards written, sealed. Each device's norm and
    aggregator statistics travel with its fold, in its shard."""
    if blob is None:
        return {"counted": [], "shards": [], "sealed": False}
    meta: dict[str, Any] = json.loads(blob)
    return meta


def _plan_problem(plan: Plan, num_samples: int) -> str | None:
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
