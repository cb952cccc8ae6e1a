"""``POST /v1/rounds/{round_index}/update``: an upload is checked completely before anything is stored.

First the cheap checks, before its body is read (:func:`precheck`: the token, the round is open, the
device was selected and has not uploaded yet, its report header parses and agrees with its plan and
registration, the declared size fits), then the body (:func:`read_body`: read only up to the limit,
and only while it keeps arriving: a client that stalls gets 408) against the model's tensors,
shapes, dtypes and finiteness (:func:`accept`), and only then is it handed to the coordinator, which
folds it with the other uploads waiting (:meth:`amble.live.coordinator.Coordinator.accept`). The
checks and the body's validation run in the request's own thread, concurrently with other uploads
and with the folding; a rejected request never reaches the aggregation functions.

A device whose uploads were refused :data:`MAX_REFUSED_UPLOADS` times in a round gets 429 for its
further uploads of that round, undecoded.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from fastapi import Header, Request
from starlette.concurrency import run_in_threadpool

from amble.errors import UpdateRejected
from amble.live.context import ApiError, Auth, Context, GatewayContext, log
from amble.server.records.reports import parse_report
from amble.server.tensors import TensorSpec, validate_update
from amble.strategies.base import Report

MAX_REPORT_BYTES = 4096
"""A report is eight flat numbers: a few hundred bytes. Anything longer is refused unparsed."""
UPDATE_MARGIN_BYTES = 64 * 1024
"""Room over an update's exact tensor bytes for the safetensors header (names, shapes, metadata)."""
BODY_IDLE_TIMEOUT_S = 30.0
"""The longest an upload's body may pause before the gateway answers 408 ``timeout`` and closes the
connection, so a stalled client holds a request slot (and ``amble serve``'s exit) only this long."""
MIN_UPLOAD_BYTES_PER_S = 16 * 1024
"""The slowest upload the gateway waits for: a whole body must arrive within the idle timeout plus
the body limit at this rate, so a client trickling a byte at a time is cut off too."""
MAX_REFUSED_UPLOADS = 32
"""Refused uploads of one device in one round after which its further uploads for that round get 429
``too_many_refusals`` from their headers alone: their bodies are dropped unparsed and nothing reaches
the functions. An honest device is refused once or twice at most (then it fixes its update or waits
for its next round); one resending refused uploads cannot make the server decode them, and record
their rejections, without end."""


def update_limit_bytes(template: Mapping[str, TensorSpec]) -> int:
    """The largest body a valid update of this model can be: its tensors' bytes plus the header."""
    payload = sum(
        math.prod(spec.shape) * torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
        for spec in template.values()
    )
    return payload + UPDATE_MARGIN_BYTES


def status_of(reason: str) -> int:
    """The HTTP status of an upload refused for ``reason``: 409 for one too late or a repeat, 413 too
    large, else 422."""
    return {"late": 409, "stale_round": 409, "replayed": 409, "too_large": 413}.get(reason, 422)


def report_header(raw: str | None) -> Any:
    """The report header as JSON, refused before parsing when absent or too long, and refused when
    it does not parse (including nesting deep enough to exhaust the parser's recursion). What the
    JSON must be is :func:`amble.server.records.reports.parse_report`'s part."""
    if raw is None:
        raise UpdateRejected("malformed_report", "send the update's JSON report in the X-Amble-Report header")
    if len(raw) > MAX_REPORT_BYTES:
        raise UpdateRejected(
            "malformed_report", f"X-Amble-Report is {len(raw):,} characters, over {MAX_REPORT_BYTES:,}"
        )
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so are oversized integers
        raise UpdateRejected("malformed_report", "X-Amble-Report is not valid JSON") from None
    return parsed


async def upload(
    round_index: int,
    request: Request,
    gateway: Context,
    authorization: Auth = None,
    x_amble_report: Annotated[str | None, Header(description="the JSON report of this update")] = None,
    content_length: Annotated[int | None, Header()] = None,
) -> dict[str, Any]:
    """Upload this round's update: the body is the safetensors delta, ``X-Amble-Report`` its JSON report.

    202: counted in the round. 4xx: refused (the reason says why; nothing was counted). 503: not
    counted because of a server fault; send the same update again after ``Retry-After``.
    """
    limit = gateway.body_limit
    try:
        device, report = await run_in_threadpool(precheck, gateway, round_index, authorization, x_amble_report)
        if content_length is not None and content_length > limit:
            message = f"update is {content_length:,} bytes, over the limit of {limit:,} for this model"
            raise gateway.refused(round_index, gateway.reject(413, "too_large", message, device))
    except ApiError as exc:
        if content_length is None or content_length <= limit:
            try:  # answer a client done sending (no reset), unless it stalls
                await read_body(request, limit, gateway.read_timeout_s, keep=False)
            except TimeoutError:
                exc.headers["Connection"] = "close"
        raise
    body = await _body_or_refusal(gateway, request, round_index, device)
    try:
        accepted: dict[str, Any] = await run_in_threadpool(accept, gateway, round_index, device, report, body)
    except ApiError as exc:
        gateway.refused(round_index, exc)
        raise
    return accepted


