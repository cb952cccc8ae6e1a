"""A real device: talks to ``amble serve`` over HTTP, trains with its plan, times itself, uploads.

The loop: learn its id and the run's config (to load its own data partition, as the simulator
would), register its sample count, then ask for a task until the run is done. A ``train`` task
carries the plan; the device fetches the model (with ``If-None-Match``, so an unchanged model is not
downloaded again), trains ``local_steps`` steps of ``batch_size`` at ``lr``, and uploads the delta as
safetensors with its report: its measured compute time, and the download and upload times of its
link. ``slowdown`` makes it really take that many times longer (for demos and tests), so what
AMBLE's planner learns from is a measurement, not a number it was told.

A plan's deadline counts from the round's start (the task says how much of it is left). With
``at_deadline: stop`` or ``probe`` the device stops training in time for its upload to arrive by the
deadline and sends the steps done: at least one, however late its task reached it, because the round
is open while it hands out tasks and a deadline must not turn devices that are alive and willing into
a failed round (issue 21). With ``drop`` it sends nothing when it cannot finish every step in time.
Requests the server could not answer (no connection, 429/502/503/504) are retried with exponential
backoff, at least as long as ``Retry-After`` asks; the server counts an update once, so a retried
upload is safe.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from amble.client.trainer import LocalTrainer, derive_seed
from amble.config import ExperimentConfig, config_from_dict, is_user_data_path
from amble.errors import AmbleError, ConfigError
from amble.imports import ImportPolicy, is_import_path, only_imports_from
from amble.problem import load_data, make_model, partition
from amble.server.tensors import decode, encode
from amble.strategies.base import Params, Plan, Report


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long a device waits before it sends a request again.

    A request is retried after a transport error (the server is starting, a connection was reset) or
    a status in ``retry_statuses``, up to ``attempts`` tries in all; the n-th wait is
    ``base_s * factor**n`` capped at ``max_s``, or what the server's ``Retry-After`` asks if longer.
    """

    attempts: int = 10
    base_s: float = 0.2
    factor: float = 2.0
    max_s: float = 10.0
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    final_reasons: frozenset[str] = frozenset({"too_many_refusals"})
    """Refusals that sending again cannot change, whatever their status (the gateway's cap on refused
    uploads answers 429 for the rest of the round)."""

    def delay_s(self, attempt: int, retry_after: str | None = None) -> float:
        """The wait before try ``attempt + 1`` (``attempt`` counts from 0)."""
        backoff_s = min(self.max_s, self.base_s * self.factor**attempt)
        try:
            asked_s = float(retry_after) if retry_after is not None else 0.0
        except ValueError:  # an HTTP date: not worth parsing, the backoff applies
            asked_s = 0.0
        return max(backoff_s, asked_s)


@dataclass
class RoundLog:
    round: int
    batch_size: int
    local_steps: int
    compute_s: float
    status: int
    """The upload's final HTTP status; 0 when the device dropped the round at its deadline."""


def server_import_policy(allow_imports: Sequence[str]) -> ImportPolicy:
    """What the server's config may make this device import: the packages of ``--allow-import`` only."""
    return ImportPolicy(frozenset(allow_imports), "the server's config", "a device")


def check_what_the_server_names(config: ExperimentConfig, allow_imports: Sequence[str], data_root: str | None) -> None:
    """Refuse code and files the server's config names unless this device's operator allowed them.

    A server (or whoever sits between it and a plain-HTTP device) could otherwise make the device import
    and call any installed function (``os:abort``), or read any file by path. So an import path runs
    only if its top-level package is in ``--allow-import`` (the device resolves the whole config under
    :func:`server_import_policy`, which checks every import path before it is imported; the model and
    the data loader are checked here too, before the data is loaded), and a user's data file is read
    only from ``--data-root``, the operator's own copy.
    """
    policy = server_import_policy(allow_imports)
    for key, value in (("model", config.model), ("data.dataset", config.data.dataset)):
        if is_import_path(value):
            policy.check(value, key)
    if is_user_data_path(config.data.dataset) and data_root is None:
        raise ConfigError(
            f"the server's config names the data file {config.data.dataset!r}: a device reads only its "
            "operator's copy. Pass --data-root with this device's file (or the folder that holds it)"
        )


