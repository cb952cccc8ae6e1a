"""What a device reports with its update, parsed into a flat typed :class:`Report` and checked against
what the server knows before it is folded.

Aggregation weights and the planner's speed estimates come from reports, so a report is hostile
until proven otherwise (SPEC 9): it must be exactly the fields of :class:`Report`, each a plain JSON
number within a range (never a string, a list or a nested object, so parsing never recurses and its
size is bounded by construction), with times the planner can divide by, and it must agree with the
registry, the device's plan and what the server itself observed of the round trip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from itertools import islice
from typing import Any

from amble.errors import UpdateRejected
from amble.server import keys
from amble.server.records.state import RoundState
from amble.server.store.base import Store, read_json
from amble.strategies.base import Plan, Report
from amble.strategies.rounds import steps_within
from amble.strategies.speed import MIN_STEP_S, fit_speed

REPORT_FIELDS = tuple(f.name for f in fields(Report))
COUNT_FIELDS = ("round", "device", "num_samples", "local_steps", "batch_size")
SECONDS_FIELDS = ("compute_s", "download_s", "upload_s")
MAX_COUNT = 2**31 - 1
"""Largest round, device, sample count, step count or batch a report may carry (a 32-bit int)."""
MAX_REPORTED_S = 1e6
"""Ceiling on each reported time (about 11.6 days): beyond it a figure is no measurement of a round."""
ELAPSED_TOLERANCE_S = 1e-3
ELAPSED_TOLERANCE_RELATIVE = 1e-6
"""Reported times may exceed the server-observed elapsed time by this much (timer granularity and
float rounding) before they are scaled down to it."""
STEPS_SLACK = 2.0
"""A report's local steps are held to at least ``1 / STEPS_SLACK`` of the steps the server expected
of the device (:func:`hold_steps`), so a weight or a learning-rate sum that divides by them is at
most this many times what the expectation gives."""
CUTS_AT_DEADLINE = ("stop", "probe")
"""The ``Plan.at_deadline`` values under which an honest device may send fewer steps than planned."""


def num_samples(store: Store, device: int) -> int:
    """The sample count a device registered (its FedAvg weight is checked against it)."""
    info = read_json(store, keys.device_info(device))
    if info is None:
        raise LookupError(f"device {device} is not registered")
    return int(info["num_samples"])


def _malformed(problem: str) -> UpdateRejected:
    expected = ", ".join(REPORT_FIELDS)
    return UpdateRejected(
        "malformed_report", f"{problem}; send a flat JSON object with exactly the numeric fields {expected}"
    )


def parse_report(raw: Any) -> Report:
    """``raw`` as a :class:`Report` if it is well-formed on its own, else ``malformed_report``.

    Exactly the fields of :class:`Report` (no extras); counts are integers in ``[0, 2^31)``
    (``num_samples`` and ``local_steps`` at least 1); times are finite numbers at most
    :data:`MAX_REPORTED_S`, link times ``>= 0`` and ``compute_s / local_steps >= MIN_STEP_S``. Checks
    only types and ranges, never recursing into a value, so a deeply nested or huge value is refused
    at its first level. What the report must agree with is :func:`check_report`'s part.
    """
    if not isinstance(raw, Mapping):
        raise _malformed(f"the report is a {type(raw).__name__}, not a JSON object")
    if len(raw) != len(REPORT_FIELDS) or any(name not in raw for name in REPORT_FIELDS):
        missing = [name for name in REPORT_FIELDS if name not in raw]
        extra = [str(name)[:40] for name in islice((n for n in raw if n not in REPORT_FIELDS), 5)]
        raise _malformed(f"the report has missing fields {missing} and unexpected fields {extra}")
    for name in COUNT_FIELDS:
        value = raw[name]
        if type(value) is not int:  # bool is an int subclass, and 5.0 is not a count
            raise _malformed(f"{name} is a {type(value).__name__}, not an integer")
        lowest = 1 if name in ("num_samples", "local_steps", "batch_size") else 0
        if not lowest <= value <= MAX_COUNT:
            raise _malformed(f"{name} = {value} is outside [{lowest}, {MAX_COUNT}]")
    for name in SECONDS_FIELDS:
        value = raw[name]
        if type(value) not in (int, float):
            raise _malformed(f"{name} is a {type(value).__name__}, not a number of seconds")
        if not 0 <= value <= MAX_REPORTED_S:  # False for NaN too; no float() of a huge int, which overflows
            raise _malformed(f"{name} = {value} is not a finite number of seconds in [0, {MAX_REPORTED_S:g}]")
    report = Report(**{name: raw[name] for name in REPORT_FIELDS})
    if report.compute_s < MIN_STEP_S * report.local_steps:
        raise _malformed(
            f"compute_s = {report.compute_s} for {report.local_steps} steps is under {MIN_STEP_S:g} s per step; "
            "report the measured seconds of local training"
        )
    return report


def check_report(
    store: Store, round_index: int, device: int, raw: Any, state: RoundState, arrived_at_s: float | None = None
) -> Report:
    """The report, parsed (:func:`parse_report`), agreeing with the registry and the device's plan.

    Aggregation weights come from the report, so a device may not claim more samples than it
    registered, a different batch size, or more steps than it was planned. ``arrived_at_s`` is when
    the upload arrived, on the clock of ``state.started_at_s`` (None when the caller cannot know);
    given it, the times are bounded by what the server observed (:func:`bound_by_elapsed`).
    """
    report = parse_report(raw)
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
    elapsed_s = None if arrived_at_s is None else arrived_at_s - state.started_at_s
    report = hold_steps(report, plan, device_history(store, device, before=round_index), elapsed_s)
    if arrived_at_s is None:
        return report
    return bound_by_elapsed(report, arrived_at_s - state.started_at_s)


def as_observed(report: Report, elapsed_s: float) -> Report:
    """What the planner learns of a round trip: the report bounded by the elapsed time
    (:func:`bound_by_elapsed`), and any time the server saw elapse beyond the reported total added to
    ``download_s``.

    A real device cannot see all of its round: the wait until its next poll for the task, HTTP and TLS
    set-up, the gateway reading its upload. Left out, ``T_r`` is shorter than telling a device about
    the round takes: with compute of milliseconds, a device polling every 0.1 s got a 33 ms deadline
    and dropped out before its first step (issue 21). So the link time the planner fits is everything
    between the round's start and the upload's arrival that the device did not report as compute:
    a figure the server measured itself, which a device can raise only by being slow. The live path
    applies it (:meth:`amble.live.coordinator.Coordinator.accept`); the simulator's devices report
    their virtual times exactly and start when their plans are published, so it has nothing to add.
    """
    bounded = bound_by_elapsed(report, elapsed_s)
    unseen_s = elapsed_s - (bounded.compute_s + bounded.download_s + bounded.upload_s)
    if unseen_s <= elapsed_s * ELAPSED_TOLERANCE_RELATIVE + ELAPSED_TOLERANCE_S:
        return bounded
    return replace(bounded, download_s=bounded.download_s + unseen_s)


def device_history(store: Store, device: int, before: int | None = None) -> list[Report]:
    """The device's stored reports that parse, of rounds before ``before`` if given (histories stored
    before reports were checked may hold some that do not: those are skipped, never planned from)."""
    try:
        history = read_json(store, keys.device_reports(device))
    except ValueError:  # not JSON at all
        return []
    reports = []
    for raw in history if isinstance(history, list) else []:
        try:
            report = parse_report(raw)
        except UpdateRejected:
            continue
        if report.device == device and (before is None or report.round < before):
            reports.append(report)
    return reports


def expected_steps(plan: Plan, history: Sequence[Report], elapsed_s: float | None) -> int | None:
    """The local steps the server expects a device to have run for ``plan`` (None: it cannot tell).

    All of them unless the plan lets the device stop at its deadline (``at_deadline`` ``stop`` or
    ``probe``): an honest device runs exactly ``plan.local_steps`` otherwise (with ``drop`` it sends
    nothing rather than fewer). With a deadline cut, the steps its speed fitted from its own earlier
    reports (:func:`~amble.strategies.speed.fit_speed`, as the planner fits it) fit in the time it had:
    until the deadline, or until its upload arrived if that was sooner (``elapsed_s``, seconds since
    the round started as the server saw them; None when unknown), after its usual link time; at least
    1 (the first step always runs), at most the plan's. A device without earlier reports has no speed
    to judge by: None.
    """
    if plan.deadline_s is None or plan.at_deadline not in CUTS_AT_DEADLINE:
        return plan.local_steps
    if not history:
        return None
    window_s = plan.deadline_s if elapsed_s is None or elapsed_s < 0 else min(plan.deadline_s, elapsed_s)
    fits = steps_within(window_s, fit_speed(history), plan.batch_size)
    return min(plan.local_steps, max(fits, 1))


def hold_steps(report: Report, plan: Plan, history: Sequence[Report], elapsed_s: float | None) -> Report:
    """The report with its local steps raised, if need be, to what the server finds plausible.

    FedNova weights an update by ``n / steps`` and SCAFFOLD divides it by the sum of its steps'
    learning rates, so a device that ran all its steps and reported one would count many times over.
    The steps are held to at least the plan's when the plan cannot be cut at a deadline (an honest
    device reports exactly those), and otherwise to ``ceil(e / STEPS_SLACK)``, ``e`` the
    :func:`expected_steps` of its speed in the time it had. So whatever a device reports, such a
    weight is at most :data:`STEPS_SLACK` (2) times the one its expected steps give, which for a device
    whose earlier reports were honest is its honest weight: one lying report moves the model at most
    2x its honest share. Honest partial work (stopped at the deadline at the speed its reports show,
    within 2x) keeps its steps; an honest device more than 2x slower than its reports show (its steps
    or its link) has them raised, so its update counts less than its share, never more. What the
    bound cannot see: a device's first cut round (no speed to judge by: its steps stand) and a device
    that understates its speed in every report (it must then really arrive as late as it claims, the
    times being bounded by what the server observed; AMBLE plans it the less work it claims to
    manage, but under FedNova's fixed plans it keeps the weight of the slow device it claims to be).
    The compute time keeps the per-step floor.
    """
    expected = expected_steps(plan, history, elapsed_s)
    if expected is None:
        return report
    cut = plan.deadline_s is not None and plan.at_deadline in CUTS_AT_DEADLINE
    least = math.ceil(expected / STEPS_SLACK) if cut else expected
    if report.local_steps >= least:
        return report
    return replace(report, local_steps=least, compute_s=max(report.compute_s, MIN_STEP_S * least))


def bound_by_elapsed(report: Report, elapsed_s: float) -> Report:
    """The report with its times scaled down, if need be, to what the server observed elapse.

    A device cannot have spent more on download + compute + upload than elapsed between the round's
    planning and its upload's arrival. In simulation arrival = start + the three exactly; live, the
    reported ``upload_s`` is the device's previous upload, so an honest sum may exceed the elapsed
    time a little. Hence a clamp, not a rejection: the update's work and weight do not depend on
    the times, a 202 from the gateway (which cannot know the arrival) promises it is counted, and
    the planner learns at most what the server itself saw. The three are scaled together (the
    device's split between link and compute is kept) to ``elapsed_s`` plus a small tolerance, with
    the per-step floor kept. A negative ``elapsed_s`` (clocks that disagree) bounds nothing.
    """
    if elapsed_s < 0:
        return report
    budget_s = elapsed_s * (1 + ELAPSED_TOLERANCE_RELATIVE) + ELAPSED_TOLERANCE_S
    total_s = report.compute_s + report.download_s + report.upload_s
    if total_s <= budget_s:
        return report
    scale = budget_s / total_s
    return replace(
        report,
        compute_s=max(report.compute_s * scale, MIN_STEP_S * report.local_steps),
        download_s=report.download_s * scale,
        upload_s=report.upload_s * scale,
    )
