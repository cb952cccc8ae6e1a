"""Device profiles and the seeded fleet generators of SPEC 4: uniform, lognormal, tiers, trace."""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from amble.config import FleetConfig
from amble.errors import ConfigError


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
    """Sigma of the lognormal noise on each round's compute time."""
    p_dropout: float
    availability: float


PROFILE_FIELDS = tuple(f.name for f in fields(DeviceProfile))


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
    """A CSV with a header and one device per row; missing columns take the fleet config's values.

    Columns: ``slowdown`` (required) and any of ``step_overhead_s, up_bps, down_bps, latency_s,
    jitter, p_dropout, availability``. With fewer rows than devices the rows are reused in order.
    """
    if not path.is_file():
        raise ConfigError(f"fleet.trace file {path} not found; give a CSV with a 'slowdown' column")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "slowdown" not in rows[0]:
        raise ConfigError(f"fleet.trace file {path} needs a header row with at least a 'slowdown' column")
    unknown = sorted(set(rows[0]) - set(PROFILE_FIELDS) - {"device"})
    if unknown:
        raise ConfigError(f"fleet.trace file {path} has unknown column(s) {unknown}; allowed: {list(PROFILE_FIELDS)}")
    mid_bps = float(np.sqrt(config.bandwidth_mbps[0] * config.bandwidth_mbps[1]) * 1e6)
    default = DeviceProfile(
        1.0,
        config.step_overhead_s,
        mid_bps,
        mid_bps,
        config.latency_s,
        config.jitter,
        config.p_dropout,
        config.availability,
    )
    profiles = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {k: float(v) for k, v in row.items() if k in PROFILE_FIELDS and v not in ("", None)}
        except ValueError as exc:
            raise ConfigError(f"fleet.trace file {path} line {line}: {exc}") from None
        if values.get("slowdown", 0) <= 0:
            raise ConfigError(f"fleet.trace file {path} line {line}: slowdown must be positive")
        profiles.append(replace(default, **values))
    return [profiles[k % len(profiles)] for k in range(num_devices)]
