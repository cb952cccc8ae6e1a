"""A device's speed, learned only from its own reports (SPEC 3.1).

Per-step time is modelled as ``t(B) = a + b * B`` seconds, fitted by exponentially weighted least
squares over recent ``(B, seconds per step)`` pairs; communication as a weighted mean of the
reported download + upload seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amble.strategies.base import Report


@dataclass(frozen=True)
class SpeedModel:
    step_intercept_s: float
    step_per_sample_s: float
    comm_s: float

    def step_s(self, batch_size: int) -> float:
        """Seconds one local step takes at ``batch_size``."""
        return self.step_intercept_s + self.step_per_sample_s * batch_size

    def throughput(self, batch_size: int) -> float:
        """Samples per second at ``batch_size``."""
        return batch_size / self.step_s(batch_size)


def fit_speed(reports: Sequence[Report], decay: float = 0.7, window: int = 8) -> SpeedModel:
    """Fit ``t(B) = a + b B`` to the newest ``window`` reports, weighting age ``i`` by ``decay**i``.

    With one distinct batch size (or a fit that is not physical: ``a < 0`` or ``b <= 0``) the
    proportional model ``t(B) = b B`` is used, which a single observation determines exactly.
    """
    if not reports:
        raise ValueError("fit_speed needs at least one report")
    recent = sorted(reports, key=lambda r: r.round)[-window:]
    weights = [decay ** (len(recent) - 1 - i) for i in range(len(recent))]
    xs = [float(r.batch_size) for r in recent]
    ys = [r.step_s for r in recent]
    total = sum(weights)
    comm_s = sum(w * (r.download_s + r.upload_s) for w, r in zip(weights, recent, strict=True)) / total

    if len(set(xs)) > 1:
        mean_x = sum(w * x for w, x in zip(weights, xs, strict=True)) / total
        mean_y = sum(w * y for w, y in zip(weights, ys, strict=True)) / total
        sxx = sum(w * (x - mean_x) ** 2 for w, x in zip(weights, xs, strict=True))
        sxy = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, xs, ys, strict=True))
        slope = sxy / sxx
        intercept = mean_y - slope * mean_x
        if slope > 0 and intercept >= 0:
            return SpeedModel(intercept, slope, comm_s)
    # Proportional model through the origin: b = sum w t B / sum w B^2.
    slope = sum(w * x * y for w, x, y in zip(weights, xs, ys, strict=True)) / sum(
        w * x * x for w, x in zip(weights, xs, strict=True)
    )
    return SpeedModel(0.0, slope, comm_s)
