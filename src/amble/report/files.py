"""The run directory's files: their schemas, reading them back with clear errors, atomic writes.

``amble run`` writes ``metrics.jsonl`` and ``devices.jsonl`` line by line as rounds finish and
``summary.json`` at the end (SPEC section 6); ``amble report`` rebuilds everything from these alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amble.errors import AmbleError

METRICS_FILE = "metrics.jsonl"
DEVICES_FILE = "devices.jsonl"
SUMMARY_FILE = "summary.json"

METRICS_FIELDS = (
    "strategy",
    "round",
    "virtual_time_s",
    "wall_time_s",
    "accuracy",
    "loss",
    "participants",
    "completed",
    "dropped",
    "samples_processed",
)
DEVICE_FIELDS = (
    "strategy",
    "round",
    "device",
    "batch_size",
    "local_steps",
    "epochs",
    "lr",
    "compute_s",
    "comm_s",
    "idle_s",
    "status",
)
DEVICE_STATUSES = ("ok", "partial", "dropped", "failed")
STRATEGY_SUMMARY_FIELDS = (
    "final_accuracy",
    "best_accuracy",
    "target_accuracy",
    "time_to_target_s",
    "rounds_to_target",
    "virtual_time_s",
    "wall_time_s",
    "rounds",
    "rounds_failed",
    "updates_aggregated",
    "updates_rejected",
    "function_invocations",
    "cold_starts",
    "warm_starts",
    "function_busy_s",
)

_RUN_DIR_HINT = (
    f"The directory should be the output of `amble run` (it holds {METRICS_FILE}, {DEVICES_FILE} and {SUMMARY_FILE})."
)

Row = dict[str, Any]


@dataclass(frozen=True)
class RunData:
    """Everything a run wrote: rows in file order, and the summary with the resolved config."""

    metrics: list[Row]
    devices: list[Row]
    summary: dict[str, Any]
    run_dir: Path = field(default_factory=Path)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved experiment config recorded in the summary ({} if none was recorded)."""
        config = self.summary.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def name(self) -> str:
        """The run's name from its config, else the run directory's name."""
        name = self.config.get("name")
        return str(name) if name not in (None, "") else (self.run_dir.name or "run")

    @property
    def measured(self) -> bool:
        """True for a served run (``amble serve``): its times are wall-clock seconds measured on a real
        fleet, from the first round's start, not the simulator's virtual seconds."""
        return self.summary.get("clock") == "wall"

    @property
    def clock_text(self) -> str:
        """How the report names the run's time axis."""
        return "measured time" if self.measured else "virtual time"

    @property
    def strategies(self) -> list[str]:
        """Strategy names: the summary's order first, then any seen only in the row files."""
        names = list(self.summary.get("strategies", {}))
        for row in (*self.metrics, *self.devices):
            if row["strategy"] not in names:
                names.append(row["strategy"])
        return names

    def strategy_summary(self, strategy: str) -> dict[str, Any]:
        """The summary entry of one strategy ({} if the summary does not list it)."""
        entry = self.summary.get("strategies", {}).get(strategy)
        return entry if isinstance(entry, dict) else {}


def read_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory written by ``amble run``; raise AmbleError naming any bad file and line."""
    root = Path(run_dir)
    if not root.is_dir():
        raise AmbleError(f"run directory {root} does not exist or is not a directory. {_RUN_DIR_HINT}")
    metrics = _read_jsonl(root / METRICS_FILE, _check_metrics_row)
    devices = _read_jsonl(root / DEVICES_FILE, _check_device_row)
    return RunData(metrics=metrics, devices=devices, summary=read_summary(root), run_dir=root)


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A run directory's ``summary.json`` alone, checked as :func:`read_run` checks it."""
    return _read_summary(Path(run_dir) / SUMMARY_FILE)


def _lenient_constant(name: str) -> None:
    """Read a stray NaN/Infinity (not strict JSON, never written by RunWriter) as a missing value."""
    return None


def _read_jsonl(path: Path, check: Callable[[Row], str | None]) -> list[Row]:
    if not path.is_file():
        raise AmbleError(f"{path} is missing. {_RUN_DIR_HINT}")
    rows: list[Row] = []
    try:
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {line_number}"
                try:
                    row = json.loads(line, parse_constant=_lenient_constant)
                except json.JSONDecodeError as error:
                    raise AmbleError(
                        f"{where} is not valid JSON ({error.msg}, column {error.colno}). "
                        "If the run crashed while writing it, delete that line and run `amble report` "
                        f"again. {_RUN_DIR_HINT}"
                    ) from None
                if not isinstance(row, dict):
                    raise AmbleError(f"{where} is not a JSON object. {_RUN_DIR_HINT}")
                problem = check(row)
                if problem is not None:
                    raise AmbleError(f"{where}: {problem}. {_RUN_DIR_HINT}")
                rows.append(row)
    except UnicodeDecodeError as error:
        raise AmbleError(f"{path} is not UTF-8 text ({error.reason}). {_RUN_DIR_HINT}") from None
    return rows


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AmbleError(f"{path} is missing: the run did not finish, or this is not a run directory. {_RUN_DIR_HINT}")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"), parse_constant=_lenient_constant)
    except json.JSONDecodeError as error:
        raise AmbleError(
            f"{path} line {error.lineno} is not valid JSON ({error.msg}, column {error.colno}). {_RUN_DIR_HINT}"
        ) from None
    except UnicodeDecodeError as error:
        raise AmbleError(f"{path} is not UTF-8 text ({error.reason}). {_RUN_DIR_HINT}") from None
    if not isinstance(summary, dict):
        raise AmbleError(f"{path} must hold a JSON object. {_RUN_DIR_HINT}")
    strategies = summary.get("strategies")
    if not isinstance(strategies, dict) or not all(isinstance(v, dict) for v in strategies.values()):
        raise AmbleError(
            f'{path} must have "strategies": an object mapping each strategy name to an object '
            f"of results. {_RUN_DIR_HINT}"
        )
    if not isinstance(summary.get("config", {}), dict):
        raise AmbleError(f'{path}: "config" must be a JSON object. {_RUN_DIR_HINT}')
    return summary


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _missing(row: Row, fields: tuple[str, ...]) -> str | None:
    absent = [name for name in fields if name not in row]
    return f"missing {', '.join(repr(n) for n in absent)}" if absent else None


def _check_common(row: Row, numeric: tuple[str, ...]) -> str | None:
    if not isinstance(row["strategy"], str):
        return f"'strategy' must be a string, got {row['strategy']!r}"
    if not isinstance(row["round"], int) or isinstance(row["round"], bool):
        return f"'round' must be an integer, got {row['round']!r}"
    for name in numeric:
        if row[name] is not None and not _is_number(row[name]):
            return f"{name!r} must be a number or null, got {row[name]!r}"
    return None


def _check_metrics_row(row: Row) -> str | None:
    return _missing(row, METRICS_FIELDS) or _check_common(row, ("virtual_time_s", "wall_time_s", "accuracy"))


def _check_device_row(row: Row) -> str | None:
    problem = _missing(row, DEVICE_FIELDS) or _check_common(row, ("compute_s", "comm_s", "idle_s"))
    if problem is None and row["status"] not in DEVICE_STATUSES:
        problem = f"'status' must be one of {', '.join(DEVICE_STATUSES)}, got {row['status']!r}"
    return problem
