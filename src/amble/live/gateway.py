"""The HTTP gateway: how real devices reach the parameter server (FastAPI; OpenAPI at /openapi.json).

Every device request carries ``Authorization: Bearer <token>``; a token maps to one device (its hash
is in the store). The operator's endpoints (``/v1/status``, ``/metrics``) take the operator token
instead. An upload is checked completely before anything is stored: first the cheap checks, before
its body is read (the token, the round is open, the device was selected and has not uploaded yet,
its report header parses and agrees with its plan and registration, the declared size fits), then
the body (read only up to the limit: the model's update size plus a margin, and only while it keeps
arriving: a client that stalls gets 408) against the model's tensors, shapes, dtypes and finiteness.
A rejected request never reaches the aggregation functions, so the model cannot change because of it.

Refusals cost the store nothing: they are counted in this process's memory (``/metrics``), so a
flood of forged tokens or bad uploads cannot grow it. A device whose uploads were refused
:data:`MAX_REFUSED_UPLOADS` times in a round gets 429 for its further uploads of that round, undecoded.

Answers: 202 means the update is counted in its round (the functions ran on it); a client mistake
gets a 4xx with ``{"error": <reason>, "message": <what to do>}``; a server fault (a function that
failed, a store outage) gets 503 with ``Retry-After`` and nothing counted, so the device may retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from amble.errors import REJECTION_REASONS, AmbleError, UpdateRejected
from amble.live.coordinator import Coordinator, device_of, token_hash
from amble.server import keys
from amble.server.records.reports import check_report, parse_report
from amble.server.records.settings import RunSettings
from amble.server.runtime.base import RuntimeStats
from amble.server.tensors import TensorSpec, template_from_json, validate_update
from amble.strategies.base import Report

log = logging.getLogger("amble.gateway")

MAX_REPORT_BYTES = 4096
"""A report is eight flat numbers: a few hundred bytes. Anything longer is refused unparsed."""
UPDATE_MARGIN_BYTES = 64 * 1024
"""Room over an update's exact tensor bytes for the safetensors header (names, shapes, metadata)."""
RETRY_AFTER_S = 1
"""What a 503 asks a device to wait before it retries."""
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


Auth = Annotated[str | None, Header(description="Bearer <device token>")]
"""Routes take this at module level: FastAPI resolves (postponed) annotations in the module's globals."""


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


class Registration(BaseModel):
    num_samples: int = Field(gt=0, lt=2**31, description="training samples on the device (its FedAvg weight)")


def update_limit_bytes(template: Mapping[str, TensorSpec]) -> int:
    """The largest body a valid update of this model can be: its tensors' bytes plus the header."""
    payload = sum(
        math.prod(spec.shape) * torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
        for spec in template.values()
    )
    return payload + UPDATE_MARGIN_BYTES


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


