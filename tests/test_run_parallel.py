"""``run.parallel``: strategies played in processes of their own give the sequential run's results bit
for bit, and a parallel run killed part-way resumes to the same outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from amble.config import config_from_dict
from amble.errors import ConfigError
from amble.sim import parallel, run_experiment
from tests.test_sim import MEASURED_METRICS, MEASURED_SUMMARY, RESUMABLE, read_jsonl

PARALLEL: dict[str, Any] = {**RESUMABLE, "run": {"parallel": 2}}
SEQUENTIAL: dict[str, Any] = {**RESUMABLE, "run": {"parallel": 1}}
REPO = Path(__file__).resolve().parents[1]


def _without(rows: list[dict[str, Any]], measured: set[str]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in measured} for row in rows]


def _assert_same_results(out: Path, reference: Path) -> None:
    """Every output figure but the wall-clock measurements, bit for bit; the models byte for byte."""
    assert _without(read_jsonl(out / "metrics.jsonl"), MEASURED_METRICS) == _without(
        read_jsonl(reference / "metrics.jsonl"), MEASURED_METRICS
    )
    assert read_jsonl(out / "devices.jsonl") == read_jsonl(reference / "devices.jsonl")
    ours, theirs = (json.loads((d / "summary.json").read_text())["strategies"] for d in (out, reference))
    assert list(ours) == list(theirs)
    for label, figures in theirs.items():
        assert _without([ours[label]], MEASURED_SUMMARY) == _without([figures], MEASURED_SUMMARY)
        model = f"model_{label}.safetensors"
        assert (out / model).read_bytes() == (reference / model).read_bytes()
    assert not (out / "state").exists()


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sequential")
    run_experiment(config_from_dict(SEQUENTIAL), out, progress=False)
    return out


def test_parallel_strategies_give_the_sequential_results_bit_for_bit(sequential_run: Path, tmp_path: Path) -> None:
    # Execute: the same run with both strategies at once (the config differs only in run.parallel)
    run_experiment(config_from_dict(PARALLEL), tmp_path, progress=False)

    # Assert: rows in strategy order, as a sequential run writes them
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["strategy"], r["round"]) for r in rows] == [(s, r) for s in ("fedavg", "amble") for r in range(6)]
    _assert_same_results(tmp_path, sequential_run)


def test_a_killed_parallel_run_resumes_to_the_same_results(sequential_run: Path, tmp_path: Path) -> None:
    # Prepare: `amble run` with both strategies in processes of their own, killed (SIGKILL, no clean-up)
    # once some round of each has been checkpointed
    config = tmp_path / "parallel.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(PARALLEL))))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "amble", "run", str(config), "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    rows = out / "state" / parallel.ROWS_DIR
    deadline = time.monotonic() + 600
    while not all(_rounds_written(rows / str(i)) >= 2 for i in (0, 1)):
        assert process.poll() is None, "the run ended before it could be killed part-way: make it longer"
        assert time.monotonic() < deadline, "no checkpointed rounds after 600 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    # Execute
    run_experiment(config_from_dict(PARALLEL), out, progress=False, resume=True)

    # Assert
    _assert_same_results(out, sequential_run)


def _rounds_written(rows_dir: Path) -> int:
    metrics = rows_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def test_auto_plays_as_many_strategies_as_the_cores_and_threads_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    def processes(cores: int, **run: Any) -> int:
        monkeypatch.setattr(parallel, "usable_cores", lambda: cores)
        return parallel.processes_for(config_from_dict({**RESUMABLE, "run": run}), None)

    assert processes(8) == 2  # two strategies
    assert processes(1) == 1
    assert processes(8, threads=4) == 2 and processes(8, threads=6) == 1
    assert processes(1, parallel=2) == 2  # asked for: as many as there are strategies
    redis = config_from_dict({**RESUMABLE, "server": {"store": "redis://127.0.0.1:6379/0"}})
    assert parallel.processes_for(redis, None) == 1  # the functions' workers are the run's parallelism there


def test_a_model_in_memory_cannot_be_played_in_another_process() -> None:
    with pytest.raises(ConfigError, match="model factory passed in memory"):
        parallel.processes_for(config_from_dict(PARALLEL), lambda shape, classes: None)  # type: ignore[arg-type,return-value]
    assert parallel.processes_for(config_from_dict({**RESUMABLE}), lambda shape, classes: None) == 1  # type: ignore[arg-type,return-value]


def test_parallel_needs_an_embedded_run() -> None:
    with pytest.raises(ConfigError, match=r"run\.parallel 2 plays strategies in separate processes"):
        config_from_dict({**PARALLEL, "server": {"store": "redis://127.0.0.1:6379/0"}})
