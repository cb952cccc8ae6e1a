"""The synchronous rounds' functions: ``plan_round``, ``aggregate`` and ``finalize``.

- ``plan_round`` (``round_start``) selects the round's devices and writes their plans with the round's
  state, one compare-and-set;
- ``aggregate`` (``update_uploaded``) folds an update into the round's partial sums, exactly once in
  effect (``common.FunctionsBase.fold_once``);
- ``finalize`` (``round_ready``, ``round_deadline``) seals the meta record (no fold can commit after
  it), sums the shards and moves the round from ``open`` to ``finalized`` with one compare-and-set;
  only the invocation that wins it publishes the next model version. A round fails visibly, saying
  why, below quorum at the deadline or when the new model would hold a NaN or an infinity.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

from amble.errors import UpdateRejected
from amble.server import keys
from amble.server.events.base import Event
from amble.server.functions import controlvariates
from amble.server.functions.common import (
    CAS_RETRIES,
    KEEP_ROUNDS,
    FoldTarget,
    FunctionsBase,
    broken_tensors,
    compacted_below,
    read_meta,
    record_rejection,
)
from amble.server.functions.planning import select_devices
from amble.server.records.reports import check_report, num_samples
from amble.server.records.state import RoundState
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation
from amble.server.store.base import read_json
from amble.server.tensors import decode, encode
from amble.strategies.base import Params
from amble.strategies.serveropt import server_step


class RoundFunctions(FunctionsBase):
    """The functions of a synchronous strategy's rounds."""

    def handlers(self) -> dict[str, Handler]:
        return {
            "round_start": self.plan_round,
            "update_uploaded": self.aggregate,
            "round_ready": self.finalize,
            "round_deadline": self.finalize,
        }

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
        if round_index < compacted_below(self.store):
            return  # a redelivered start of a round decided and compacted long ago
        if self.store.get(state_key) is None:
            settings = self.settings(inv)
            latest = read_json(self.store, keys.LATEST)
            chosen = select_devices(
                settings.seed, round_index, [int(d) for d in event.payload["available"]], settings.devices_per_round
            )
            plans, excluded = self.planner.plan_devices(round_index, chosen)
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

    # -- aggregate ------------------------------------------------------------------------------

    def aggregate(self, event: Event, inv: Invocation) -> None:
        """Fold one uploaded update into the round's partial aggregate, exactly once in effect."""
        payload = event.payload
        round_index, device, upload = int(payload["round"]), int(payload["device"]), str(payload["upload"])
        update_key = payload.get("update_key")
        reader = _RoundReader(self, inv, payload, event.at_s)

        def write_variate(target: FoldTarget, delta: Params) -> None:
            """SCAFFOLD: this upload's candidate ``c_k+``, from the steps it reports (at most its plan's)."""
            eta = controlvariates.lr_sum(reader.plan(), target.report.local_steps)
            template = self.template(inv)
            controlvariates.write_candidate(
                self.store, template, round_index, device, upload, target.base_version, delta, eta
            )

        try:
            on_delta = write_variate if self.strategy.uses_control_variates() else None
            target = self.fold_once(inv, reader.read, update_key, payload, on_delta)
        except UpdateRejected as rejection:
            record_rejection(self.store, round_index, device, upload, rejection.reason, str(rejection))
            if update_key:
                self.store.delete(update_key)
            return
        if target is not None and reader.state is not None:
            self.announce_if_complete(inv, round_index, target.meta, reader.state)

    def announce_if_complete(self, inv: Invocation, round_index: int, meta: dict[str, Any], state: RoundState) -> None:
        if len(meta["counted"]) == len(state.expected) and not meta["sealed"]:
            inv.emit(FUNCTIONS_TOPIC, "round_ready", {"round": round_index})

    def sample_shares(self, inv: Invocation, devices: list[int]) -> dict[int, float]:
        """Each device's share ``n_k / n`` of the samples of every registered device (the total is read
        once per warm instance: registrations do not change during a simulated run)."""
        if "total_samples" not in inv.cache:
            registered = [key for key in self.store.keys(keys.DEVICE_PREFIX) if key.endswith("/info")]
            inv.cache["total_samples"] = sum(
                int(json.loads(self.store.get(key) or b"{}")["num_samples"]) for key in registered
            )
        total = int(inv.cache["total_samples"])
        return {device: num_samples(self.store, device) / total for device in devices}

    # -- finalize -------------------------------------------------------------------------------

    def finalize(self, event: Event, inv: Invocation) -> None:
        """Publish the next model once every expected update is in, or at the deadline with a quorum.

        Order of writes: seal the partial (no fold can land after it), write the model blob, its norm
        reference and the server optimizer's state (their bytes follow from the sealed partial and the
        base version's model and state, so a rerun writes the same bytes), move the round state to
        ``finalized`` (the one decisive compare-and-set), advance ``latest``, announce. A rerun after a
        crash at any point completes the remaining steps.
        """
        round_index = int(event.payload["round"])
        state_key = keys.round_state(round_index)
        current = self.store.get_versioned(state_key)
        if current is None:
            if round_index < compacted_below(self.store):
                return  # a redelivered event of a round decided and compacted long ago
            raise LookupError(f"finalize for round {round_index}, which was never planned")
        state = RoundState.from_json(current.value)
        if not state.is_open:
            self._announce_outcome(inv, round_index, state)
            return
        meta = self._seal(round_index, len(state.expected), closing=event.type == "round_deadline")
        if meta is None:
            return  # not every update is in and this is not the deadline
        counted = len(meta["counted"])
        quorum = max(1, math.ceil(self.settings(inv).quorum * len(state.expected)))
        if counted < quorum:
            failure = (
                f"{counted} of {len(state.expected)} updates counted at the deadline, below the quorum of {quorum}"
            )
            outcome = state.decided("failed", meta["counted"], quorum=quorum, failure=failure)
        else:
            outcome = self._publish(inv, round_index, state, meta)
        if self.store.compare_and_set(state_key, outcome.to_json(), current.version):
            self._announce_outcome(inv, round_index, outcome)

    def _publish(self, inv: Invocation, round_index: int, state: RoundState, meta: dict[str, Any]) -> RoundState:
        """The round's outcome with a quorum: the next model written (not yet announced), or a failure
        when it would hold a NaN or an infinity (the model stays at the round's base version)."""
        base_version = state.base_version
        base_params = self.model(inv, base_version)
        sums, aggregate = self.combine(meta, base_params, self.strategy.aggregator)
        new_params, optimizer_state = self._server_step(base_version, base_params, aggregate)
        broken = broken_tensors(new_params)
        if broken:
            failure = (
                f"the aggregate of {len(meta['counted'])} updates holds NaN or infinite values in {broken[:5]}; it "
                f"was not published (the model stays at version {base_version}): lower server.max_update_norm"
            )
            optimizer = self.strategy.server_optimizer
            if optimizer.resolved_kind != "none":
                failure += f" or the server_optimizer's lr (it is {optimizer.describe()})"
            return state.decided("failed", meta["counted"], failure=failure)
        if self.strategy.uses_control_variates():  # c for the next version, before the round's CAS
            controlvariates.publish_server_variate(
                self.store,
                self.template(inv),
                round_index,
                base_version,
                controlvariates.counted_uploads(meta),
                self.sample_shares(inv, meta["counted"]),
            )
        self.write_model(inv, base_version + 1, new_params, sums)
        if optimizer_state:
            self.store.put(keys.server_optimizer_state(base_version + 1), encode(optimizer_state))
        return state.decided("finalized", meta["counted"], version=base_version + 1)

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
            meta = read_meta(current.value if current else None)
            if meta["sealed"]:
                return meta
            if len(meta["counted"]) < expected and not closing:
                return None
            meta["sealed"] = True
            if self.store.compare_and_set(key, json.dumps(meta).encode(), current.version if current else 0):
                return meta
        raise RuntimeError(f"could not seal round {round_index}: too much contention")

    def _announce_outcome(self, inv: Invocation, round_index: int, state: RoundState) -> None:
        if self.strategy.uses_control_variates():  # before the next round can be planned
            self._settle_variates(round_index, state)
        if state.status == "finalized" and state.version is not None:
            self.advance_latest(state.version)
            self.drop_shards(keys.round_meta(round_index))
            self.drop_versions_before(state.base_version)  # the store keeps the latest two
            self.compact_before(round_index + 1 - KEEP_ROUNDS)
            inv.emit(keys.PUBLISHED_TOPIC, "model_published", {"round": round_index, "version": state.version})
        elif state.status == "failed":
            payload = {
                "round": round_index,
                "counted": len(state.counted),
                "quorum": state.quorum,
                "failure": state.failure,
            }
            inv.emit(keys.PUBLISHED_TOPIC, "round_failed", {**payload, "version": state.base_version})
            self.compact_before(round_index + 1 - KEEP_ROUNDS)

    def _settle_variates(self, round_index: int, state: RoundState) -> None:
        """SCAFFOLD, once the round is decided: counted devices' ``c_k`` move on, the rest is dropped."""
        meta = read_meta(self.store.get(keys.round_meta(round_index)))
        finalized = state.status == "finalized"
        uploads = controlvariates.counted_uploads(meta) if finalized else {}
        controlvariates.settle_round(self.store, round_index, uploads, state.expected)
        if finalized and state.base_version >= 1:
            controlvariates.drop_server_variate(self.store, state.base_version - 1)


