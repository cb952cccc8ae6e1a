"""What a request costs the server, over real loopback HTTP (issue 22, items 5 to 8).

A refusal costs the store nothing (it is counted in the gateway's memory), a device that keeps
sending refused uploads is cut off for the round, a client that stalls mid-body cannot hold the
gateway or keep ``amble serve`` from writing its files and exiting, and every malformed body is a
4xx naming what was wrong, however its raw safetensors header is broken.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amble.client.device import DeviceAgent
from amble.config import config_from_dict
from amble.errors import REJECTION_REASONS, UpdateRejected
from amble.live.gateway import MAX_REFUSED_UPLOADS, create_app
from amble.live.serve import prepare, serve
from amble.server import keys
from amble.server.factory import release_server
from amble.server.store.redis import RedisStore, connect, escape_glob, prefix_of
from amble.server.tensors import TensorSpec, decode, encode, validate_update
from tests.conftest import RedisServer, free_port
from tests.test_gateway import Gateway, assert_error, post_update, running, update_for
from tests.test_hostile_devices import counted, register, run_all, serving, small


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Gateway]:
    """4 devices, all selected in every round, a long deadline; the embedded store."""
    served = prepare(config_from_dict(small(rounds=2)), tmp_path, round_timeout_s=60)
    yield from running(served)


def metric(gw: Gateway, reason: str) -> int:
    """``amble_updates_rejected_total`` for ``reason``, as ``/metrics`` shows it."""
    text = gw.operator().get("/metrics").text
    prefix = f'amble_updates_rejected_total{{reason="{reason}"}} '
    return int(next(line for line in text.splitlines() if line.startswith(prefix)).removeprefix(prefix))


# -- item 5: a refusal costs the store nothing ---------------------------------------------------


def test_500_requests_without_a_valid_token_add_no_key_to_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    raw = small(rounds=1)
    raw["server"] = {"store": redis_server.url}
    served = prepare(config_from_dict(raw), tmp_path, round_timeout_s=60)
    store = served.coordinator.server.store
    assert isinstance(store, RedisStore)
    client = connect(redis_server.url)

    def run_keys() -> int:
        return sum(1 for _ in client.scan_iter(match=escape_glob(prefix_of(store.namespace)) + "*", count=1000))

    forged = {"Authorization": "Bearer forged"}
    with serving(served) as gw, httpx.Client(base_url=gw.url, timeout=30) as http, contextlib.closing(client):
        before = run_keys()
        for _ in range(125):
            assert http.get("/v1/task").status_code == 401  # no token at all
            assert http.get("/v1/model", headers=forged).status_code == 401
            assert http.post("/v1/rounds/0/update", content=b"x" * 100, headers=forged).status_code == 401
            assert http.post("/v1/register", content=b"not json", headers=forged).status_code == 422
        after = run_keys()

        assert after == before  # before the fix: one counter-increment key per request, 500 in all
        assert metric(gw, "unauthenticated") == 125
        assert metric(gw, "unknown_token") == 250
        assert metric(gw, "invalid_request") == 125


# -- item 7: refused uploads are capped per device and round, and leave no record each ------------


def refused_update(gw: Gateway, device: int) -> tuple[bytes, str]:
    """An update of 1e30s for round 0 with a valid report: finite, so the gateway passes it on, and
    the functions' norm bound (``server.max_update_norm``) refuses it."""
    body, report = update_for(gw, device, 0, gw.wait_round(0)["plans"][str(device)])
    return encode({name: torch.full_like(t, 1e30) for name, t in decode(body).items()}), report


def resend(gw: Gateway, device: int, body: bytes, report: str, times: int) -> list[httpx.Response]:
    with gw.client(device) as client:
        headers = {"X-Amble-Report": report}
        return [client.post("/v1/rounds/0/update", content=body, headers=headers) for _ in range(times)]


