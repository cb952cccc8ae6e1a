"""Plots of a run, drawn from its files alone.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, no GUI, and no
change to matplotlib's global state, so this is safe inside servers, tests and threads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from amble.report.files import Row, RunData

DPI = 110
ACCURACY_VS_TIME_FILE = "accuracy_vs_time.png"
ACCURACY_VS_ROUND_FILE = "accuracy_vs_round.png"
TIMELINE_ROUNDS_SHOWN = 6  # more rounds than this: show the first and last half of it
TIMELINE_LABELLED_DEVICES = 40  # more devices in a round than this: no per-device tick labels

SEGMENT_COLOURS = {"compute": "#4C72B0", "comm": "#F0A04B", "idle": "#E3E3E3"}
STATUS_STYLES = {  # status: (colour, hatch); "ok" bars are plain
    "partial": ("#B07A00", "///"),
    "dropped": ("#C0392B", "xxx"),
    "failed": ("#7D3C98", "\\\\\\"),
}


@dataclass(frozen=True)
class PlotFile:
    """One written PNG, with the caption the report shows under it."""

    path: Path
    caption: str
    strategy: str | None = None


def write_plots(run: RunData, out_dir: Path) -> list[PlotFile]:
    """Write the accuracy plots and one timeline per strategy with device rows into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        PlotFile(
            plot_accuracy_vs_time(run, out_dir / ACCURACY_VS_TIME_FILE),
            (
                "Test accuracy against wall-clock time measured on the real fleet (from the first round's start)"
                if run.measured
                else "Test accuracy against simulated (virtual) time"
            )
            + "; stars mark where each strategy first reaches the target accuracy.",
        ),
        PlotFile(
            plot_accuracy_vs_round(run, out_dir / ACCURACY_VS_ROUND_FILE),
            "Test accuracy per round; stars mark where each strategy first reaches the target.",
        ),
    ]
    with_devices = [s for s in run.strategies if any(row["strategy"] == s for row in run.devices)]
    for strategy, stem in timeline_file_stems(with_devices).items():
        path = plot_timeline(run, strategy, out_dir / f"timeline_{stem}.png")
        caption = (
            f"Per-device time in each round for {strategy}: compute, communication, and idle time "
            "spent waiting for the round's straggler."
        )
        plots.append(PlotFile(path, caption, strategy))
    return plots


