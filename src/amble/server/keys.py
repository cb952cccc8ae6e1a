"""Where each piece of parameter-server state lives in the Store (one place, so backends agree)."""

from __future__ import annotations

SETTINGS = "run/settings"
TEMPLATE = "model/template"
LATEST = "model/latest"
PUBLISHED_TOPIC = "published"


def model(version: int) -> str:
    return f"model/{version:08d}"


DEVICE_PREFIX = "device/"


def device_info(device: int) -> str:
    return f"{DEVICE_PREFIX}{device}/info"


def device_reports(device: int) -> str:
    return f"device/{device}/reports"


def round_state(round_index: int) -> str:
    return f"round/{round_index:06d}/state"


def norm_reference(version: int) -> str:
    """JSON: the median L2 norm of the updates that made model ``version`` (the relative norm bound's
    reference for rounds that train from it), and how many there were."""
    return f"norms/{version:08d}"


def server_optimizer_state(version: int) -> str:
    """safetensors: the server optimizer's state (``m/<tensor>``, ``v/<tensor>``, float64) after it
    published model ``version``; read by the finalize that steps from that version. Absent: zeros."""
    return f"serveropt/{version:08d}"


def round_meta(round_index: int) -> str:
    """JSON: devices counted, aggregator stats, shards written, sealed."""
    return f"round/{round_index:06d}/meta"


def round_shard(round_index: int, instance: int) -> str:
    """One function instance's partial sums for the round (safetensors)."""
    return f"round/{round_index:06d}/shard/{instance}"


def round_update(round_index: int, device: int, upload: str) -> str:
    return f"round/{round_index:06d}/update/{device}/{upload}"


def round_rejected(round_index: int) -> str:
    """A set of ``device:upload:reason`` members."""
    return f"round/{round_index:06d}/rejected"


def round_rejection(round_index: int, device: int, upload: str) -> str:
    """JSON ``{"reason", "message"}``: why the functions rejected one upload. Under ``amble serve`` the
    coordinator deletes it once it has answered the upload (the round's ``rejected`` set keeps the
    reason), so refused uploads leave no value key each."""
    return f"round/{round_index:06d}/rejection/{device}/{upload}"


def task(task_id: int) -> str:
    """JSON: one asynchronous task (buffered aggregation): its device, plan, the model version it trains
    from, when it started, and once its update is counted, the buffer it was folded into."""
    return f"task/{task_id:08d}"


def task_update(task_id: int, upload: str) -> str:
    """One asynchronous task's uploaded update (safetensors), until it is folded or rejected."""
    return f"task/{task_id:08d}/update/{upload}"


COMPACTED = "run/compacted"
"""JSON ``{"below": n}``: every round (or buffer) below ``n`` was compacted away; events for one are
stale (a redelivered ``round_start`` must not plan it again)."""
TASKS_COMPACTED = "run/tasks_compacted"
"""JSON ``{"below": n}``: the task records below task ``n`` were compacted away (none can count any more)."""

UPLOAD_COUNTER = "uploads"
"""Counter: uploads stored so far (each gets the next number as its upload id)."""

RUN_SPEC = "run/spec"
"""What a worker needs to rebuild a run's functions: the experiment config and the strategy's index."""
POOL = "run/pool"
"""A run's PoolSettings, as JSON."""
CHECKPOINT = "driver/checkpoint"
"""The simulation driver's own state after its last completed round (JSON)."""

# -- the runtime's accounting -------------------------------------------------------------------

INVOCATIONS = "runtime/invocations"
COLD_STARTS = "runtime/cold_starts"
WARM_STARTS = "runtime/warm_starts"
BUSY_S = "runtime/busy_s"
FAILURES = "runtime/failures"
DEAD_LETTERS = "runtime/dead_letters"
FOLD_CONFLICTS = "runtime/fold_conflicts"
"""Counter: fold commits that lost to another instance's on the round's meta record and were retried."""
DEAD_LETTER_PREFIX = "runtime/dead_letter/"
LAST_ERROR_PREFIX = "runtime/last_error/"


def dead_letter(event_id: str) -> str:
    return f"{DEAD_LETTER_PREFIX}{event_id}"


def last_error(event_id: str) -> str:
    return f"{LAST_ERROR_PREFIX}{event_id}"


# -- the live gateway ---------------------------------------------------------------------------

TOKEN_PREFIX = "gateway/token/"
"""``gateway/token/{sha256 of the token}`` -> the device id (tokens themselves are never stored)."""
REGISTERED = "gateway/registered"
"""A set of the device ids that registered."""
ACCEPTED = "gateway/accepted"
"""Counter: uploads the gateway accepted."""
OPERATOR_TOKEN = "gateway/operator"
"""The sha256 of the operator token (``/v1/status``, ``/metrics``); the token itself is never stored."""


def device_token(token_hash: str) -> str:
    return f"{TOKEN_PREFIX}{token_hash}"


def uploaded(round_index: int) -> str:
    """A set of the devices whose upload for the round was accepted (replays are refused)."""
    return f"gateway/uploaded/{round_index}"


def rounds_counter(status: str) -> str:
    """Counter: rounds the live coordinator closed with ``status``."""
    return f"gateway/rounds/{status}"


INSTANCE_PREFIX = "instance/"


def instance(consumer: str) -> str:
    """JSON: one real function instance's figures for this run (started at, first event done at, events
    run), written by the instance after each event; see :class:`~amble.server.runtime.base.InstanceRecord`."""
    return f"{INSTANCE_PREFIX}{consumer}"


# -- SCAFFOLD control variates (server/controlvariates.py) ---------------------------------------


SERVER_VARIATE_PREFIX = "cv/server/"


def server_variate(version: int) -> str:
    """The server's control variate ``c`` for rounds that train from model ``version`` (safetensors,
    float32 like the model; absent: zeros). Written by the ``finalize`` that publishes the version."""
    return f"{SERVER_VARIATE_PREFIX}{version:08d}"


def device_variate_pointer(device: int) -> str:
    """JSON ``{"round", "upload"}``: which candidate is the device's control variate ``c_k`` now (absent:
    zeros). Moved forward only by the ``finalize`` of a round that counted the device's upload."""
    return f"cv/device/{device}"


def device_variate_prefix(device: int) -> str:
    return f"cv/device/{device}/round/"


def device_variate(device: int, round_index: int, upload: str) -> str:
    """A candidate ``c_k+`` (safetensors) computed by ``aggregate`` from one upload; it becomes the
    device's ``c_k`` only if the round counts that upload and is published."""
    return f"{device_variate_prefix(device)}{round_index:06d}/{upload}"
