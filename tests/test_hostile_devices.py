"""One misbehaving device must not stop, stall or steer a live run (issue 13), over real loopback HTTP.

Honest devices (``DeviceAgent`` threads, or real ``amble device`` processes) work beside a hostile
one; every run serves the ``amble`` strategy on the small synthetic config. Each test asserts the
4xx and its reason the hostile requests get, that every round still closes, that the published
model stays finite, and, where ``amble serve`` runs as a process, its exit status.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amble.client.device import DeviceAgent, RetryPolicy
from amble.client.trainer import LocalTrainer
from amble.config import config_from_dict
from amble.errors import REJECTION_REASONS
from amble.live.serve import prepare
from amble.models import build_model
from amble.runsetup import device_shards
from amble.server import keys
from amble.server.store.base import read_json
from amble.server.tensors import decode, encode
from amble.strategies.base import Plan, Report
from tests.conftest import RedisServer, free_port
from tests.test_gateway import Gateway, assert_error, post_update, running, samples_of, update_for
from tests.test_sim import SMALL

AMBLE = [{"name": "amble", "deadline_quantile": 1.0}]
"""q = 1: no device is cut at a deadline set by loopback timing noise, so every round counts every update."""
serving = contextlib.contextmanager(running)
"""``with serving(served) as gw``: the gateway fixture's set-up and tear-down, for a run of its own."""


def small(num_devices: int = 4, per_round: int = 4, rounds: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        **SMALL,
        "strategies": AMBLE,
        "data": {**SMALL["data"], "num_devices": num_devices},
        "devices_per_round": per_round,
        "rounds": rounds,
        **extra,
    }


@pytest.fixture
def hostile_run(tmp_path: Path) -> Iterator[Gateway]:
    """4 devices, all selected every round, 20 rounds (tests use what they need), a long deadline."""
    served = prepare(config_from_dict(small(rounds=20)), tmp_path, round_timeout_s=60)
    yield from running(served)


def register(gw: Gateway, devices: range | list[int]) -> None:
    for device in devices:
        response = gw.client(device).post("/v1/register", json={"num_samples": samples_of(gw, device)})
        assert response.status_code == 200, response.text


def counted(gw: Gateway, r: int) -> list[int]:
    meta = read_json(gw.served.coordinator.server.store, keys.round_meta(r)) or {}
    return list(meta.get("counted", []))


def finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in params.values() if t.is_floating_point())


def run_all(agents: list[DeviceAgent]) -> None:
    """Each device's loop in a thread of its own, until the run is done (two minutes at most)."""
    threads = [threading.Thread(target=agent.run) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)


# -- the report header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "[" * 1500,  # RecursionError in json.loads before: HTTP 500
        '{"a":' * 1000 + "1" + "}" * 1000,
        '{"round": 0, "device": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}',
        '{"num_samples": 1' + "0" * 4400 + "}",  # over the size limit: refused unparsed
        '{"num_samples": ' + "9" * 4300 + "}",
        "[1, 2, 3]",
        '"a string"',
    ],
)
def test_a_hostile_report_header_gets_422_malformed_report_never_a_500(hostile_run: Gateway, header: str) -> None:
    register(hostile_run, range(4))
    state = hostile_run.wait_round(0)
    body, _ = update_for(hostile_run, 0, 0, state["plans"]["0"])
    before = hostile_run.model_bytes()

    response = post_update(hostile_run, 0, 0, body, header)

    assert_error(response, 422, "malformed_report")
    assert counted(hostile_run, 0) == [] and hostile_run.model_bytes() == before


# -- registration ------------------------------------------------------------------------------


def test_a_weight_of_its_own_choosing_is_refused_with_the_partition_size_named(hostile_run: Gateway) -> None:
    own = samples_of(hostile_run, 1)
    response = hostile_run.client(1).post("/v1/register", json={"num_samples": 2**31})
    assert_error(response, 422, "invalid_request")  # not even an int32 weight
    response = hostile_run.client(1).post("/v1/register", json={"num_samples": 2**31 - 1})
    assert_error(response, 409, "registration_conflict")
    assert f"has {own} training samples" in response.json()["message"]
    assert hostile_run.client(1).post("/v1/register", json={"num_samples": own}).status_code == 200


