"""The time-to-accuracy benchmark's analysis, on hand-written run files with hand-computed answers.

The benchmark's numbers go into BENCHMARKS.md; these tests pin what they mean: the target, the
budget, time and rounds to target, the ratio to AMBLE and "not reached".
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from amble.config import config_from_dict
from amble.fleet import StepTime

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tta() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # for its own `from provenance import ...`
    try:
        spec = importlib.util.spec_from_file_location("time_to_accuracy", BENCHMARKS / "time_to_accuracy.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while it executes
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def write_run(path: Path, curves: dict[str, list[tuple[float, float | None]]]) -> Path:
    """A run directory as `amble run` leaves it: metrics.jsonl rows and summary.json counters."""
    path.mkdir(parents=True)
    rows = [
        {"strategy": name, "round": r, "virtual_time_s": t, "accuracy": acc}
        for name, curve in curves.items()
        for r, (t, acc) in enumerate(curve)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary: dict[str, Any] = {
        name: {"samples_processed": 100 * len(curve), "function_invocations": 12, "cold_starts": 1}
        for name, curve in curves.items()
    }
    (path / "summary.json").write_text(json.dumps({"strategies": summary}))
    return path


def test_target_times_ratios_and_budget_by_hand(tta: ModuleType, tmp_path: Path) -> None:
    seed0 = write_run(
        tmp_path / "seed0",
        {
            "fedavg": [(2.0, 0.30), (4.0, 0.50), (6.0, 0.62), (8.0, 0.58)],
            "amble": [(2.0, 0.40), (4.0, 0.61), (5.0, 0.66)],
            "deadline": [(1.0, 0.20), (2.0, None), (3.0, 0.40)],
        },
    )
    seed1 = write_run(
        tmp_path / "seed1",
        {
            "fedavg": [(2.0, 0.45), (4.0, 0.66)],
            "amble": [(1.0, 0.55), (3.0, 0.64)],
            "deadline": [(1.5, 0.61), (3.5, 0.65)],
        },
    )
    result = tta.analyse("cell", [seed0, seed1])
    # FedAvg's best: 0.62 and 0.66, mean 0.64; 95% of it is 0.608, rounded down to a hundredth.
    assert result.target == 0.60
    assert result.seeds == 2
    # The budget is the shortest strategy's total virtual time in each seed.
    assert result.budget_s == [3.0, 3.0]
    fedavg, amble, deadline = (result.strategies[name] for name in ("fedavg", "amble", "deadline"))
    assert fedavg.time_to_target_s == [6.0, 4.0] and fedavg.rounds_to_target == [3, 2]
    assert amble.time_to_target_s == [4.0, 3.0] and amble.rounds_to_target == [2, 2]
    assert deadline.time_to_target_s == [None, 1.5] and deadline.rounds_to_target == [None, 1]
    assert fedavg.ratio_to_amble == [1.5, pytest.approx(4 / 3)]
    assert deadline.ratio_to_amble == [None, 0.5]
    # Within the budget: the last and best accuracy measured at or before it (None rows skipped).
    assert fedavg.final_at_budget == [0.30, 0.45] and fedavg.best_at_budget == [0.30, 0.45]
    assert deadline.final_at_budget == [0.40, 0.61] and deadline.best_at_budget == [0.40, 0.61]
    assert amble.samples == [300, 200] and amble.cold_starts == [1, 1]
    # The plot's curves: every seed's evaluated rounds (None rows skipped).
    assert result.curves["deadline"] == [[(1.0, 0.20), (3.0, 0.40)], [(1.5, 0.61), (3.5, 0.65)]]


def test_the_plotted_curve_is_the_mean_of_each_seeds_latest_accuracy(tta: ModuleType) -> None:
    seeds = [[(1.0, 0.2), (2.0, 0.4), (3.0, 0.6)], [(1.5, 0.3), (2.5, 0.5)]]
    times, accuracy = tta.mean_curve(seeds, points=3)
    # From the last first evaluation (1.5 s) to the first end (2.5 s): at 1.5 s seed 0's latest is
    # 0.2 (from 1 s); at 2 s, 0.4 and 0.3; at 2.5 s, 0.4 and 0.5.
    assert times == [1.5, 2.0, 2.5]
    assert accuracy == pytest.approx([0.25, 0.35, 0.45])


def test_aim_check_against_fedavg_and_each_seeds_best_baseline(tta: ModuleType, tmp_path: Path) -> None:
    seed0 = write_run(
        tmp_path / "seed0",
        {
            "fedavg": [(2.0, 0.30), (4.0, 0.50), (6.0, 0.62)],
            "amble": [(2.0, 0.40), (4.0, 0.61), (5.0, 0.66)],
            "deadline": [(1.0, 0.20), (3.0, 0.40)],  # never reaches 0.60: its 3 s run is a lower bound
        },
    )
    seed1 = write_run(
        tmp_path / "seed1",
        {
            "fedavg": [(2.0, 0.45), (4.0, 0.66)],
            "amble": [(1.0, 0.55), (3.0, 0.64)],
            "deadline": [(1.5, 0.61), (3.5, 0.65)],
        },
    )
    (check,) = tta.aim_checks(tta.analyse("cell", [seed0, seed1]))
    assert check.variant == "amble"
    assert check.vs_fedavg == [1.5, pytest.approx(4 / 3)] and check.censored_fedavg == 0
    # Seed 0: deadline's whole 3 s run is shorter than AMBLE's 4 s, a lower bound (0.75); the fastest
    # baseline that reached the target is FedAvg. Seed 1: deadline, 1.5 s against 3 s.
    assert check.vs_best == [0.75, 0.5] and check.censored_best == 1
    assert check.best == ["fedavg", "deadline"] and check.missed == 0
    # Final accuracy at each seed's 3 s budget: AMBLE 0.40 and 0.64, FedAvg 0.30 and 0.45, and the best
    # baselines of the seeds (FedAvg, deadline) 0.30 and 0.61.
    assert (check.final, check.final_fedavg, check.final_best) == pytest.approx((0.52, 0.375, 0.455))
    assert check.verdict() == "no"  # 1.42x FedAvg is exact, and short of 2x
    row = "| cell | amble | 1.42 ± 0.12 | ≥ 0.62 ± 0.18 | deadline 1, fedavg 1 | 0.520 / 0.375 / 0.455 | no |"
    assert row in tta.render_aims([tta.analyse("cell", [seed0, seed1])])


def test_aim_verdicts(tta: ModuleType) -> None:
    def check(**changes: Any) -> Any:
        fields = {"vs_fedavg": [2.5, 2.1], "vs_best": [1.4, 1.3], "final": 0.7, "final_fedavg": 0.6, "final_best": 0.7}
        return tta.AimCheck("amble", **{**fields, **changes}).verdict()

    assert check() == "yes"
    assert check(final=0.69) == "no"  # less accurate than the best baseline at the budget
    assert check(missed=1) == "no"
    assert check(vs_fedavg=[1.5, 1.6]) == "no"
    assert check(vs_fedavg=[1.5, 1.6], censored_fedavg=1) == "undetermined (lower bound)"
    assert check(vs_best=[1.2, 1.3], censored_fedavg=1) == "no"  # the short ratio is the exact one


def test_a_strategy_that_never_reaches_the_target_says_so(tta: ModuleType) -> None:
    assert tta.mean_spread([None, None]) == "not reached"
    assert tta.mean_spread([2.0, 4.0, None], 1) == "3.0 ± 1.4 (1 not reached)"
    assert tta.mean_spread([0.5]) == "0.500"


def test_every_cell_config_is_valid_and_pins_the_reference_step_times(
    tta: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calibration times real steps: stubbed here so the test neither waits for it nor writes the user's cache.
    monkeypatch.setattr(tta, "calibrate", lambda *args: StepTime.from_mapping({32: 0.004, 64: 0.007}))
    tta.reference_step_times.cache_clear()
    monkeypatch.setattr(tta, "reference_step_times", tta.reference_step_times.__wrapped__)
    first = tta.FULL_MATRIX[0].config(seed=1)
    config = config_from_dict(first)
    assert config.fleet.t_ref == {32: 0.004, 64: 0.007}, "a cell's runs share one clock, whatever process runs them"
    assert config.fleet.t_ref == config_from_dict(tta.FULL_MATRIX[0].config(seed=2)).fleet.t_ref
    labels = [s.label or s.name for s in config.strategies]
    assert len(labels) == len(set(labels)) and "fedavg" in labels and "amble" in labels
    assert not tta.VARIANTS & set(labels), "the variants run only when asked for"
    with_variants = config_from_dict(tta.FULL_MATRIX[0].config(seed=1, strategies=tta.chosen_strategies(True)))
    assert [s.label or s.name for s in with_variants.strategies if s.label not in tta.VARIANTS] == labels
    assert {s.label for s in with_variants.strategies} >= tta.VARIANTS
    assert [tta.entry_label(e) for e in tta.chosen_strategies(False, ["fedbuff", "fedavg"])] == ["fedavg", "fedbuff"]
    names = [cell.name for cell in tta.FULL_MATRIX]
    assert len(names) == len(set(names)) and set(tta.REDUCED) <= set(names)


def test_one_run_per_strategy_merges_into_one_seed_with_idle_shares_and_a_second_target(
    tta: ModuleType, tmp_path: Path
) -> None:
    seed = tmp_path / "seed0"
    fedavg = write_run(seed / "fedavg", {"fedavg": [(2.0, 0.30), (4.0, 0.50), (6.0, 0.62)]})
    amble = write_run(seed / "amble", {"amble": [(1.0, 0.40), (2.0, 0.61), (3.0, 0.63)]})
    rows = [  # FedAvg's devices: 3 s busy, 1 s idle; AMBLE's: 3 s busy, no idle
        {"strategy": "fedavg", "compute_s": 2.0, "comm_s": 1.0, "idle_s": 1.0},
        {"strategy": "fedavg", "compute_s": 2.5, "comm_s": 0.5, "idle_s": 1.0},
    ]
    (fedavg / "devices.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (amble / "devices.jsonl").write_text(json.dumps({"strategy": "amble", "compute_s": 3, "comm_s": 0, "idle_s": 0}))

    first = tta.analyse("cell", [[fedavg, amble]])
    high = tta.analyse("cell", [[fedavg, amble]], fraction=1.0)

    # 95% of 0.62 is 0.589 -> 0.58; FedAvg's best itself is 0.62
    assert (first.target, high.target) == (0.58, 0.62)
    assert first.strategies["fedavg"].time_to_target_s == [6.0] and first.strategies["amble"].time_to_target_s == [2.0]
    assert high.strategies["amble"].time_to_target_s == [3.0]
    assert first.strategies["fedavg"].idle_share == [pytest.approx(2 / 8)]
    assert first.strategies["amble"].idle_share == [0.0]