def safe_file_stem(name: str) -> str:
    """A file-name-safe form of a strategy name (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "strategy"


def timeline_file_stems(strategies: Iterable[str]) -> dict[str, str]:
    """Map each strategy to a distinct safe file stem (a numeric suffix breaks collisions)."""
    stems: dict[str, str] = {}
    for strategy in strategies:
        stem = base = safe_file_stem(strategy)
        suffix = 2
        while stem in stems.values():
            stem, suffix = f"{base}_{suffix}", suffix + 1
        stems[strategy] = stem
    return stems


def plot_accuracy_vs_time(run: RunData, path: Path) -> Path:
    """Accuracy against cumulative virtual time, one line per strategy."""
    return _plot_accuracy(run, path, x_key="virtual_time_s")


def plot_accuracy_vs_round(run: RunData, path: Path) -> Path:
    """Accuracy against round number, one line per strategy."""
    return _plot_accuracy(run, path, x_key="round")


def plot_timeline(run: RunData, strategy: str, path: Path) -> Path:
    """Stacked compute/comm/idle bars per device for a readable subset of rounds, coloured by status,
    above the idle share of every round."""
    by_round: dict[int, dict[object, Row]] = {}
    for row in run.devices:
        if row["strategy"] == strategy:  # a resumed run may repeat a row: the last one wins
            by_round.setdefault(row["round"], {})[_device_key(row["device"])] = row
    rounds = sorted(by_round)
    shown, shown_text = _rounds_to_show(rounds)

    ncols = 2 if len(shown) == 4 else max(1, min(3, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    most_devices = max((len(by_round[r]) for r in shown), default=1)
    panel_height = 1.1 + 0.24 * min(most_devices, TIMELINE_LABELLED_DEVICES)
    fig = _new_figure(width=4.6 * ncols + 1.2, height=nrows * panel_height + 3.4)
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[panel_height] * nrows + [2.3])

    longest_s = max(
        (_seconds(row, "compute_s", "comm_s", "idle_s") for r in shown for row in by_round[r].values()),
        default=1.0,
    )
    statuses: set[str] = set()
    first_axes: Axes | None = None
    for index, round_number in enumerate(shown):
        axes = fig.add_subplot(grid[index // ncols, index % ncols], sharex=first_axes)
        first_axes = first_axes or axes
        rows = list(by_round[round_number].values())
        statuses.update(row["status"] for row in rows)
        _draw_round(axes, round_number, rows)
        if index // ncols == nrows - 1 or index + ncols >= len(shown):
            axes.set_xlabel(f"Seconds since round start ({'measured' if run.measured else 'virtual'})")
        if index % ncols == 0:
            axes.set_ylabel("Device (busiest on top)")
    if first_axes is None:
        first_axes = fig.add_subplot(grid[0, :])
        _no_data(first_axes, f"no device rows recorded for {strategy}")
    else:
        first_axes.set_xlim(0, max(longest_s, 1e-9) * 1.22)  # room for the status labels

    share_axes = fig.add_subplot(grid[nrows, :])
    _draw_idle_share(share_axes, rounds, by_round, shown)

    fig.suptitle(
        f"{_plain(strategy)}: where each device's time went, per round ({shown_text})",
        fontsize=13,
        fontweight="bold",
    )
    handles: list[Patch | Line2D] = [
        Patch(facecolor=SEGMENT_COLOURS["compute"], label="compute"),
        Patch(facecolor=SEGMENT_COLOURS["comm"], label="communication (down + up)"),
        Patch(facecolor=SEGMENT_COLOURS["idle"], edgecolor="0.6", label="idle (waiting for straggler)"),
    ]
    for status, (colour, hatch) in STATUS_STYLES.items():
        if status in statuses:
            handles.append(Patch(facecolor="white", edgecolor=colour, hatch=hatch, label=f"device {status}"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return _save(fig, path)


def _plot_accuracy(run: RunData, path: Path, x_key: str) -> Path:
    fig = _new_figure(width=9.0, height=5.6)
    axes = fig.add_subplot()
    colours = _strategy_colours(run.strategies)
    drew_star = False
    for strategy in run.strategies:
        # Rounds not evaluated (accuracy null: eval.every) are left out, not drawn as gaps in the line.
        rows = [row for row in _metrics_of(run, strategy) if not math.isnan(_number(row["accuracy"]))]
        if not rows:
            continue
        xs = [_number(row[x_key]) for row in rows]
        ys = [_number(row["accuracy"]) for row in rows]
        target = target_accuracy(run, strategy)
        reached = next(
            (row for row in rows if target is not None and row["accuracy"] >= target),
            None,
        )
        if target is None:
            note = ""
        elif reached is None:
            note = " (target not reached)"
        elif x_key == "round":
            note = f" (target at round {reached['round']})"
        else:
            note = f" (target at {_number(reached[x_key]):,.0f} s)"
        axes.plot(
            xs,
            ys,
            color=colours[strategy],
            linewidth=2,
            marker="o" if len(rows) <= 40 else None,
            markersize=4,
            label=_plain(strategy) + note,
        )
        if reached is not None:
            drew_star = True
            axes.plot(
                [_number(reached[x_key])],
                [_number(reached["accuracy"])],
                linestyle="none",
                marker="*",
                markersize=17,
                color=colours[strategy],
                markeredgecolor="black",
                markeredgewidth=0.8,
                zorder=5,
            )
    for target in sorted({t for s in run.strategies if (t := target_accuracy(run, s)) is not None}):
        axes.axhline(target, linestyle="--", color="0.3", linewidth=1.3, label=f"target accuracy {target * 100:g}%")
    if drew_star:
        axes.plot([], [], linestyle="none", marker="*", markersize=13, color="0.6",
                  markeredgecolor="black", label="first reaches target")  # fmt: skip
    if not run.metrics:
        _no_data(axes, "no metrics recorded")

    what = run.clock_text if x_key == "virtual_time_s" else "round"
    axes.set_title(f"{_plain(run.name)}: test accuracy vs {what}", fontsize=13, fontweight="bold")
    if x_key == "round":
        axes.set_xlabel("Round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        axes.set_xlabel("Time (s, measured on the real fleet)" if run.measured else "Virtual time (s, simulated)")
    axes.set_ylabel("Test accuracy (%)")
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=9, framealpha=0.9)
    return _save(fig, path)


def target_accuracy(run: RunData, strategy: str) -> float | None:
    """The strategy's target from the summary, else the config's ``eval.target_accuracy``."""
    target = run.strategy_summary(strategy).get("target_accuracy")
    if target is None:
        evaluation = run.config.get("eval")
        target = evaluation.get("target_accuracy") if isinstance(evaluation, dict) else None
    value = _number(target)
    return value if math.isfinite(value) else None


def _draw_round(axes: Axes, round_number: int, rows: list[Row]) -> None:
    rows = sorted(rows, key=lambda row: _seconds(row, "compute_s", "comm_s"))  # straggler on top
    positions = list(range(len(rows)))
    left = [0.0] * len(rows)
    for segment in ("compute", "comm", "idle"):
        widths = [_seconds(row, f"{segment}_s") for row in rows]
        bars = axes.barh(positions, widths, left=left, height=0.72, color=SEGMENT_COLOURS[segment])
        for bar, row in zip(bars, rows, strict=True):
            if row["status"] in STATUS_STYLES:
                colour, hatch = STATUS_STYLES[row["status"]]
                bar.set_hatch(hatch)
                bar.set_edgecolor(colour)
            elif segment == "idle":
                bar.set_edgecolor("0.7")
        left = [start + width for start, width in zip(left, widths, strict=True)]
    for position, (row, end) in enumerate(zip(rows, left, strict=True)):
        if row["status"] in STATUS_STYLES:
            colour = STATUS_STYLES[row["status"]][0]
            axes.text(end, position, f" {row['status']}", va="center", fontsize=8, color=colour,
                      fontweight="bold")  # fmt: skip

    axes.set_yticks(positions)
    if len(rows) <= TIMELINE_LABELLED_DEVICES:
        axes.set_yticklabels([_plain(str(row["device"])) for row in rows], fontsize=8)
    else:
        axes.set_yticklabels([])
    axes.set_ylim(-0.6, len(rows) - 0.4)
    not_ok = [s for s in STATUS_STYLES if any(row["status"] == s for row in rows)]
    counts = ", ".join(f"{sum(row['status'] == s for row in rows)} {s}" for s in not_ok)
    axes.set_title(f"Round {round_number}: {len(rows)} devices" + (f", {counts}" if counts else ""),
                   fontsize=10)  # fmt: skip
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_axisbelow(True)


def _draw_idle_share(axes: Axes, rounds: list[int], by_round: dict[int, dict[object, Row]], shown: list[int]) -> None:
    shares = []
    for round_number in rounds:
        rows = by_round[round_number].values()
        total = sum(_seconds(row, "compute_s", "comm_s", "idle_s") for row in rows)
        shares.append(sum(_seconds(row, "idle_s") for row in rows) / total if total > 0 else math.nan)
    axes.plot(rounds, shares, color="0.25", linewidth=1.8, marker="o" if len(rounds) <= 60 else None,
              markersize=4)  # fmt: skip
    axes.fill_between(rounds, shares, color=SEGMENT_COLOURS["idle"], alpha=0.8)
    partial = len(shown) < len(rounds)
    if partial:  # shade the first and last blocks of rounds drawn above
        half = len(shown) // 2
        for block in (shown[:half], shown[half:]):
            axes.axvspan(block[0] - 0.5, block[-1] + 0.5, color=SEGMENT_COLOURS["compute"], alpha=0.12, lw=0)
    axes.set_ylim(0, 1)
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("Round")
    axes.set_ylabel("Idle share (%)")
    axes.set_title(
        "Idle share of participating devices' time in every round"
        + (" (rounds drawn above are shaded)" if partial else ""),
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)


def _rounds_to_show(rounds: list[int]) -> tuple[list[int], str]:
    if len(rounds) <= TIMELINE_ROUNDS_SHOWN:
        return rounds, f"all {len(rounds)} round{'s' if len(rounds) != 1 else ''}"
    half = TIMELINE_ROUNDS_SHOWN // 2
    first, last = rounds[:half], rounds[-half:]
    return first + last, (
        f"first {half} and last {half} of {len(rounds)} rounds: {first[0]}–{first[-1]} and {last[0]}–{last[-1]}"
    )


def _metrics_of(run: RunData, strategy: str) -> list[Row]:
    """A strategy's metrics rows by round; a resumed run may repeat a round: the last row wins."""
    by_round = {row["round"]: row for row in run.metrics if row["strategy"] == strategy}
    return [by_round[r] for r in sorted(by_round)]


def _strategy_colours(strategies: list[str]) -> dict[str, Any]:
    palette = colormaps["tab10"].colors  # type: ignore[attr-defined]
    return {strategy: palette[i % len(palette)] for i, strategy in enumerate(strategies)}


def _device_key(device: object) -> object:
    return device if isinstance(device, str | int) else repr(device)


def _seconds(row: Row, *keys: str) -> float:
    """Sum of the named durations, treating null or negative as zero."""
    return sum(max(_number(row.get(key)), 0.0) if row.get(key) is not None else 0.0 for key in keys)


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _plain(text: str) -> str:
    """Text shown literally by matplotlib: a ``$`` would otherwise start mathtext."""
    return text.replace("$", r"\$")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="0.4")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path
