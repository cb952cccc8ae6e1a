"""Connecting to Ray: a local instance started here, or a running cluster (``auto``, ``ray://``).

Ray is an optional extra (``pip install 'amble[ray]'``): nothing else in AMBLE imports it. Ray's own
transport pickles what crosses between its processes, so a Ray cluster must be a trusted network
(as Ray's documentation requires); what AMBLE sends over it is kept to JSON text and safetensors
bytes, never Python objects of its own.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from amble.errors import AmbleError

_started_here = False
"""Whether this process started the Ray instance it is connected to (then it also stops it)."""


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise AmbleError(
            "Ray is not installed: install the extra with `pip install 'amble[ray]'` "
            "(or set server.runtime: local and leave ray.train unset)"
        ) from None
    return ray


def connect(address: str = "local", num_cpus: int | None = None) -> ModuleType:
    """Join the Ray cluster at ``address`` (``local``: start one in this process), once per process."""
    global _started_here
    ray = import_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": True}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, **options)
            _started_here = True
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise AmbleError(
            f"could not join the Ray cluster at ray.address={address!r}: {exc}. Start one with "
            "`ray start --head`, or use ray.address: local to start Ray in this process"
        ) from None
    return ray


def cpus() -> int:
    """CPUs the connected cluster offers (at least 1)."""
    ray = import_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def disconnect() -> None:
    """Stop the Ray instance this process started (a cluster it joined keeps running)."""
    global _started_here
    if _started_here:
        import_ray().shutdown()
        _started_here = False
