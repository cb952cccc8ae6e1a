"""What every function shares: cached reads, the one exactly-once fold and the one publish.

Each function is triggered by one event and keeps no state between events except an instance's warm
cache (a copy of what is in the Store, used only while its Store version is unchanged). Every write
that matters is a compare-and-set on versioned keys, so running a function twice, or crashing it
half-way and running it again, has the effect of running it once:

- a fold (:meth:`FunctionsBase.fold_once`) adds the update to its instance's *shard* of the partial
  sums and records the update as counted in the small *meta* record, both in one atomic ``commit``
  (with any record of the caller's, such as a task's); a duplicate or a redelivery is seen as counted
  and skipped. Instances fold into different shards, so parallel workers never redo each other's
  folds; they only serialise on the meta record, a few hundred bytes;
- a publish (:meth:`FunctionsBase.combine`, :meth:`FunctionsBase.write_model`) sums the sealed shards
  in a fixed order and applies the aggregator, so the model published does not depend on which
  instance folded which update in which order: the embedded server, worker processes and Ray publish
  the same bits. No update can make the sums non-finite: each is bounded in L2 norm (absolute, and
  relative to the median norm of the updates behind the model it trained from), a fold that would
  overflow is rejected, and a non-finite model is never published.

Rounds (``rounds.py``) and FedBuff's buffers (``buffered.py``) differ only in what they read before
a fold and what they decide after; both fold and publish through this module.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amble.errors import UpdateRejected
from amble.server import keys
from amble.server.functions.planning import PEER_ROUNDS, Planner
from amble.server.records.partialsum import FoldRecord, PartialSum
from amble.server.records.settings import RunSettings, load_model, norm_reference, read_settings, read_template
from amble.server.runtime.base import Invocation
from amble.server.store.base import Store, Value, read_json
from amble.server.tensors import TensorSpec, all_finite, encode, update_stats, validate_update
from amble.strategies.base import Aggregator, Contribution, Params, Report, Strategy

CAS_RETRIES = 100
KEEP_ROUNDS = PEER_ROUNDS + 2
"""Decided rounds whose records (state, meta, rejections) stay in the store: the planner's prior reads
the last :data:`PEER_ROUNDS`; older ones are compacted away, so the store does not grow with the run."""


def read_meta(blob: bytes | None) -> dict[str, Any]:
    """A round's (or buffer's) aggregation record: what was counted, the shards written, sealed. Each
    update's norm and aggregator statistics travel with its fold, in its shard."""
    if blob is None:
        return {"counted": [], "shards": [], "sealed": False}
    meta: dict[str, Any] = json.loads(blob)
    return meta


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


def check_norm(norm: float, settings: RunSettings, reference: float | None, base_version: int) -> None:
    """Refuse (reason ``norm``) an update whose L2 norm is over the absolute bound, or over the ratio
    times ``reference``, the median norm behind ``base_version`` (see ``records.settings.norm_reference``)."""
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


def compacted_below(store: Store) -> int:
    """Rounds (or buffers) below this were compacted away: an event for one is stale."""
    stored = read_json(store, keys.COMPACTED)
    return 0 if stored is None else int(stored["below"])


def broken_tensors(params: Params) -> list[str]:
    """The floating tensors holding a NaN or an infinity, by name."""
    return sorted(n for n, t in params.items() if t.is_floating_point() and not all_finite(t))


@dataclass(frozen=True)
class FoldTarget:
    """Where one update is to be counted, as read for one commit attempt."""

    group: int
    """The round (or buffer) the update is counted in."""
    item: int
    """What the shard records the fold under: the device (rounds) or the task (buffers)."""
    device: int
    base_version: int
    """The model the update trained from: its norm is held to the median norm behind it."""
    report: Report
    contribution: Contribution
    meta_key: str
    shard_key: str
    meta: dict[str, Any]
    """The meta record to write, with this update counted."""
    meta_version: int
    what: str
    """What the sum belongs to, for messages: ``round 3``, ``buffer 7``."""
    extra_writes: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    """Further records the commit writes (compare-and-set on their versions), e.g. a task marked counted."""


RETRY = "retry"
"""What a fold's reader returns when what it read moved on under it: read again."""
Reader = Callable[[], "FoldTarget | str | None"]
"""Reads what a fold needs: a target, None when the update is counted already (the reader has
finished what a crash may have cut), or :data:`RETRY`."""


@dataclass(frozen=True)
class _Folded:
    """An update folded into a copy of this instance's shard, ready to commit."""

    shard_key: str
    shard_version: int
    sums: PartialSum
    blob: Value