def test_300_refused_uploads_of_one_device_are_capped_and_leave_no_value_key_each(run: Gateway) -> None:
    gw, store = run, run.served.coordinator.server.store
    register(gw, range(4))
    body, report = refused_update(gw, 0)
    keys_before, model_before = len(store.keys("")), gw.model_bytes()

    answers = resend(gw, 0, body, report, 300)

    assert len(store.keys("")) == keys_before  # before the fix: one rejection record per refused upload, +300
    statuses = collections.Counter(a.status_code for a in answers)
    assert statuses == {422: MAX_REFUSED_UPLOADS, 429: 300 - MAX_REFUSED_UPLOADS}
    assert {a.json()["error"] for a in answers[:MAX_REFUSED_UPLOADS]} == {"norm"}
    assert_error(answers[-1], 429, "too_many_refusals")
    assert len(store.set_members(keys.round_rejected(0))) == MAX_REFUSED_UPLOADS  # the outcome still says why
    assert store.counter(keys.UPLOAD_COUNTER) == MAX_REFUSED_UPLOADS  # the 429s never reached the functions
    assert counted(gw, 0) == [] and gw.model_bytes() == model_before
    assert metric(gw, "too_many_refusals") == 300 - MAX_REFUSED_UPLOADS
    # The cap is the device's own: another device of the round is not held back.
    state = gw.wait_round(0)
    assert post_update(gw, 1, 0, *update_for(gw, 1, 0, state["plans"]["1"])).status_code == 202


def test_300_refused_uploads_add_no_lasting_key_to_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    """The same on Redis, with a worker process running the functions: the keys that stay (no expiry)
    do not grow. (Each upload that reaches the functions still leaves counter increments' one-time
    keys, which expire after ten minutes: at most a few per refused upload under the cap.)"""
    raw = small(rounds=1)
    raw["server"] = {"store": redis_server.url, "workers": 1}
    served = prepare(config_from_dict(raw), tmp_path, round_timeout_s=60)
    store = served.coordinator.server.store
    assert isinstance(store, RedisStore)
    client = connect(redis_server.url)

    def lasting_keys() -> list[bytes]:
        names = list(client.scan_iter(match=escape_glob(prefix_of(store.namespace)) + "*", count=1000))
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.ttl(name)
            return sorted(name for name, ttl in zip(names, pipe.execute(), strict=True) if ttl == -1)

    try:
        with serving(served) as gw:
            register(gw, range(4))
            body, report = refused_update(gw, 0)
            first = resend(gw, 0, body, report, 1)  # the round's rejected set and the worker's record exist now
            before = lasting_keys()

            answers = resend(gw, 0, body, report, 299)

            after = lasting_keys()
    finally:
        release_server(served.coordinator.server)
        client.close()

    assert len(after) == len(before)  # before the fix: +299, a rejection record per refused upload
    assert_error(first[0], 422, "norm")
    statuses = collections.Counter(a.status_code for a in answers)
    assert statuses == {422: MAX_REFUSED_UPLOADS - 1, 429: 300 - MAX_REFUSED_UPLOADS}
    assert after == before


# -- item 6: a client that stalls mid-body -------------------------------------------------------


def stalled_upload(url: str, token: str, round_index: int, body: bytes, report: str) -> socket.socket:
    """A raw connection that sent an upload's headers and half its body, and then nothing more."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=60)
    lines = [f"POST /v1/rounds/{round_index}/update HTTP/1.1", "Host: x", f"Authorization: Bearer {token}"]
    lines += ["Content-Type: application/octet-stream", f"Content-Length: {len(body)}", f"X-Amble-Report: {report}"]
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body[: len(body) // 2])
    return conn


def read_answer(conn: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers (lower-case names) and JSON body of the one answer on ``conn``."""
    answer = conn.makefile("rb")
    status = int(answer.readline().split()[1])
    headers = {}
    while (line := answer.readline().strip()) != b"":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, json.loads(answer.read(int(headers["content-length"])))


def test_an_upload_that_stalls_mid_body_gets_408_and_its_connection_closed(tmp_path: Path) -> None:
    served = prepare(config_from_dict(small(rounds=1)), tmp_path, round_timeout_s=60)
    served = replace(served, app=create_app(served.coordinator, read_timeout_s=0.5))
    with serving(served) as gw:
        register(gw, range(4))
        state = gw.wait_round(0)
        body, report = update_for(gw, 2, 0, state["plans"]["2"])
        model_before = gw.model_bytes()

        with stalled_upload(gw.url, served.tokens[2], 0, body, report) as conn:
            status, headers, answer = read_answer(conn)  # before the fix: no answer, the socket times out
            closed = conn.recv(1) == b""

        assert (status, answer["error"]) == (408, "timeout") and answer["message"]
        assert headers["connection"] == "close" and closed
        assert counted(gw, 0) == [] and gw.model_bytes() == model_before
        assert post_update(gw, 2, 0, body, report).status_code == 202  # the stalled try used nothing up


