"""SCAFFOLD's control variates (option II, kept server-side): the update rule on hand-computed tensors,
exactly once under duplicates, redeliveries and crashes, rejected and failed rounds changing nothing,
the same bits on every runtime, and end-to-end runs of ``scaffold`` and AMBLE with control variates."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import torch

from amble.client import LocalTrainer
from amble.config import config_from_dict
from amble.data import make_synthetic
from amble.errors import ConfigError
from amble.models import build_model
from amble.server import Invocation, MemoryStore, ParameterServer, ServerFunctions, keys
from amble.server.functions import controlvariates
from amble.server.runtime.base import FUNCTIONS_GROUP, FUNCTIONS_TOPIC
from amble.server.tensors import encode, template_of
from amble.sim import run_experiment
from amble.sim.vectorized import VectorizedTrainer
from amble.strategies import BaseWork, Plan, Report
from amble.strategies.base import DeviceState
from amble.strategies.registry import STRATEGIES
from amble.strategies.scaffold import Scaffold
from tests.conftest import RedisServer
from tests.test_functions import INITIAL, SAMPLES, CrashingStore, HugeWeightFedAvg, make_server
from tests.test_sim import SMALL
from tests.test_vectorized import in_float64, order_bound

TEMPLATE = template_of({"w": INITIAL["w"], "b": INITIAL["b"]})


class TwoPlans(Scaffold):
    """Device 0: 2 steps at lr 0.1; device 1: up to 5 steps at lr 0.25, stopping at a deadline; device 2: 4
    steps at lr 0.1."""

    def plan(self, round_index: int, devices: Sequence[DeviceState]) -> dict[int, Plan]:
        cut = Plan(32, 5, 0.25, deadline_s=10.0, at_deadline="stop")
        plans = {0: Plan(32, 2, 0.1), 1: cut, 2: Plan(32, 4, 0.1)}
        return {d.device: plans[d.device] for d in devices}


STEPS = {0: 2, 1: 4, 2: 4}
"""Steps each device reports: device 1 stopped one step short of its plan at its deadline (its first
report: the server has no speed of it to doubt the 4 by), so eta_1 = 4 * 0.25 = 1."""


def report(device: int, round_: int = 0) -> Report:
    return Report(round_, device, SAMPLES[device], STEPS[device], 32, 1.0, 0.1, 0.1)


def delta(device: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(device + 1)), "b": torch.tensor([-float(device)])}


def scaffold_server(store: MemoryStore | None = None, per_round: int = 3, quorum: float = 0.5) -> ParameterServer:
    return make_server(store, quorum=quorum, per_round=per_round, strategy=TwoPlans(BaseWork(32, 1, 0.1)))


def variates(server: ParameterServer, version: int) -> dict[str, dict[str, list[float]]]:
    """c for ``version`` and every device's c_k, as lists (zeros where nothing was stored)."""
    store = server.store
    found = {"c": controlvariates.server_variate(store, version, TEMPLATE)}
    found.update({f"c{k}": controlvariates.device_variate(store, k, TEMPLATE) for k in SAMPLES})
    return {name: {t: v.tolist() for t, v in sorted(p.items())} for name, p in found.items()}


def candidates(server: ParameterServer) -> list[str]:
    """Every device control-variate blob left in the store (current c_k and pending candidates)."""
    return sorted(key for k in SAMPLES for key in server.store.keys(keys.device_variate_prefix(k)))


def one_round_of_0_and_1(server: ParameterServer) -> None:
    server.start_round(0, [0, 1], 0.0)
    server.upload(report(0), encode(delta(0)), 0.0)
    server.upload(report(1), encode(delta(1)), 1.0)
    server.close_round(0, 2.0)


