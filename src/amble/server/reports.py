"""What a device reports with its update, checked against what the server knows before it is folded.

Aggregation weights and the planner's speed estimates come from reports, so a report is hostile
until proven otherwise (SPEC 9): it must be well-formed and agree with the registry and the
device's plan.
"""

from __future__ import annotations

import math
from typing import Any

from amble.errors import UpdateRejected
from amble.server import keys
from amble.server.state import RoundState
from amble.server.store.base import Store, read_json
from amble.strategies.base import Report


def num_samples(store: Store, device: int) -> int:
    """The sample count a device registered (its FedAvg weight is checked against it)."""
    info = read_json(store, keys.device_info(device))
    if info is None:
        raise LookupError(f"device {device} is not registered")
    return int(info["num_samples"])


def check_report(
    store: Store, round_index: int, device: int, raw: Any, state: RoundState, arrived_at_s: float | None = None
) -> Report:
    """The report must be well-formed and agree with the registry and the device's plan.

    Aggregation weights come from the report, so a device may not claim more samples than it
    registered, a different batch size, or more steps than it was planned. ``arrived_at_s`` is when
    the upload arrived, on the clock of ``state.started_at_s`` (None when the caller cannot know).
    """
    try:
        report = Report.from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise UpdateRejected("malformed_report", f"report is missing field {exc}") from None
    counts = [report.round, report.device, report.num_samples, report.local_steps, report.batch_size]
    seconds = [report.compute_s, report.download_s, report.upload_s]
    if not all(type(x) is int for x in counts):
        raise UpdateRejected("malformed_report", "round, device, num_samples, local_steps, batch_size must be integers")
    if not all(type(x) in (int, float) and math.isfinite(x) and x >= 0 for x in seconds):
        raise UpdateRejected("malformed_report", "compute_s, download_s, upload_s must be finite non-negative numbers")
    if (report.round, report.device) != (round_index, device):
        raise UpdateRejected(
            "malformed_report", f"report is for round {report.round} device {report.device}, not the upload's"
        )
    registered = num_samples(store, device)
    if report.num_samples != registered:
        raise UpdateRejected(
            "malformed_report",
            f"report claims {report.num_samples} samples; device {device} registered {registered}",
        )
    plan = state.plans[device]
    if report.batch_size != plan.batch_size or not 1 <= report.local_steps <= plan.local_steps:
        raise UpdateRejected(
            "malformed_report",
            f"report says batch {report.batch_size} x {report.local_steps} steps; the plan was batch "
            f"{plan.batch_size} x at most {plan.local_steps} steps",
        )
    return report
