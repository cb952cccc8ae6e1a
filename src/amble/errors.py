"""The exception tree: one root, a few domain subclasses, each message says what to do."""

from __future__ import annotations


class AmbleError(Exception):
    """Root of every error AMBLE raises on purpose."""


class ConfigError(AmbleError):
    """An experiment config is invalid: names the key, the bad value and what is allowed."""


class DataError(AmbleError):
    """A dataset is missing or malformed: names the file or folder and how to get it."""


REJECTION_REASONS: dict[str, str] = {
    # the gateway's own, before an upload is stored
    "unauthenticated": "no bearer token was sent",
    "unknown_token": "the token was not issued by this server",
    "not_operator": "an operator endpoint (status, metrics) called without the operator token",
    "invalid_request": "the request does not match the API (a field's type or range)",
    "registration_conflict": "a registration that disagrees with what the server knows of the device",
    "future_round": "an upload for a round that has not started",
    "stale_round": "an upload for a round that is closed",
    "replayed": "a second upload for a round the device already uploaded to",
    "busy": "the update could not be queued for aggregation now; retry later",
    "timeout": "an upload whose body stalled, or came too slowly (408; the connection is closed)",
    "too_many_refusals": "an upload of a device whose uploads were refused too often in the round (429, unread)",
    # the aggregation functions' (and the gateway's, which runs the same checks first)
    "unknown_round": "a round that was never planned",
    "not_selected": "a device that was not selected in the round",
    "late": "an update that arrived after its round was closed",
    "too_large": "an update over the size limit",
    "missing_update": "an upload whose stored update is gone",
    "malformed_report": "a report that is not a flat JSON object of the expected, plausible values",
    "malformed": "bytes that are not a safetensors blob",
    "missing_tensor": "an update without one of the model's tensors",
    "unexpected_tensor": "an update with a tensor the model does not have",
    "shape": "a tensor whose shape differs from the model's",
    "dtype": "a tensor whose dtype differs from the model's",
    "non_finite": "a tensor with NaN or infinite values",
    "norm": "an update whose L2 norm is over a bound (server.max_update_norm or server.max_update_norm_ratio)",
    "overflow": "an update that would make the round's running sum (or its SCAFFOLD control variate) non-finite",
    # buffered asynchronous aggregation (fedbuff)
    "unknown_task": "an asynchronous upload for a task that was never started",
    "too_stale": "an asynchronous update trained from a model more than max_staleness versions old",
}
"""Every reason an upload or a request can be refused for, with what it means: the functions, the
gateway and the gateway's metrics all use this one list."""


class UpdateRejected(AmbleError):
    """An uploaded update failed validation; ``reason`` is a short code from :data:`REJECTION_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}: add it to REJECTION_REASONS")
        super().__init__(message)
        self.reason = reason


class RoundFailed(AmbleError):
    """A round ended below quorum at its deadline."""