def create_app(
    coordinator: Coordinator, device_config: dict[str, Any] | None = None, read_timeout_s: float = BODY_IDLE_TIMEOUT_S
) -> FastAPI:
    """The gateway in front of ``coordinator``'s parameter server.

    ``device_config`` is what ``/v1/whoami`` gives a device besides its id: the config sections it
    needs to load its data and build its model and trainer, nothing else (no store URL, no paths of
    the server's). ``read_timeout_s``: how long an upload's body may pause (see :data:`BODY_IDLE_TIMEOUT_S`).
    """
    app = FastAPI(
        title="AMBLE parameter server",
        version="1",
        description="Register, fetch the model and your plan, upload updates (safetensors + JSON report).",
    )
    store = coordinator.store
    settings = RunSettings.from_json(store.get(keys.SETTINGS) or b"{}")
    template = template_from_json(store.get(keys.TEMPLATE) or b"{}")
    body_limit = min(settings.max_update_bytes, update_limit_bytes(template))
    tally = Tally()

    def reject(
        status: int, reason: str, message: str, device: int | None = None, headers: Mapping[str, str] | None = None
    ) -> ApiError:
        tally.rejected(reason)
        log.info(json.dumps({"event": "rejected", "reason": reason, "device": device, "message": message}))
        return ApiError(status, reason, message, headers, device)

    def busy(message: str, device: int | None = None) -> ApiError:
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        return reject(503, "busy", f"{message}; retry in {RETRY_AFTER_S} s", device, retry)

    def authenticate(authorization: str | None) -> int:
        if not authorization or not authorization.startswith("Bearer "):
            raise reject(401, "unauthenticated", "send 'Authorization: Bearer <token>' with your device token")
        device = device_of(store, authorization.removeprefix("Bearer ").strip())
        if device is None:
            raise reject(401, "unknown_token", "this token was not issued by this server (see amble serve's tokens)")
        return device

    def operator(authorization: str | None) -> None:
        if not authorization or not authorization.startswith("Bearer "):
            raise reject(401, "unauthenticated", "send 'Authorization: Bearer <operator token>' (operator.token)")
        expected = store.get(keys.OPERATOR_TOKEN)
        if expected is None or token_hash(authorization.removeprefix("Bearer ").strip()).encode() != expected:
            message = "this endpoint needs the operator token (operator.token beside tokens.json)"
            raise reject(403, "not_operator", message)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.reason, "message": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        """A fault of the server's own (a store outage, say): the device may retry, nothing changed."""
        message = f"the server could not answer now ({type(exc).__name__}); retry in {RETRY_AFTER_S} s"
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse({"error": "busy", "message": message}, status_code=503, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        tally.rejected("invalid_request")
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse({"error": "invalid_request", "message": message}, status_code=422)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/whoami")
    def whoami(authorization: Auth = None) -> dict[str, Any]:
        """This token's device id and what it needs of the run's config (data, model, training)."""
        return {"device": authenticate(authorization), "config": device_config or {}}

    @app.post("/v1/register")
    def register(registration: Registration, authorization: Auth = None) -> dict[str, Any]:
        """Register this device's sample count; call again freely with the same count."""
        device = authenticate(authorization)
        try:
            coordinator.register(device, registration.num_samples)
        except AmbleError as exc:
            raise reject(409, "registration_conflict", str(exc), device) from None
        return {"device": device}

    @app.get("/v1/model")
    def model(authorization: Auth = None, if_none_match: Annotated[str | None, Header()] = None) -> Response:
        """The current global model as safetensors; ``If-None-Match`` with the last ETag avoids a re-download."""
        authenticate(authorization)
        with coordinator.lock:
            version = coordinator.server.latest_version()
            etag = f'"v{version}"'
            if if_none_match == etag:
                return Response(status_code=304, headers={"ETag": etag, "X-Model-Version": str(version)})
            blob = store.get(keys.model(version)) or b""
        headers = {"ETag": etag, "X-Model-Version": str(version)}
        return Response(blob, media_type="application/octet-stream", headers=headers)

    @app.get("/v1/task")
    def task(authorization: Auth = None) -> dict[str, Any]:
        """What this device should do now: ``train`` (with its plan), ``wait``, ``done`` or ``failed``.

        With a plan deadline, ``deadline_in_s`` is the time left to it now: the deadline counts from
        the round's start (as in the simulator), not from when the device asks.
        """
        device = authenticate(authorization)
        with coordinator.lock:
            if coordinator.error is not None:
                return {"state": "failed", "message": f"the run stopped: {coordinator.error}"}
            if coordinator.finished:
                return {"state": "done"}
            r = coordinator.current
            if str(device) not in store.set_members(keys.REGISTERED):
                return {"state": "register"}
            if r is None:
                return {"state": "wait"}
            state = coordinator.server.round_state(r)
            done = str(device) in store.set_members(keys.uploaded(r))
            plan = None if state is None else state.plan_of(device)
            if state is None or not state.is_open or done or plan is None:
                return {"state": "wait", "round": r}
            answer = {"state": "train", "round": r, "base_version": state.base_version, "plan": plan.to_dict()}
            if plan.deadline_s is not None:
                answer["deadline_in_s"] = plan.deadline_s - (coordinator.now_s() - state.started_at_s)
            return answer

    @app.get("/v1/rounds/{round_index}/plan")
    def plan(round_index: int, authorization: Auth = None) -> dict[str, Any]:
        """This device's plan for a round it was selected in."""
        device = authenticate(authorization)
        state = coordinator.server.round_state(round_index)
        if state is None:
            raise reject(404, "unknown_round", f"round {round_index} has not been planned yet", device)
        plan = state.plan_of(device)
        if plan is None:
            raise reject(403, "not_selected", f"device {device} was not selected in round {round_index}", device)
        return plan.to_dict()

    @app.post(
        "/v1/rounds/{round_index}/update",
        status_code=202,
        responses={503: {"description": "not counted now (a server fault): retry after Retry-After seconds"}},
    )
    async def upload(
        round_index: int,
        request: Request,
        authorization: Auth = None,
        x_amble_report: Annotated[str | None, Header(description="the JSON report of this update")] = None,
        content_length: Annotated[int | None, Header()] = None,
    ) -> dict[str, Any]:
        """Upload this round's update: the body is the safetensors delta, ``X-Amble-Report`` its JSON report.

        202: counted in the round. 4xx: refused (the reason says why; nothing was counted). 503: not
        counted because of a server fault; send the same update again after ``Retry-After``.
        """
        try:
            device, report = await run_in_threadpool(_precheck, round_index, authorization, x_amble_report)
            if content_length is not None and content_length > body_limit:
                message = f"update is {content_length:,} bytes, over the limit of {body_limit:,} for this model"
                raise refused(round_index, reject(413, "too_large", message, device))
        except ApiError as exc:
            if content_length is None or content_length <= body_limit:
                try:  # answer a client done sending (no reset), unless it stalls
                    await _read_limited(request, body_limit, read_timeout_s, keep=False)
                except TimeoutError:
                    exc.headers["Connection"] = "close"
            raise
        try:
            body = await _read_limited(request, body_limit, read_timeout_s)
        except TimeoutError:
            message = f"the update's body stalled for over {read_timeout_s:g} s (or came slower than "
            message += f"{MIN_UPLOAD_BYTES_PER_S // 1024} KiB/s): send it again"
            raise refused(round_index, reject(408, "timeout", message, device, {"Connection": "close"})) from None
        try:
            if body is None:
                message = f"update is over the limit of {body_limit:,} bytes for this model"
                raise reject(413, "too_large", message, device)
            accepted: dict[str, Any] = await run_in_threadpool(_accept, round_index, device, report, body)
        except ApiError as exc:
            refused(round_index, exc)
            raise
        return accepted

    def refused(round_index: int, exc: ApiError) -> ApiError:
        """Count a refusal of a selected device's upload against its round's :data:`MAX_REFUSED_UPLOADS`
        (not a 503: that is the server's fault)."""
        if exc.device is not None and exc.status < 500:
            tally.refused_upload(round_index, exc.device, coordinator.current)
        return exc

    def _precheck(round_index: int, authorization: str | None, raw_report: str | None) -> tuple[int, Report]:
        """Everything that can be refused without the body."""
        device = authenticate(authorization)
        if tally.refused_uploads(round_index, device) >= MAX_REFUSED_UPLOADS:
            message = f"device {device} had {MAX_REFUSED_UPLOADS} uploads refused in round {round_index}: "
            message += "no more are taken in this round (see the earlier answers' reasons); wait for your next round"
            raise reject(429, "too_many_refusals", message, device)
        state = coordinator.server.round_state(round_index)
        current = coordinator.current
        if state is None:
            raise reject(409, "future_round", f"round {round_index} has not started (current round: {current})", device)
        if str(device) in store.set_members(keys.uploaded(round_index)):
            raise reject(
                409, "replayed", f"device {device} already uploaded its update for round {round_index}", device
            )
        if not state.is_open:
            raise reject(409, "stale_round", f"round {round_index} is closed (current round: {current})", device)
        if device not in state.expected:
            raise reject(403, "not_selected", f"device {device} was not selected in round {round_index}", device)
        try:
            raw = report_header(raw_report)
            check_report(store, round_index, device, raw, state)  # refused here, before the body is read
            return device, parse_report(raw)  # what the device said: the functions hold it with the timing
        except UpdateRejected as exc:
            raise refused(round_index, reject(422, exc.reason, str(exc), device)) from None

    def _accept(round_index: int, device: int, report: Report, body: bytes) -> dict[str, Any]:
        try:
            validate_update(body, template, body_limit)
        except UpdateRejected as exc:
            raise reject(status_of(exc.reason), exc.reason, str(exc), device) from None
        try:
            with coordinator.lock:  # uploads are taken one at a time: the round may have closed meanwhile
                latest = coordinator.server.round_state(round_index)
                if latest is None or not latest.is_open:
                    raise reject(409, "stale_round", f"round {round_index} closed before the update arrived", device)
                if str(device) in store.set_members(keys.uploaded(round_index)):  # a racing replay lost
                    message = f"device {device} already uploaded its update for round {round_index}"
                    raise reject(409, "replayed", message, device)
                fate = coordinator.accept(report, body)
                if fate.counted:  # only now: a device whose update was not counted may send it again
                    store.add_to_set(keys.uploaded(round_index), str(device))
        except ApiError:
            raise
        except Exception as exc:  # a store or runtime fault: nothing is marked, the device retries
            log.exception("upload of device %s for round %s failed", device, round_index)
            raise busy(f"the update could not be stored or aggregated ({type(exc).__name__})", device) from None
        if not fate.counted and fate.reason is not None:
            raise reject(status_of(fate.reason), fate.reason, fate.message, device)
        if not fate.counted:
            raise busy(f"the update was not counted: its aggregation failed (upload {fate.upload})", device)
        store.incr(keys.ACCEPTED)
        log.info(json.dumps({"event": "accepted", "round": round_index, "device": device, "upload": fate.upload}))
        return {"upload": fate.upload, "round": round_index, "device": device}

    @app.get("/v1/status")
    def status(authorization: Auth = None) -> dict[str, Any]:
        """Run progress (operator token): current round, model version, registered devices, outcomes."""
        operator(authorization)
        return coordinator.status()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(authorization: Auth = None) -> str:
        """Prometheus text format (operator token: ``authorization: {credentials_file: operator.token}``)."""
        operator(authorization)
        return _prometheus(coordinator, tally.rejected_by_reason())

    return app


def status_of(reason: str) -> int:
    """The HTTP status of an update the checks refused: 409 for one too late, 413 too large, else 422."""
    return {"late": 409, "too_large": 413}.get(reason, 422)


async def _read_limited(request: Request, limit: int, idle_s: float, keep: bool = True) -> bytes | None:
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
            chunk = await asyncio.wait_for(anext(stream), max(0.0, min(idle_s, deadline - loop.time())))
        except StopAsyncIteration:
            break
        size += len(chunk)
        if size > limit:
            return None
        if keep:
            chunks.append(chunk)
    return b"".join(chunks)


def _prometheus(coordinator: Coordinator, rejected: Mapping[str, int]) -> str:
    store = coordinator.store
    stats = RuntimeStats.from_store(store)
    lines = [
        "# HELP amble_model_version The published global model version.",
        "# TYPE amble_model_version gauge",
        f"amble_model_version {coordinator.server.latest_version()}",
        "# HELP amble_rounds_total Rounds closed, by outcome.",
        "# TYPE amble_rounds_total counter",
    ]
    for outcome in ("finalized", "failed"):
        lines.append(f'amble_rounds_total{{status="{outcome}"}} {int(store.counter(keys.rounds_counter(outcome)))}')
    lines += [
        "# HELP amble_updates_accepted_total Updates accepted by the gateway.",
        "# TYPE amble_updates_accepted_total counter",
        f"amble_updates_accepted_total {int(store.counter(keys.ACCEPTED))}",
        "# HELP amble_updates_rejected_total Requests rejected, by reason.",
        "# TYPE amble_updates_rejected_total counter",
    ]
    for reason in REJECTION_REASONS:
        lines.append(f'amble_updates_rejected_total{{reason="{reason}"}} {rejected.get(reason, 0)}')
    latency = [r.wall_s for r in coordinator.history]
    lines += [
        "# HELP amble_function_invocations_total Parameter-server function invocations.",
        "# TYPE amble_function_invocations_total counter",
        f"amble_function_invocations_total {stats.invocations}",
        "# HELP amble_function_starts_total Function starts, cold or warm.",
        "# TYPE amble_function_starts_total counter",
        f'amble_function_starts_total{{kind="cold"}} {stats.cold_starts}',
        f'amble_function_starts_total{{kind="warm"}} {stats.warm_starts}',
        "# HELP amble_function_busy_seconds_total Busy function-seconds.",
        "# TYPE amble_function_busy_seconds_total counter",
        f"amble_function_busy_seconds_total {stats.busy_s:.6f}",
        "# HELP amble_rounds_closed_at_seconds Seconds since start at which the last round closed.",
        "# TYPE amble_rounds_closed_at_seconds gauge",
        f"amble_rounds_closed_at_seconds {latency[-1] if latency else 0.0:.3f}",
    ]
    return "\n".join(lines) + "\n"