def test_the_update_rule_on_two_devices_with_different_steps_and_learning_rates() -> None:
    # Prepare: 3 registered devices with 64, 192 and 128 samples (shares 1/6, 1/2, 1/3); round 0 counts 0 and 1
    server = scaffold_server(per_round=2)

    # Execute
    one_round_of_0_and_1(server)

    # Assert: c_k+ = c_k - c - delta_k / eta_k with eta_0 = 2 * 0.1, eta_1 = 4 * 0.25 (steps reported)
    # c_0 = -(1, 1, 1; 0) / 0.2 = (-5; 0); c_1 = -(2, 2, 2; -1) / 1 = (-2; 1); c_2 untouched
    # c+ = c_0 / 6 + c_1 / 2 = (-5/6 - 1; 1/2) = (-11/6; 1/2)
    after = variates(server, 1)
    assert after["c0"] == {"b": [0.0], "w": [-5.0] * 3}
    assert after["c1"] == {"b": [1.0], "w": [-2.0] * 3}
    assert after["c2"] == {"b": [0.0], "w": [0.0] * 3}
    assert after["c"]["w"] == pytest.approx([-11 / 6] * 3) and after["c"]["b"] == pytest.approx([1 / 2])
    # the model is FedAvg's: w + (64 * 1 + 192 * 2) / 256, b + (64 * 0 - 192 * 1) / 256
    assert server.model()["w"].tolist() == pytest.approx([2.75, 3.75, 4.75])
    assert server.model()["b"].tolist() == pytest.approx([-0.25])
    # what each device's trainer adds to its gradients in round 1: c - c_k
    shifts = controlvariates.corrections(server.store, [0, 1, 2], 1)
    assert shifts is not None
    assert shifts[0]["w"].tolist() == pytest.approx([-11 / 6 + 5] * 3) and shifts[0]["b"].tolist() == pytest.approx(
        [1 / 2]
    )
    assert shifts[2]["w"].tolist() == pytest.approx([-11 / 6] * 3)

    # Execute: round 1 counts device 0 only (device 1 misses it; quorum 1 of 2)
    server.start_round(1, [0, 1], 3.0)
    server.upload(report(0, 1), encode(delta(0)), 3.5)
    outcome = server.close_round(1, 4.0)

    # Assert: c_0 = -5 + 11/6 - 5 = -49/6 (w), 0 - 1/2 - 0 = -1/2 (b); c_1 unchanged;
    # c = -11/6 + (-49/6 + 5) / 6 = -85/36 (w), 1/2 + (-1/2) / 6 = 5/12 (b)
    assert (outcome.status, outcome.counted) == ("finalized", [0])
    after = variates(server, 2)
    assert after["c0"]["w"] == pytest.approx([-49 / 6] * 3) and after["c0"]["b"] == pytest.approx([-1 / 2])
    assert after["c1"] == {"b": [1.0], "w": [-2.0] * 3}
    assert after["c"]["w"] == pytest.approx([-85 / 36] * 3) and after["c"]["b"] == pytest.approx([5 / 12])
    # only the current c_k are kept, and c of the latest two versions (like the models)
    assert candidates(server) == [keys.device_variate(0, 1, "3"), keys.device_variate(1, 0, "2")]
    assert server.store.keys(keys.SERVER_VARIATE_PREFIX) == [keys.server_variate(1), keys.server_variate(2)]


def test_the_sum_of_learning_rates_follows_the_warm_up() -> None:
    plan = Plan(32, 5, 0.1, lr_warmup_steps=2, lr_warmup_from=0.05)
    assert controlvariates.lr_sum(plan, 3) == pytest.approx(0.05 + 0.075 + 0.1)
    assert controlvariates.lr_sum(Plan(32, 5, 0.1), 3) == pytest.approx(0.3)


def test_the_trainer_adds_the_correction_to_every_gradient() -> None:
    # Prepare: the same start, data and seed with and without a correction s = c - c_k
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    shift = {"weight": torch.full((3, 4), 0.5), "bias": torch.tensor([1.0, -1.0, 2.0])}
    trainer = LocalTrainer(model)
    plan = Plan(16, 1, 0.1)

    # Execute
    plain = trainer.train(start, x, y, plan, seed=1)
    corrected = trainer.train(start, x, y, plan, seed=1, correction=shift)

    # Assert: one SGD step from the same point and gradient g: the deltas differ by -lr * s, up to the
    # roundings (u = 2**-24 of each value) of g + s, of lr times it, of w minus that, and of each delta
    # w' - w and of their difference: within 6 u (|w| + |lr (g + s)| + |lr g|) of it.
    u = 2.0**-24
    for name in ("weight", "bias"):
        scale = sum(float(t.abs().max()) for t in (start[name], corrected.delta[name], plain.delta[name]))
        expected = -0.1 * shift[name]
        torch.testing.assert_close(corrected.delta[name] - plain.delta[name], expected, rtol=0, atol=6 * u * scale)


