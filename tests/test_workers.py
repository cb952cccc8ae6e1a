"""Simulations through Redis and real ``amble worker`` processes: the same run as the embedded one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from amble.config import config_from_dict
from amble.errors import AmbleError
from amble.sim import run_experiment
from tests.conftest import RedisServer
from tests.test_sim import SMALL


def _config(url: str, **server: Any) -> Any:
    return config_from_dict({**SMALL, "strategies": ["fedavg"], "server": {"store": url, **server}})


def test_a_run_through_redis_and_two_workers_matches_the_embedded_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    embedded = run_experiment(config_from_dict({**SMALL, "strategies": ["fedavg"]}), tmp_path / "a", progress=False)
    redis_run = run_experiment(_config(redis_server.url, workers=2), tmp_path / "b", progress=False)
    a, b = embedded["strategies"]["fedavg"], redis_run["strategies"]["fedavg"]
    assert b["updates_aggregated"] == a["updates_aggregated"] == 16
    # The sums do not depend on which worker folded what (server.partialsum): the same model, bit for bit.
    assert (tmp_path / "b" / "model_fedavg.safetensors").read_bytes() == (
        tmp_path / "a" / "model_fedavg.safetensors"
    ).read_bytes()
    assert b["final_accuracy"] == a["final_accuracy"]
    assert b["function_invocations"] == a["function_invocations"]
    assert b["cold_starts"] >= 1


def test_no_worker_is_a_clear_error_not_a_hang(redis_server: RedisServer, tmp_path: Path) -> None:
    lonely = redis_server.url.replace("/0", "/1")  # a database no worker of another test ever beat in
    with pytest.raises(AmbleError, match="no amble worker is serving"):
        run_experiment(_config(lonely, workers=0), tmp_path, progress=False)