def test_own_data_registration_is_bounded_and_fixed_once_counted(tmp_path: Path) -> None:
    raw = small(num_devices=5, per_round=3, rounds=2)
    raw["server"] = {"device_data": "own", "max_samples": 500, "max_weight_share": 0.5}
    served = prepare(config_from_dict(raw), tmp_path, round_timeout_s=60)
    with serving(served) as gw:

        def post(device: int, count: int) -> httpx.Response:
            return gw.client(device).post("/v1/register", json={"num_samples": count})

        for device in range(3):
            assert post(device, 100).status_code == 200
        assert post(0, 120).status_code == 200  # nothing counted yet: it may correct its count
        assert_error(post(3, 501), 409, "registration_conflict")  # over server.max_samples
        assert_error(post(3, 330), 409, "registration_conflict")  # 330 / (320 + 330) > 0.5
        assert "max_weight_share" in post(3, 330).json()["message"]
        assert post(3, 320).status_code == 200  # 320 / 640 = 0.5: at the cap, allowed

        state = gw.wait_round(0)
        device = state["expected"][0]
        plan = Plan.from_dict(state["plans"][str(device)])
        registered = read_json(served.coordinator.server.store, keys.device_info(device))["num_samples"]
        delta = {k: torch.zeros_like(v) for k, v in decode(gw.model_bytes()).items() if v.is_floating_point()}
        report = Report(0, device, registered, plan.local_steps, plan.batch_size, 0.5, 0.1, 0.1)
        assert post_update(gw, device, 0, encode(delta), json.dumps(report.to_dict())).status_code == 202
        refused = post(device, registered + 1)
        assert_error(refused, 409, "registration_conflict")
        assert "cannot change" in refused.json()["message"]
        assert post(device, registered).status_code == 200  # the same count again is fine


# -- a 202 means counted -----------------------------------------------------------------------


def test_an_upload_whose_aggregation_is_dead_lettered_gets_503_and_its_retry_is_counted(
    hostile_run: Gateway,
) -> None:
    register(hostile_run, range(4))
    state = hostile_run.wait_round(0)
    runtime = hostile_run.served.coordinator.server.runtime
    aggregate = runtime.handlers["update_uploaded"]  # type: ignore[attr-defined]

    def broken(*args: Any) -> None:
        raise ConnectionError("the store went away")

    runtime.handlers["update_uploaded"] = broken  # type: ignore[attr-defined]
    body, report = update_for(hostile_run, 2, 0, state["plans"]["2"])

    lost = post_update(hostile_run, 2, 0, body, report)

    assert_error(lost, 503, "busy")
    assert lost.headers["Retry-After"] == "1"
    assert counted(hostile_run, 0) == []
    assert "2" not in hostile_run.served.coordinator.server.store.set_members(keys.uploaded(0))
    runtime.handlers["update_uploaded"] = aggregate  # type: ignore[attr-defined]
    assert post_update(hostile_run, 2, 0, body, report).status_code == 202  # not `replayed`: it was not counted
    assert counted(hostile_run, 0) == [2]
    assert_error(post_update(hostile_run, 2, 0, body, report), 409, "replayed")