def test_a_duplicate_a_redelivery_and_a_crash_mid_fold_leave_the_variates_of_one_fold() -> None:
    # Prepare: the reference, one clean fold per device
    clean = scaffold_server(per_round=2)
    one_round_of_0_and_1(clean)

    # Execute: a crashing instance, a retried upload, a worker dying on an event (device 0's first upload,
    # so its retry is folded first and the redelivered first upload is the duplicate)
    messy = scaffold_server(CrashingStore(crashes=2), per_round=2)
    messy.start_round(0, [0, 1], 0.0)
    messy.upload(report(0), encode(delta(0)), 0.0)
    messy.upload(report(1), encode(delta(1)), 1.0)
    taken = messy.events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, "dead-worker", count=1)
    assert taken and taken[0].type == "update_uploaded"
    messy.upload(report(0), encode(delta(0)), 1.5)  # a retry: the same update again, a new upload id
    outcome = messy.close_round(0, 2.0)

    # Assert
    assert sorted(outcome.counted) == [0, 1] and messy.runtime.stats().failures == 2
    assert variates(messy, 1) == variates(clean, 1)
    assert candidates(clean) == [keys.device_variate(0, 0, "1"), keys.device_variate(1, 0, "2")]
    assert candidates(messy) == [keys.device_variate(0, 0, "3"), keys.device_variate(1, 0, "2")]
    assert torch.equal(messy.model()["w"], clean.model()["w"])


def test_a_rejected_update_and_a_failed_round_leave_the_variates_unchanged() -> None:
    # Prepare: device 1's update overflows the sum (rejected after its candidate was computed)
    server = make_server(
        quorum=0.5, per_round=3, strategy=TwoPlans(BaseWork(32, 1, 0.1), aggregator=HugeWeightFedAvg())
    )
    server.start_round(0, [0, 1, 2], 0.0)
    server.upload(report(0), encode(delta(0)), 0.0)
    server.upload(report(1), encode({"w": torch.full((3,), 3e38), "b": torch.tensor([0.0])}), 1.0)
    server.upload(report(2), encode(delta(2)), 2.0)

    # Execute
    outcome = server.close_round(0, 3.0)

    # Assert: c_1 stays zero, and c+ is c_0 / 6 + c_2 / 3 with c_0 = (-5; 0), c_2 = -(3; -2) / 0.4 = (-7.5; 5)
    assert (outcome.counted, outcome.rejected) == ([0, 2], {1: "overflow"})
    after = variates(server, 1)
    assert after["c1"] == {"b": [0.0], "w": [0.0] * 3}
    assert after["c"]["w"] == pytest.approx([-10 / 3] * 3) and after["c"]["b"] == pytest.approx([5 / 3])
    assert candidates(server) == [keys.device_variate(0, 0, "1"), keys.device_variate(2, 0, "3")]

    # Execute: round 1 fails below quorum (1 of 3 counted, quorum 2)
    before = variates(server, 1)
    server.start_round(1, [0, 1, 2], 4.0)
    server.upload(report(0, 1), encode(delta(0)), 4.5)
    failed = server.close_round(1, 5.0)

    # Assert: nothing moved, the failed round's candidate is gone, no c for a version never published
    assert failed.status == "failed"
    assert variates(server, 1) == before
    assert candidates(server) == [keys.device_variate(0, 0, "1"), keys.device_variate(2, 0, "3")]
    assert server.store.get(keys.server_variate(2)) is None


SCAFFOLD_RUN = {**SMALL, "rounds": 2, "strategies": ["scaffold"]}


def test_the_first_round_of_scaffold_is_fedavgs_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: c = c_k = 0 in round 0, so the correction is zero
    config = config_from_dict({**SMALL, "rounds": 1, "strategies": ["fedavg", "scaffold"]})

    # Execute
    run_experiment(config, tmp_path, progress=False)

    # Assert
    assert (tmp_path / "model_fedavg.safetensors").read_bytes() == (
        tmp_path / "model_scaffold.safetensors"
    ).read_bytes()


