"""Server optimizers (FedAvgM, FedAdam, FedYogi) on every strategy's aggregate.

The math against hand-computed values over two rounds (so the state is used); ``none`` publishes
the aggregate itself, bit for bit; the state lives in the Store next to its model version, a rerun
of finalize writes the same bytes, and worker processes over Redis publish the embedded run's bits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from amble.config import config_from_dict, config_to_dict
from amble.errors import ConfigError
from amble.server import MemoryStore, ParameterServer, keys
from amble.server.factory import handlers_from_store
from amble.server.tensors import decode
from amble.sim import run_experiment
from amble.strategies import BaseWork, FedAvg, FedAvgAggregator, Strategy
from amble.strategies.fedopt import FedAdam, FedAvgM
from amble.strategies.registry import build_strategy
from amble.strategies.serveropt import ServerOptimizerSettings, server_step
from tests.conftest import RedisServer
from tests.test_faults import rows, run_cli, wait_for
from tests.test_functions import INITIAL, SAMPLES, delta, make_server, upload_all
from tests.test_sim import SMALL

BASE = BaseWork(32, 1, 0.1)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- the math, two rounds by hand -------------------------------------------------------------------


def test_momentum_steps_from_the_base_with_the_accumulated_pseudo_gradient() -> None:
    # Prepare: lr 0.5, beta1 0.9; round 1's aggregate moves w by (-1, +0.5), round 2's by (-0.25, 0)
    momentum = ServerOptimizerSettings(kind="momentum", lr=0.5, beta1=0.9)
    base = {"w": t(1.0, 2.0), "steps": torch.tensor(7)}

    # Execute
    x1, state1 = server_step(momentum, base, {"w": t(0.0, 2.5), "steps": torch.tensor(9)}, None)
    x2, state2 = server_step(momentum, x1, {"w": t(0.25, 2.25), "steps": torch.tensor(9)}, state1)

    # Assert: g1 = (1, -0.5) = m1, x1 = (1, 2) - 0.5 m1 = (0.5, 2.25)
    assert torch.equal(x1["w"], t(0.5, 2.25)) and x1["w"].dtype == torch.float32
    assert state1["m/w"].dtype == torch.float64 and state1["m/w"].tolist() == [1.0, -0.5]
    # g2 = (0.25, 0), m2 = 0.9 m1 + g2 = (1.15, -0.45), x2 = (0.5, 2.25) - 0.5 m2 = (-0.075, 2.475)
    torch.testing.assert_close(state2["m/w"], torch.tensor([1.15, -0.45], dtype=torch.float64))
    torch.testing.assert_close(x2["w"], t(-0.075, 2.475))
    assert x2["steps"].item() == 9 and set(state2) == {"m/w"}  # integers are the aggregator's, never stepped


def test_adam_without_bias_correction_over_two_rounds() -> None:
    # Prepare: lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3; round 1's pseudo-gradient is 1, round 2's is 0
    adam = ServerOptimizerSettings(kind="adam", lr=0.1)
    base = {"w": t(1.0)}

    # Execute
    x1, state1 = server_step(adam, base, {"w": t(0.0)}, None)
    x2, state2 = server_step(adam, x1, {"w": x1["w"].clone()}, state1)

    # Assert: m1 = 0.1, v1 = 0.01, x1 = 1 - 0.1 * 0.1 / (0.1 + 0.001)
    assert state1["m/w"].item() == pytest.approx(0.1) and state1["v/w"].item() == pytest.approx(0.01)
    assert x1["w"].item() == pytest.approx(1 - 0.1 * 0.1 / (0.1 + 0.001), rel=1e-6)
    # m2 = 0.09, v2 = 0.0099: the step goes on with no new pseudo-gradient (the moment remembers)
    assert state2["m/w"].item() == pytest.approx(0.09) and state2["v/w"].item() == pytest.approx(0.0099)
    assert x2["w"].item() == pytest.approx(x1["w"].item() - 0.1 * 0.09 / (math.sqrt(0.0099) + 0.001), rel=1e-6)


def test_yogi_keeps_its_second_moment_when_the_pseudo_gradient_is_zero() -> None:
    yogi = ServerOptimizerSettings(kind="yogi", lr=0.1)
    x1, state1 = server_step(yogi, {"w": t(1.0)}, {"w": t(0.0)}, None)
    x2, state2 = server_step(yogi, x1, {"w": x1["w"].clone()}, state1)

    # v1 = 0 - 0.01 * 1 * sign(0 - 1) = 0.01 (as adam's); v2 = v1 - 0.01 * 0 * sign(...) = 0.01 (adam: 0.0099)
    assert state1["v/w"].item() == pytest.approx(0.01) and state2["v/w"].item() == pytest.approx(0.01)
    assert x2["w"].item() == pytest.approx(x1["w"].item() - 0.1 * 0.09 / (0.1 + 0.001), rel=1e-6)


def test_none_publishes_the_aggregate_itself_and_running_statistics_are_never_stepped() -> None:
    new = {"w": t(0.0), "bn.running_var": t(0.5)}
    assert server_step(ServerOptimizerSettings(), {"w": t(1.0), "bn.running_var": t(1.0)}, new, None) == (new, {})

    published, state = server_step(
        ServerOptimizerSettings(kind="adam"), {"w": t(1.0), "bn.running_var": t(1.0)}, new, None
    )
    assert torch.equal(published["bn.running_var"], t(0.5)) and set(state) == {"m/w", "v/w"}


# -- through the functions and the Store ------------------------------------------------------------


def with_optimizer(strategy: Strategy, **settings: Any) -> Strategy:
    strategy.server_optimizer = ServerOptimizerSettings(**settings)
    return strategy


def run_rounds(server: ParameterServer, rounds: int) -> None:
    for r in range(rounds):
        server.start_round(r, [0, 1, 2], float(r * 10))
        upload_all(server, [0, 1, 2], round_=r)
        assert server.close_round(r, r * 10 + 5.0).status == "finalized"


def fedavg_aggregate(base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FedAvg of the three devices' deltas by hand, through the aggregator (float64, rounded once)."""
    total = sum(SAMPLES.values())
    weighted = {name: sum(SAMPLES[d] * delta(d)[name].double() for d in SAMPLES) for name in ("w", "b")}
    return FedAvgAggregator().apply(dict(base), weighted, {"num_samples": float(total)})