async def _body_or_refusal(gateway: GatewayContext, request: Request, round_index: int, device: int) -> bytes:
    """The upload's body, or the refusal to raise (counted): 408 when it stalled, 413 when too large."""
    timeout_s, limit = gateway.read_timeout_s, gateway.body_limit
    try:
        body = await read_body(request, limit, timeout_s)
    except TimeoutError:
        message = f"the update's body stalled for over {timeout_s:g} s (or came slower than "
        message += f"{MIN_UPLOAD_BYTES_PER_S // 1024} KiB/s): send it again"
        refusal = gateway.reject(408, "timeout", message, device, {"Connection": "close"})
        raise gateway.refused(round_index, refusal) from None
    if body is None:
        message = f"update is over the limit of {limit:,} bytes for this model"
        raise gateway.refused(round_index, gateway.reject(413, "too_large", message, device))
    return body


def precheck(
    gateway: GatewayContext, round_index: int, authorization: str | None, raw_report: str | None
) -> tuple[int, Report]:
    """Everything that can be refused without the body: the device and what it said."""
    device = gateway.authenticate(authorization)
    reject = gateway.reject
    if gateway.tally.refused_uploads(round_index, device) >= MAX_REFUSED_UPLOADS:
        message = f"device {device} had {MAX_REFUSED_UPLOADS} uploads refused in round {round_index}: "
        message += "no more are taken in this round (see the earlier answers' reasons); wait for your next round"
        raise reject(429, "too_many_refusals", message, device)
    state = gateway.coordinator.round_state(round_index)
    current = gateway.coordinator.current
    if state is None:
        raise reject(409, "future_round", f"round {round_index} has not started (current round: {current})", device)
    if gateway.records.accepted_upload(round_index, device):
        raise reject(409, "replayed", f"device {device} already uploaded its update for round {round_index}", device)
    if not state.is_open:
        raise reject(409, "stale_round", f"round {round_index} is closed (current round: {current})", device)
    if device not in state.expected:
        raise reject(403, "not_selected", f"device {device} was not selected in round {round_index}", device)
    try:
        raw = report_header(raw_report)
        gateway.records.check_report(round_index, device, raw, state)  # refused here, before the body is read
        return device, parse_report(raw)  # what the device said: the functions hold it with the timing
    except UpdateRejected as exc:
        raise gateway.refused(round_index, reject(422, exc.reason, str(exc), device)) from None


def accept(gateway: GatewayContext, round_index: int, device: int, report: Report, body: bytes) -> dict[str, Any]:
    """Validate the body against the model, then have the coordinator fold it: 202's body, or a refusal."""
    try:
        validate_update(body, gateway.template, gateway.body_limit)
    except UpdateRejected as exc:
        raise gateway.reject(status_of(exc.reason), exc.reason, str(exc), device) from None
    try:
        fate = gateway.coordinator.accept(report, body)
    except Exception as exc:  # a store or runtime fault: nothing is marked, the device retries
        log.exception("upload of device %s for round %s failed", device, round_index)
        raise gateway.busy(f"the update could not be stored or aggregated ({type(exc).__name__})", device) from None
    if not fate.counted and fate.reason is not None:
        raise gateway.reject(status_of(fate.reason), fate.reason, fate.message, device)
    if not fate.counted:
        raise gateway.busy(f"the update was not counted: its aggregation failed (upload {fate.upload})", device)
    gateway.records.count_accepted()
    log.info(json.dumps({"event": "accepted", "round": round_index, "device": device, "upload": fate.upload}))
    return {"upload": fate.upload, "round": round_index, "device": device}


async def read_body(request: Request, limit: int, idle_s: float, keep: bool = True) -> bytes | None:
    """The request body, or None as soon as it grows past ``limit`` (never buffered beyond it).

    Raises ``TimeoutError`` when no byte came for ``idle_s``, or the whole body did not come within
    ``idle_s`` plus ``limit`` at :data:`MIN_UPLOAD_BYTES_PER_S`. With ``keep=False`` the body is read
    and dropped: a refused request's client, which sends its whole body before it reads the answer,
    then gets the answer and not a connection reset."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle_s + limit / MIN_UPLOAD_BYTES_PER_S
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(max(0.0, min(idle_s, deadline - loop.time()))):  # no task per chunk
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        size += len(chunk)
        if size > limit:
            return None
        if keep:
            chunks.append(chunk)
    return b"".join(chunks)
