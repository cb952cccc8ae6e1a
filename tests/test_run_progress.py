"""A run whose rounds fail says so (issue 21), and AMBLE as shipped makes progress on real devices.

The rule (``amble.report.progress``): failed rounds are counted in ``summary.json``, shown in the
report and warned about on stderr; a strategy that finalized fewer than two of its rounds (none of
one) stalled, and ``amble run`` / ``amble serve`` exit with status 3. The served tests run the
issue's configuration (synthetic data, ``mlp-small``, AMBLE at its shipped defaults) on a local fleet
of real ``amble device`` processes, over HTTP and HTTPS, and assert what must hold whatever the
machine's load: every round is finalized, every selected device sent an update, no device dropped
out at its deadline.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from amble.cli import main
from amble.report.progress import STALLED_EXIT_STATUS, failed_rounds_warnings, stalled
from tests.conftest import free_port

ISSUE_21: dict[str, Any] = {
    "name": "issue21",
    "seed": 0,
    "data": {"dataset": "synthetic", "synthetic_size": [1200, 300], "partition": {"kind": "iid"}, "num_devices": 5},
    "model": "mlp-small",
    "rounds": 3,
    "devices_per_round": 3,
    "strategies": ["amble"],
}


@pytest.mark.parametrize(
    ("rounds", "failed", "expected"),
    [
        (3, 0, False),
        (3, 1, False),
        (3, 2, True),
        (3, 3, True),
        (2, 1, True),
        (1, 0, False),
        (1, 1, True),
        (0, 0, False),
    ],
)
def test_a_strategy_stalled_when_at_most_one_round_published_a_model(rounds: int, failed: int, expected: bool) -> None:
    assert stalled({"rounds": rounds, "rounds_failed": failed}) is expected


def test_failed_rounds_are_warned_about_per_strategy() -> None:
    results = {"fedavg": {"rounds": 4, "rounds_failed": 0}, "amble": {"rounds": 4, "rounds_failed": 3}}

    lines = failed_rounds_warnings(results, "metrics.jsonl")

    assert len(lines) == 1 and lines[0].startswith("strategy amble: 3 of 4 rounds failed")
    assert "metrics.jsonl" in lines[0] and "no progress" in lines[0]


def test_a_simulated_run_that_made_no_progress_warns_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        **ISSUE_21,
        "fleet": {"kind": "uniform", "p_dropout": 0.9, "t_ref": {16: 0.002, 32: 0.003, 64: 0.005}},
        "server": {"quorum": 1.0},  # every selected device must be counted: with 90% dropout none is
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    status = main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])

    assert status == STALLED_EXIT_STATUS
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["strategies"]["amble"]["rounds_failed"] == 3
    assert "amble: warning: strategy amble: 3 of 3 rounds failed" in capsys.readouterr().err
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Rounds failed" in report and "Warning: strategy amble: 3 of 3 rounds failed" in report


def serve_command(config_path: Path, out: Path, port: int, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "amble", "serve", str(config_path), "--out", str(out), "--port", str(port)]
    return [*command, "--linger-s", "1", *extra]


def test_a_served_run_whose_devices_never_upload_warns_and_exits_3(tmp_path: Path) -> None:
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({**ISSUE_21, "rounds": 2}))
    out, port = tmp_path / "out", free_port()
    serve = subprocess.Popen(
        serve_command(tmp_path / "serve.yaml", out, port, "--round-timeout-s", "0.5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while not (out / "tokens.json").is_file():
            assert serve.poll() is None, serve.communicate()[1].decode()
            time.sleep(0.1)
        tokens = json.loads((out / "tokens.json").read_text())
        for device in range(3):  # registered and silent: each round waits out its timeout and fails
            headers = {"Authorization": f"Bearer {tokens[str(device)]}"}
            for _ in range(100):
                try:
                    response = httpx.post(
                        f"http://127.0.0.1:{port}/v1/register", json={"num_samples": 240}, headers=headers
                    )
                    break
                except httpx.TransportError:  # the gateway is still starting
                    time.sleep(0.1)
            assert response.status_code == 200, response.text
        _, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()

    assert serve.returncode == STALLED_EXIT_STATUS, err.decode()[-2000:]
    assert "strategy amble: 2 of 2 rounds failed" in err.decode()
    assert json.loads((out / "summary.json").read_text())["strategies"]["amble"]["rounds_failed"] == 2


@pytest.mark.e2e
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_served_amble_as_shipped_finalizes_every_round(tmp_path: Path, tls: bool) -> None:
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(ISSUE_21))
    extra = ["--local-devices", "5", "--round-timeout-s", "30"]
    if tls:
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        openssl += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
        subprocess.run(openssl, check=True, capture_output=True)
        extra += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    out = tmp_path / "out"

    served = subprocess.run(
        serve_command(tmp_path / "serve.yaml", out, free_port(), *extra), capture_output=True, timeout=600
    )

    assert served.returncode == 0, served.stderr.decode()[-3000:]
    rounds = [json.loads(line) for line in (out / "serve.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in rounds] == [(0, "finalized"), (1, "finalized"), (2, "finalized")]
    for r in rounds:
        assert r["counted"] >= math.ceil(0.5 * r["expected"]), r  # the default quorum
        assert sorted(r["arrivals"]) == sorted(r["plans"]), r  # every selected device sent its update
    for r in rounds[1:]:  # as shipped (q = 0.8), every plan after the first round has a deadline
        assert all(p["deadline_s"] is not None and p["at_deadline"] in ("stop", "probe") for p in r["plans"].values())
    for log in (out / "devices").iterdir():
        assert "dropped at the deadline" not in log.read_text(), log.name