def test_serve_writes_its_files_and_exits_though_a_client_stalls_mid_body(tmp_path: Path) -> None:
    """A client stalls in the body of an upload the gateway refuses (a forged token) and never goes on:
    ``serve`` writes the final model and summary as the rounds end, and returns (its shutdown cancels
    the stalled request). Before the fix it waited for that body for ever, writing nothing."""
    out, port = tmp_path / "out", free_port()
    served = prepare(config_from_dict(small(rounds=1)), out, round_timeout_s=60)
    url = f"http://127.0.0.1:{port}"
    failure: list[BaseException] = []

    def serve_in_thread() -> None:
        try:
            serve(served, "127.0.0.1", port, out, linger_s=0.2)
        except BaseException as exc:  # reported by the assertion below
            failure.append(exc)

    thread = threading.Thread(target=serve_in_thread, daemon=True)
    thread.start()
    wait_for(lambda: httpx.get(url + "/v1/health").status_code == 200, "the gateway to listen")
    stalled = stalled_upload(url, "forged", 0, b"\0" * 100_000, "{}")
    try:
        run_all([DeviceAgent(url, served.tokens[d]) for d in range(4)])
        files = [out / "summary.json", out / "model_amble.safetensors"]
        wait_for(lambda: all(f.is_file() for f in files), "the run's files, with the stalled client still connected")
        thread.join(timeout=120)
        assert not thread.is_alive(), "serve did not return"
    finally:
        stalled.close()
        thread.join(timeout=30)

    assert failure == []
    summary = json.loads((out / "summary.json").read_text())["strategies"]["amble"]
    assert (summary["rounds"], summary["updates_aggregated"]) == (1, 4)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.05)


# -- item 8: every malformed body is a 4xx -------------------------------------------------------


def raw_safetensors(header: Any, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Hand-built safetensors bytes: an 8-byte little-endian header length, the JSON header, the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if header_len is None else header_len).to_bytes(8, "little") + text + data


def rewritten(body: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """``body`` with its header changed by ``change`` (which edits it in place or returns a new one)."""
    length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + length])
    changed = change(header)
    return raw_safetensors(header if changed is None else changed, body[8 + length :])


