"""A device's speed, learned only from its own reports (SPEC 3.1).

Per-step time is modelled as ``t(B) = a + b * B`` seconds, fitted by exponentially weighted least
squares over recent ``(B, seconds per step)`` pairs; communication as a weighted mean of the
reported download + upload seconds.

Robust to one outlying report: before the fit, each observation is winsorized against the median
of the device's own observations (:func:`winsorize_steps`), so with three or more reports in the
window one report, whatever it says, counts as at most :data:`OUTLIER_FACTOR` times what the others
say, and moves the estimate only that far. Honest timing noise (a few percent) never reaches the
bound, so honest fits are unchanged. Per-step times are floored at :data:`MIN_STEP_S`, so a model
is always positive and finite (histories stored before reports were checked included).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from amble.strategies.base import Report

OUTLIER_FACTOR = 4.0
"""How far one observation may sit from the device's median before it is clipped to that distance."""
MIN_STEP_S = 1e-6
"""Floor on a per-step time (the planner divides by it): no real device runs a training step in
under a microsecond, so the server rejects reports below it."""


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


def winsorize_steps(batches: Sequence[float], steps_s: Sequence[float]) -> list[float]:
    """Each per-step time clipped to within :data:`OUTLIER_FACTOR` of what the others imply.

    Observations at different batch sizes are compared through physics: a step at a larger batch
    is never faster and never slower per sample, so ``t(x_j)`` implies ``t(x_i)`` in
    ``[t(x_j) min(1, x_i/x_j), t(x_j) max(1, x_i/x_j)]``. Observation ``i`` is clipped to
    ``[low median of the lower ends / F, low median of the upper ends * F]`` over all observations
    (itself included): with three or more a single outlier cannot be the median; with two, the
    lower one wins (an inflated time, which would set everyone's deadline, is the one that is cut).
    """
    if len(steps_s) < 2:
        return list(steps_s)
    clipped = []
    for x_i, y_i in zip(batches, steps_s, strict=True):
        lows = [y_j * min(1.0, x_i / x_j) for x_j, y_j in zip(batches, steps_s, strict=True)]
        highs = [y_j * max(1.0, x_i / x_j) for x_j, y_j in zip(batches, steps_s, strict=True)]
        low = statistics.median_low(lows) / OUTLIER_FACTOR
        high = statistics.median_low(highs) * OUTLIER_FACTOR
        clipped.append(min(max(y_i, low), high))
    return clipped


def winsorize_comm(comm_s: Sequence[float]) -> list[float]:
    """Each communication time capped at :data:`OUTLIER_FACTOR` times the low median.

    Only from above: a low value (a cached model downloads in no time) is no sign of an outlier,
    while an inflated one would stretch the deadline. As for steps, with two the lower one wins.
    """
    if len(comm_s) < 2:
        return list(comm_s)
    cap = statistics.median_low(comm_s) * OUTLIER_FACTOR
    return [min(c, cap) for c in comm_s]


def fit_speed(reports: Sequence[Report], decay: float = 0.7, window: int = 8) -> SpeedModel:
    """Fit ``t(B) = a + b B`` to the newest ``window`` reports, weighting age ``i`` by ``decay**i``.

    With one distinct batch size (or a fit that is not physical: ``a < 0`` or ``b <= 0``) the
    proportional model ``t(B) = b B`` is used, which a single observation determines exactly.
    Observations are floored and winsorized first (see the module's docstring).
    """
    if not reports:
        raise ValueError("fit_speed needs at least one report")
    recent = sorted(reports, key=lambda r: r.round)[-window:]
    weights = [decay ** (len(recent) - 1 - i) for i in range(len(recent))]
    xs = [float(max(r.batch_size, 1)) for r in recent]
    ys = winsorize_steps(xs, [max(r.step_s, MIN_STEP_S) for r in recent])
    comms = winsorize_comm([max(r.download_s + r.upload_s, 0.0) for r in recent])
    total = sum(weights)
    comm_s = sum(w * c for w, c in zip(weights, comms, strict=True)) / total

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
