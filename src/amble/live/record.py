"""A served run's output files: the files ``amble run`` writes, on the wall clock, and its fleet trace.

As each round closes, ``metrics.jsonl`` gets one row and ``devices.jsonl`` one row per selected
device, through the simulator's :class:`RunWriter`; at the end ``summary.json`` (with ``"clock":
"wall"``), ``report.html`` with the same plots, and ``fleet_trace.json``: the fleet as it was
measured, which ``fleet.kind: trace`` replays in simulation.

Times. The run clock (``virtual_time_s`` in the rows, ``time_to_target_s``) is wall-clock seconds
since the first round started, i.e. since enough devices had registered: the simulator's clock
starts at round 0 too. It includes the server's evaluation of each published model (``eval_s``,
during which no round runs). ``wall_time_s`` counts from when ``amble serve`` started. Per device
and round: ``compute_s`` is the training time the device measured (bounded by what the server saw
elapse), ``comm_s`` the rest of the time from the round's start to its update's arrival (waiting for
the task, the model's download, the upload, HTTP), ``idle_s`` the time from its arrival to the
round's close. So ``compute_s + comm_s + idle_s`` is the round's duration, as in simulation.

The trace, per device: ``step_s``, absolute seconds per step by batch size (the median of its
reported steps at each batch size it ran, interpolated between them, and beyond them the reference
curve ``t_ref_s``'s shape; ``slowdown`` is the device's median ratio to that curve, for reading
only); ``download_s`` (median reported) and
``upload_s`` (median observed rest of the round trip), so that replayed ``download + compute +
upload`` is what the server saw; ``jitter`` (spread of its step times around the fitted ones, from 3
reports on, once the round's shared factor is taken out); ``shared_jitter`` (for the whole fleet:
the spread of the per-round factor all devices' step times moved by together, e.g. a machine's load);
``p_dropout`` (selected rounds it sent nothing in) and ``availability`` (rounds it was registered
at the start of; 0 for a device that never joined). Absolute times make a replay on another machine
the recorded fleet, not one rescaled to that machine's calibration.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amble.config import ExperimentConfig, config_to_dict
from amble.durable import write_atomic
from amble.fleet import StepTime
from amble.fleet.profiles import TRACE_FORMAT
from amble.live.coordinator import RoundRecord
from amble.problem import reference_step_time
from amble.report import RunWriter, build_report
from amble.report.rows import device_row, finished_status
from amble.report.writer import to_json_value
from amble.runsetup import RunSetup
from amble.server.runtime.base import RuntimeStats

log = logging.getLogger("amble.serve")

TRACE_FILE = "fleet_trace.json"
WALL_CLOCK = "wall"
"""``summary.json``'s ``clock`` for a served run: its times are measured, not simulated."""
MIN_JITTER_REPORTS = 3
"""Reports a device needs before the spread of its step times is taken as its jitter."""


def device_rows(
    record: RoundRecord, label: str, num_samples: Mapping[int, int], local_epochs: int
) -> list[dict[str, Any]]:
    """One ``devices.jsonl`` row per device selected in the round, from what the server observed.

    ``ok``/``partial`` as in simulation for a counted update; ``failed`` for an update that arrived
    but was not counted or whose round failed; ``dropped`` for one that never arrived (its times are
    unknown: null).
    """
    finalized = record.status == "finalized"
    round_s = record.closed_s - record.started_s
    rows = []
    for key, plan in sorted(record.plans.items(), key=lambda item: int(item[0])):
        device = int(key)
        arrival = record.arrivals.get(key)
        steps = int(arrival["local_steps"]) if arrival else int(plan["local_steps"])
        batch_size = int(plan["batch_size"])
        samples = int(arrival["num_samples"]) if arrival else num_samples.get(device, 1)  # own data: its count
        row = device_row(
            label, record.round, device, batch_size, steps, plan["lr"], samples, None, None, None, "dropped"
        )
        if arrival is not None:
            elapsed_s = min(max(arrival["at_s"] - record.started_s, 0.0), round_s)
            compute_s = min(float(arrival["compute_s"]), elapsed_s)
            done = finished_status(steps, int(plan["local_steps"]), row["epochs"], local_epochs)
            row.update(
                compute_s=compute_s,
                comm_s=elapsed_s - compute_s,
                idle_s=round_s - elapsed_s,
                download_s=float(arrival["download_s"]),
                arrived_s=elapsed_s,
                status=done if finalized and arrival["counted"] else "failed",
            )
        rows.append(row)
    return rows