class DeviceAgent:
    def __init__(
        self,
        url: str,
        token: str,
        slowdown: float = 1.0,
        poll_s: float = 0.1,
        data_root: str | None = None,
        ca_cert: str | None = None,
        retry: RetryPolicy | None = None,
        allow_imports: Sequence[str] = (),
    ) -> None:
        if slowdown < 1.0:
            raise AmbleError(f"--slowdown must be at least 1 (it multiplies the real time), not {slowdown}")
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            verify=ssl.create_default_context(cafile=ca_cert) if ca_cert else True,  # e.g. a self-signed server
        )
        self.slowdown = slowdown
        self.poll_s = poll_s
        self.data_root = data_root
        self.allow_imports = tuple(allow_imports)
        """Top-level packages whose code the server's config may name (``--allow-import``)."""
        self.retry = retry or RetryPolicy()
        self.etag: str | None = None
        self.params: Params | None = None
        self.upload_s = 0.0
        self.rounds: list[RoundLog] = []
        self._handled: set[int] = set()

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, int]:
        """The server's answer and how many tries it took, retried as :attr:`retry` says."""
        attempt = 0
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt + 1 >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay_s(attempt))
            else:
                if (
                    response.status_code not in self.retry.retry_statuses
                    or attempt + 1 >= self.retry.attempts
                    or _reason(response) in self.retry.final_reasons
                ):
                    return response, attempt + 1
                time.sleep(self.retry.delay_s(attempt, response.headers.get("Retry-After")))
            attempt += 1

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._request("GET", path, **kwargs)[0]

    def _check(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = f"{body.get('error')}: {body.get('message')}"
            except ValueError:
                detail = response.text[:200]
            raise AmbleError(
                f"{response.request.method} {response.request.url.path} -> {response.status_code} {detail}"
            )
        result: dict[str, Any] = response.json()
        return result

    def setup(self) -> None:
        me = self._check(self._get("/v1/whoami"))
        self.device = int(me["device"])
        # Everything the server's config names is resolved under the device's own allow-list.
        with only_imports_from(server_import_policy(self.allow_imports)):
            self.config = config_from_dict(me["config"], "the server's config")
            check_what_the_server_names(self.config, self.allow_imports, self.data_root)
            dataset = load_data(self.config, self.data_root)
            mine = torch.as_tensor(partition(self.config, dataset)[self.device])
            self.x, self.y = dataset.x_train[mine], dataset.y_train[mine]
            model = make_model(self.config, dataset)
        self.trainer = LocalTrainer(model, self.config.train.momentum, self.config.train.weight_decay)
        self._warm_up()
        self._register()

    def _warm_up(self) -> None:
        """Train two throwaway steps before registering. A process's first optimizer steps pay one-time
        costs (lazy imports, allocations: about 4 s for the MLP here, against 0.1 s for a whole round's
        steps after) that would otherwise be measured as round 0's compute: the round AMBLE learns
        each device's speed from, and one that a replayed fleet trace would carry as the device's own."""
        start = {name: value.detach().clone() for name, value in self.trainer.model.state_dict().items()}
        self.trainer.train(start, self.x, self.y, Plan(self.config.train.batch_size, 2, self.config.train.lr), 0)

    def _register(self) -> None:
        self._check(self._request("POST", "/v1/register", json={"num_samples": len(self.y)})[0])

    def run(self) -> list[RoundLog]:
        """Work until the server says the run is done; returns what it did per round."""
        self.setup()
        while True:
            task = self._check(self._get("/v1/task"))
            if task["state"] == "done":
                return self.rounds
            if task["state"] == "failed":
                raise AmbleError(f"the server's run failed: {task.get('message')}")
            if task["state"] == "register":
                self._register()
            elif task["state"] == "train" and int(task["round"]) not in self._handled:
                self._handled.add(int(task["round"]))  # trained once: uploaded, refused or dropped
                plan = Plan.from_dict(task["plan"])
                left_s = task.get("deadline_in_s", plan.deadline_s)
                deadline_at = None if left_s is None else time.monotonic() + float(left_s)
                self._train(int(task["round"]), plan, deadline_at)
            else:
                time.sleep(self.poll_s)

    def _fetch_model(self) -> tuple[Params, float]:
        began = time.perf_counter()
        headers = {"If-None-Match": self.etag} if self.etag else {}
        response = self._get("/v1/model", headers=headers)
        if response.status_code == 304 and self.params is not None:
            return self.params, 0.0
        if response.status_code != 200:
            self._check(response)
        self.params, self.etag = decode(response.content), response.headers.get("ETag")
        return self.params, time.perf_counter() - began

    def _budget_s(self, plan: Plan, deadline_at: float | None) -> float | None:
        """Real seconds of training left so the upload still arrives by the deadline (None: no limit).

        The upload is expected to take as long as the last one did; ``slowdown`` stretches training.
        """
        if deadline_at is None or plan.at_deadline not in ("stop", "probe", "drop"):
            return None
        return (deadline_at - time.monotonic() - self.upload_s) / self.slowdown

    def _train(self, round_index: int, plan: Plan, deadline_at: float | None = None) -> None:
        params, download_s = self._fetch_model()
        budget_s = self._budget_s(plan, deadline_at)
        if budget_s is not None and budget_s <= 0 and plan.at_deadline == "drop":
            self._drop(round_index, plan, 0, "no time left before the deadline")
            return
        began = time.perf_counter()
        result = self.trainer.train(
            params, self.x, self.y, plan, derive_seed(self.config.seed, round_index, self.device), budget_s
        )
        elapsed = time.perf_counter() - began
        time.sleep((self.slowdown - 1.0) * elapsed)  # a slower device: really slower
        compute_s = self.slowdown * elapsed
        if plan.at_deadline == "drop" and result.steps < plan.local_steps:
            self._drop(round_index, plan, result.steps, f"{result.steps} of {plan.local_steps} steps by the deadline")
            return
        report = Report(
            round_index, self.device, len(self.y), result.steps, plan.batch_size, compute_s, download_s, self.upload_s
        )
        began = time.perf_counter()
        response, tries = self._request(
            "POST",
            f"/v1/rounds/{round_index}/update",
            content=encode(result.delta),
            headers={"X-Amble-Report": json.dumps(report.to_dict()), "Content-Type": "application/octet-stream"},
        )
        self.upload_s = time.perf_counter() - began
        status = response.status_code
        if status == 409 and tries > 1 and _reason(response) == "replayed":
            status = 202  # an earlier try was counted and its answer lost: the server counts an update once
        self.rounds.append(RoundLog(round_index, plan.batch_size, result.steps, compute_s, status))
        if status >= 400:  # a late upload after the deadline, say: report it and go on
            print(f"amble device {self.device}: round {round_index}: {response.text}", file=sys.stderr)

    def _drop(self, round_index: int, plan: Plan, steps: int, why: str) -> None:
        self.rounds.append(RoundLog(round_index, plan.batch_size, steps, 0.0, 0))
        print(f"amble device {self.device}: round {round_index}: dropped at the deadline ({why})", file=sys.stderr)


def _reason(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None
