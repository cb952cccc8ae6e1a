"""Device profiles and the seeded fleet generators of SPEC 4: uniform, lognormal, tiers, trace."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from amble.config import FleetConfig
from amble.errors import ConfigError
from amble.fleet.steptime import StepTime

TRACE_FORMAT = "amble-fleet-trace/1"
"""The ``format`` of a recorded fleet trace (JSON), as ``amble serve`` writes it."""


@dataclass(frozen=True)
class DeviceProfile:
    """The hidden truth about a simulated device. Strategies never see it, only reports."""

    slowdown: float
    """Multiplier on the reference device's per-step time."""
    step_overhead_s: float
    up_bps: float
    down_bps: float
    latency_s: float
    jitter: float
    """Sigma of the lognormal noise on each round's compute time, drawn for each device alone."""
    p_dropout: float
    availability: float
    shared_jitter: float = 0.0
    """Sigma of a lognormal factor on compute time drawn once per round for the whole fleet: what
    slows every device at once (the load of a machine they share, say), on top of ``jitter``."""
    step_s: StepTime | None = None
    """Absolute seconds per step by batch size (a recorded device): replaces ``slowdown x t_ref``."""
    download_s: float | None = None
    """Absolute seconds to fetch the model (a recorded device): replaces latency + bytes / bandwidth."""
    upload_s: float | None = None
    """Absolute seconds from the end of training to the update's arrival (a recorded device)."""


PROFILE_FIELDS = tuple(f.name for f in fields(DeviceProfile) if f.name != "step_s")
"""The CSV trace's columns (every profile field that is one number)."""


def _slowdowns(config: FleetConfig, num_devices: int, rng: np.random.Generator) -> np.ndarray:
    if config.kind == "uniform":
        lo, hi = config.slowdown_range
        return rng.uniform(lo, hi, num_devices)
    if config.kind == "lognormal":
        # Median device = reference speed; sigma sets the spread (sigma ~1 puts the slowest of 100 near 10x).
        return np.exp(rng.normal(0.0, config.sigma, num_devices))
    # tiers: exact counts per share (largest remainders), then shuffled onto devices.
    shares = np.array([t.share for t in config.tiers])
    counts = np.floor(shares * num_devices).astype(int)
    for i in np.argsort(-(shares * num_devices - counts))[: num_devices - counts.sum()]:
        counts[i] += 1
    values = np.repeat([t.slowdown for t in config.tiers], counts)
    return rng.permutation(values)


def generate_fleet(config: FleetConfig, num_devices: int, seed: int) -> list[DeviceProfile]:
    """One profile per device, a deterministic function of ``(config, num_devices, seed)``."""
    if config.kind == "trace":
        return load_trace(Path(config.trace or ""), config, num_devices)
    rng = np.random.default_rng([seed, 0xF1EE7])
    slowdowns = _slowdowns(config, num_devices, rng)
    lo, hi = config.bandwidth_mbps
    bandwidth_bps = np.exp(rng.uniform(np.log(lo), np.log(hi), num_devices)) * 1e6
    return [
        DeviceProfile(
            slowdown=float(slowdowns[k]),
            step_overhead_s=config.step_overhead_s,
            up_bps=float(bandwidth_bps[k]),
            down_bps=float(bandwidth_bps[k]),
            latency_s=config.latency_s,
            jitter=config.jitter,
            p_dropout=config.p_dropout,
            availability=config.availability,
        )
        for k in range(num_devices)
    ]


def load_trace(path: Path, config: FleetConfig, num_devices: int) -> list[DeviceProfile]:
    """A fleet from a file: a recorded trace (``.json``, see :func:`load_recorded_trace`) or a CSV.

    The CSV has a header and one device per row; missing columns take the fleet config's values.
    Columns: ``slowdown`` (required) and any of ``step_overhead_s, up_bps, down_bps, latency_s,
    jitter, p_dropout, availability, shared_jitter, download_s, upload_s``. With fewer rows than devices the rows
    are reused in order.
    """
    if not path.is_file():
        raise ConfigError(
            f"fleet.trace file {path} not found; give a CSV with a 'slowdown' column or a fleet_trace.json "
            "written by amble serve"
        )
    if path.suffix == ".json":
        return load_recorded_trace(path, config, num_devices)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "slowdown" not in rows[0]:
        raise ConfigError(f"fleet.trace file {path} needs a header row with at least a 'slowdown' column")
    unknown = sorted(set(rows[0]) - set(PROFILE_FIELDS) - {"device"})
    if unknown:
        raise ConfigError(f"fleet.trace file {path} has unknown column(s) {unknown}; allowed: {list(PROFILE_FIELDS)}")
    default = _default_profile(config)
    profiles = []
    for line, row in enumerate(rows, start=2):
        try:
            values: dict[str, Any] = {
                k: float(v) for k, v in row.items() if k in PROFILE_FIELDS and v not in ("", None)
            }
        except ValueError as exc:
            raise ConfigError(f"fleet.trace file {path} line {line}: {exc}") from None
        if values.get("slowdown", 0) <= 0:
            raise ConfigError(f"fleet.trace file {path} line {line}: slowdown must be positive")
        profiles.append(replace(default, **values))
    return [profiles[k % len(profiles)] for k in range(num_devices)]