def test_kind_none_publishes_the_same_bits_as_a_strategy_without_a_server_optimizer() -> None:
    plain = make_server(strategy=FedAvg(BASE))
    explicit = make_server(strategy=with_optimizer(FedAvg(BASE), kind="none"))

    run_rounds(plain, 2)
    run_rounds(explicit, 2)

    assert plain.store.get(keys.model(2)) == explicit.store.get(keys.model(2))
    by_hand = fedavg_aggregate(fedavg_aggregate(INITIAL))  # the aggregator's own result, twice
    assert all(torch.equal(explicit.model()[name], by_hand[name]) for name in ("w", "b", "steps"))
    assert explicit.store.keys("serveropt/") == []  # no state, no extra key: today's behaviour


def test_fedadam_over_three_rounds_steps_from_each_aggregate_with_the_stored_state() -> None:
    # Prepare
    adam = ServerOptimizerSettings(kind="adam", lr=0.05)
    server = make_server(strategy=with_optimizer(FedAvg(BASE), kind="adam", lr=0.05))

    # Execute
    run_rounds(server, 3)

    # Assert: the published models are the optimizer's steps from each round's FedAvg aggregate, bit for
    # bit: the deltas and weights are integers, so the server's sums are exact and equal these, and the
    # step is the same function of the same inputs
    model, state = dict(INITIAL), None
    for _ in range(3):
        model, state = server_step(adam, model, fedavg_aggregate(model), state)
    published = server.model()
    assert torch.equal(published["w"], model["w"]) and torch.equal(published["b"], model["b"])
    assert published["steps"].item() == 7
    # the state sits next to the two models the store keeps; the older one went with its model
    assert server.store.keys("serveropt/") == [keys.server_optimizer_state(2), keys.server_optimizer_state(3)]
    assert state is not None and sorted(decode(server.store.get(keys.server_optimizer_state(3)) or b"")) == sorted(
        state
    )