def first_tensor(header: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = header[min(k for k in header if k != "__metadata__")]
    return entry


def retyped(entry: dict[str, Any], dtype: str, bits: int) -> None:
    """The tensor as ``dtype``, its shape made to fill its bytes exactly, as a writer of it would."""
    start, end = entry["data_offsets"]
    entry.update(dtype=dtype, shape=[(end - start) * 8 // bits])


BROKEN_HEADERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "dtype F4": lambda h: retyped(first_tensor(h), "F4", 4),
    "dtype F6_E2M3": lambda h: retyped(first_tensor(h), "F6_E2M3", 6),
    "dtype F8_E8M0": lambda h: retyped(first_tensor(h), "F8_E8M0", 8),
    "dtype F4, sizes of F32": lambda h: first_tensor(h).update(dtype="F4"),
    "dtype F8_E4M3": lambda h: first_tensor(h).update(dtype="F8_E4M3"),
    "dtype C64": lambda h: first_tensor(h).update(dtype="C64"),
    "dtype U16": lambda h: first_tensor(h).update(dtype="U16"),
    "dtype lower case": lambda h: first_tensor(h).update(dtype="f32"),
    "dtype empty": lambda h: first_tensor(h).update(dtype=""),
    "dtype a number": lambda h: first_tensor(h).update(dtype=32),
    "offsets past the data": lambda h: first_tensor(h).update(data_offsets=[0, 10**9]),
    "offsets reversed": lambda h: first_tensor(h).update(data_offsets=[8, 0]),
    "offsets missing": lambda h: first_tensor(h).pop("data_offsets"),
    "shape negative": lambda h: first_tensor(h).update(shape=[-1]),
    "shape huge": lambda h: first_tensor(h).update(shape=[2**62, 2**62]),
    "shape disagrees with offsets": lambda h: first_tensor(h).update(shape=[1]),
    "shape a string": lambda h: first_tensor(h).update(shape="3"),
    "header a list": lambda h: [h],
    "header a number": lambda h: 7,
    "metadata not strings": lambda h: h.update(__metadata__={"a": [1]}),
    "tensor entry a string": lambda h: h.update({min(k for k in h if k != "__metadata__"): "F32"}),
}
"""Raw header corruptions of a valid update; each must be refused with a 4xx, never a 503."""


def test_every_raw_header_corruption_is_a_4xx_naming_it_never_a_5xx(run: Gateway) -> None:
    register(run, range(4))
    state = run.wait_round(0)
    body, report = update_for(run, 3, 0, state["plans"]["3"])
    length = int.from_bytes(body[:8], "little")
    bodies = {name: rewritten(body, change) for name, change in BROKEN_HEADERS.items()}
    bodies["header length past the body"] = (len(body) + 1).to_bytes(8, "little") + body[8:]
    bodies["header length 2**63"] = (2**63).to_bytes(8, "little") + body[8:]
    bodies["header not JSON"] = raw_safetensors(b"{not json" + b" " * (length - 9), body[8 + length :])
    bodies["header nested too deep"] = raw_safetensors(b"[" * 100_000)
    bodies["header not UTF-8"] = raw_safetensors(b"\xff\xfe" * 8)
    bodies["seven bytes"] = body[:7]
    assert len(bodies) < MAX_REFUSED_UPLOADS  # each is answered as itself, not with the cap's 429
    model_before = run.model_bytes()

    answers = {name: post_update(run, 3, 0, sent, report) for name, sent in bodies.items()}

    for name, answer in answers.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        assert "Retry-After" not in answer.headers, name  # before the fix: dtype F4 got 503 and a Retry-After
        assert answer.json()["error"] in REJECTION_REASONS and answer.json()["message"], name
    for dtype in ("F4", "F6_E2M3", "F8_E8M0"):  # before the fix: 503 and Retry-After, so the device resent them
        refusal = answers[f"dtype {dtype}"].json()
        assert refusal["error"] == "dtype" and f"'{dtype}'" in refusal["message"]
    assert answers["header length past the body"].json()["error"] == "malformed"
    assert counted(run, 0) == [] and run.model_bytes() == model_before
    assert post_update(run, 3, 0, body, report).status_code == 202  # the refusals used nothing up


TEMPLATE = {"w": TensorSpec((2, 3), "float32"), "b": TensorSpec((3,), "float32")}
VALID = encode({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I8": 8, "U8": 8, "BOOL": 8}
BITS |= {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "E8M0": 8, "C64": 64}
BITS |= {"C128": 128, "U16": 16, "U32": 32, "U64": 64, "f32": 32, "": 8, "F32 ": 32}
"""Element sizes in bits of the dtypes the fuzz writes: what AMBLE reads, what newer safetensors
versions know (sub-byte floats among them) and what nobody does."""


@st.composite
def raw_updates(draw: st.DrawFn) -> bytes:
    """Raw safetensors bytes, mostly laid out as a writer would (offsets that follow from dtypes and
    shapes, the data as long as they say), each field sometimes replaced by junk."""
    junk = st.one_of(st.integers(-1, 2**65), st.text(max_size=4), st.none(), st.lists(st.integers(-1, 9), max_size=3))
    header: dict[str, Any] = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(["w", "b", "x"]), unique=True, max_size=3)):
        dtype = draw(st.sampled_from(sorted(BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = (math.prod(shape) * BITS[dtype] + 7) // 8
        entry: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        for field in draw(st.sets(st.sampled_from(sorted(entry)), max_size=1)):
            entry[field] = draw(junk)
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3)), junk))
    text = json.dumps(draw(st.one_of(st.just(header), junk))).encode()
    length = len(text) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**40]))
    data = bytes(max(0, offset + draw(st.sampled_from([0, 0, 0, -1, 1]))))
    return raw_safetensors(text, data, header_len=max(0, length))


@settings(max_examples=500, deadline=None)
@given(blob=raw_updates())
def test_fuzz_raw_safetensors_bytes_are_refused_with_a_reason_never_an_exception(blob: bytes) -> None:
    try:
        tensors = validate_update(blob, TEMPLATE, 1 << 20)
    except UpdateRejected as exc:
        assert exc.reason in REJECTION_REASONS and str(exc)
    else:  # only an update the template accepts gets through
        assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == {
            "w": ((2, 3), torch.float32),
            "b": ((3,), torch.float32),
        }


def test_the_valid_update_of_the_fuzz_above_passes() -> None:
    """The control of the fuzz: the template is reachable, so the fuzz's refusals are the header's fault."""
    assert sorted(validate_update(VALID, TEMPLATE, 1 << 20)) == ["b", "w"]
