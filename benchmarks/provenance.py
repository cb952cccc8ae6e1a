"""What every benchmark records next to its numbers: the CPU it ran on and the code it measured."""

from __future__ import annotations

import os
import platform
import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    with suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return cpu


def commit() -> str:
    """``commit <short hash>``, marked when src/ has uncommitted or untracked changes."""
    run = subprocess.run
    head = run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT).returncode != 0
    untracked = run(["git", "ls-files", "--others", "--exclude-standard", "src"], capture_output=True, cwd=ROOT)
    changed = dirty or bool(untracked.stdout.strip())
    return f"commit {head}" + (" with uncommitted changes in src/" if changed else "")


def provenance(command: str, **extra: Any) -> dict[str, Any]:
    """The machine, code and command a result came from, and ``extra`` versions or settings."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "commit": commit(),
        "command": command.strip(),
        "python": platform.python_version(),
        **extra,
    }


def write_record(path: Path, benchmark: str, command: str, began: float, **fields: Any) -> None:
    """Write a benchmark's results as JSON with when, where and by what command they were measured
    (``began``: its ``time.perf_counter()`` at the start)."""
    import json
    import time
    from datetime import UTC, datetime

    import torch

    record = {
        "benchmark": benchmark,
        "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "provenance": provenance(command, torch=torch.__version__, wall_s=time.perf_counter() - began),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
