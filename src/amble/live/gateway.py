"""The HTTP gateway: how real devices reach the parameter server (FastAPI; OpenAPI at /openapi.json).

Every device request carries ``Authorization: Bearer <token>``; a token maps to one device (its hash
is in the store). An upload is checked completely before anything is stored (the round is open,
the device was selected and has not uploaded yet, the report matches its plan and registration, the
update has the model's tensors, shapes and dtypes, finite values, and fits the size limit), so a
rejected request never reaches the aggregation functions and the model cannot change because of it.
Client mistakes get a 4xx with ``{"error": <reason>, "message": <what to do>}``, never a 5xx.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from amble.errors import REJECTION_REASONS, AmbleError, UpdateRejected
from amble.live.coordinator import Coordinator, device_of
from amble.server import keys
from amble.server.functions import RunSettings
from amble.server.reports import check_report
from amble.server.runtime.base import RuntimeStats
from amble.server.tensors import template_from_json, validate_update

log = logging.getLogger("amble.gateway")

MAX_REPORT_BYTES = 4096


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


Auth = Annotated[str | None, Header(description="Bearer <device token>")]
"""Routes take this at module level: FastAPI resolves (postponed) annotations in the module's globals."""


class Registration(BaseModel):
    num_samples: int = Field(gt=0, lt=2**31, description="training samples on the device (its FedAvg weight)")


def create_app(coordinator: Coordinator, public_config: dict[str, Any] | None = None) -> FastAPI:
    """The gateway in front of ``coordinator``'s parameter server."""
    app = FastAPI(
        title="AMBLE parameter server",
        version="1",
        description="Register, fetch the model and your plan, upload updates (safetensors + JSON report).",
    )
    store = coordinator.store
    settings = RunSettings.from_json(store.get(keys.SETTINGS) or b"{}")
    template = template_from_json(store.get(keys.TEMPLATE) or b"{}")

    def reject(status: int, reason: str, message: str, device: int | None = None) -> ApiError:
        store.incr(keys.rejected_counter(reason))
        log.info(json.dumps({"event": "rejected", "reason": reason, "device": device, "message": message}))
        return ApiError(status, reason, message)

    def authenticate(authorization: str | None) -> int:
        if not authorization or not authorization.startswith("Bearer "):
            raise reject(401, "unauthenticated", "send 'Authorization: Bearer <token>' with your device token")
        device = device_of(store, authorization.removeprefix("Bearer ").strip())
        if device is None:
            raise reject(401, "unknown_token", "this token was not issued by this server (see amble serve's tokens)")
        return device

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.reason, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        store.incr(keys.rejected_counter("invalid_request"))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse({"error": "invalid_request", "message": message}, status_code=422)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/whoami")
    def whoami(authorization: Auth = None) -> dict[str, Any]:
        """This token's device id and the run's config (data, partition, model, training settings)."""
        return {"device": authenticate(authorization), "config": public_config or {}}

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
        """What this device should do now: ``train`` (with its plan), ``wait`` or ``done``."""
        device = authenticate(authorization)
        with coordinator.lock:
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
            return {"state": "train", "round": r, "base_version": state.base_version, "plan": plan.to_dict()}

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

    @app.post("/v1/rounds/{round_index}/update", status_code=202)
    async def upload(
        round_index: int,
        request: Request,
        authorization: Auth = None,
        x_amble_report: Annotated[str | None, Header(description="the JSON report of this update")] = None,
        content_length: Annotated[int | None, Header()] = None,
    ) -> dict[str, Any]:
        """Upload this round's update: the body is the safetensors delta, ``X-Amble-Report`` its JSON report."""
        device = authenticate(authorization)
        limit = settings.max_update_bytes
        if content_length is not None and content_length > limit:
            raise reject(413, "too_large", f"update is {content_length:,} bytes, over the limit of {limit:,}", device)
        body = await _read_limited(request, limit)
        if body is None:
            raise reject(413, "too_large", f"update is over the limit of {limit:,} bytes", device)
        accepted: dict[str, Any] = await run_in_threadpool(_accept, round_index, device, body, x_amble_report)
        return accepted

    def _accept(round_index: int, device: int, body: bytes, raw_report: str | None) -> dict[str, Any]:
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
        if raw_report is None or len(raw_report) > MAX_REPORT_BYTES:
            raise reject(422, "malformed_report", "send the update's JSON report in the X-Amble-Report header", device)
        try:
            report = check_report(store, round_index, device, json.loads(raw_report), state)
            validate_update(body, template, settings.max_update_bytes)
        except json.JSONDecodeError:
            raise reject(422, "malformed_report", "X-Amble-Report is not valid JSON", device) from None
        except UpdateRejected as exc:
            raise reject(422, exc.reason, str(exc), device) from None
        with coordinator.lock:  # uploads are taken one at a time: the round may have closed meanwhile
            latest = coordinator.server.round_state(round_index)
            if latest is None or not latest.is_open:
                raise reject(409, "stale_round", f"round {round_index} closed before the update arrived", device)
            if str(device) in store.set_members(keys.uploaded(round_index)):  # a racing replay lost
                message = f"device {device} already uploaded its update for round {round_index}"
                raise reject(409, "replayed", message, device)
            # The validated bytes are stored as sent; the device counts as uploaded only once they are
            # in (a failure here leaves it free to retry; the functions count a repeat once anyway).
            upload_id = coordinator.accept(lambda at_s: coordinator.server.upload(report, body, at_s))
            store.add_to_set(keys.uploaded(round_index), str(device))
        store.incr(keys.ACCEPTED)
        log.info(json.dumps({"event": "accepted", "round": round_index, "device": device, "upload": upload_id}))
        return {"upload": upload_id, "round": round_index, "device": device}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        """Run progress: current round, model version, registered devices, per-round outcomes."""
        return coordinator.status()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text format."""
        return _prometheus(coordinator)

    return app


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it grows past ``limit`` (never buffered beyond it)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _prometheus(coordinator: Coordinator) -> str:
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
        count = int(store.counter(keys.rejected_counter(reason)))
        lines.append(f'amble_updates_rejected_total{{reason="{reason}"}} {count}')
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
