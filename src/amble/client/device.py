"""A real device: talks to ``amble serve`` over HTTP, trains with its plan, times itself, uploads.

The loop: learn its id and the run's config (to load its own data partition, as the simulator
would), register its sample count, then ask for a task until the run is done. A ``train`` task
carries the plan; the device fetches the model (with ``If-None-Match``, so an unchanged model is not
downloaded again), trains ``local_steps`` steps of ``batch_size`` at ``lr``, and uploads the delta as
safetensors with its report: its measured compute time, and the download and upload times of its
link. ``slowdown`` makes it really take that many times longer (for demos and tests), so what
AMBLE's planner learns from is a measurement, not a number it was told.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from amble.client.trainer import LocalTrainer, derive_seed
from amble.config import config_from_dict
from amble.data import load_dataset, split_for
from amble.errors import AmbleError
from amble.models import build_model
from amble.server.tensors import decode, encode
from amble.strategies.base import Params, Plan, Report


@dataclass
class RoundLog:
    round: int
    batch_size: int
    local_steps: int
    compute_s: float
    status: int


class DeviceAgent:
    def __init__(
        self,
        url: str,
        token: str,
        slowdown: float = 1.0,
        poll_s: float = 0.1,
        data_root: str | None = None,
        ca_cert: str | None = None,
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
        self.etag: str | None = None
        self.params: Params | None = None
        self.upload_s = 0.0
        self.rounds: list[RoundLog] = []

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return self.client.get(path, **kwargs)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the server may still be starting

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
        self.config = config_from_dict(me["config"], "the server's config")
        data = self.config.data
        dataset = load_dataset(
            data.dataset, self.data_root or data.root, seed=self.config.seed, synthetic_size=data.synthetic_size
        )
        mine = torch.as_tensor(split_for(data, dataset.y_train.numpy(), self.config.seed)[self.device])
        self.x, self.y = dataset.x_train[mine], dataset.y_train[mine]
        model = build_model(self.config.model, dataset.input_shape, dataset.num_classes)
        self.trainer = LocalTrainer(model, self.config.train.momentum, self.config.train.weight_decay)
        self._check(self.client.post("/v1/register", json={"num_samples": len(self.y)}))

    def run(self) -> list[RoundLog]:
        """Work until the server says the run is done; returns what it did per round."""
        self.setup()
        while True:
            task = self._check(self._get("/v1/task"))
            if task["state"] == "done":
                return self.rounds
            if task["state"] == "register":
                self._check(self.client.post("/v1/register", json={"num_samples": len(self.y)}))
            elif task["state"] == "train":
                self._train(int(task["round"]), Plan.from_dict(task["plan"]))
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

    def _train(self, round_index: int, plan: Plan) -> None:
        params, download_s = self._fetch_model()
        began = time.perf_counter()
        result = self.trainer.train(
            params, self.x, self.y, plan, derive_seed(self.config.seed, round_index, self.device)
        )
        elapsed = time.perf_counter() - began
        time.sleep((self.slowdown - 1.0) * elapsed)  # a slower device: really slower
        compute_s = self.slowdown * elapsed
        report = Report(
            round_index, self.device, len(self.y), result.steps, plan.batch_size, compute_s, download_s, self.upload_s
        )
        began = time.perf_counter()
        response = self.client.post(
            f"/v1/rounds/{round_index}/update",
            content=encode(result.delta),
            headers={"X-Amble-Report": json.dumps(report.to_dict()), "Content-Type": "application/octet-stream"},
        )
        self.upload_s = time.perf_counter() - began
        self.rounds.append(RoundLog(round_index, plan.batch_size, result.steps, compute_s, response.status_code))
        if response.status_code >= 400:  # a late upload after the deadline, say: report it and go on
            print(f"amble device {self.device}: round {round_index}: {response.text}", file=sys.stderr)