def test_a_step_that_overflows_the_model_fails_the_round_saying_why() -> None:
    # Prepare: lr 1e39 turns w's pseudo-gradient (about -2.2) into a float32 overflow
    server = make_server(strategy=with_optimizer(FedAvg(BASE), kind="momentum", lr=1e39))
    server.start_round(0, [0, 1, 2], 0.0)
    upload_all(server, [0, 1, 2])

    # Execute
    outcome = server.close_round(0, 5.0)

    # Assert: nothing was published, and the failure names the optimizer
    state = server.round_state(0)
    assert (outcome.status, outcome.version, server.latest_version()) == ("failed", 0, 0)
    assert state is not None and "or the server_optimizer's lr (it is momentum(lr=1e+39" in (state.failure or "")
    assert server.store.keys("serveropt/") == []


class CrashBeforeDecisionStore(MemoryStore):
    """Dies once at a round's decisive compare-and-set (after the model and the state were written),
    and records every server-optimizer state written."""

    def __init__(self, round_index: int) -> None:
        super().__init__()
        self.round_key, self.armed = keys.round_state(round_index), True
        self.state_writes: list[bytes] = []

    def put(self, key: str, value: bytes) -> None:
        if key.startswith("serveropt/"):
            self.state_writes.append(value)
        super().put(key, value)

    def compare_and_set(self, key: str, value: bytes, expected_version: int) -> bool:
        if self.armed and key == self.round_key and b'"finalized"' in value:
            self.armed = False
            raise ConnectionError("instance killed before the round's decision")
        return super().compare_and_set(key, value, expected_version)


def test_a_finalize_rerun_after_a_crash_writes_the_same_state_and_publishes_the_same_model() -> None:
    # Prepare: the same run without a crash
    clean = make_server(strategy=with_optimizer(FedAvg(BASE), kind="momentum", lr=1.0, beta1=0.9))
    run_rounds(clean, 2)
    store = CrashBeforeDecisionStore(round_index=1)
    crashed = make_server(store, strategy=with_optimizer(FedAvg(BASE), kind="momentum", lr=1.0, beta1=0.9))

    # Execute
    run_rounds(crashed, 2)

    # Assert: round 1's state was written twice with the same bytes, and the model is the clean run's
    assert crashed.runtime.stats().failures == 1
    assert len(store.state_writes) == 3 and store.state_writes[1] == store.state_writes[2]
    assert crashed.store.get(keys.model(2)) == clean.store.get(keys.model(2))
    assert crashed.store.get(keys.server_optimizer_state(2)) == clean.store.get(keys.server_optimizer_state(2))


def test_a_snapshot_of_the_embedded_store_keeps_the_state(tmp_path: Path) -> None:
    server = make_server(strategy=with_optimizer(FedAvg(BASE), kind="adam"))
    run_rounds(server, 1)
    assert isinstance(server.store, MemoryStore)

    server.store.save(tmp_path / "snapshot.safetensors")
    restored = MemoryStore.load(tmp_path / "snapshot.safetensors")

    saved = server.store.get(keys.server_optimizer_state(1))
    assert saved is not None and restored.get(keys.server_optimizer_state(1)) == saved


