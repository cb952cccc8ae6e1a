"""The exception tree: one root, a few domain subclasses, each message says what to do."""

from __future__ import annotations


class AmbleError(Exception):
    """Root of every error AMBLE raises on purpose."""


class ConfigError(AmbleError):
    """An experiment config is invalid: names the key, the bad value and what is allowed."""


class DataError(AmbleError):
    """A dataset is missing or malformed: names the file or folder and how to get it."""


class UpdateRejected(AmbleError):
    """An uploaded update failed validation; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RoundFailed(AmbleError):
    """A round ended below quorum at its deadline."""
