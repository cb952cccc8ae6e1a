"""The HTTP gateway on real loopback HTTP: every rejection path, ETags, metrics, a fuzz, devices end to end.

Each test serves a fresh run (synthetic data, the MLP, the ``amble`` strategy, 6 devices of which 3
per round) with uvicorn in a thread; the rounds run in another thread, as under ``amble serve``.
"""

from __future__ import annotations

import json
import math
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amble.client.device import DeviceAgent
from amble.config import config_from_dict
from amble.live.serve import Served, http_config, prepare
from amble.server.records.reports import num_samples
from amble.server.tensors import decode, encode
from amble.strategies.base import Plan, Report
from tests.conftest import free_port
from tests.test_sim import SMALL


@dataclass
class Gateway:
    served: Served
    url: str

    def client(self, device: int | None = None, token: str | None = None) -> httpx.Client:
        headers = {}
        if device is not None or token is not None:
            headers["Authorization"] = f"Bearer {token or self.served.tokens[device or 0]}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def operator(self) -> httpx.Client:
        """A client with the operator token (``/v1/status``, ``/metrics``)."""
        headers = {"Authorization": f"Bearer {self.served.operator_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def model_bytes(self) -> bytes:
        return self.client(0).get("/v1/model").content

    def wait_round(self, r: int) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = self.served.coordinator.server.round_state(r)
            if state is not None:
                return state.public()
            time.sleep(0.02)
        raise AssertionError(f"round {r} was never planned")


def small_run(strategy: str | dict[str, Any]) -> dict[str, Any]:
    return {
        **SMALL,
        "strategies": [strategy],
        "data": {**SMALL["data"], "num_devices": 6},
        "devices_per_round": 3,
        "rounds": 3,
        "server": {"max_update_mb": 2.0},
    }


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    raw = small_run({"name": "amble", "deadline_quantile": 1.0})  # q = 1: real timing sets no cut
    served = prepare(config_from_dict(raw), tmp_path, round_timeout_s=30)
    yield from running(served)


@pytest.fixture
def shipped_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """AMBLE as shipped (q = 0.8: every plan after the first round has a deadline)."""
    served = prepare(config_from_dict(small_run("amble")), tmp_path, round_timeout_s=30)
    yield from running(served)


def running(served: Served) -> Iterator[Gateway]:
    """``served`` on a free loopback port, its rounds in a thread, until the generator is closed."""
    port = free_port()
    server = uvicorn.Server(http_config(served.app, "127.0.0.1", port))
    threads = [threading.Thread(target=server.run, daemon=True), threading.Thread(target=served.coordinator.run)]
    for thread in threads:
        thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield Gateway(served, f"http://127.0.0.1:{port}")
    finally:
        served.coordinator.stop()
        server.should_exit = True
        for thread in threads:
            thread.join(timeout=10)


def samples_of(gw: Gateway, device: int) -> int:
    """The device's partition size, which the server knows from the config."""
    return num_samples(gw.served.coordinator.server.store, device)


def register_all(gw: Gateway) -> dict[int, Any]:
    for device in range(6):
        response = gw.client(device).post("/v1/register", json={"num_samples": samples_of(gw, device)})
        assert response.status_code == 200, response.text
    state = gw.wait_round(0)
    return state


def update_for(gw: Gateway, device: int, r: int, plan: dict[str, Any]) -> tuple[bytes, str]:
    """A valid update: zeros of the model's float tensors, and a report that matches the plan."""
    model = decode(gw.model_bytes())
    delta = {k: torch.zeros_like(v) for k, v in model.items() if v.is_floating_point()}
    p = Plan.from_dict(plan)
    report = Report(r, device, samples_of(gw, device), p.local_steps, p.batch_size, 0.5, 0.1, 0.1)
    return encode(delta), json.dumps(report.to_dict())


def post_update(gw: Gateway, device: int, r: int, body: bytes, report: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if report is not None:
        headers["X-Amble-Report"] = report
    return gw.client(device).post(f"/v1/rounds/{r}/update", content=body, headers=headers)


def assert_error(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == reason and body["message"]


def test_requests_without_a_valid_token_are_401(gateway: Gateway) -> None:
    assert_error(gateway.client().get("/v1/model"), 401, "unauthenticated")
    assert_error(gateway.client(token="forged").get("/v1/task"), 401, "unknown_token")
    assert_error(gateway.client(token="forged").post("/v1/rounds/0/update", content=b"x"), 401, "unknown_token")


def test_a_selected_device_uploads_once_and_every_misuse_is_refused(gateway: Gateway) -> None:
    state = register_all(gateway)
    before = gateway.model_bytes()
    chosen = sorted(state["expected"])
    other = next(d for d in range(6) if d not in chosen)
    first = chosen[0]
    body, report = update_for(gateway, first, 0, state["plans"][str(first)])

    assert_error(post_update(gateway, first, 5, body, report), 409, "future_round")
    assert_error(post_update(gateway, other, 0, body, report), 403, "not_selected")
    assert_error(gateway.client(other).get("/v1/rounds/0/plan"), 403, "not_selected")
    assert post_update(gateway, first, 0, body, report).status_code == 202
    assert_error(post_update(gateway, first, 0, body, report), 409, "replayed")
    assert gateway.model_bytes() == before  # nothing published before the round is complete

    for device in chosen[1:]:
        b, rep = update_for(gateway, device, 0, state["plans"][str(device)])
        assert post_update(gateway, device, 0, b, rep).status_code == 202
    gateway.wait_round(1)
    assert_error(post_update(gateway, first, 0, body, report), 409, "replayed")  # its own, again
    assert_error(post_update(gateway, other, 0, body, report), 409, "stale_round")
    history = gateway.served.coordinator.status()["history"]
    assert history[0]["counted"] == 3 and history[0]["status"] == "finalized"


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ("shape", 422, "shape"),
        ("nan", 422, "non_finite"),
        ("dtype", 422, "dtype"),
        ("truncated", 422, "malformed"),
        ("missing", 422, "missing_tensor"),
        ("no_report", 422, "malformed_report"),
        ("bad_json_report", 422, "malformed_report"),
        ("inflated_samples", 422, "malformed_report"),
        ("too_large", 413, "too_large"),
    ],
)
def test_a_bad_upload_gets_a_4xx_naming_it_and_the_model_is_unchanged(
    gateway: Gateway, change: str, status: int, reason: str
) -> None:
    state = register_all(gateway)
    device = sorted(state["expected"])[0]
    body, report = update_for(gateway, device, 0, state["plans"][str(device)])
    tensors = decode(body)
    # The smallest tensor (by size, then name: decode's order varies by process), so that a doubled
    # dtype still fits the body limit (the update's size plus a margin) and reaches the dtype check.
    name = min(tensors, key=lambda n: (tensors[n].numel(), n))
    before = gateway.model_bytes()
    sent_report: str | None = report
    if change == "shape":
        body = encode({**tensors, name: torch.zeros(3)})
    elif change == "nan":
        body = encode({**tensors, name: tensors[name] + float("nan")})
    elif change == "dtype":
        body = encode({**tensors, name: tensors[name].double()})
    elif change == "truncated":
        body = body[:-100]
    elif change == "missing":
        body = encode({k: v for k, v in tensors.items() if k != name})
    elif change == "no_report":
        sent_report = None
    elif change == "bad_json_report":
        sent_report = "{not json"
    elif change == "inflated_samples":
        sent_report = json.dumps({**json.loads(report), "num_samples": 10_000})
    elif change == "too_large":
        body = b"\0" * (3 * 2**20)

    assert_error(post_update(gateway, device, 0, body, sent_report), status, reason)
    assert gateway.model_bytes() == before
    # The refusal did not use up the device's upload: a good one is still accepted.
    assert (
        post_update(gateway, device, 0, *update_for(gateway, device, 0, state["plans"][str(device)])).status_code == 202
    )
    metrics = gateway.operator().get("/metrics").text
    assert f'amble_updates_rejected_total{{reason="{reason}"}} 1' in metrics
    assert "amble_updates_accepted_total 1" in metrics


def test_an_unchanged_model_is_not_downloaded_again(gateway: Gateway) -> None:
    first = gateway.client(0).get("/v1/model")
    assert first.status_code == 200 and first.headers["ETag"] == '"v0"' and first.headers["X-Model-Version"] == "0"
    again = gateway.client(0).get("/v1/model", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_api_is_described_by_openapi(gateway: Gateway) -> None:
    paths = gateway.client().get("/openapi.json").json()["paths"]
    for path in (
        "/v1/register",
        "/v1/model",
        "/v1/task",
        "/v1/rounds/{round_index}/plan",
        "/v1/rounds/{round_index}/update",
    ):
        assert path in paths


def test_registration_is_validated(gateway: Gateway) -> None:
    assert_error(gateway.client(0).post("/v1/register", json={"num_samples": -3}), 422, "invalid_request")
    assert_error(gateway.client(0).post("/v1/register", content=b"not json"), 422, "invalid_request")
    own = samples_of(gateway, 0)
    assert gateway.client(0).post("/v1/register", json={"num_samples": own}).status_code == 200
    assert gateway.client(0).post("/v1/register", json={"num_samples": own}).status_code == 200  # again: fine
    assert_error(gateway.client(0).post("/v1/register", json={"num_samples": own + 1}), 409, "registration_conflict")
    huge = gateway.client(1).post("/v1/register", json={"num_samples": 2**31 - 1})  # a weight of its own choosing
    assert_error(huge, 409, "registration_conflict")


_URL_SAFE = string.ascii_letters + string.digits + "-._~%/{}"
_HEADER_SAFE = string.ascii_letters + string.digits + string.punctuation + " "
_PATHS = ["/v1/model", "/v1/task", "/v1/whoami", "/v1/register", "/v1/rounds/0/update", "/v1/rounds/0/plan"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.one_of(st.sampled_from(_PATHS), st.text(_URL_SAFE, min_size=1, max_size=30).map(lambda s: "/v1/" + s)),
    token=st.one_of(st.none(), st.sampled_from(["0", "1"]), st.text(_URL_SAFE + "+=", min_size=1, max_size=40)),
    body=st.binary(max_size=2048),
    report=st.one_of(st.none(), st.text(_HEADER_SAFE, min_size=1, max_size=200).map(str.strip).filter(bool)),
    round_index=st.integers(min_value=-5, max_value=10**12),
)
def test_fuzz_never_a_5xx_and_never_a_model_change(
    gateway: Gateway, method: str, path: str, token: str | None, body: bytes, report: str | None, round_index: int
) -> None:
    if not hasattr(gateway, "initial"):
        register_all(gateway)
        gateway.initial = gateway.model_bytes()  # type: ignore[attr-defined]
    headers = {}
    if token in ("0", "1"):
        headers["Authorization"] = f"Bearer {gateway.served.tokens[int(token)]}"
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if report is not None:
        headers["X-Amble-Report"] = report
    path = path.replace("/0/", f"/{round_index}/")
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        response = client.request(method, path, content=body, headers=headers)
    assert response.status_code < 500, response.text
    assert gateway.model_bytes() == gateway.initial  # type: ignore[attr-defined]


def run_six_devices(gw: Gateway) -> list[DeviceAgent]:
    """Six device agents, each in a thread, until the run is done; returns them with their round logs."""
    agents = [DeviceAgent(gw.url, gw.served.tokens[d]) for d in range(6)]
    threads = [threading.Thread(target=agent.run) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return agents


def test_devices_over_http_train_every_round_and_the_model_learns(gateway: Gateway) -> None:
    agents = run_six_devices(gateway)
    status = gateway.operator().get("/v1/status").json()
    assert status["finished"] and [r["status"] for r in status["history"]] == ["finalized"] * 3
    assert sum(len(a.rounds) for a in agents) == 3 * 3  # 3 devices per round, 3 rounds
    assert all(log.status == 202 for a in agents for log in a.rounds)
    accuracies = [r["accuracy"] for r in status["history"]]
    assert accuracies[-1] > 0.2  # 10 classes: chance is 0.1


def test_devices_over_http_with_amble_as_shipped_make_progress_every_round(shipped_gateway: Gateway) -> None:
    agents = run_six_devices(shipped_gateway)

    history = shipped_gateway.operator().get("/v1/status").json()["history"]
    assert [r["status"] for r in history] == ["finalized"] * 3
    assert all(r["counted"] >= math.ceil(0.5 * r["expected"]) for r in history)  # the default quorum
    assert all(p["deadline_s"] is not None for r in history[1:] for p in r["plans"].values())  # bounded rounds
    assert sum(len(a.rounds) for a in agents) == 3 * 3  # every selected device trained...
    assert all(log.status != 0 and log.local_steps >= 1 for a in agents for log in a.rounds)  # ...and sent


def test_a_device_whose_task_reaches_it_after_the_deadline_still_sends_one_step(gateway: Gateway) -> None:
    state = register_all(gateway)
    device = state["expected"][0]
    plan = Plan.from_dict({**state["plans"][str(device)], "deadline_s": 0.01, "at_deadline": "stop"})
    agent = DeviceAgent(gateway.url, gateway.served.tokens[device])
    agent.setup()

    agent._train(0, plan, deadline_at=time.monotonic() - 1.0)  # its deadline passed before it had the task

    assert [(log.local_steps, log.status) for log in agent.rounds] == [(1, 202)]  # 202: counted in round 0


def test_200_concurrent_uploads_are_each_accepted_exactly_once(tmp_path: Path) -> None:
    """The load benchmark at test size: every upload 202 once, the model is the exact FedAvg, replays 409."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gateway_load.py"
    done = subprocess.run(
        [sys.executable, str(script), "--devices", "200", "--concurrency", "200", "--out", str(tmp_path / "load.md")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout


def test_tls_with_uvicorns_certificate_options(tmp_path: Path) -> None:
    """`amble serve --ssl-certfile/--ssl-keyfile`: devices reach it over HTTPS, trusting the certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    openssl += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(openssl, check=True, capture_output=True)
    raw = {**SMALL, "strategies": ["fedavg"], "rounds": 1}
    served = prepare(config_from_dict(raw), tmp_path / "out")
    port = free_port()
    server = uvicorn.Server(http_config(served.app, "127.0.0.1", port, str(cert), str(key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        url = f"https://127.0.0.1:{port}"
        agent = DeviceAgent(url, served.tokens[0], ca_cert=str(cert))
        assert agent.client.get("/v1/whoami").json()["device"] == 0
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            httpx.get(url + "/v1/health")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