def _default_profile(config: FleetConfig) -> DeviceProfile:
    """What a trace leaves unsaid: the reference speed, the fleet config's middle bandwidth and rest."""
    mid_bps = float(np.sqrt(config.bandwidth_mbps[0] * config.bandwidth_mbps[1]) * 1e6)
    return DeviceProfile(
        1.0,
        config.step_overhead_s,
        mid_bps,
        mid_bps,
        config.latency_s,
        config.jitter,
        config.p_dropout,
        config.availability,
    )


def load_recorded_trace(path: Path, config: FleetConfig, num_devices: int) -> list[DeviceProfile]:
    """The fleet ``amble serve`` recorded (``fleet_trace.json``), replayed as it was measured.

    Each device's ``step_s`` (seconds per step by batch size), ``download_s`` and ``upload_s`` are
    absolute: replayed on any machine they mean the recorded fleet, not one recalibrated to this
    machine's ``t_ref``. A device recorded without step times (it never trained) runs at its
    ``slowdown`` times this machine's ``t_ref``. ``availability`` 0 is a device that never joined.
    Devices not in the file take the file's devices in order, as CSV rows do.
    """
    where = f"fleet.trace file {path}"
    try:
        trace = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc}); give the fleet_trace.json amble serve wrote") from None
    if not isinstance(trace, dict) or trace.get("format") != TRACE_FORMAT:
        raise ConfigError(f'{where} is not a recorded fleet trace: it needs "format": "{TRACE_FORMAT}"')
    entries = trace.get("devices")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where} needs "devices": a list with one object per device')
    shared = trace.get("shared_jitter", 0.0)
    if type(shared) not in (int, float) or not 0 <= shared < 10:
        raise ConfigError(f"{where}: 'shared_jitter' must be a number in [0, 10), not {shared!r}")
    default = replace(
        _default_profile(config),
        step_overhead_s=0.0,
        jitter=0.0,
        p_dropout=0.0,
        availability=1.0,
        shared_jitter=float(shared),
    )
    by_device: dict[int, DeviceProfile] = {}
    for index, entry in enumerate(entries):
        try:
            device, profile = _recorded_profile(entry, default)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{where}: devices[{index}]: {exc}") from None
        by_device[device] = profile
    in_order = [by_device[d] for d in sorted(by_device)]
    return [by_device.get(k, in_order[k % len(in_order)]) for k in range(num_devices)]


def _recorded_profile(entry: Any, default: DeviceProfile) -> tuple[int, DeviceProfile]:
    if not isinstance(entry, dict):
        raise TypeError("each device must be a JSON object")
    device = entry["device"]
    if type(device) is not int or device < 0:
        raise ValueError(f"'device' must be a device id (an integer >= 0), not {device!r}")
    values: dict[str, Any] = {}
    for name in ("slowdown", "download_s", "upload_s", "jitter", "p_dropout", "availability"):
        value = entry.get(name)
        if value is None:
            continue
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name!r} must be a finite number >= 0, not {value!r}")
        values[name] = float(value)
    if values.get("slowdown", 1.0) <= 0:
        raise ValueError("'slowdown' must be positive")
    if values.get("p_dropout", 0.0) > 1 or values.get("availability", 1.0) > 1:  # 1: it never sent anything
        raise ValueError("'p_dropout' and 'availability' must be at most 1")
    step_s = entry.get("step_s")
    if step_s is not None:
        if not isinstance(step_s, dict) or not step_s:
            raise ValueError("'step_s' must map batch sizes to seconds per step")
        points = {int(batch): float(seconds) for batch, seconds in step_s.items()}
        if min(points) < 1 or not all(math.isfinite(t) and t > 0 for t in points.values()):
            raise ValueError("'step_s' must map batch sizes >= 1 to positive seconds per step")
        values["step_s"] = StepTime.from_mapping(points)
    return device, replace(default, **values)