def test_devices_retry_a_503_with_backoff_and_every_round_is_counted_in_full(tmp_path: Path) -> None:
    served = prepare(config_from_dict(small(rounds=2)), tmp_path, round_timeout_s=60)
    runtime = served.coordinator.server.runtime
    aggregate = runtime.handlers["update_uploaded"]  # type: ignore[attr-defined]
    failures = {"left": 5}  # max_attempts deliveries of one event: exactly one upload is dead-lettered

    def flaky(*args: Any) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("a worker died")
        aggregate(*args)

    runtime.handlers["update_uploaded"] = flaky  # type: ignore[attr-defined]
    with serving(served) as gw:
        agents = [DeviceAgent(gw.url, served.tokens[d], retry=RetryPolicy(base_s=0.05)) for d in range(4)]
        run_all(agents)
        history = gw.operator().get("/v1/status").json()["history"]
        assert [(r["status"], r["counted"]) for r in history] == [("finalized", 4), ("finalized", 4)]
        assert sorted(log.status for a in agents for log in a.rounds) == [202] * 8
        assert failures["left"] == 0
        busy = gw.operator().get("/metrics").text
        assert 'amble_updates_rejected_total{reason="busy"} 1' in busy
        assert "amble_updates_accepted_total 8" in busy


# -- the body ----------------------------------------------------------------------------------


def test_the_body_limit_is_the_models_update_size_not_max_update_mb(hostile_run: Gateway) -> None:
    register(hostile_run, range(4))
    state = hostile_run.wait_round(0)
    body, report = update_for(hostile_run, 0, 0, state["plans"]["0"])
    oversized = body + b"\0" * 2**20  # the update plus 1 MiB: far under max_update_mb (2 MiB here)

    refused = post_update(hostile_run, 0, 0, oversized, report)

    assert_error(refused, 413, "too_large")
    assert "for this model" in refused.json()["message"]
    assert post_update(hostile_run, 0, 0, body, report).status_code == 202


def test_the_cheap_checks_answer_before_the_body_is_sent(hostile_run: Gateway) -> None:
    """A 1 GB upload is refused from its headers alone: the test never sends a byte of the body."""
    register(hostile_run, range(4))
    state = hostile_run.wait_round(0)
    _, report = update_for(hostile_run, 1, 0, state["plans"]["1"])
    host, port = hostile_run.url.removeprefix("http://").split(":")

    def headers_only(token: str, round_index: int, report: str | None = None) -> tuple[int, str]:
        lines = [f"POST /v1/rounds/{round_index}/update HTTP/1.1", "Host: x", f"Authorization: Bearer {token}"]
        lines += ["Content-Type: application/octet-stream", "Content-Length: 1000000000"]
        lines += [f"X-Amble-Report: {report}"] if report is not None else []
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            answer = conn.makefile("rb")
            status = int(answer.readline().split()[1])
            length = 0
            while (line := answer.readline().strip()) != b"":
                name, _, value = line.decode().partition(":")
                length = int(value) if name.lower() == "content-length" else length
            return status, json.loads(answer.read(length))["error"]

    assert headers_only("forged", 0) == (401, "unknown_token")
    assert headers_only(hostile_run.served.tokens[1], 7) == (409, "future_round")
    assert headers_only(hostile_run.served.tokens[1], 0) == (422, "malformed_report")  # no report header
    assert headers_only(hostile_run.served.tokens[1], 0, report) == (413, "too_large")  # all else fine: the size


# -- operator endpoints, whoami, token files ---------------------------------------------------


def test_status_and_metrics_need_the_operator_token(hostile_run: Gateway) -> None:
    for path in ("/v1/status", "/metrics"):
        assert_error(hostile_run.client().get(path), 401, "unauthenticated")
        assert_error(hostile_run.client(0).get(path), 403, "not_operator")  # a device's token is not enough
        assert hostile_run.operator().get(path).status_code == 200


def test_whoami_gives_a_device_only_what_it_needs_to_train(hostile_run: Gateway) -> None:
    me = hostile_run.client(2).get("/v1/whoami").json()
    assert me["device"] == 2
    assert sorted(me["config"]) == ["data", "devices_per_round", "model", "model_args", "name", "seed", "train"]
    assert config_from_dict(me["config"]).data.num_devices == 4  # enough to load its partition


