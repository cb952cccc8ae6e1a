"""Write a run's output files while it runs, so a crashed run still leaves readable files."""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from amble.durable import write_atomic
from amble.errors import AmbleError
from amble.report.files import (
    DEVICE_FIELDS,
    DEVICE_STATUSES,
    DEVICES_FILE,
    METRICS_FIELDS,
    METRICS_FILE,
    SUMMARY_FILE,
)


class RunWriter:
    """Appends one JSON line per round to ``metrics.jsonl`` and per device to ``devices.jsonl``.

    Every write is flushed at once. Files from an earlier run in the same directory are truncated
    unless ``append=True`` (resuming), in which case a half-written last line is dropped first and,
    with ``keep_rounds`` ({strategy: last kept round}), so is every row after a strategy's last kept round.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], *, append: bool = False, keep_rounds: Mapping[str, int] | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AmbleError(
                f"cannot create run directory {self.run_dir}: {error.strerror or error}. "
                "Choose another output directory (--out DIR)."
            ) from None
        self._files = ExitStack()
        if append and keep_rounds is not None:  # resuming: rows past each strategy's checkpoint are redone
            for name in (METRICS_FILE, DEVICES_FILE):
                _keep_rows(self.run_dir / name, keep_rounds)
        self._metrics = self._open(self.run_dir / METRICS_FILE, append)
        self._devices = self._open(self.run_dir / DEVICES_FILE, append)
        self._closed = False

    def _open(self, path: Path, append: bool) -> IO[str]:
        if append:
            _drop_incomplete_last_line(path)
        return self._files.enter_context(path.open("a" if append else "w", encoding="utf-8"))

    def write_round(self, row: Mapping[str, object]) -> None:
        """Append one (strategy, round) row to ``metrics.jsonl``."""
        self._write(self._metrics, [_json_line(row, METRICS_FIELDS, "metrics row")])

    def write_devices(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append one row per (strategy, round, device) to ``devices.jsonl``."""
        lines = []
        for row in rows:
            if row.get("status") not in DEVICE_STATUSES:
                raise ValueError(
                    f"device row status must be one of {', '.join(DEVICE_STATUSES)}, got {row.get('status')!r}"
                )
            lines.append(_json_line(row, DEVICE_FIELDS, "device row"))
        self._write(self._devices, lines)

    def write_summary(self, summary: Mapping[str, object]) -> None:
        """Write ``summary.json`` atomically: ``{"config": {...}, "strategies": {name: {...}}}``."""
        if not isinstance(summary.get("strategies"), Mapping):
            raise ValueError('summary needs "strategies": a mapping of strategy name to results')
        text = json.dumps(to_json_value(summary), indent=2, allow_nan=False, ensure_ascii=False)
        write_atomic(self.run_dir / SUMMARY_FILE, (text + "\n").encode("utf-8"))

    def close(self) -> None:
        """Close the row files; safe to call twice."""
        self._closed = True
        self._files.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, file: IO[str], lines: list[str]) -> None:
        if self._closed:
            raise ValueError(f"RunWriter for {self.run_dir} is closed")
        file.write("".join(lines))
        file.flush()


def to_json_value(value: object) -> object:
    """Convert ``value`` to strict JSON data: NaN and infinities become null, numpy/torch scalars
    and arrays become numbers and lists, paths become strings."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, Mapping):
        return {_json_key(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    tolist = getattr(value, "tolist", None)  # numpy and torch scalars and arrays
    if callable(tolist):
        return to_json_value(tolist())
    raise TypeError(
        f"cannot write a {type(value).__name__} to a run file: convert it to a number, string, list or dict first"
    )


def _json_key(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise TypeError(f"run file keys must be strings, got {key!r}")


def _json_line(row: Mapping[str, object], fields: tuple[str, ...], kind: str) -> str:
    absent = [name for name in fields if name not in row]
    if absent:
        raise ValueError(f"{kind} is missing {', '.join(absent)}; it needs {', '.join(fields)}")
    return json.dumps(to_json_value(row), allow_nan=False, ensure_ascii=False) + "\n"


def _keep_rows(path: Path, keep_rounds: Mapping[str, int]) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
        if row.get("round", 0) <= keep_rounds.get(row.get("strategy", ""), -1):
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept).encode("utf-8"))


def _drop_incomplete_last_line(path: Path) -> None:
    """Cut a line left half-written by a crash, so appended rows start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        content = file.read()
        file.truncate(content.rfind(b"\n") + 1)
