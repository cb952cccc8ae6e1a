"""Several strategies of one run played at once, each in a process of its own (``run.parallel``).

The run's process spawns a Python process (``strategy_process.main``) per strategy (at most ``processes``
at a time) and hands it its job as JSON on stdin: the resolved config, the strategy's index, where
to write, and the reference step times this process measured (so every strategy's virtual clock is
the same). It gets files back, never pickles: the strategy's rows (``state/rows/<index>/``, the
same ``metrics.jsonl`` and ``devices.jsonl`` lines a sequential run writes, appended to the run's
files in strategy order when it ends), its model (safetensors) and its summary (JSON), as a
checkpointed sequential run leaves them. Each process trains and evaluates with ``run.threads``
torch threads, as the sequential path does, so either way the results are the same bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from amble.config import ExperimentConfig, config_to_dict, embedded, strategy_label
from amble.durable import write_atomic
from amble.errors import AmbleError, ConfigError
from amble.report.files import DEVICES_FILE, METRICS_FILE

if TYPE_CHECKING:
    from amble.models import ModelFactory

ROWS_DIR = "rows"
"""Under a run's ``state/``: one folder of rows per strategy played in a process of its own."""
ERROR_FILE = "error.json"
POLL_S = 0.2


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def processes_for(config: ExperimentConfig, model_factory: ModelFactory | None) -> int:
    """How many strategies of ``config`` to play at once (1: one after another, in this process)."""
    wanted = config.run.parallel
    if model_factory is not None and isinstance(wanted, int) and wanted > 1:
        raise ConfigError(
            f"run.parallel {wanted} plays strategies in separate processes, which a model factory passed in "
            "memory cannot reach: name the model by an import path (model: 'package.module:function'), or set "
            "run.parallel to 1 or auto"
        )
    if not embedded(config) or model_factory is not None:
        return 1
    if wanted == "auto":
        wanted = usable_cores() // config.run.threads
    return max(1, min(wanted, len(config.strategies)))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Train and evaluate with ``threads`` torch threads inside the block (restored after it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_parallel(
    config: ExperimentConfig,
    t_ref: dict[str, Any],
    processes: int,
    progress: bool,
    namespace: str,
    state_dir: Path,
    resume: bool,
) -> dict[str, dict[str, Any]]:
    """Play every strategy of ``config`` in its own process, ``processes`` at a time, every one on the
    reference step times ``t_ref``; their rows stay under ``state/rows/`` for :func:`gather_rows`."""
    labels = [strategy_label(s) for s in config.strategies]
    queue = [i for i, label in enumerate(labels) if not (resume and _summary_file(state_dir, label).is_file())]
    running: dict[int, subprocess.Popen[bytes]] = {}
    base = {
        "config": config_to_dict(config, with_secrets=True),  # on a pipe, never on disk
        "namespace": namespace,
        "state_dir": str(state_dir),
        "resume": resume,
        "progress": progress,
        "t_ref": t_ref,
        "parent_pid": os.getpid(),
    }
    try:
        while queue or running:
            while queue and len(running) < processes:
                index = queue.pop(0)
                running[index] = _spawn({**base, "index": index, "rows_dir": str(_rows_dir(state_dir, index))})
            finished = [i for i, process in running.items() if process.poll() is not None]
            for index in finished:
                process = running.pop(index)
                if process.returncode != 0:
                    raise AmbleError(_failure(labels[index], _rows_dir(state_dir, index), process.returncode))
            if not finished:
                time.sleep(POLL_S)
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.wait()
    return {label: json.loads(_summary_file(state_dir, label).read_text()) for label in labels}


def gather_rows(out_dir: Path, labels: list[str]) -> None:
    """Fold the rows (and models) that strategies played in their own processes left under
    ``state/rows/`` into the run's files (a row of a round already there is replaced), grouped by
    strategy in the config's order as a sequential run writes them. After a parallel run, and before
    resuming any run (an interrupted parallel run's rows are there)."""
    parts = [(label, _rows_dir(out_dir / "state", index)) for index, label in enumerate(labels)]
    parts = [(label, rows_dir) for label, rows_dir in parts if rows_dir.is_dir()]
    if not parts:
        return
    for name in (METRICS_FILE, DEVICES_FILE):
        by_label: dict[str, list[dict[str, Any]]] = {}
        for row in _read_rows(out_dir / name):
            by_label.setdefault(row.get("strategy", ""), []).append(row)
        for label, rows_dir in parts:
            part = _read_rows(rows_dir / name)
            if part:
                first = min(row["round"] for row in part)
                by_label[label] = [row for row in by_label.get(label, []) if row["round"] < first] + part
        ordered = [*labels, *(label for label in by_label if label not in labels)]
        rows = [row for label in ordered for row in by_label.get(label, [])]
        text = "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n" for row in rows)
        write_atomic(out_dir / name, text.encode("utf-8"))
    for _, rows_dir in parts:
        for model in rows_dir.glob("model_*.safetensors"):
            model.replace(out_dir / model.name)
        shutil.rmtree(rows_dir)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file's rows (a line torn by a crash is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    return rows


def _rows_dir(state_dir: Path, index: int) -> Path:
    return state_dir / ROWS_DIR / str(index)


def _summary_file(state_dir: Path, label: str) -> Path:
    return state_dir / f"{label}.summary.json"


def _spawn(job: dict[str, Any]) -> subprocess.Popen[bytes]:
    Path(job["rows_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(job["rows_dir"]) / ERROR_FILE).unlink(missing_ok=True)
    entry = "import sys; from amble.sim.strategy_process import main; sys.exit(main())"
    process = subprocess.Popen([sys.executable, "-c", entry], stdin=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(json.dumps(job).encode())
    process.stdin.close()
    return process


def _failure(label: str, rows_dir: Path, status: int) -> str:
    error = rows_dir / ERROR_FILE
    if error.is_file():
        return f"strategy {label}: {json.loads(error.read_text())['error']}"
    return f"strategy {label} failed in its own process (exit status {status}); its error is printed above"


def watch_parent(parent: int) -> None:
    """Exit when the run's process is gone (killed before it could stop this one)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
