"""The parameter server's functions: ``plan_round``, ``aggregate`` and ``finalize``.

Each is triggered by one event and keeps no state between events except an instance's warm cache
(a copy of what is in the Store, used only while its Store version is unchanged). Every write that
matters is a compare-and-set on a versioned key, so running a function twice, or crashing it
half-way and running it again, has the effect of running it once:

- ``aggregate`` folds the update and records the device as counted in *one* write (the partial
  aggregate blob carries its list of counted devices), so a duplicate or redelivered update is
  seen as already counted and skipped;
- ``finalize`` moves the round from ``open`` to ``finalized`` with one compare-and-set; only the
  invocation that wins it publishes the next model version.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from amble.errors import UpdateRejected
from amble.server import keys
from amble.server.events.base import Event
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation
from amble.server.store.base import Store
from amble.server.tensors import (
    TensorSpec,
    decode,
    encode,
    read_metadata,
    template_from_json,
    validate_update,
)
from amble.strategies.base import DeviceState, Params, Plan, Report, Strategy

CAS_RETRIES = 100


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings every function instance reads from the Store."""

    seed: int
    devices_per_round: int
    quorum: float
    max_update_bytes: int
    report_window: int = 16

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


def read_json(store: Store, key: str) -> Any:
    blob = store.get(key)
    return None if blob is None else json.loads(blob)


