"""``t_ref(B)`` and every per-step time by batch size: a few measured points, interpolated."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class StepTime:
    """``t_ref(B)``: piecewise-linear through measured points, linear beyond them."""

    points: tuple[tuple[int, float], ...]

    @classmethod
    def from_mapping(cls, values: Mapping[int, float]) -> StepTime:
        ordered = sorted((int(b), float(t)) for b, t in values.items())
        # Physical bounds that timing noise must not break: a bigger batch is never faster per step,
        # and never slower per sample (t(B) <= t(B') * B / B' for B > B').
        clean: list[tuple[int, float]] = []
        for batch, seconds in ordered:
            if clean:
                prev_batch, prev_seconds = clean[-1]
                seconds = min(max(seconds, prev_seconds), prev_seconds * batch / prev_batch)
            clean.append((batch, seconds))
        return cls(tuple(clean))

    def __call__(self, batch_size: float) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1] * batch_size / pts[0][0]
        batches = [b for b, _ in pts]
        i = min(max(bisect.bisect_left(batches, batch_size), 1), len(pts) - 1)
        (b0, t0), (b1, t1) = pts[i - 1], pts[i]
        return max(t0 + (t1 - t0) * (batch_size - b0) / (b1 - b0), 1e-9)

    def to_json(self) -> dict[str, float]:
        return {str(b): t for b, t in self.points}
