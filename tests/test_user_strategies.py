"""Strategies and aggregators of the user's own, named by import path, end to end and when they are wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from amble.cli import main
from amble.config import config_from_dict, strategy_label
from amble.live.serve import device_config, prepare
from amble.server import keys
from amble.server.runtime.workers import worker_command
from amble.server.store.redis import RedisStore, wipe
from amble.sim import run_experiment
from amble.strategies import build_strategy
from tests.conftest import RedisServer
from tests.test_sim import SMALL, read_jsonl
from tests.user_strategies import HalfStep, ParityPlans

ROOT = Path(__file__).resolve().parents[1]
PARITY = "tests.user_strategies:ParityPlans"
HALF_STEP = "tests.user_strategies:HalfStep"


def write_config(tmp_path: Path, **changes: Any) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({**SMALL, **changes}))  # JSON is YAML
    return config


def test_a_user_strategy_runs_end_to_end_and_plans_what_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 3 rounds of 4 devices; lr0 = 0.05
    config = write_config(
        tmp_path, rounds=3, strategies=[{"name": PARITY, "steps": 3, "lr_factor": 0.5}, {"name": PARITY, "label": "p2"}]
    )

    # Execute
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"])

    # Assert: every device ran exactly its plan: batch 8 (even) / 16 (odd), steps + round, lr_factor * lr0
    assert code == 0
    rows = read_jsonl(tmp_path / "out" / "devices.jsonl")
    mine = [r for r in rows if r["strategy"] == "ParityPlans"]  # an import path is filed under its class name
    assert len(mine) == 12 and {r["round"] for r in mine} == {0, 1, 2}
    for r in mine:
        assert (r["batch_size"], r["local_steps"], r["lr"]) == (
            8 if r["device"] % 2 == 0 else 16,
            3 + r["round"],
            pytest.approx(0.025),
        )
    defaults = [r for r in rows if r["strategy"] == "p2"]
    assert {(r["round"], r["local_steps"], r["lr"]) for r in defaults} == {(0, 2, 0.05), (1, 3, 0.05), (2, 4, 0.05)}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["strategies"]["ParityPlans"]["updates_aggregated"] == 12
    assert summary["config"]["strategies"][0] == {
        "name": PARITY, "label": None, "aggregator": None, "server_optimizer": None, "steps": 3, "lr_factor": 0.5
    }  # fmt: skip
    assert "ParityPlans" in capsys.readouterr().out


def test_a_user_aggregator_is_built_from_the_config_and_applies_its_rule() -> None:
    # Prepare: the config-wide aggregator and a strategy's own, each by import path
    config = config_from_dict(
        {**SMALL, "aggregator": HALF_STEP, "strategies": ["fedavg", {"name": PARITY, "aggregator": "fednova"}]}
    )
    fedavg, parity = (build_strategy(s, config) for s in config.strategies)
    x = {"w": torch.tensor([1.0, 2.0])}
    summed = {"w": torch.tensor([4.0, -8.0])}  # sum_k n_k Delta_k over 4 samples: a mean update of [1, -2]

    # Execute
    stepped = fedavg.aggregator.apply(x, summed, {"num_samples": 4.0})

    # Assert: x + 0.5 * [1, -2]; the strategy's own key wins over the config-wide one
    assert isinstance(fedavg.aggregator, HalfStep) and isinstance(parity, ParityPlans)
    assert torch.equal(stepped["w"], torch.tensor([1.5, 1.0]))
    assert parity.aggregator.name == "fednova"


def test_a_user_aggregator_runs_the_same_in_amble_worker_processes(redis_server: RedisServer, tmp_path: Path) -> None:
    # Prepare: one config with the user's aggregator, run embedded and through Redis with one worker process
    base = {**SMALL, "rounds": 2, "strategies": ["fedavg"]}
    plain = run_experiment(config_from_dict(base), tmp_path / "plain", progress=False)
    half = {**base, "aggregator": HALF_STEP}

    # Execute
    run_experiment(config_from_dict(half), tmp_path / "embedded", progress=False)
    remote = run_experiment(
        config_from_dict({**half, "server": {"store": redis_server.url, "workers": 1}}),
        tmp_path / "workers",
        progress=False,
    )

    # Assert: the worker (another process) folded with HalfStep: the very model the embedded run published,
    # which is not FedAvg's
    assert plain["strategies"]["fedavg"]["updates_aggregated"] == remote["strategies"]["fedavg"]["updates_aggregated"]
    models = [load_file(tmp_path / run / "model_fedavg.safetensors") for run in ("plain", "embedded", "workers")]
    assert models[1].keys() == models[2].keys()
    assert all(torch.equal(models[1][name], models[2][name]) for name in models[1])
    assert not all(torch.equal(models[0][name], models[1][name]) for name in models[0])


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ({"strategies": [{"name": "tests.nowhere:Mine"}]}, ["no module named 'tests.nowhere'", "PYTHONPATH"]),
        ({"strategies": [{"name": "tests.user_strategies:Missing"}]}, ["has no attribute 'Missing'", "ParityPlans"]),
        ({"strategies": [{"name": HALF_STEP}]}, ["not a subclass of amble.strategies.Strategy"]),
        ({"strategies": [{"name": "tests.user_strategies:NOT_A_CLASS"}]}, ["is a int, not a subclass"]),
        ({"strategies": [{"name": "tests.user_strategies"}]}, ["unknown strategy", "package.module:Class"]),
        ({"strategies": [{"name": PARITY, "stepz": 2}]}, ["no setting 'stepz'", "steps, lr_factor"]),
        ({"strategies": [{"name": PARITY, "steps": 0}]}, ["key 'strategies.0.steps'"]),
        ({"aggregator": PARITY}, ["key 'aggregator'", "not a subclass of amble.strategies.Aggregator"]),
        ({"strategies": [{"name": "fedavg", "aggregator": "tests.nowhere:Agg"}]}, ["strategies.0.aggregator"]),
    ],
)
def test_a_wrong_user_strategy_or_aggregator_exits_2_saying_what_to_fix(
    entry: dict[str, Any], fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, **entry)

    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"])

    err = capsys.readouterr().err
    assert code == 2
    assert all(fragment in err for fragment in fragments), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_worker_that_cannot_import_the_strategy_says_so_once_and_serves_on(redis_server: RedisServer) -> None:
    # Prepare: a run whose spec names a module this worker's machine does not have (its package allowed)
    namespace = "byo-missing-module"
    store = RedisStore(redis_server.url, namespace)
    config = {**SMALL, "strategies": [{"name": "not_installed_here.strats:Mine"}]}
    store.put(keys.RUN_SPEC, json.dumps({"config": config, "strategy": 0}).encode())
    store.put(keys.POOL, json.dumps({}).encode())

    # Execute
    try:
        done = subprocess.run(
            worker_command(
                redis_server.url, "--namespace", namespace, "--idle-exit-s", "2", "--allow-import", "not_installed_here"
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        wipe(store.client, namespace)
        store.close()

    # Assert: the run is skipped, saying why once; the worker stays up for other runs (here: until idle)
    assert done.returncode == 0
    assert done.stderr.count("no module named 'not_installed_here'") == 1 and "PYTHONPATH" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_readme_example_strategy_runs_with_amble_run(tmp_path: Path) -> None:
    # Prepare: the README's command, on synthetic data with a tiny budget
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])}
    budget = ["data.dataset=synthetic", "data.num_devices=8", "devices_per_round=4", "rounds=3", "model=mlp"]
    budget += ["fleet.t_ref={16: 0.002, 32: 0.003, 64: 0.005}"]

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "amble", "run", str(ROOT / "examples" / "my_strategy.yaml"), "--out", str(out)]
        + [f"--set={item}" for item in budget]
        + ["--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    # Assert: a device ran fast_epochs (3) or E0 (1) epochs' steps, E0 when seen for the first time,
    # and some fast device got 3
    assert done.returncode == 0, done.stderr
    rows = [r for r in read_jsonl(out / "devices.jsonl") if r["strategy"] == "fast-do-more"]
    assert len(rows) == 12
    first_steps: dict[int, int] = {}
    for r in sorted(rows, key=lambda r: r["round"]):
        first_steps.setdefault(r["device"], r["local_steps"])
        assert r["local_steps"] in (first_steps[r["device"]], 3 * first_steps[r["device"]])
    assert any(r["local_steps"] == 3 * first_steps[r["device"]] for r in rows)


def test_the_readme_shows_the_example_strategy_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "my_strategy.py").read_text()

    assert f"```python\n{example}```" in readme


def test_amble_serve_plans_with_a_user_strategy_and_tells_devices_nothing_of_it(tmp_path: Path) -> None:
    # Prepare: serve the user's strategy (lr0 = 0.05)
    config = config_from_dict({**SMALL, "strategies": ["fedavg", {"name": PARITY, "steps": 5, "lr_factor": 2.0}]})
    served = prepare(config, tmp_path / "serve", strategy="ParityPlans")

    # Execute: the first round's plans, as the gateway hands them out
    plans, _ = served.coordinator.server.start_round(0, list(range(8)), 0.0)

    # Assert: the user's rule, and a device's view of the config names no strategy it could import
    assert served.label == "ParityPlans" and len(plans) == 4
    assert {k: (p.batch_size, p.local_steps, p.lr) for k, p in plans.items()} == {
        k: (8 if k % 2 == 0 else 16, 5, 0.1) for k in plans
    }
    assert "strategies" not in device_config(config) and "aggregator" not in device_config(config)


def test_a_user_strategy_and_aggregator_on_ray_publish_the_embedded_models(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    # Prepare: the functions run on Ray actors (other processes), which import the user's classes there.
    # Training stays in the driver, at one thread as in the embedded run.
    mine = {**SMALL, "rounds": 2, "strategies": [{"name": PARITY, "steps": 2}], "aggregator": HALF_STEP}
    on_ray = {**mine, "server": {"store": redis_server.url, "runtime": "ray"}, "ray": {"train": False}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        # Execute
        run_experiment(config_from_dict(mine), tmp_path / "embedded", progress=False)
        run_experiment(config_from_dict(on_ray), tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)

    # Assert
    embedded, remote = (load_file(tmp_path / run / "model_ParityPlans.safetensors") for run in ("embedded", "ray"))
    assert embedded.keys() == remote.keys()
    assert all(torch.equal(embedded[name], remote[name]) for name in embedded)


def test_labels_of_built_in_and_imported_strategies() -> None:
    config = config_from_dict(
        {**SMALL, "strategies": ["fedavg", {"name": "amble", "label": "q08"}, PARITY, {"name": PARITY, "label": "x"}]}
    )

    assert [strategy_label(s) for s in config.strategies] == ["fedavg", "q08", "ParityPlans", "x"]
