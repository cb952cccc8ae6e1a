"""How the simulator scores published models without letting evaluation dominate its wall time.

A round is evaluated every ``eval.every`` rounds and at the last. Rounds before the last are scored
on ``eval.subsample`` of the evaluation samples (drawn once by the seed: every round and strategy
of a run sees the same ones), an estimate with a standard error of ``sqrt(a (1 - a) / n)``; the
last round on all of them. Until a strategy reaches ``eval.target_accuracy``, an estimate within
two standard errors of the target (or above it) is replaced by the score on all samples, so time to
target is always decided by the full evaluation set: an estimate never declares the target reached,
and a round at the target is missed only when its estimate reads more than two standard errors low
(about 2% of the time). Scoring runs in inference mode (no autograd) in batches of ``eval.batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from amble.client import derive_seed, evaluate
from amble.config import ExperimentConfig
from amble.strategies import Params

SUBSAMPLE_STREAM = 0x5E1EC7
"""Seed part that separates the subsample's draw from every other use of the run's seed."""
CONFIRM_SE = 2.0
"""An estimate this many standard errors below the target, or closer, is checked on every sample."""


@dataclass(frozen=True)
class Score:
    accuracy: float
    loss: float
    samples: int
    """How many test samples the score is on (the subsample, or the whole evaluation set)."""


class Evaluator:
    """Scores the models one strategy publishes (one per strategy run: it holds a scratch model)."""

    def __init__(self, config: ExperimentConfig, model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model = model
        self.every = config.eval.every
        self.rounds = config.rounds
        self.target = config.eval.target_accuracy
        self.batch_size = config.eval.batch_size
        self.full = test
        self.subsample = evaluation_subsample(config, test)
        size = len(self.subsample[1]) if self.subsample is not None else len(test[1])
        self.confirm_from = self.target - CONFIRM_SE * math.sqrt(self.target * (1 - self.target) / size)

    def due(self, round_index: int) -> bool:
        """Whether round ``round_index`` is evaluated (every ``eval.every``-th and the last)."""
        return (round_index + 1) % self.every == 0 or round_index == self.rounds - 1

    def score(self, params: Params, round_index: int, reached: bool) -> Score:
        """Score ``params``, the model published by round ``round_index``; ``reached``: whether this
        strategy has already reached the target (then an estimate is never confirmed)."""
        self.model.load_state_dict(params)
        if self.subsample is not None and round_index < self.rounds - 1:
            estimate = self._score(*self.subsample)
            if reached or estimate.accuracy < self.confirm_from:
                return estimate
        return self._score(*self.full)

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> Score:
        with torch.inference_mode():
            accuracy, loss = evaluate(self.model, x, y, batch_size=self.batch_size)
        return Score(accuracy, loss, len(y))


def evaluation_subsample(
    config: ExperimentConfig, test: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``eval.subsample`` of the evaluation samples drawn by the seed, in their original order (None: the
    subsample is off, or not smaller than the evaluation set)."""
    size = config.eval.subsample
    if size is None or size >= len(test[1]):
        return None
    generator = torch.Generator().manual_seed(derive_seed(config.seed, SUBSAMPLE_STREAM))
    keep = torch.randperm(len(test[1]), generator=generator)[:size].sort().values
    return test[0][keep], test[1][keep]


def score_fields(score: Score | None) -> dict[str, float | int | None]:
    """A ``metrics.jsonl`` row's scoring fields; all null for a round not evaluated."""
    if score is None:
        return {"accuracy": None, "loss": None, "eval_samples": None}
    return {"accuracy": score.accuracy, "loss": score.loss, "eval_samples": score.samples}