def test_token_files_are_created_readable_by_the_owner_only(hostile_run: Gateway) -> None:
    out = hostile_run.served.tokens_file.parent
    for name in ("tokens.json", "operator.token"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name
    assert (out / "operator.token").read_text() == hostile_run.served.operator_token
    stored = hostile_run.served.coordinator.server.store.get(keys.OPERATOR_TOKEN)
    assert stored is not None and hostile_run.served.operator_token.encode() not in stored  # only its hash


# -- deadlines ---------------------------------------------------------------------------------


def test_the_trainer_stops_within_a_time_budget_and_is_unchanged_without_one() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    plan = Plan(batch_size=8, local_steps=5, lr=0.1)
    trainer = LocalTrainer(model)

    plain = trainer.train(start, x, y, plan, seed=1)
    generous = trainer.train(start, x, y, plan, seed=1, time_budget_s=1e9)
    tight = trainer.train(start, x, y, plan, seed=1, time_budget_s=1e-12)

    assert plain.steps == generous.steps == 5
    assert all(torch.equal(plain.delta[k], generous.delta[k]) for k in plain.delta)
    assert tight.steps == 1 and tight.samples == 8  # the first step always runs, the second cannot fit


def test_a_deadline_no_step_can_meet_still_gets_one_step_from_every_device_and_the_round_counts(
    tmp_path: Path,
) -> None:
    """A deadline of 1 ms (``deadline_s`` caps amble's round time): from round 1 on no device can make
    it; with ``at_deadline: stop`` each device still sends one step (issue 21: before, each sent
    nothing and the round failed), so the round is finalized."""
    raw = small(rounds=2, strategies=[{"name": "amble", "deadline_s": 0.001}])
    served = prepare(config_from_dict(raw), tmp_path, round_timeout_s=30)
    with serving(served) as gw:
        agents = [DeviceAgent(gw.url, served.tokens[d]) for d in range(4)]
        run_all(agents)
        history = gw.operator().get("/v1/status").json()["history"]
        assert [r["status"] for r in history] == ["finalized", "finalized"] and history[1]["counted"] >= 2
        assert all(p["at_deadline"] == "stop" for p in history[1]["plans"].values())
        late = sorted((log.round, log.local_steps) for a in agents for log in a.rounds if log.round == 1)
        assert late == [(1, 1)] * 4 and all(log.status != 0 for a in agents for log in a.rounds)


def test_a_device_with_time_for_one_step_uploads_one_step_and_it_is_counted(hostile_run: Gateway) -> None:
    register(hostile_run, [1, 2, 3])
    agent = DeviceAgent(hostile_run.url, hostile_run.served.tokens[0])
    agent.setup()
    state = hostile_run.wait_round(0)
    plan = replace(Plan.from_dict(state["plans"]["0"]), deadline_s=60.0, at_deadline="stop")
    assert plan.local_steps > 1
    agent._budget_s = lambda plan, deadline_at: 1e-12  # type: ignore[method-assign]  # time for one step only

    agent._train(0, plan, deadline_at=time.monotonic() + 60)

    assert [(log.local_steps, log.status) for log in agent.rounds] == [(1, 202)]
    assert counted(hostile_run, 0) == [0]
    reports = read_json(hostile_run.served.coordinator.server.store, keys.device_reports(0))
    # The server's own plan for round 0 has no deadline (only the device's copy was changed), so the
    # one step reported is held to that plan's steps, which an honest device under it runs in full.
    assert reports[0]["local_steps"] == plan.local_steps


def test_a_device_with_drop_sends_nothing_when_it_cannot_finish(hostile_run: Gateway) -> None:
    register(hostile_run, [1, 2, 3])
    agent = DeviceAgent(hostile_run.url, hostile_run.served.tokens[0])
    agent.setup()
    state = hostile_run.wait_round(0)
    plan = replace(Plan.from_dict(state["plans"]["0"]), deadline_s=60.0, at_deadline="drop")
    agent._budget_s = lambda plan, deadline_at: 1e-12  # type: ignore[method-assign]

    agent._train(0, plan, deadline_at=time.monotonic() + 60)

    assert [(log.local_steps, log.status) for log in agent.rounds] == [(1, 0)]
    assert (
        counted(hostile_run, 0) == [] and hostile_run.served.coordinator.server.store.counter(keys.UPLOAD_COUNTER) == 0
    )


# -- a fuzz over valid-shaped updates ----------------------------------------------------------

SCALES = [0.0, 1e-3, 1.0, 1e3, 1e30, -1e33, float("inf"), float("nan")]
"""Times updates of about 1e-3: huge but finite ones too (summing them without overflow is the
fold's concern, tested with the functions)."""


@st.composite
def mutations(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "scale": draw(st.sampled_from(SCALES)),
        "dtype": draw(st.sampled_from([None, torch.float64, torch.float16, torch.int32])),
        "field": draw(st.sampled_from([None, "num_samples", "local_steps", "batch_size", "compute_s", "round"])),
        "value": draw(
            st.one_of(
                st.integers(-3, 3).map(lambda k: ("shift", k)),
                st.sampled_from([("set", None), ("set", "7"), ("set", [1]), ("set", {"a": 1}), ("set", 1e308)]),
                st.sampled_from([("set", -1.0), ("set", float("nan")), ("set", True), ("drop", None)]),
            )
        ),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_fuzz_valid_shaped_updates_never_a_5xx_refused_changes_nothing_accepted_is_counted(
    hostile_run: Gateway, mutation: dict[str, Any]
) -> None:
    gw = hostile_run
    coordinator = gw.served.coordinator
    if not coordinator.server.store.set_members(keys.REGISTERED):
        register(gw, range(4))
    # The next device of the open round that has not uploaded yet.
    deadline = time.monotonic() + 20
    while True:
        r = coordinator.current
        state = None if r is None else coordinator.server.round_state(r)
        if state is not None and state.is_open:
            waiting = [d for d in state.expected if d not in counted(gw, r)]  # type: ignore[arg-type]
            if waiting:
                break
        assert time.monotonic() < deadline, "no round opened"
        time.sleep(0.02)
    device = waiting[0]
    model = decode(gw.model_bytes())
    generator = torch.Generator().manual_seed(device)
    delta = {
        k: (torch.randn(v.shape, generator=generator) * 1e-3).to(v.dtype) * mutation["scale"]
        for k, v in model.items()
        if v.is_floating_point()
    }
    if mutation["dtype"] is not None:
        name = sorted(delta)[0]
        delta[name] = delta[name].to(mutation["dtype"])
    plan = state.plans[device]
    report: dict[str, Any] = Report(
        r, device, samples_of(gw, device), plan.local_steps, plan.batch_size, 0.5, 0.1, 0.1
    ).to_dict()
    if mutation["field"] is not None:
        how, value = mutation["value"]
        if how == "shift":
            report[mutation["field"]] += value
        elif how == "drop":
            del report[mutation["field"]]
        else:
            report[mutation["field"]] = value
    version_before, model_before = coordinator.server.latest_version(), gw.model_bytes()

    response = post_update(gw, device, r, encode(delta), json.dumps(report))  # type: ignore[arg-type]

    assert response.status_code < 500, response.text
    if response.status_code == 202:
        assert device in counted(gw, r)  # type: ignore[arg-type]
    else:
        assert response.status_code in (409, 413, 422), response.text
        assert response.json()["error"] in REJECTION_REASONS
        assert device not in counted(gw, r)  # type: ignore[arg-type]
        assert coordinator.server.latest_version() == version_before and gw.model_bytes() == model_before


# -- real processes: `amble serve` with honest `amble device`s beside a hostile client -----------


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(raw))))
    return path


