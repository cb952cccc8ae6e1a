"""What the live path (``amble serve``: its coordinator and gateway) keeps in the Store, typed.

Tokens are kept only as hashes; a device's registration is its sample count; the gateway's replay
guard is a set of the devices whose upload a round accepted; counters feed ``/metrics``. The live
path reads and writes these through :class:`LiveRecords` only, never through Store keys.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from amble.server import keys
from amble.server.records.reports import check_report
from amble.server.records.settings import RunSettings, read_settings, read_template
from amble.server.records.state import RoundState
from amble.server.runtime.base import RuntimeStats
from amble.server.store.base import Store, read_json
from amble.server.tensors import TensorSpec


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LiveRecords:
    """The live path's records in one run's Store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- tokens ------------------------------------------------------------------------------------

    def add_device_token(self, token: str, device: int) -> None:
        self.store.put(keys.device_token(token_hash(token)), str(device).encode())

    def device_of(self, token: str) -> int | None:
        blob = self.store.get(keys.device_token(token_hash(token)))
        return None if blob is None else int(blob)

    def set_operator_token(self, token: str) -> None:
        self.store.put(keys.OPERATOR_TOKEN, token_hash(token).encode())

    def operator_token_hash(self) -> bytes | None:
        return self.store.get(keys.OPERATOR_TOKEN)

    # -- devices -----------------------------------------------------------------------------------

    def registered_samples(self, device: int) -> int | None:
        """The sample count ``device`` registered (or its partition holds), None if none is stored."""
        info = read_json(self.store, keys.device_info(device))
        return None if info is None else int(info["num_samples"])

    def set_samples(self, device: int, num_samples: int) -> None:
        self.store.put(keys.device_info(device), json.dumps({"num_samples": num_samples}).encode())

    def mark_registered(self, device: int) -> None:
        self.store.add_to_set(keys.REGISTERED, str(device))

    def registered(self) -> set[int]:
        return {int(d) for d in self.store.set_members(keys.REGISTERED)}

    def has_counted_update(self, device: int) -> bool:
        """Whether an update of ``device`` was counted (its report history is not empty)."""
        return bool(read_json(self.store, keys.device_reports(device)))

    # -- rounds ------------------------------------------------------------------------------------

    def counted(self, round_index: int) -> set[int]:
        """The devices a round has counted so far (its meta record)."""
        meta: dict[str, Any] = read_json(self.store, keys.round_meta(round_index)) or {}
        return {int(d) for d in meta.get("counted", ())}

    def take_rejection(self, round_index: int, device: int, upload: str) -> tuple[str, str] | None:
        """Why the functions rejected an upload (reason, message), once: the record is deleted when read
        (the round's rejected set keeps the reason), so refused uploads leave no value key each."""
        key = keys.round_rejection(round_index, device, upload)
        rejection = read_json(self.store, key)
        if rejection is None:
            return None
        self.store.delete(key)
        return str(rejection["reason"]), str(rejection["message"])

    def accepted_upload(self, round_index: int, device: int) -> bool:
        """Whether the gateway accepted an upload of ``device`` in the round already (replays are refused)."""
        return str(device) in self.store.set_members(keys.uploaded(round_index))

    def mark_uploaded(self, round_index: int, device: int) -> bool:
        """Record the device's accepted upload for the round; False if one was recorded already."""
        return self.store.add_to_set(keys.uploaded(round_index), str(device))

    def forget_round(self, round_index: int) -> None:
        """Drop the round's replay guard once it is closed (a later upload is refused as stale anyway)."""
        self.store.delete_set(keys.uploaded(round_index))

    # -- counters and the run's shape --------------------------------------------------------------

    def count_round(self, status: str) -> None:
        self.store.incr(keys.rounds_counter(status))

    def rounds(self, status: str) -> int:
        return int(self.store.counter(keys.rounds_counter(status)))

    def count_accepted(self) -> None:
        self.store.incr(keys.ACCEPTED)

    def accepted(self) -> int:
        return int(self.store.counter(keys.ACCEPTED))

    def runtime_stats(self) -> RuntimeStats:
        """The functions' counters, as every process running them adds to them."""
        return RuntimeStats.from_store(self.store)

    def check_report(self, round_index: int, device: int, raw: Any, state: RoundState) -> None:
        """Refuse (``UpdateRejected``) a report the functions would refuse, before its body is read."""
        check_report(self.store, round_index, device, raw, state)

    def settings(self) -> RunSettings:
        return read_settings(self.store)

    def template(self) -> dict[str, TensorSpec]:
        return read_template(self.store)

    def model_blob(self, version: int) -> bytes:
        """Model ``version`` as the bytes devices download (empty if it is no longer kept)."""
        return self.store.get(keys.model(version)) or b""
