"""The gateway's endpoints besides the upload (:mod:`amble.live.uploads`), one function each.

A device registers (``POST /v1/register``), asks what to do (``GET /v1/task``), fetches the model
(``GET /v1/model``) and its plan; the operator reads the run's progress (``GET /v1/status``) and its
Prometheus metrics (``GET /metrics``). None of them waits for a fold: the coordinator's lock they take
guards only its round bookkeeping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import Response
from pydantic import BaseModel, Field

from amble.errors import REJECTION_REASONS, AmbleError
from amble.live.context import Auth, Context
from amble.live.coordinator import Coordinator


class Registration(BaseModel):
    num_samples: int = Field(gt=0, lt=2**31, description="training samples on the device (its FedAvg weight)")


def health() -> dict[str, str]:
    return {"status": "ok"}


def whoami(gateway: Context, authorization: Auth = None) -> dict[str, Any]:
    """This token's device id and what it needs of the run's config (data, model, training)."""
    return {"device": gateway.authenticate(authorization), "config": gateway.device_config}


def register(registration: Registration, gateway: Context, authorization: Auth = None) -> dict[str, Any]:
    """Register this device's sample count; call again freely with the same count."""
    device = gateway.authenticate(authorization)
    try:
        gateway.coordinator.register(device, registration.num_samples)
    except AmbleError as exc:
        raise gateway.reject(409, "registration_conflict", str(exc), device) from None
    return {"device": device}


def model(
    gateway: Context, authorization: Auth = None, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    """The current global model as safetensors; ``If-None-Match`` with the last ETag avoids a re-download."""
    gateway.authenticate(authorization)
    coordinator = gateway.coordinator
    version = coordinator.server.latest_version()
    etag = f'"v{version}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag, "X-Model-Version": str(version)})
    blob = gateway.records.model_blob(version)
    if not blob:  # compacted as two rounds were published in between: the newest one, then
        version = coordinator.server.latest_version()
        etag, blob = f'"v{version}"', gateway.records.model_blob(version)
    headers = {"ETag": etag, "X-Model-Version": str(version)}
    return Response(blob or b"", media_type="application/octet-stream", headers=headers)


def task(gateway: Context, authorization: Auth = None) -> dict[str, Any]:
    """What this device should do now: ``train`` (with its plan), ``wait``, ``done`` or ``failed``.

    With a plan deadline, ``deadline_in_s`` is the time left to it now: the deadline counts from
    the round's start (as in the simulator), not from when the device asks.
    """
    device = gateway.authenticate(authorization)
    coordinator, records = gateway.coordinator, gateway.records
    with coordinator.lock:
        if coordinator.error is not None:
            return {"state": "failed", "message": f"the run stopped: {coordinator.error}"}
        if coordinator.finished:
            return {"state": "done"}
        r = coordinator.current
        if device not in records.registered():
            return {"state": "register"}
        if r is None:
            return {"state": "wait"}
        state = coordinator.round_state(r)
        done = records.accepted_upload(r, device)
        plan = None if state is None else state.plan_of(device)
        if state is None or not state.is_open or done or plan is None:
            return {"state": "wait", "round": r}
        answer = {"state": "train", "round": r, "base_version": state.base_version, "plan": plan.to_dict()}
        if plan.deadline_s is not None:
            answer["deadline_in_s"] = plan.deadline_s - (coordinator.now_s() - state.started_at_s)
        return answer


def plan(round_index: int, gateway: Context, authorization: Auth = None) -> dict[str, Any]:
    """This device's plan for a round it was selected in."""
    device = gateway.authenticate(authorization)
    state = gateway.coordinator.round_state(round_index)
    if state is None:
        raise gateway.reject(404, "unknown_round", f"round {round_index} has not been planned yet", device)
    device_plan = state.plan_of(device)
    if device_plan is None:
        raise gateway.reject(403, "not_selected", f"device {device} was not selected in round {round_index}", device)
    return device_plan.to_dict()


def status(gateway: Context, authorization: Auth = None) -> dict[str, Any]:
    """Run progress (operator token): current round, model version, registered devices, outcomes."""
    gateway.operator(authorization)
    return gateway.coordinator.status()


def metrics(gateway: Context, authorization: Auth = None) -> str:
    """Prometheus text format (operator token: ``authorization: {credentials_file: operator.token}``)."""
    gateway.operator(authorization)
    return prometheus(gateway.coordinator, gateway.tally.rejected_by_reason())


def prometheus(coordinator: Coordinator, rejected: Mapping[str, int]) -> str:
    """The run's counters and gauges in Prometheus' text format; ``rejected``: refusals by reason."""
    records = coordinator.records
    stats = records.runtime_stats()
    lines = [
        "# HELP amble_model_version The published global model version.",
        "# TYPE amble_model_version gauge",
        f"amble_model_version {coordinator.server.latest_version()}",
        "# HELP amble_rounds_total Rounds closed, by outcome.",
        "# TYPE amble_rounds_total counter",
    ]
    for outcome in ("finalized", "failed"):
        lines.append(f'amble_rounds_total{{status="{outcome}"}} {records.rounds(outcome)}')
    lines += [
        "# HELP amble_updates_accepted_total Updates accepted by the gateway.",
        "# TYPE amble_updates_accepted_total counter",
        f"amble_updates_accepted_total {records.accepted()}",
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