def start_serve(config: Path, out: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """``amble serve`` with its output in ``serve.out`` beside the config (a pipe nobody reads until
    the end would fill up with its log lines and stall it)."""
    command = [sys.executable, "-m", "amble", "serve", str(config), "--port", str(port), "--out", str(out)]
    with (config.parent / "serve.out").open("wb") as log:
        return subprocess.Popen([*command, *extra], stdout=log, stderr=subprocess.STDOUT)


def serve_output(config: Path) -> str:
    return (config.parent / "serve.out").read_text()


def wait_tokens(serve: subprocess.Popen[bytes], out: Path) -> dict[str, str]:
    while not (out / "tokens.json").is_file():
        assert serve.poll() is None, "amble serve exited early"
        time.sleep(0.1)
    time.sleep(0.1)  # written atomically; give the gateway a moment to listen
    tokens: dict[str, str] = json.loads((out / "tokens.json").read_text())
    return tokens


def wait_task(client: httpx.Client, round_index: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while (task := client.get("/v1/task").json()).get("round") != round_index or task["state"] != "train":
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    return task


def start_device(port: int, token: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "amble", "device", "--server", f"http://127.0.0.1:{port}"]
    env = {**os.environ, "AMBLE_TOKEN": token, "OMP_NUM_THREADS": "1"}  # devices share 2 cores in CI
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE)


def test_amble_serve_with_three_honest_devices_and_a_hostile_one_closes_every_round(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", small(rounds=2))
    out, port = tmp_path / "out", free_port()
    serve = start_serve(config, out, port, "--round-timeout-s", "60", "--linger-s", "1")
    processes = [serve]
    try:
        tokens = wait_tokens(serve, out)
        processes += [start_device(port, tokens[str(d)]) for d in (0, 1, 2)]
        hostile = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {tokens['3']}"}, timeout=30
        )
        answers: dict[str, tuple[int, str]] = {}

        def answer(what: str, response: httpx.Response) -> None:
            answers[what] = (response.status_code, response.json().get("error", ""))

        # Round 0: every kind of hostile request, each refused; then a valid one, so no round waits for a deadline.
        answer("huge weight", hostile.post("/v1/register", json={"num_samples": 2**31 - 2}))
        _, shards = device_shards(config_from_dict(small(rounds=2)))
        samples = len(shards[3][1])  # the partition's size, as an honest device computes it
        assert hostile.post("/v1/register", json={"num_samples": samples}).status_code == 200
        task = wait_task(hostile, 0)
        plan = Plan.from_dict(task["plan"])
        model = decode(hostile.get("/v1/model").content)
        huge = {k: torch.full_like(v, 1e30) for k, v in model.items() if v.is_floating_point()}
        good = Report(0, 3, samples, plan.local_steps, plan.batch_size, 0.5, 0.1, 0.1).to_dict()

        def upload(r: int, body: bytes, report: str) -> httpx.Response:
            return hostile.post(f"/v1/rounds/{r}/update", content=body, headers={"X-Amble-Report": report})

        answer("nested report", upload(0, encode(huge), "[" * 1500))
        answer("inflated weight", upload(0, encode(huge), json.dumps({**good, "num_samples": samples * 1000})))
        answer("nan", upload(0, encode({k: v * float("nan") for k, v in huge.items()}), json.dumps(good)))
        answer("status", hostile.get("/v1/status"))
        zeros = encode({k: torch.zeros_like(v) for k, v in huge.items()})
        answer("zeros", upload(0, zeros, json.dumps(good)))  # the rejections did not use up its upload
        # Round 1: a valid-shaped update of 1e30s, then its replay (or, refused, a zero update).
        plan = Plan.from_dict(wait_task(hostile, 1)["plan"])
        good = {**good, "round": 1, "local_steps": plan.local_steps, "batch_size": plan.batch_size}
        answer("1e30", upload(1, encode(huge), json.dumps(good)))
        answer("replay", upload(1, encode(huge) if answers["1e30"][0] == 202 else zeros, json.dumps(good)))

        for device in processes[1:]:
            _, err = device.communicate(timeout=120)
            assert device.returncode == 0, err.decode()
        assert serve.wait(timeout=60) == 0, serve_output(config)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    assert answers["huge weight"] == (409, "registration_conflict")
    assert answers["nested report"] == (422, "malformed_report")
    assert answers["inflated weight"] == (422, "malformed_report")
    assert answers["nan"] == (422, "non_finite")
    assert answers["1e30"][0] in (202, 422)  # counted, or refused by an update-norm bound: answered either way
    assert answers["zeros"] == (202, "")
    assert answers["replay"] == ((409, "replayed") if answers["1e30"][0] == 202 else (202, ""))
    assert answers["status"] == (403, "not_operator")
    rounds = [json.loads(line) for line in (out / "serve.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["status"] == "finalized" for r in rounds)
    assert [r["counted"] for r in rounds] == [4, 4]  # every round closed with every device, none timed out
    assert finite(decode((out / "model_amble.safetensors").read_bytes()))


def test_amble_serve_exits_non_zero_with_the_reason_when_its_rounds_crash(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """No function worker serves the run's Redis: round 0 is never planned, the coordinator gives up
    after ``server.drain_timeout_s``; devices are told, ``serve.jsonl`` says so, the exit status is 2."""
    raw = small(num_devices=2, per_round=2, rounds=2)
    raw["server"] = {"store": redis_server.url, "workers": 0, "drain_timeout_s": 1.0}
    config = write_config(tmp_path / "run.yaml", raw)
    out, port = tmp_path / "out", free_port()
    serve = start_serve(config, out, port, "--linger-s", "2")
    processes = [serve]
    try:
        tokens = wait_tokens(serve, out)
        processes += [start_device(port, tokens[str(d)]) for d in (0, 1)]
        device_errors = [device.communicate(timeout=120)[1].decode() for device in processes[1:]]
        serve.wait(timeout=60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    output = serve_output(config)
    assert serve.returncode == 2, output
    assert "amble: error: the run failed in round 0" in output and "made no progress" in output
    assert all(device.returncode != 0 for device in processes[1:])
    assert all("the server's run failed" in message for message in device_errors), device_errors
    last = json.loads((out / "serve.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "crashed" and last["round"] == 0 and "made no progress" in last["error"]


def test_a_round_failing_below_quorum_is_an_outcome_not_a_crash(tmp_path: Path) -> None:
    """One of four selected devices uploads, quorum is 0.5: the round fails at its deadline and the run
    goes on; ``serve`` returns normally (exit 0 under ``amble serve``)."""
    served = prepare(config_from_dict(small(rounds=1)), tmp_path, round_timeout_s=1.5)
    with serving(served) as gw:
        register(gw, range(4))
        state = gw.wait_round(0)
        assert post_update(gw, 0, 0, *update_for(gw, 0, 0, state["plans"]["0"])).status_code == 202
        deadline = time.monotonic() + 20
        while not served.coordinator.finished:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert served.coordinator.error is None
        history = gw.operator().get("/v1/status").json()["history"]
        assert [(r["status"], r["counted"]) for r in history] == [("failed", 1)]
        assert gw.client(0).get("/v1/task").json() == {"state": "done"}
        assert math.isfinite(float(sum(float(t.sum()) for t in served.coordinator.server.model().values())))


class _Answer429(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 429 and the reason the server's ``reason`` attribute names."""

    def do_POST(self) -> None:
        self.server.requests += 1  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": self.server.reason, "message": "m"}).encode()  # type: ignore[attr-defined]
        self.send_response(429)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("reason", "tries"), [("too_many_refusals", 1), ("busy", 3)])
def test_a_device_does_not_resend_what_the_refusal_cap_refuses_but_retries_a_busy_429(reason: str, tries: int) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer429)
    server.requests, server.reason = 0, reason  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        agent = DeviceAgent(f"http://127.0.0.1:{server.server_address[1]}", "t", retry=RetryPolicy(3, base_s=0.01))

        response, attempts = agent._request("POST", "/v1/rounds/0/update", content=b"x")

        assert (response.status_code, attempts, server.requests) == (429, tries, tries)  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