def test_embedded_and_redis_with_worker_processes_publish_the_same_bits(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Execute: the second round trains with non-zero corrections read from each store
    embedded = run_experiment(config_from_dict(SCAFFOLD_RUN), tmp_path / "a", progress=False)
    workers = {"store": redis_server.url, "workers": 2}
    remote = run_experiment(config_from_dict({**SCAFFOLD_RUN, "server": workers}), tmp_path / "b", progress=False)

    # Assert
    assert embedded["strategies"]["scaffold"]["updates_aggregated"] == 8
    assert remote["strategies"]["scaffold"]["updates_aggregated"] == 8
    model_a = (tmp_path / "a" / "model_scaffold.safetensors").read_bytes()
    assert model_a == (tmp_path / "b" / "model_scaffold.safetensors").read_bytes()


def test_amble_with_control_variates_runs_end_to_end_and_trains_differently(tmp_path: Path) -> None:
    # Prepare
    amble = {"name": "amble", "batch_max": 128}
    config = config_from_dict(
        {**SMALL, "rounds": 3, "strategies": [amble, {**amble, "control_variates": True, "label": "amble_cv"}]}
    )

    # Execute
    summary = run_experiment(config, tmp_path, progress=False)["strategies"]

    # Assert: every update counted; round 0 equal (zero corrections), the corrected runs differ after
    assert summary["amble_cv"]["updates_aggregated"] == summary["amble"]["updates_aggregated"] == 12
    assert summary["amble_cv"]["updates_rejected"] == summary["amble_cv"]["rounds_failed"] == 0
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    loss = {(r["strategy"], r["round"]): r["loss"] for r in rows}
    assert loss[("amble", 0)] == loss[("amble_cv", 0)]
    assert loss[("amble", 2)] != loss[("amble_cv", 2)]


def test_scaffold_is_a_built_in_and_is_refused_where_it_cannot_run_yet(tmp_path: Path) -> None:
    assert STRATEGIES["scaffold"] is Scaffold
    with pytest.raises(ConfigError, match="do not train on Ray yet"):
        config_from_dict({**SMALL, "strategies": ["scaffold"], "ray": {"train": True}})
    with pytest.raises(ConfigError, match="do not train on Ray yet"):
        config_from_dict({**SMALL, "strategies": [{"name": "amble", "control_variates": True}], "ray": {"train": True}})
    from amble.live.serve import prepare

    with pytest.raises(ConfigError, match="not supported on real devices yet"):
        prepare(config_from_dict({**SMALL, "strategies": ["scaffold"]}), tmp_path)


class RacingStore(MemoryStore):
    """Runs ``hook`` (once) just before the next commit: another instance folding in between."""

    hook: Callable[[], None] | None = None

    def commit(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return super().commit(writes)


def test_of_two_racing_uploads_of_a_device_the_counted_one_sets_its_variate() -> None:
    # Prepare: device 1 is folded; device 0 sends an update and a retry with other bytes, and two
    # instances take them at once: the retry's fold commits between the first's computation and commit
    store = RacingStore()
    server = scaffold_server(store, per_round=2)
    server.start_round(0, [0, 1], 0.0)
    server.upload(report(1), encode(delta(1)), 1.0)
    server.run_functions()
    server.upload(report(0), encode(delta(0)), 1.5)
    server.upload(report(0), encode(delta(2)), 1.6)
    first, retry = server.events.read(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, "racer", count=2)
    functions = ServerFunctions(store, TwoPlans(BaseWork(32, 1, 0.1)))
    store.hook = lambda: functions.aggregate(retry, Invocation(98, True, {}, shard=98))

    # Execute
    functions.aggregate(first, Invocation(99, True, {}, shard=99))  # computes its candidate, loses the commit
    for event in (first, retry):
        server.events.ack(FUNCTIONS_TOPIC, FUNCTIONS_GROUP, event.id)
    outcome = server.close_round(0, 2.0)

    # Assert: both the model and c_0 come from the retry, delta(2) = (3; -2):
    # w + (64 * 3 + 192 * 2) / 256 and c_0 = -(3; -2) / 0.2; the first upload's candidate is gone
    assert sorted(outcome.counted) == [0, 1]
    assert server.model()["w"].tolist() == pytest.approx([1 + 2.25, 2 + 2.25, 3 + 2.25])
    assert variates(server, 1)["c0"] == {"b": [10.0], "w": [-15.0] * 3}
    assert candidates(server) == [keys.device_variate(0, 0, "3"), keys.device_variate(1, 0, "1")]


def test_vectorised_training_applies_each_devices_own_correction_as_the_per_device_path_does() -> None:
    # Prepare: three devices on one plan (momentum and weight decay on), two corrections and one None
    torch.manual_seed(0)
    model = build_model("mlp-small", (1, 28, 28), 10)
    data = make_synthetic(num_train=150, num_test=10, seed=1)
    shards = in_float64(
        model, [(data.x_train[i * 50 : (i + 1) * 50], data.y_train[i * 50 : (i + 1) * 50]) for i in range(3)]
    )
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    shifts: list[dict[str, torch.Tensor] | None] = [
        {n: torch.full_like(start[n], 0.3) for n in names},
        None,
        {n: torch.randn_like(start[n]) for n in names},
    ]
    plan, seeds = Plan(16, 4, 0.05), [1, 2, 3]

    # Execute
    vectorized = VectorizedTrainer(model, 0.5, 1e-3).train(start, shards, plan, seeds, shifts)
    looped = [
        LocalTrainer(model, 0.5, 1e-3).train(start, x, y, plan, seed, correction=shift)
        for (x, y), seed, shift in zip(shards, seeds, shifts, strict=True)
    ]

    # Assert: equal up to the order of float64 sums (and the correction's place in one addition, a
    # rounding of a weight's size, far below the bound), and the correction changed the corrected devices
    plain = LocalTrainer(model, 0.5, 1e-3).train(start, *shards[0], plan, seeds[0])
    for v, loop in zip(vectorized, looped, strict=True):
        for name in names:
            torch.testing.assert_close(v.delta[name], loop.delta[name], rtol=0, atol=order_bound(plan, momentum=0.5))
    assert not torch.allclose(looped[0].delta[names[0]], plain.delta[names[0]])


def test_an_update_whose_control_variate_would_overflow_is_refused_before_its_fold() -> None:
    # Prepare: device 0 (eta 0.2) sends 3e38, finite in float32 and in the float64 sum, but 3e38 / 0.2 is not
    server = scaffold_server(per_round=2)
    server.start_round(0, [0, 1], 0.0)

    # Execute
    server.upload(report(0), encode({"w": torch.full((3,), 3e38), "b": torch.tensor([0.0])}), 0.0)
    server.upload(report(1), encode(delta(1)), 1.0)
    outcome = server.close_round(0, 2.0)

    # Assert: only device 1 counted; c = c_1 / 2 = (-1; 1/2), c_0 still zero, nothing of device 0 kept
    assert (outcome.counted, outcome.rejected) == ([1], {0: "overflow"})
    after = variates(server, 1)
    assert after["c0"] == {"b": [0.0], "w": [0.0] * 3}
    assert after["c"]["w"] == pytest.approx([-1.0] * 3) and after["c"]["b"] == pytest.approx([1 / 2])
    assert candidates(server) == [keys.device_variate(1, 0, "2")]


def test_a_late_duplicate_finalize_cannot_overwrite_the_published_server_variate() -> None:
    # Prepare: round 0 decided and settled: the device pointers already name their new c_k
    server = scaffold_server(per_round=2)
    one_round_of_0_and_1(server)
    published = variates(server, 1)["c"]
    meta = json.loads(server.store.get(keys.round_meta(0)) or b"{}")

    # Execute: a second finalize of round 0 that lost the race computes c+ from the moved pointers
    uploads = controlvariates.counted_uploads(meta)
    shares = {0: 1 / 6, 1: 1 / 2}
    controlvariates.publish_server_variate(server.store, TEMPLATE, 0, 0, uploads, shares)

    # Assert: what it computed (c_k+ - c_k = 0 for both, so c+ = c = 0) did not replace the winner's c+
    assert variates(server, 1)["c"] == published
    assert published["w"] == pytest.approx([-11 / 6] * 3)


def test_control_variates_with_client_momentum_are_refused() -> None:
    for strategy in ("scaffold", {"name": "amble", "control_variates": True}):
        raw = {**SMALL, "strategies": [strategy], "train": {**SMALL["train"], "momentum": 0.9}}
        with pytest.raises(ConfigError, match=r"set train\.momentum to 0"):
            config_from_dict(raw)