class _RoundReader:
    """What a fold into a round reads before each commit attempt (``FunctionsBase.fold_once``)."""

    def __init__(self, functions: RoundFunctions, inv: Invocation, payload: Any, arrived_at_s: float) -> None:
        self.functions, self.inv, self.payload, self.arrived_at_s = functions, inv, payload, arrived_at_s
        self.round, self.device = int(payload["round"]), int(payload["device"])
        self.state: RoundState | None = None

    def plan(self) -> Any:
        assert self.state is not None  # read() ran first
        return self.state.plans[self.device]

    def read(self) -> FoldTarget | None:
        functions, store, round_index, device = self.functions, self.functions.store, self.round, self.device
        state = functions._round_state(self.inv, round_index)
        if state is None and round_index < compacted_below(store):
            raise UpdateRejected("late", f"round {round_index} was decided long ago")
        if state is None:
            raise UpdateRejected("unknown_round", f"round {round_index} was never planned")
        self.state = state
        if device not in state.expected:
            raise UpdateRejected("not_selected", f"device {device} was not selected in round {round_index}")
        meta_key, shard_key = keys.round_meta(round_index), keys.round_shard(round_index, self.inv.shard)
        current = store.get_versioned(meta_key)
        meta = read_meta(current.value if current else None)
        if device in meta["counted"]:  # a duplicate or a redelivery: finish what a crash may have cut
            with contextlib.suppress(UpdateRejected):  # what the planner learns is checked and bounded too
                functions.record_report(self.inv, self._report(state))
            functions.announce_if_complete(self.inv, round_index, meta, state)
            return None
        if meta["sealed"] or not state.is_open:
            raise UpdateRejected("late", f"round {round_index} is already closed")
        report = self._report(state)
        meta["counted"].append(device)
        if functions.strategy.uses_control_variates():  # which upload's control variate candidate counts
            meta.setdefault("uploads", {})[str(device)] = str(self.payload["upload"])
        if shard_key not in meta["shards"]:
            meta["shards"].append(shard_key)
        return FoldTarget(
            group=round_index,
            item=device,
            device=device,
            base_version=state.base_version,
            report=report,
            contribution=functions.strategy.aggregator.contribution(report),
            meta_key=meta_key,
            shard_key=shard_key,
            meta=meta,
            meta_version=current.version if current else 0,
            what=f"round {round_index}",
        )

    def _report(self, state: RoundState) -> Any:
        store, payload = self.functions.store, self.payload
        return check_report(store, self.round, self.device, payload.get("report"), state, self.arrived_at_s)
