"""The config's sections for how a run scores its models and uses the machine: ``eval`` and ``run``
(in their own module to keep ``config.py`` readable; ``amble.config`` re-exports both)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from amble.config_server import Section


class EvalConfig(Section):
    """How published models are scored (the simulator; ``amble serve`` scores every round on ``test_samples``)."""

    every: int = Field(1, ge=1)
    """Evaluate every ``every``-th round and the last; the rows of the others hold ``accuracy: null``."""
    target_accuracy: float = Field(0.75, gt=0, le=1)
    test_samples: int | None = Field(None, ge=1)
    """The evaluation set: this many test samples drawn by the seed (all of them when unset)."""
    subsample: int | None = Field(1000, ge=1)
    """Rounds before the last are scored on this many of the evaluation samples (drawn by the seed,
    the same for every round and strategy); the last round, and a round whose estimate comes near
    the target before it is reached, on all of them. ``null``: every evaluation on all of them."""
    batch_size: int = Field(256, ge=1)
    """Samples per forward pass (inference mode: no autograd). Moderate batches whose activations stay
    in cache score fastest on CPU (BENCHMARKS.md: LeNet and the CIFAR CNN, 64 to 2000)."""


class RunSection(Section):
    """How ``amble run`` uses this machine (the results do not depend on ``parallel``)."""

    parallel: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """Strategies played at once, each in its own process; ``auto``: as many as the strategies and
    the cores allow (cores // ``threads``). Embedded runs only (``server.store: memory``, training in
    this process, a model named in the config): others play their strategies one after another."""
    threads: int = Field(1, ge=1)
    """Torch threads of each strategy's training and evaluation. Part of what a run computes: float
    sums are split by thread, so results are bit-for-bit reproducible for a given ``threads``."""

    @field_validator("parallel", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError("run.parallel must be auto or a whole number of processes >= 1")
        return value
