"""Fleet generators, the step-time model and the virtual clock."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch import nn

from amble.config import FleetConfig, TierConfig
from amble.errors import ConfigError
from amble.fleet import StepTime, VirtualClock, calibrate, generate_fleet, load_trace


def test_tiers_give_exact_shares_deterministically() -> None:
    config = FleetConfig(kind="tiers")  # 50% 1x, 30% 3x, 20% 10x

    fleet = generate_fleet(config, 100, seed=4)

    slowdowns = [p.slowdown for p in fleet]
    assert (slowdowns.count(1.0), slowdowns.count(3.0), slowdowns.count(10.0)) == (50, 30, 20)
    assert fleet == generate_fleet(config, 100, seed=4)
    assert fleet != generate_fleet(config, 100, seed=5)


def test_tier_counts_use_largest_remainders() -> None:
    config = FleetConfig(kind="tiers", tiers=[TierConfig(share=0.5, slowdown=1), TierConfig(share=0.5, slowdown=2)])
    slowdowns = [p.slowdown for p in generate_fleet(config, 7, seed=0)]
    assert sorted(slowdowns) == [1, 1, 1, 1, 2, 2, 2] or sorted(slowdowns) == [1, 1, 1, 2, 2, 2, 2]


def test_lognormal_spread_and_bandwidth_range() -> None:
    fleet = generate_fleet(FleetConfig(kind="lognormal", sigma=1.0, bandwidth_mbps=(5, 50)), 1000, seed=0)
    slowdowns = sorted(p.slowdown for p in fleet)
    median = slowdowns[500]
    assert 0.8 < median < 1.25
    assert slowdowns[-1] / median > 10  # sigma 1: the slowest of 1000 is well past 10x the median
    assert all(5e6 <= p.down_bps <= 50e6 for p in fleet)


def test_uniform_slowdowns_stay_in_range() -> None:
    fleet = generate_fleet(FleetConfig(kind="uniform", slowdown_range=(2, 4)), 200, seed=1)
    assert all(2 <= p.slowdown <= 4 for p in fleet)


def test_trace_csv_fills_missing_columns_from_the_config(tmp_path: Path) -> None:
    trace = tmp_path / "fleet.csv"
    trace.write_text("slowdown,up_bps\n2,1000000\n5,\n")
    config = FleetConfig(kind="trace", trace=str(trace), latency_s=0.2)

    fleet = generate_fleet(config, 3, seed=0)

    assert [p.slowdown for p in fleet] == [2.0, 5.0, 2.0]  # rows reused in order
    assert fleet[0].up_bps == 1e6 and fleet[0].latency_s == 0.2


def test_trace_errors_name_the_file_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("speed\n1\n")
    with pytest.raises(ConfigError, match="slowdown"):
        load_trace(bad, FleetConfig(kind="trace", trace=str(bad)), 2)
    with pytest.raises(ConfigError, match="not found"):
        load_trace(tmp_path / "missing.csv", FleetConfig(kind="trace", trace="x"), 2)


def test_step_time_interpolates_and_stays_monotone() -> None:
    step = StepTime.from_mapping({32: 0.01, 64: 0.008, 128: 0.03, 256: 0.5})  # 64 and 256: noise

    assert step(32) == pytest.approx(0.01)
    assert step(64) == pytest.approx(0.01)  # clamped to be no faster than 32
    assert step(128) == pytest.approx(0.02)  # no slower per sample than 64: 0.01 * 128 / 64
    assert step(96) == pytest.approx(0.015)
    assert step(256) == pytest.approx(0.04)
    assert step(512) == pytest.approx(0.08)  # linear beyond the last point
    assert StepTime.from_mapping({32: 0.02})(64) == pytest.approx(0.04)


def test_clock_charges_compute_and_communication() -> None:
    config = FleetConfig(kind="uniform", slowdown_range=(3, 3), bandwidth_mbps=(8, 8), latency_s=0.1, jitter=0.0)
    profile = generate_fleet(config, 1, seed=0)[0]
    clock = VirtualClock(StepTime.from_mapping({32: 0.01}), model_bytes=1_000_000, seed=0)

    timing = clock.timing(profile, round_index=0, device=0, batch_size=32, steps=20)

    assert timing.compute_s == pytest.approx(20 * 3 * 0.01)
    assert timing.download_s == pytest.approx(0.1 + 8e6 / 8e6)
    assert timing.total_s == pytest.approx(0.6 + 2 * 1.1)
    assert timing.dropped_at_s is None


def test_dropouts_and_jitter_are_seeded() -> None:
    profile = generate_fleet(FleetConfig(kind="tiers", p_dropout=0.3, jitter=0.2), 1, seed=0)[0]
    clock = VirtualClock(StepTime.from_mapping({32: 0.01}), 1000, seed=9)

    timings = [clock.timing(profile, r, 0, 32, 10) for r in range(400)]

    drops = sum(t.dropped_at_s is not None for t in timings)
    assert 80 < drops < 160  # ~30% of 400
    assert timings == [clock.timing(profile, r, 0, 32, 10) for r in range(400)]
    assert len({round(t.compute_s, 9) for t in timings}) > 300  # jitter varies per round
    assert all(t.dropped_at_s is None or 0 <= t.dropped_at_s <= t.total_s for t in timings)


def test_availability_is_deterministic_per_round_and_device() -> None:
    profile = generate_fleet(FleetConfig(kind="tiers", availability=0.5), 1, seed=0)[0]
    clock = VirtualClock(StepTime.from_mapping({32: 0.01}), 1000, seed=1)
    draws = [clock.is_available(profile, r, 0) for r in range(200)]
    assert 60 < sum(draws) < 140
    assert draws == [clock.is_available(profile, r, 0) for r in range(200)]


def test_calibration_times_real_steps_and_caches_them(tmp_path: Path) -> None:
    built: list[int] = []

    def build() -> nn.Module:
        built.append(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))

    first = calibrate(build, "tiny", (1, 4, 4), 4, cache_dir=tmp_path, batches=(8, 64), repeats=3)
    second = calibrate(build, "tiny", (1, 4, 4), 4, cache_dir=tmp_path, batches=(8, 64), repeats=3)

    assert built == [1]  # the second call read the cache
    assert first == second
    assert all(t > 0 and math.isfinite(t) for _, t in first.points)
    assert (tmp_path / "calibration.json").is_file()
