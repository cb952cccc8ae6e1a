"""The simulator's evaluation: the seeded subsample, the full-set checks near the target, and the rows
and summary of rounds not evaluated (``eval.every``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from amble.config import config_from_dict
from amble.sim import run_experiment
from amble.sim.evaluation import Evaluator, evaluation_subsample
from tests.test_sim import SMALL, read_jsonl

EVERY_OTHER: dict[str, Any] = {
    **SMALL,
    "rounds": 5,
    "eval": {"every": 2, "target_accuracy": 0.3, "subsample": 100},
    "run": {"parallel": 1},
}


class Constant(nn.Module):
    """Predicts class 0 for every sample: its accuracy is the share of label 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 2)


def _evaluator(labels: list[int], subsample: int, target: float, rounds: int = 10) -> Evaluator:
    config = config_from_dict(
        {**SMALL, "rounds": rounds, "eval": {"subsample": subsample, "target_accuracy": target}, "seed": 5}
    )
    y = torch.tensor(labels)
    return Evaluator(config, Constant(), (torch.zeros(len(y), 1), y))


def test_the_subsample_is_drawn_by_the_seed_in_test_order() -> None:
    x, y = torch.arange(1000.0).unsqueeze(1), torch.arange(1000) % 10

    def draw(seed: int, size: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        config = config_from_dict({**SMALL, "seed": seed, "eval": {"subsample": size}})
        return evaluation_subsample(config, (x, y))

    first, again, other = draw(1, 100), draw(1, 100), draw(2, 100)
    assert first is not None and again is not None and other is not None
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    rows = first[0].squeeze(1).long()
    assert len(rows) == 100 and torch.equal(rows, rows.sort().values) and torch.equal(first[1], y[rows])
    assert draw(1, None) is None and draw(1, 1000) is None  # off, or the whole set: no subsample


def test_rounds_before_the_last_are_estimates_and_the_last_is_on_every_sample() -> None:
    evaluator = _evaluator([0] * 200 + [1] * 800, subsample=100, target=0.9)
    params = Constant().state_dict()

    estimate = evaluator.score(params, round_index=3, reached=False)
    final = evaluator.score(params, round_index=9, reached=False)

    assert estimate.samples == 100 and final.samples == 1000
    assert final.accuracy == 0.2


def test_an_estimate_near_the_target_is_checked_on_every_sample_until_it_is_reached() -> None:
    # Prepare: 30% label 0. The check starts at target - 2 standard errors of a 100-sample estimate:
    # 0.35 - 2 * sqrt(0.35 * 0.65 / 100) = 0.2546, so an estimate around 0.3 is checked.
    evaluator = _evaluator([0] * 300 + [1] * 700, subsample=100, target=0.35)
    params = Constant().state_dict()
    assert evaluator.confirm_from == pytest.approx(0.35 - 2 * (0.35 * 0.65 / 100) ** 0.5)
    estimate = evaluator._score(*evaluator.subsample)  # type: ignore[misc]
    assert estimate.accuracy >= evaluator.confirm_from, "the seed's subsample must read near 0.3 for this test"

    # Execute
    before = evaluator.score(params, round_index=2, reached=False)
    after = evaluator.score(params, round_index=2, reached=True)

    # Assert: the full set decides until the target is reached; then the estimate stands
    assert (before.samples, before.accuracy) == (1000, 0.3)
    assert after.samples == 100 and after.accuracy == estimate.accuracy


def test_an_estimate_far_below_the_target_is_not_checked() -> None:
    evaluator = _evaluator([0] * 300 + [1] * 700, subsample=100, target=0.9)
    assert evaluator.score(Constant().state_dict(), round_index=2, reached=False).samples == 100


def test_rounds_not_evaluated_hold_null_and_the_summary_reads_the_evaluated(tmp_path: Path) -> None:
    # Execute
    summary = run_experiment(config_from_dict(EVERY_OTHER), tmp_path, progress=False)

    # Assert: rounds 1 and 3 (of 0..4) are evaluated, and 4, the last, on the full test set (500 samples)
    rows = {(r["strategy"], r["round"]): r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    for label in ("fedavg", "amble"):
        evaluated = {r for (s, r), row in rows.items() if s == label and row["accuracy"] is not None}
        assert evaluated == {1, 3, 4}
        for r in (0, 2):
            assert (rows[label, r]["loss"], rows[label, r]["eval_samples"]) == (None, None)
        assert rows[label, 4]["eval_samples"] == SMALL["data"].get("synthetic_size", (2000, 500))[1]
        result = summary["strategies"][label]
        accuracies = [rows[label, r]["accuracy"] for r in sorted(evaluated)]
        assert result["final_accuracy"] == accuracies[-1] and result["best_accuracy"] == max(accuracies)
        reached = next((r for r in sorted(evaluated) if rows[label, r]["accuracy"] >= 0.3), None)
        assert result["rounds_to_target"] == (None if reached is None else reached + 1)
        if reached is not None:
            assert result["time_to_target_s"] == rows[label, reached]["virtual_time_s"]
            assert rows[label, reached]["eval_samples"] == 500, "only the full set may declare the target reached"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["eval"]["every"] == 2 and (tmp_path / "accuracy_vs_round.png").is_file()