class FunctionsBase:
    """Binds the functions to a Store and a strategy; holds no per-round state itself."""

    def __init__(self, store: Store, strategy: Strategy) -> None:
        self.store = store
        self.strategy = strategy
        self.planner = Planner(store, strategy)

    # -- shared reads, cached per warm instance -------------------------------------------------

    def settings(self, inv: Invocation) -> RunSettings:
        if "settings" not in inv.cache:
            inv.cache["settings"] = read_settings(self.store)
        settings: RunSettings = inv.cache["settings"]
        return settings

    def template(self, inv: Invocation) -> dict[str, TensorSpec]:
        if "template" not in inv.cache:
            inv.cache["template"] = read_template(self.store)
        template: dict[str, TensorSpec] = inv.cache["template"]
        return template

    def model(self, inv: Invocation, version: int) -> Params:
        cached = inv.cache.get("model")
        if cached is None or cached[0] != version:
            cached = (version, load_model(self.store, version))
            inv.cache["model"] = cached
        params: Params = cached[1]
        return params

    def load_update(self, inv: Invocation, device: int, update_key: str | None, payload: Any) -> Params:
        """The stored update, checked against the model except for finiteness (the fold's
        :func:`update_stats` checks that), as read-only views of the blob's bytes."""
        settings = self.settings(inv)
        if update_key is None:
            size, limit = payload.get("size", 0), settings.max_update_bytes
            raise UpdateRejected("too_large", f"update is {size:,} bytes, over the limit of {limit:,}")
        blob = self.store.get(update_key)
        if blob is None:
            raise UpdateRejected("missing_update", f"no update blob was stored for device {device}")
        # Finiteness is checked by the fold's own reads of the update (update_stats), not here.
        return validate_update(blob, self.template(inv), settings.max_update_bytes, finite=False)

    def check_update_norm(self, inv: Invocation, base_version: int, norm: float) -> None:
        """:func:`check_norm`, with the reference of ``base_version`` read once per warm instance."""
        settings = self.settings(inv)
        reference = None
        if settings.max_update_norm_ratio is not None:
            cached = inv.cache.get("norm_reference")
            if cached is None or cached[0] != base_version:
                cached = (base_version, norm_reference(self.store, base_version))
                inv.cache["norm_reference"] = cached
            reference = cached[1]
        check_norm(norm, settings, reference, base_version)

    def record_report(self, inv: Invocation, report: Report) -> None:
        """Append the report to the device's history (what the planner learns from), once."""
        window = self.settings(inv).report_window

        def append(history: Any) -> Any:
            history = history or []
            if any(r["round"] == report.round for r in history):
                return None
            return [*history, report.to_dict()][-window:]

        update_json(self.store, keys.device_reports(report.device), append, f"the reports of device {report.device}")

    # -- the fold -------------------------------------------------------------------------------

    def fold_once(
        self,
        inv: Invocation,
        read: Reader,
        update_key: str | None,
        payload: Any,
        on_delta: Callable[[FoldTarget, Params], None] | None = None,
    ) -> FoldTarget | None:
        """Fold one update into this instance's shard and count it, exactly once in effect.

        ``read`` says where it goes (and raises ``UpdateRejected`` when it goes nowhere); the update is
        loaded, bounded and folded once unless this instance's shard moved in between. Returns the
        committed target, or None when the update had been counted already. ``on_delta`` sees the
        checked update before its fold (SCAFFOLD writes its control-variate candidate from it).
        """
        folded: _Folded | None = None
        for _ in range(CAS_RETRIES):
            target = read()
            if target is None:  # a duplicate or a redelivery: the reader finished what a crash cut
                self._drop_update(update_key)
                return None
            if isinstance(target, str):
                continue
            shard = target.shard_key
            if folded is None or folded.shard_key != shard or self.store.version(shard) != folded.shard_version:
                # The heavy part, done once unless this shard itself moved: then read again, since
                # other instances may have changed the meta record in the meantime.
                folded = self._fold_into_shard(inv, target, update_key, payload, on_delta)
                continue
            writes = {
                target.meta_key: (json.dumps(target.meta).encode(), target.meta_version),
                shard: (folded.blob, folded.shard_version),
                **target.extra_writes,
            }
            if self.store.commit(writes):
                inv.cache["shard"] = (shard, folded.shard_version + 1, folded.sums)
                self._drop_update(update_key)
                self.record_report(inv, target.report)
                return target
            self.store.incr(keys.FOLD_CONFLICTS)  # another instance committed first: read, commit again
        raise RuntimeError(f"could not fold an update of device {payload.get('device')}: too much contention")

    def _fold_into_shard(
        self,
        inv: Invocation,
        target: FoldTarget,
        update_key: str | None,
        payload: Any,
        on_delta: Callable[[FoldTarget, Params], None] | None,
    ) -> _Folded:
        delta = self.load_update(inv, target.device, update_key, payload)
        stats = update_stats(delta)
        norm = stats.norm
        self.check_update_norm(inv, target.base_version, norm)
        if on_delta is not None:
            on_delta(target, delta)
        sums, shard_version = self._shard_sums(inv, target.shard_key)
        weight = target.contribution.weight
        # In place, so the warm copy leaves the cache until the commit puts it back: no path that
        # ends without committing (a duplicate, a late fold, a crash) can reuse it.
        inv.cache.pop("shard", None)
        if not sums.add(target.item, delta, weight, FoldRecord(norm, target.contribution.stats), stats.largest):
            raise UpdateRejected(
                "overflow",
                f"update (L2 norm {norm:.4g}, weight {weight:g}) would make the sum of {target.what} non-finite: "
                "it was not counted; lower server.max_update_norm to refuse such updates",
            )
        return _Folded(target.shard_key, shard_version, sums, sums.to_value())

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
            return PartialSum.zeros(self.template(inv)), 0
        current = self.store.get_stored(key)
        if current is None:  # deleted in between (the round was compacted): the commit will fail and retry
            return self._shard_sums(inv, key)
        return PartialSum.from_value(current.value), current.version

    def _drop_update(self, update_key: str | None) -> None:
        if update_key:
            self.store.delete(update_key)

    # -- the publish ----------------------------------------------------------------------------

    def combine(self, meta: dict[str, Any], base: Params, aggregator: Aggregator) -> tuple[PartialSum, Params]:
        """The sealed shards summed in a fixed (sorted) order and the aggregator applied to ``base``:
        a rerun computes the same bytes."""
        total: PartialSum | None = None
        for key in sorted(meta["shards"]):
            stored = self.store.get_stored(key)
            if stored is None:
                raise LookupError(f"shard {key} of a sealed round is missing from the store")
            part = PartialSum.from_value(stored.value)
            total = part if total is None else total.merged(part)
        if total is None:
            raise LookupError("a round with counted updates has no shards")
        if sorted(total.folds) != sorted(meta["counted"]):
            raise LookupError(f"the shards hold {sorted(total.folds)}, the round counted {sorted(meta['counted'])}")
        return total, aggregator.apply(base, total.total(), total.stats())

    def write_model(self, inv: Invocation, version: int, params: Params, sums: PartialSum) -> None:
        """Model ``version`` and its norm reference (the median norm of the updates behind it)."""
        reference = {"median_norm": statistics.median(sums.norms()), "updates": len(sums.folds)}
        self.store.put(keys.model(version), encode(params))
        self.store.put(keys.norm_reference(version), json.dumps(reference).encode())
        inv.cache["model"] = (version, params)

    def advance_latest(self, version: int) -> None:
        def advance(latest: Any) -> Any:
            return None if latest is not None and latest["version"] >= version else {"version": version}

        update_json(self.store, keys.LATEST, advance, "the latest model version")

    def drop_shards(self, meta_key: str) -> None:
        """Once a round (or buffer) is decided its shards go; the sealed meta record stays, so a late or
        duplicate fold still sees it closed."""
        for shard in read_meta(self.store.get(meta_key))["shards"]:
            self.store.delete(shard)

    def compact_before(self, below: int) -> None:
        """Drop the records of every round (or buffer) below ``below``: state, meta record, shards and
        rejections (see :meth:`advance_mark`)."""
        self.advance_mark(keys.COMPACTED, below, self._drop_round)

    def advance_mark(self, key: str, below: int, drop: Callable[[int], None]) -> None:
        """Move a compaction mark up to ``below`` and ``drop`` what it passes.

        The mark (JSON ``{"from", "below"}``: ``from`` the first not known to be dropped) is written
        before the drops, so a redelivered event of a dropped round finds it stale instead of planning
        it anew, and again after them; a call that finds ``from < below`` redoes that window first
        (drops are idempotent), so a crash between the mark and its drops loses nothing.
        """
        stored = read_json(self.store, key) or {"from": 0, "below": 0}
        done_from, start = int(stored.get("from", 0)), int(stored["below"])
        for old in range(done_from, start):  # a crash cut the last window's drops: finish them
            drop(old)
        if below <= start:
            if done_from < start:
                self._set_mark(key, start, start)
            return
        self._set_mark(key, start, below)
        for old in range(start, below):
            drop(old)
        self._set_mark(key, below, below)  # every drop done: the next call has nothing to redo

    def _set_mark(self, key: str, done_from: int, below: int) -> None:
        def advance(current: Any) -> Any:
            moved = {"from": done_from, "below": below}
            if current and (int(current["below"]), int(current.get("from", 0))) >= (below, done_from):
                return None  # another invocation moved it as far already
            return moved

        update_json(self.store, key, advance, f"the compaction mark {key}")

    def _drop_round(self, round_index: int) -> None:
        meta_key = keys.round_meta(round_index)
        self.drop_shards(meta_key)
        rejected = keys.round_rejected(round_index)
        for member in self.store.set_members(rejected):
            device, upload, _ = member.split(":", 2)
            self.store.delete(keys.round_rejection(round_index, int(device), upload))
        self.store.delete_set(rejected)
        self.store.delete(meta_key)
        self.store.delete(keys.round_state(round_index))

    def drop_versions_before(self, oldest_kept: int) -> None:
        """The model of version ``oldest_kept - 1``, its norm reference and server optimizer state: called
        at each publish, so the store keeps the versions from ``oldest_kept`` on (idempotent)."""
        if oldest_kept >= 1:
            self.store.delete(keys.model(oldest_kept - 1))
            self.store.delete(keys.norm_reference(oldest_kept - 1))
            self.store.delete(keys.server_optimizer_state(oldest_kept - 1))
