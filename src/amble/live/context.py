"""What every gateway handler works with: the coordinator, the model's limits, the refusal tally, and
the answers it gives (an :class:`ApiError` becomes ``{"error": <reason>, "message": <what to do>}``).

Handlers take a :class:`GatewayContext` as a FastAPI dependency (:data:`Context`), so each one is a
plain function that says what it reads and what it answers; :func:`amble.live.gateway.create_app`
builds one context per app.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from amble.live.coordinator import Coordinator
from amble.server.records.live import LiveRecords, token_hash
from amble.server.tensors import TensorSpec

log = logging.getLogger("amble.gateway")

RETRY_AFTER_S = 1
"""What a 503 asks a device to wait before it retries."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        device: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.device = status, reason, message, device
        self.headers = dict(headers or {})


class Tally:
    """What the gateway counts in its own memory, never in the store: requests refused, by reason (for
    ``/metrics``; they start from zero with the process, as Prometheus counters do), and each device's
    refused uploads in the rounds still open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rejected: Counter[str] = Counter()
        self._refused_uploads: Counter[tuple[int, int]] = Counter()

    def rejected(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def rejected_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejected)

    def refused_upload(self, round_index: int, device: int, current: int | None) -> None:
        """Count a refused upload of ``device`` in ``round_index``; forget the rounds before ``current``."""
        with self._lock:
            self._refused_uploads[(round_index, device)] += 1
            for closed in [k for k in self._refused_uploads if current is not None and k[0] < current]:
                del self._refused_uploads[closed]

    def refused_uploads(self, round_index: int, device: int) -> int:
        with self._lock:
            return self._refused_uploads[(round_index, device)]


@dataclass
class GatewayContext:
    """One gateway's coordinator, the model's update limits and its tally of refusals."""

    coordinator: Coordinator
    template: dict[str, TensorSpec]
    """The model's floating tensors: what an update must hold."""
    body_limit: int
    """The largest upload body taken (the update's size plus a header margin, within the run's limit)."""
    read_timeout_s: float
    """How long an upload's body may pause (:data:`amble.live.uploads.BODY_IDLE_TIMEOUT_S`)."""
    device_config: dict[str, Any] = field(default_factory=dict)
    """What ``/v1/whoami`` gives a device besides its id."""
    tally: Tally = field(default_factory=Tally)

    @property
    def records(self) -> LiveRecords:
        return self.coordinator.records

    def reject(
        self,
        status: int,
        reason: str,
        message: str,
        device: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiError:
        """The refusal to raise, counted and logged."""
        self.tally.rejected(reason)
        log.info(json.dumps({"event": "rejected", "reason": reason, "device": device, "message": message}))
        return ApiError(status, reason, message, headers, device)

    def busy(self, message: str, device: int | None = None) -> ApiError:
        """A 503 for a fault of the server's own: nothing was counted, the device may retry."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        return self.reject(503, "busy", f"{message}; retry in {RETRY_AFTER_S} s", device, retry)

    def authenticate(self, authorization: str | None) -> int:
        """The device whose token this is, or a 401."""
        if not authorization or not authorization.startswith("Bearer "):
            raise self.reject(401, "unauthenticated", "send 'Authorization: Bearer <token>' with your device token")
        device = self.records.device_of(authorization.removeprefix("Bearer ").strip())
        if device is None:
            message = "this token was not issued by this server (see amble serve's tokens)"
            raise self.reject(401, "unknown_token", message)
        return device

    def operator(self, authorization: str | None) -> None:
        """Pass only with the operator token (401 without a token, 403 with another)."""
        if not authorization or not authorization.startswith("Bearer "):
            raise self.reject(401, "unauthenticated", "send 'Authorization: Bearer <operator token>' (operator.token)")
        expected = self.records.operator_token_hash()
        if expected is None or token_hash(authorization.removeprefix("Bearer ").strip()).encode() != expected:
            message = "this endpoint needs the operator token (operator.token beside tokens.json)"
            raise self.reject(403, "not_operator", message)

    def refused(self, round_index: int, exc: ApiError) -> ApiError:
        """Count a refusal of a selected device's upload against its round's refusal cap
        (:data:`amble.live.uploads.MAX_REFUSED_UPLOADS`; not a 503: that is the server's fault)."""
        if exc.device is not None and exc.status < 500:
            self.tally.refused_upload(round_index, exc.device, self.coordinator.current)
        return exc


async def context_of(request: Request) -> GatewayContext:
    """The app's context (a coroutine, so FastAPI resolves it on the event loop, not in a thread)."""
    context: GatewayContext = request.app.state.gateway
    return context


Context = Annotated[GatewayContext, Depends(context_of)]
"""A handler's context parameter."""
Auth = Annotated[str | None, Header(description="Bearer <device token>")]
"""Routes take these at module level: FastAPI resolves (postponed) annotations in the module's globals."""