def test_fedadam_on_redis_with_a_worker_process_publishes_the_embedded_runs_bits(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Prepare: an entry that overrides only lr (the worker rebuilds it from the config's JSON dump)
    raw = {**SMALL, "rounds": 2, "strategies": [{"name": "fedadam", "server_optimizer": {"lr": 0.03}}]}
    redis_url = redis_server.url.replace("/0", "/2")

    # Execute
    run_experiment(config_from_dict(raw), tmp_path / "embedded", progress=False)
    run_experiment(
        config_from_dict({**raw, "server": {"store": redis_url, "workers": 1}}), tmp_path / "redis", progress=False
    )

    # Assert
    embedded = (tmp_path / "embedded" / "model_fedadam.safetensors").read_bytes()
    assert (tmp_path / "redis" / "model_fedadam.safetensors").read_bytes() == embedded
    # (that the worker steps with adam at lr 0.03, not with none: test_the_worker_rebuilds_the_entry_optimizer...)


def test_an_embedded_fedadam_run_killed_mid_way_resumes_with_its_state(tmp_path: Path) -> None:
    # Prepare: a run long enough to be killed mid-way (its checkpoint is the embedded store's snapshot)
    raw = {**SMALL, "rounds": 16, "strategies": ["fedadam"]}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    driver = run_cli([str(config_file), "--out", str(out)])
    wait_for(lambda: rows(out) >= 4, 120, "4 rounds")
    driver.kill()
    driver.wait()
    assert (out / "state" / "fedadam.safetensors").is_file()

    # Execute
    resumed = run_cli(["--resume", str(out)])
    _, err = resumed.communicate(timeout=300)

    # Assert: bit for bit the uninterrupted run (a lost m or v would change every later model)
    assert resumed.returncode == 0, err.decode()
    run_experiment(config_from_dict(raw), tmp_path / "reference", progress=False)
    ours = (out / "model_fedadam.safetensors").read_bytes()
    assert ours == (tmp_path / "reference" / "model_fedadam.safetensors").read_bytes()


# -- config ------------------------------------------------------------------------------------------


def test_the_baselines_carry_their_optimizer_and_an_entry_overrides_it() -> None:
    config = config_from_dict(
        {
            "strategies": [
                "fedavgm",
                "fedadam",
                {"name": "fedadam", "label": "fast", "server_optimizer": {"lr": 0.03}},
                {"name": "fedavgm", "label": "adam", "server_optimizer": {"kind": "adam"}},
                {"name": "amble", "server_optimizer": {"kind": "momentum", "beta1": 0.8}},
            ]
        }
    )
    reread = config_from_dict(config_to_dict(config))  # what a worker process rebuilds

    described = [build_strategy(entry, reread).server_optimizer.describe() for entry in reread.strategies]
    assert described == [
        "momentum(lr=1, beta1=0.9)",
        "adam(lr=0.0316228, beta1=0.9, beta2=0.99, tau=0.001)",
        "adam(lr=0.03, beta1=0.9, beta2=0.99, tau=0.001)",
        "adam(lr=0.0316228, beta1=0.9, beta2=0.99, tau=0.001)",
        "momentum(lr=1, beta1=0.8)",
    ]
    assert isinstance(build_strategy(reread.strategies[0], reread), FedAvgM)
    assert isinstance(build_strategy(reread.strategies[1], reread), FedAdam)


def test_the_worker_rebuilds_the_entry_optimizer_from_the_run_spec() -> None:
    config = config_from_dict({**SMALL, "strategies": [{"name": "fedadam", "server_optimizer": {"lr": 0.03}}]})
    store = MemoryStore()
    store.put(keys.RUN_SPEC, json.dumps({"config": config_to_dict(config), "strategy": 0}).encode())

    functions = handlers_from_store(store)["round_ready"].__self__  # the bound ServerFunctions

    assert functions.strategy.server_optimizer.describe() == "adam(lr=0.03, beta1=0.9, beta2=0.99, tau=0.001)"


@pytest.mark.parametrize(
    ("server_optimizer", "message"),
    [
        ({"kind": "sgd"}, "server_optimizer.kind': Input should be 'none', 'momentum', 'adam' or 'yogi'"),
        ({"kind": "adam", "lr": 0}, "server_optimizer.lr': Input should be greater than 0"),
        ({"kind": "adam", "lr": float("inf")}, "server_optimizer.lr': Input should be a finite number"),
        ({"kind": "momentum", "beta1": 1.0}, "server_optimizer.beta1': Input should be less than 1"),
        ({"kind": "adam", "beta2": -0.1}, "server_optimizer.beta2': Input should be greater than or equal to 0"),
        ({"kind": "adam", "tau": 0}, "server_optimizer.tau': Input should be greater than 0"),
        ({"kind": "adam", "momentum": 0.9}, "server_optimizer.momentum': Extra inputs are not permitted"),
        ({"lr": 0.1}, "server_optimizer sets lr but its kind is none, so they would be ignored: set server_optimizer"),
    ],
)
def test_a_bad_server_optimizer_is_a_config_error_naming_the_key(
    server_optimizer: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"strategies": [{"name": "fedavg", "server_optimizer": server_optimizer}]})
