"""The rows of ``devices.jsonl``, built in one place for simulated and served runs."""

from __future__ import annotations

from typing import Any


def device_row(
    label: str,
    round_index: int | None,
    device: int,
    batch_size: int,
    local_steps: int,
    lr: float,
    num_samples: int,
    compute_s: float | None,
    comm_s: float | None,
    idle_s: float | None,
    status: str | None = None,
) -> dict[str, Any]:
    """One device's row for one round (or task): the work it ran (steps as sent, cut at its deadline if
    it had to), its compute, communication and idle seconds (None where the server could not see them),
    and its status (None until its round ends)."""
    row: dict[str, Any] = {
        "strategy": label,
        "round": round_index,
        "device": device,
        "batch_size": batch_size,
        "local_steps": local_steps,
        "epochs": local_steps * batch_size / max(num_samples, 1),
        "lr": lr,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "idle_s": idle_s,
    }
    if status is not None:
        row["status"] = status
    return row


def finished_status(steps: int, planned_steps: int, epochs: float, local_epochs: int) -> str:
    """A counted update's status: ``partial`` when it ran fewer steps than planned or less than the base
    plan's epochs (partial work), else ``ok``."""
    return "partial" if steps < planned_steps or epochs < local_epochs else "ok"
