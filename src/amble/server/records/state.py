"""A round's state as the Store holds it (``keys.round_state``): one typed record, read everywhere.

``plan_round`` writes it ``open`` with the selection and every plan in one compare-and-set;
``finalize`` moves it to ``finalized`` (with the published ``version``) or ``failed`` (below
``quorum``) with another. Nobody else writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from amble.strategies.base import Plan

RoundStatus = Literal["open", "finalized", "failed"]


@dataclass(frozen=True)
class RoundState:
    status: RoundStatus
    base_version: int
    """The model version the round's devices train from."""
    expected: tuple[int, ...]
    """The devices selected and planned, in ascending order."""
    plans: dict[int, Plan]
    started_at_s: float = 0.0
    """When the round was planned (virtual seconds in simulation, seconds since start when live): with
    an upload's arrival time, what the server itself observes of a device's round trip."""
    excluded: dict[int, str] = field(default_factory=dict)
    """Devices selected but left out of the round, with the reason (their data broke planning)."""
    counted: tuple[int, ...] = ()
    """Devices whose updates are in the outcome (set when the round is decided)."""
    version: int | None = None
    """The published model version (``finalized`` only)."""
    quorum: int | None = None
    """The quorum the round missed (``failed`` below quorum only)."""
    failure: str | None = None
    """Why the round failed (``failed`` only): below quorum, or an aggregate that was not finite."""

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    def plan_of(self, device: int) -> Plan | None:
        return self.plans.get(device)

    def decided(
        self,
        status: RoundStatus,
        counted: list[int],
        version: int | None = None,
        quorum: int | None = None,
        failure: str | None = None,
    ) -> RoundState:
        return replace(self, status=status, counted=tuple(counted), version=version, quorum=quorum, failure=failure)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "status": self.status,
            "base_version": self.base_version,
            "expected": list(self.expected),
            "plans": {str(d): p.to_dict() for d, p in self.plans.items()},
            "started_at_s": self.started_at_s,
            "excluded": {str(d): reason for d, reason in self.excluded.items()},
            "counted": list(self.counted),
            "version": self.version,
            "quorum": self.quorum,
            "failure": self.failure,
        }
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, blob: bytes | str) -> RoundState:
        data = json.loads(blob)
        return cls(
            status=data["status"],
            base_version=int(data["base_version"]),
            expected=tuple(int(d) for d in data["expected"]),
            plans={int(d): Plan.from_dict(p) for d, p in data["plans"].items()},
            started_at_s=float(data.get("started_at_s", 0.0)),
            excluded={int(d): str(r) for d, r in data.get("excluded", {}).items()},
            counted=tuple(int(d) for d in data.get("counted", [])),
            version=None if data.get("version") is None else int(data["version"]),
            quorum=None if data.get("quorum") is None else int(data["quorum"]),
            failure=data.get("failure"),
        )

    def public(self) -> dict[str, Any]:
        """A JSON-ready view (plans as dicts keyed by device id string), for records and logs."""
        data: dict[str, Any] = json.loads(self.to_json())
        return data
