"""The HTTP gateway: how real devices reach the parameter server (FastAPI; OpenAPI at /openapi.json).

Every device request carries ``Authorization: Bearer <token>``; a token maps to one device (its hash
is in the store). The operator's endpoints (``/v1/status``, ``/metrics``) take the operator token
instead. An upload is checked completely before anything is stored (:mod:`amble.live.uploads`): a
rejected request never reaches the aggregation functions, so the model cannot change because of it.

Refusals cost the store nothing: they are counted in this process's memory (``/metrics``), so a
flood of forged tokens or bad uploads cannot grow it. A device whose uploads were refused
:data:`MAX_REFUSED_UPLOADS` times in a round gets 429 for its further uploads of that round, undecoded.

Answers: 202 means the update is counted in its round (the functions ran on it); a client mistake
gets a 4xx with ``{"error": <reason>, "message": <what to do>}``; a server fault (a function that
failed, a store outage) gets 503 with ``Retry-After`` and nothing counted, so the device may retry.

This module assembles the app: the routes (:mod:`amble.live.routes`, :mod:`amble.live.uploads`),
each a plain function of its request and the app's :class:`~amble.live.context.GatewayContext`, and
the three exception handlers that turn errors into those answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from amble.live import routes
from amble.live.context import RETRY_AFTER_S, ApiError, GatewayContext
from amble.live.coordinator import Coordinator
from amble.live.uploads import BODY_IDLE_TIMEOUT_S, MAX_REFUSED_UPLOADS, update_limit_bytes, upload

__all__ = ["BODY_IDLE_TIMEOUT_S", "MAX_REFUSED_UPLOADS", "create_app"]


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
    settings, template = coordinator.records.settings(), coordinator.records.template()
    body_limit = min(settings.max_update_bytes, update_limit_bytes(template))
    app.state.gateway = GatewayContext(coordinator, template, body_limit, read_timeout_s, device_config or {})

    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]  # Starlette types it for Exception
    app.add_exception_handler(Exception, fault)
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]

    app.get("/v1/health")(routes.health)
    app.get("/v1/whoami")(routes.whoami)
    app.post("/v1/register")(routes.register)
    app.get("/v1/model")(routes.model)
    app.get("/v1/task")(routes.task)
    app.get("/v1/rounds/{round_index}/plan")(routes.plan)
    app.post(
        "/v1/rounds/{round_index}/update",
        status_code=202,
        responses={503: {"description": "not counted now (a server fault): retry after Retry-After seconds"}},
    )(upload)
    app.get("/v1/status")(routes.status)
    app.get("/metrics", response_class=PlainTextResponse)(routes.metrics)
    return app


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    """A refusal (or a 503 the gateway chose): its status, reason and message, and its headers."""
    return JSONResponse({"error": exc.reason, "message": exc.message}, status_code=exc.status, headers=exc.headers)


async def fault(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the server's own (a store outage, say): the device may retry, nothing changed."""
    message = f"the server could not answer now ({type(exc).__name__}); retry in {RETRY_AFTER_S} s"
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse({"error": "busy", "message": message}, status_code=503, headers=headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request that does not match the API (a field's type or range): 422 naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    request.app.state.gateway.tally.rejected("invalid_request")
    message = f"{where}: {first.get('msg', 'invalid request')}"
    return JSONResponse({"error": "invalid_request", "message": message}, status_code=422)