def metrics_row(record: RoundRecord, label: str, origin_s: float, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The round's ``metrics.jsonl`` row: ``virtual_time_s`` is seconds from ``origin_s`` (the first
    round's start) to this round's close, ``wall_time_s`` seconds since the server started."""
    finalized = record.status == "finalized"
    counted = [r for r in rows if r["status"] in ("ok", "partial")]
    return {
        "strategy": label,
        "round": record.round,
        "virtual_time_s": record.closed_s - origin_s,
        "wall_time_s": record.closed_s,
        "accuracy": record.accuracy,
        "loss": record.loss,
        "participants": len(rows),
        "completed": record.counted if finalized else 0,
        "dropped": sum(1 for r in rows if r["status"] == "dropped"),
        "samples_processed": sum(int(r["local_steps"]) * int(r["batch_size"]) for r in counted),
        "status": record.status,
        "round_s": record.closed_s - record.started_s,
        "eval_s": record.eval_s,
    }


@dataclass
class ServedRunFiles:
    """Writes a served run's files as its rounds close (``on_round``) and when it ends (``finish``)."""

    config: ExperimentConfig
    label: str
    out_dir: Path
    setup: RunSetup
    records: list[RoundRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        RunWriter(self.out_dir).close()  # a fresh run: an earlier run's rows in this directory go

    @property
    def origin_s(self) -> float:
        return self.records[0].started_s if self.records else 0.0

    def on_round(self, record: RoundRecord) -> None:
        self.records.append(record)
        rows = device_rows(record, self.label, self.setup.num_samples, self.config.train.local_epochs)
        with RunWriter(self.out_dir, append=True) as writer:  # opened per round: nothing held between
            writer.write_round(metrics_row(record, self.label, self.origin_s, rows))
            writer.write_devices(rows)

    def finish(self, stats: RuntimeStats, wall_time_s: float, error: str | None = None) -> None:
        """Write ``summary.json``, ``fleet_trace.json`` and ``report.html``; a failure of one is logged,
        not raised, so it never hides why the run itself stopped."""
        with RunWriter(self.out_dir, append=True) as writer:
            writer.write_summary(self.summary(stats, wall_time_s, error))
        try:
            invocation_s = stats.busy_s / stats.invocations if stats.invocations else None
            trace = fleet_trace(self.records, self.reference_step_time(), self.config, self.label, invocation_s)
            write_atomic(self.out_dir / TRACE_FILE, (json.dumps(to_json_value(trace), indent=1) + "\n").encode())
        except Exception as exc:  # the run's own files are written; say what is missing
            log.error("could not write %s: %s: %s", TRACE_FILE, type(exc).__name__, exc)
        try:
            build_report(self.out_dir)
        except Exception as exc:
            log.error("could not build report.html: %s: %s", type(exc).__name__, exc)

    def summary(self, stats: RuntimeStats, wall_time_s: float, error: str | None) -> dict[str, Any]:
        records, origin_s = self.records, self.origin_s
        target = self.config.eval.target_accuracy
        evaluated = [r for r in records if r.accuracy is not None]
        reached = next((r for r in evaluated if (r.accuracy or 0.0) >= target), None)
        finalized = [r for r in records if r.status == "finalized"]
        results: dict[str, Any] = {
            "final_accuracy": evaluated[-1].accuracy if evaluated else None,
            "best_accuracy": max((r.accuracy or 0.0 for r in evaluated), default=None),
            "target_accuracy": target,
            "time_to_target_s": reached.closed_s - origin_s if reached else None,
            "rounds_to_target": reached.round + 1 if reached else None,
            "virtual_time_s": records[-1].closed_s - origin_s if records else 0.0,
            "wall_time_s": wall_time_s,
            "rounds": len(records),
            "rounds_failed": len(records) - len(finalized),
            "updates_aggregated": sum(r.counted for r in finalized),
            "updates_rejected": sum(r.rejected for r in records),
            "function_invocations": stats.invocations,
            "cold_starts": stats.cold_starts,
            "warm_starts": stats.warm_starts,
            "function_busy_s": stats.busy_s,
            "function_failures": stats.failures,
            "fleet_ready_s": origin_s,
            "eval_s": sum(r.eval_s for r in records),
            "mean_round_s": statistics.fmean(r.closed_s - r.started_s for r in records) if records else None,
        }
        if error is not None:
            results["error"] = error
        return {"config": config_to_dict(self.config), "clock": WALL_CLOCK, "strategies": {self.label: results}}

    def reference_step_time(self) -> StepTime:
        """The curve the trace's slowdowns are relative to: ``fleet.t_ref`` when the config sets it,
        else this machine's calibration with one torch thread (as a local fleet's devices train)."""
        if self.config.fleet.t_ref is not None:
            return StepTime.from_mapping(self.config.fleet.t_ref)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return reference_step_time(self.config, self.setup.dataset, self.setup.build_model, self.setup.model)
        finally:
            torch.set_num_threads(threads)


@dataclass
class _Observed:
    """One device's measurements across the run."""

    steps: list[tuple[int, int, float]] = field(default_factory=list)
    """(round, batch size, seconds per step) of each arrived update."""
    download_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    selected: int = 0
    arrived: int = 0
    available: int = 0


def fleet_trace(
    records: Sequence[RoundRecord],
    reference: StepTime,
    config: ExperimentConfig,
    label: str,
    invocation_s: float | None = None,
) -> dict[str, Any]:
    """The fleet these rounds measured, as ``fleet.kind: trace`` reads it (see the module docstring).

    ``invocation_s``, the server's mean seconds per function invocation, is recorded for reading:
    a replay sets ``server.invocation_s`` to it (the fleet trace itself describes devices only).
    """
    observed = {k: _Observed() for k in range(config.data.num_devices)}
    for record in records:
        for device in record.available:
            observed.setdefault(device, _Observed()).available += 1
        for key in record.plans:
            observed.setdefault(int(key), _Observed()).selected += 1
        for key, arrival in record.arrivals.items():
            seen = observed.setdefault(int(key), _Observed())
            seen.arrived += 1
            steps, compute_s = int(arrival["local_steps"]), float(arrival["compute_s"])
            download_s = float(arrival["download_s"])
            seen.steps.append((record.round, int(arrival["batch_size"]), compute_s / steps))
            seen.download_s.append(download_s)
            seen.upload_s.append(max(arrival["at_s"] - record.started_s - download_s - compute_s, 0.0))
    fitted = {
        k: _fit_steps([(batch, seconds) for _, batch, seconds in seen.steps], reference)
        for k, seen in observed.items()
        if seen.steps
    }
    residuals = {
        k: {r: math.log(seconds / fitted[k][1](batch)) for r, batch, seconds in observed[k].steps} for k in fitted
    }
    shared = _shared_factors(residuals)
    slowdowns = [slowdown for slowdown, _ in fitted.values()]
    typical = statistics.median(slowdowns) if slowdowns else 1.0
    devices = []
    for k, seen in sorted(observed.items()):
        entry: dict[str, Any] = {
            "device": k,
            "slowdown": typical,
            "p_dropout": 1.0 - seen.arrived / seen.selected if seen.selected else 0.0,
            "availability": seen.available / len(records) if records else 1.0,
            "reports": seen.arrived,
        }
        if k in fitted:
            slowdown, step_s = fitted[k]
            entry.update(
                slowdown=slowdown,
                step_s=step_s.to_json(),
                download_s=statistics.median(seen.download_s),
                upload_s=statistics.median(seen.upload_s),
                jitter=_rms([e - shared.get(r, 0.0) for r, e in residuals[k].items()]),
            )
        devices.append(entry)
    return {
        "format": TRACE_FORMAT,
        "recorded": {
            "run": config.name,
            "strategy": label,
            "rounds": len(records),
            "model": config.model,
            "dataset": config.data.dataset,
            "invocation_s": invocation_s,
        },
        "t_ref_s": reference.to_json(),
        "shared_jitter": _rms(list(shared.values())),
        "devices": devices,
    }


def _fit_steps(steps: Sequence[tuple[int, float]], reference: StepTime) -> tuple[float, StepTime]:
    """A device's slowdown (its median ratio to ``reference``) and its step time by batch size.

    At each batch size it ran: the median measured; between those, interpolated; below the smallest
    and above the largest, the reference curve's shape anchored at that end's measurement.
    """
    slowdown = statistics.median(seconds / reference(batch) for batch, seconds in steps)
    measured = StepTime.from_mapping(
        {batch: statistics.median(s for b, s in steps if b == batch) for batch in {b for b, _ in steps}}
    )
    (low, low_s), (high, high_s) = measured.points[0], measured.points[-1]
    points = dict(measured.points)
    for batch, _ in reference.points:
        if batch < low:
            points[batch] = low_s * reference(batch) / reference(low)
        elif batch > high:
            points[batch] = high_s * reference(batch) / reference(high)
    return slowdown, StepTime.from_mapping(points)


def _shared_factors(residuals: Mapping[int, Mapping[int, float]]) -> dict[int, float]:
    """Per round, the log factor every device's step time moved by together: the median of the
    devices' log ratios to their fitted step times (rounds where at least two devices reported)."""
    by_round: dict[int, list[float]] = {}
    for per_round in residuals.values():
        for r, residual in per_round.items():
            by_round.setdefault(r, []).append(residual)
    return {r: statistics.median(values) for r, values in by_round.items() if len(values) >= 2}


def _rms(values: Sequence[float]) -> float:
    """The spread (root mean square) of log ratios; 0 with fewer than :data:`MIN_JITTER_REPORTS`."""
    if len(values) < MIN_JITTER_REPORTS:
        return 0.0
    return math.sqrt(statistics.fmean(value**2 for value in values))
