"""Where each piece of parameter-server state lives in the Store (one place, so backends agree)."""

from __future__ import annotations

SETTINGS = "run/settings"
TEMPLATE = "model/template"
LATEST = "model/latest"
PUBLISHED_TOPIC = "published"


def model(version: int) -> str:
    return f"model/{version:08d}"


def device_info(device: int) -> str:
    return f"device/{device}/info"


def device_reports(device: int) -> str:
    return f"device/{device}/reports"


def round_state(round_index: int) -> str:
    return f"round/{round_index:06d}/state"


def round_meta(round_index: int) -> str:
    """JSON: devices counted, aggregator stats, shards written, sealed."""
    return f"round/{round_index:06d}/meta"


def round_shard(round_index: int, instance: int) -> str:
    """One function instance's partial sums for the round (safetensors)."""
    return f"round/{round_index:06d}/shard/{instance}"


def round_update(round_index: int, device: int, upload: str) -> str:
    return f"round/{round_index:06d}/update/{device}/{upload}"


def round_rejected(round_index: int) -> str:
    """A set of ``device:upload:reason`` members."""
    return f"round/{round_index:06d}/rejected"


def round_rejection(round_index: int, device: int, upload: str) -> str:
    return f"round/{round_index:06d}/rejection/{device}/{upload}"


UPLOAD_COUNTER = "uploads"