def record_rejection(store: Store, round_index: int, device: int, reason: str, message: str) -> None:
    """Rejections are facts in the Store (a set, so a redelivered rejection counts once)."""
    store.put(keys.round_rejection(round_index, device), json.dumps({"reason": reason, "message": message}).encode())
    store.add_to_set(keys.round_rejected(round_index), f"{device}:{reason}")
    store.delete(keys.round_update(round_index, device))


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

    def _model(self, inv: Invocation, version: int) -> Params:
        cached = inv.cache.get("model")
        if cached is None or cached[0] != version:
            cached = (version, load_model(self.store, version))
            inv.cache["model"] = cached
        params: Params = cached[1]
        return params

    # -- plan_round -----------------------------------------------------------------------------

    def plan_round(self, event: Event, inv: Invocation) -> None:
        """Select the round's devices and write their plans; a second run of it changes nothing."""
        round_index = int(event.payload["round"])
        state_key = keys.round_state(round_index)
        if self.store.get(state_key) is None:
            settings = self._settings(inv)
            latest = read_json(self.store, keys.LATEST)
            chosen = select_devices(
                settings.seed, round_index, [int(d) for d in event.payload["available"]], settings.devices_per_round
            )
            states = [self._device_state(d) for d in chosen]
            plans = self.strategy.plan(round_index, states)
            self.store.put(
                keys.round_plans(round_index), json.dumps({str(d): p.to_dict() for d, p in plans.items()}).encode()
            )
            state = {"status": "open", "base_version": latest["version"], "expected": chosen}
            self.store.compare_and_set(state_key, json.dumps(state).encode(), 0)
        inv.emit(keys.PUBLISHED_TOPIC, "round_planned", {"round": round_index})

    def _device_state(self, device: int) -> DeviceState:
        info = read_json(self.store, keys.device_info(device))
        if info is None:
            raise LookupError(f"device {device} is not registered")
        reports = read_json(self.store, keys.device_reports(device)) or []
        return DeviceState(device, int(info["num_samples"]), tuple(Report.from_dict(r) for r in reports))

    # -- aggregate ------------------------------------------------------------------------------

    def aggregate(self, event: Event, inv: Invocation) -> None:
        """Fold one uploaded update into the round's partial aggregate, exactly once in effect."""
        payload = event.payload
        round_index, device = int(payload["round"]), int(payload["device"])
        try:
            report = self._check_report(round_index, device, payload.get("report"))
            self._fold(inv, round_index, device, report)
        except UpdateRejected as rejection:
            record_rejection(self.store, round_index, device, rejection.reason, str(rejection))

    def _check_report(self, round_index: int, device: int, raw: Any) -> Report:
        try:
            report = Report.from_dict(raw)
        except (KeyError, TypeError) as exc:
            raise UpdateRejected("malformed_report", f"report is missing field {exc}") from None
        numbers = [report.num_samples, report.local_steps, report.batch_size, report.compute_s]
        numbers += [report.download_s, report.upload_s]
        if not all(isinstance(x, int | float) and math.isfinite(x) and x >= 0 for x in numbers):
            raise UpdateRejected("malformed_report", "report fields must be finite non-negative numbers")
        if report.num_samples <= 0 or report.local_steps <= 0 or report.batch_size <= 0:
            raise UpdateRejected("malformed_report", "num_samples, local_steps and batch_size must be positive")
        if (report.round, report.device) != (round_index, device):
            raise UpdateRejected(
                "malformed_report", f"report is for round {report.round} device {report.device}, not the upload's"
            )
        return report

    def _fold(self, inv: Invocation, round_index: int, device: int, report: Report) -> None:
        state = read_json(self.store, keys.round_state(round_index))
        if state is None:
            raise UpdateRejected("unknown_round", f"round {round_index} was never planned")
        if device not in state["expected"]:
            raise UpdateRejected("not_selected", f"device {device} was not selected in round {round_index}")
        partial_key = keys.round_partial(round_index)
        for _ in range(CAS_RETRIES):
            current = self.store.get_versioned(partial_key)
            meta = _partial_meta(current.value if current else None)
            if device in meta["counted"]:
                self.store.delete(keys.round_update(round_index, device))
                self._record_report(inv, report)
                return
            if state["status"] != "open":
                raise UpdateRejected("late", f"round {round_index} is already {state['status']}")
            blob = self.store.get(keys.round_update(round_index, device))
            if blob is None:
                raise UpdateRejected("missing_update", f"no update blob was stored for device {device}")
            settings = self._settings(inv)
            delta = validate_update(blob, self._template(inv), settings.max_update_bytes)
            sums = self._partial_sums(inv, partial_key, current)
            contribution = self.strategy.aggregator.contribution(report)
            new_sums = {name: sums[name] + contribution.weight * delta[name] for name in sums}
            meta["counted"].append(device)
            for stat, value in contribution.stats.items():
                meta["stats"][stat] = meta["stats"].get(stat, 0.0) + value
            new_blob = encode(new_sums, {"counted": json.dumps(meta["counted"]), "stats": json.dumps(meta["stats"])})
            expected_version = current.version if current else 0
            if self.store.compare_and_set(partial_key, new_blob, expected_version):
                inv.cache["partial"] = (partial_key, expected_version + 1, new_sums)
                self.store.delete(keys.round_update(round_index, device))
                self._record_report(inv, report)
                if len(meta["counted"]) == len(state["expected"]):
                    inv.emit(FUNCTIONS_TOPIC, "round_ready", {"round": round_index})
                return
            state = read_json(self.store, keys.round_state(round_index))  # someone else wrote: re-read
        raise RuntimeError(f"could not fold device {device} into round {round_index}: too much contention")

    def _partial_sums(self, inv: Invocation, key: str, current: Any) -> Params:
        if current is None:
            return {
                name: torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype))
                for name, spec in self._template(inv).items()
            }
        cached = inv.cache.get("partial")
        if cached is not None and cached[0] == key and cached[1] == current.version:
            sums: Params = cached[2]
            return sums
        return decode(current.value)

    def _record_report(self, inv: Invocation, report: Report) -> None:
        """Append the report to the device's history (what the planner learns from), once."""
        window = self._settings(inv).report_window
        key = keys.device_reports(report.device)
        for _ in range(CAS_RETRIES):
            current = self.store.get_versioned(key)
            history = json.loads(current.value) if current else []
            if any(r["round"] == report.round for r in history):
                return
            history = [*history, report.to_dict()][-window:]
            if self.store.compare_and_set(key, json.dumps(history).encode(), current.version if current else 0):
                return
        raise RuntimeError(f"could not record the report of device {report.device}: too much contention")

    # -- finalize -------------------------------------------------------------------------------

    def finalize(self, event: Event, inv: Invocation) -> None:
        """Publish the next model once every expected update is in, or at the deadline with a quorum."""
        round_index = int(event.payload["round"])
        state_key = keys.round_state(round_index)
        current = self.store.get_versioned(state_key)
        if current is None:
            raise LookupError(f"finalize for round {round_index}, which was never planned")
        state = json.loads(current.value)
        if state["status"] != "open":
            return
        partial = self.store.get(keys.round_partial(round_index))
        meta = _partial_meta(partial)
        counted, expected = len(meta["counted"]), len(state["expected"])
        if counted < expected and event.type != "round_deadline":
            return
        quorum = max(1, math.ceil(self._settings(inv).quorum * expected))
        base_version = int(state["base_version"])
        if counted < quorum:
            failed = {**state, "status": "failed", "counted": meta["counted"], "quorum": quorum}
            if self.store.compare_and_set(state_key, json.dumps(failed).encode(), current.version):
                inv.emit(
                    keys.PUBLISHED_TOPIC,
                    "round_failed",
                    {"round": round_index, "counted": counted, "quorum": quorum, "version": base_version},
                )
            return
        assert partial is not None  # counted >= quorum >= 1 means something was folded
        sums = decode(partial)
        new_params = self.strategy.aggregator.apply(self._model(inv, base_version), sums, meta["stats"])
        new_version = base_version + 1
        self.store.put(keys.model(new_version), encode(new_params))
        done = {**state, "status": "finalized", "counted": meta["counted"], "version": new_version}
        if not self.store.compare_and_set(state_key, json.dumps(done).encode(), current.version):
            return  # another instance finalised this round first
        self._advance_latest(new_version)
        inv.cache["model"] = (new_version, new_params)
        inv.emit(keys.PUBLISHED_TOPIC, "model_published", {"round": round_index, "version": new_version})

    def _advance_latest(self, version: int) -> None:
        for _ in range(CAS_RETRIES):
            current = self.store.get_versioned(keys.LATEST)
            latest = json.loads(current.value)["version"] if current else -1
            if latest >= version:
                return
            blob = json.dumps({"version": version}).encode()
            if self.store.compare_and_set(keys.LATEST, blob, current.version if current else 0):
                return
        raise RuntimeError("could not advance the latest model version: too much contention")


def _partial_meta(blob: bytes | None) -> dict[str, Any]:
    if blob is None:
        return {"counted": [], "stats": {}}
    meta = read_metadata(blob)
    return {"counted": json.loads(meta["counted"]), "stats": json.loads(meta["stats"])}


def plans_from_json(blob: bytes) -> dict[int, Plan]:
    return {int(d): Plan.from_dict(p) for d, p in json.loads(blob).items()}
