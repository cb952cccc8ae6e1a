"""Run-wide settings, and the models and norm references the functions read by version."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from amble.server import keys
from amble.server.store.base import Store, read_json
from amble.server.tensors import TensorSpec, decode, template_from_json
from amble.strategies.base import Params


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings every function instance reads from the Store."""

    seed: int
    devices_per_round: int
    quorum: float
    max_update_bytes: int
    report_window: int = 16
    max_update_norm: float | None = None
    """Reject an update whose L2 norm (all its tensors together) is above this; None: no absolute bound.
    (None here so settings stored before the bounds existed still parse; the config sets both.)"""
    max_update_norm_ratio: float | None = None
    """Reject an update whose L2 norm is above this many times the median norm of the updates that
    made the model it trained from (the first model has none: only the absolute bound applies)."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> RunSettings:
        return cls(**json.loads(blob))


def read_settings(store: Store) -> RunSettings:
    blob = store.get(keys.SETTINGS)
    if blob is None:
        raise LookupError("run settings are missing: initialise the parameter server first")
    return RunSettings.from_json(blob)


def read_template(store: Store) -> dict[str, TensorSpec]:
    """The shapes and dtypes every update must have (written once, by ``initialize``)."""
    blob = store.get(keys.TEMPLATE)
    if blob is None:
        raise LookupError("model template is missing: initialise the parameter server first")
    return template_from_json(blob)


def load_model(store: Store, version: int) -> Params:
    blob = store.get(keys.model(version))
    if blob is None:
        raise LookupError(f"model version {version} is not in the store")
    return decode(blob)


def norm_reference(store: Store, version: int) -> float | None:
    """The median update norm behind model ``version`` (None: the first model, or all updates zero).

    Stored by the function that published the version, so it is fixed before any update that trains
    from it arrives: the relative bound does not depend on the order of arrival.
    """
    stored = read_json(store, keys.norm_reference(version))
    median = None if stored is None else float(stored["median_norm"])
    return median if median else None
