"""The Ray runtime and Ray device training, on a real local Ray instance (started once: it takes seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from amble.config import config_from_dict
from amble.server.events.base import Event, EventLog
from amble.server.events.redis import RedisEventLog
from amble.server.runtime.base import FUNCTIONS_TOPIC, Handler, Invocation, PoolSettings, Runtime
from amble.server.runtime.onray import RayRuntime
from amble.server.store.base import Store
from amble.server.store.redis import RedisStore
from amble.sim.driver import run_experiment
from tests.conftest import RedisServer
from tests.contract.runtime_contract import HandlersFor
from tests.test_faults import assert_same_model
from tests.test_redis import RedisRuntimeContract
from tests.test_sim import SMALL, read_jsonl

if os.environ.get("CI"):  # CI installs the extra (scripts/setup.sh --dev): a missing Ray is a failure there
    import ray
else:
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("ray_instance")
class TestRayRuntime(RedisRuntimeContract):
    """Real actors in other processes: they reach the run's state through Redis."""

    def make(self, store: Store, events: EventLog, handlers_for: HandlersFor, settings: PoolSettings) -> Runtime:
        assert isinstance(store, RedisStore) and isinstance(events, RedisEventLog)
        runtime = RayRuntime(store, events, handlers_for, settings, drain_timeout_s=60.0)
        self.runtimes.append(runtime)
        return runtime

    def test_an_instance_that_dies_mid_event_has_its_event_redelivered(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def fragile(event: Event, inv: Invocation) -> None:
                if event.deliveries == 1:
                    os._exit(1)  # the actor's process dies in the middle of the function
                store.incr(f"done/{event.payload['i']}")

            return {"work": fragile}

        store, events, runtime = self._setup(handlers_for, max_instances=2)
        for i in range(3):
            events.publish(FUNCTIONS_TOPIC, "work", {"i": i}, at_s=float(i))
        runtime.drain()
        assert [store.counter(f"done/{i}") for i in range(3)] == [1, 1, 1]
        assert events.pending(FUNCTIONS_TOPIC, "functions") == 0
        assert runtime.stats().dead_letters == 0
        real = runtime.real_instances()  # each event's first delivery killed its actor: 3 died, replaced
        assert real is not None and real["died"] == 3 and real["replacements"] >= 2
        assert sum(real["events_per_instance"]) == 3  # the survivors' records: the dead ones never wrote one

    def test_an_event_that_always_kills_its_instance_is_dead_lettered(self) -> None:
        def handlers_for(store: Store) -> Mapping[str, Handler]:
            def deadly(event: Event, inv: Invocation) -> None:
                os._exit(1)

            return {"work": deadly}

        store, events, runtime = self._setup(handlers_for, max_attempts=2)
        events.publish(FUNCTIONS_TOPIC, "work", {})
        runtime.drain()
        assert runtime.stats().dead_letters == 1
        letters = [store.get(k) or b"" for k in store.keys("runtime/dead_letter/")]
        assert len(letters) == 1 and b"died 2 times" in letters[0] and b"last error: " in letters[0]
        assert b"ActorDied" in letters[0] or b"RayActorError" in letters[0]  # what killed it, kept

    def test_the_pool_scales_with_the_virtual_clock_and_close_stops_every_actor(self) -> None:
        _store, events, runtime = self._setup(_noop, max_instances=2, keep_alive_s=5.0, cold_start_s=1.0)
        assert isinstance(runtime, RayRuntime) and runtime.actor_count == 0
        for _ in range(6):
            events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=0.0)  # a burst: more events than instances
        runtime.drain()
        assert runtime.actor_count == 2
        events.publish(FUNCTIONS_TOPIC, "work", {}, at_s=100.0)  # both instances expired long before
        runtime.drain()
        assert runtime.actor_count == 1
        assert (runtime.stats().cold_starts, runtime.stats().warm_starts) == (3, 4)
        # The real actors behind those starts: the third cold start took over an expired instance's
        # actor (its cache dropped), and the other expired actor was retired.
        real = runtime.real_instances()
        assert real is not None
        assert (real["started"], real["retired"], real["peak"], real["died"]) == (2, 1, 2, 0)
        assert sum(real["events_per_instance"]) == 7 and real["cold_start_ms_median"] > 0
        runtime.close()
        assert runtime.actor_count == 0


def _noop(store: Store) -> Mapping[str, Handler]:
    def handle(event: Event, inv: Invocation) -> None:
        pass

    return {"work": handle}


# -- a whole simulated run on Ray: the same plans and, within float tolerance, the same results ----------


def _plans(run_dir: Path) -> list[tuple[Any, ...]]:
    keys = ("strategy", "round", "device", "batch_size", "local_steps", "lr", "status")
    return [tuple(row[k] for k in keys) for row in read_jsonl(run_dir / "devices.jsonl")]


def _accuracies(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(row["strategy"], row["round"]): row["accuracy"] for row in read_jsonl(run_dir / "metrics.jsonl")}


def test_a_run_on_ray_matches_the_embedded_run(redis_server: RedisServer, ray_instance: Any, tmp_path: Path) -> None:
    # Setup: the same config and seed, embedded vs functions and training on Ray. The embedded run
    # trains with the actors' one torch thread: torch's CPU kernels split their sums by thread count,
    # so a device trained with two threads rounds differently whatever the server does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embedded = run_experiment(config_from_dict(SMALL), tmp_path / "embedded", progress=False)
    finally:
        torch.set_num_threads(threads)
    on_ray = {**SMALL, "server": {"store": redis_server.url, "runtime": "ray"}, "ray": {"trainers": 2}}

    # Execute
    summary = run_experiment(config_from_dict(on_ray), tmp_path / "ray", progress=False)

    # Assert: plans are decided on the virtual clock, so they match exactly; the updates are summed in
    # another order (one partial sum per actor), which the exact sums make irrelevant: the same bits.
    assert _plans(tmp_path / "ray") == _plans(tmp_path / "embedded")
    assert _accuracies(tmp_path / "ray") == _accuracies(tmp_path / "embedded")
    for label in ("fedavg", "amble"):
        ray_model = load_file(tmp_path / "ray" / f"model_{label}.safetensors")
        assert_same_model(ray_model, load_file(tmp_path / "embedded" / f"model_{label}.safetensors"))
        for key in ("updates_aggregated", "samples_processed", "cold_starts", "warm_starts", "function_invocations"):
            assert summary["strategies"][label][key] == embedded["strategies"][label][key], key
        assert summary["strategies"][label]["virtual_time_s"] == pytest.approx(
            embedded["strategies"][label]["virtual_time_s"], abs=1e-9
        )


def test_more_training_actors_than_cpus_is_refused_before_any_round(ray_instance: Any) -> None:
    from amble.errors import ConfigError
    from amble.sim.raytraining import RayDevices

    config = config_from_dict({**SMALL, "ray": {"train": True, "trainers": 3}})
    with pytest.raises(ConfigError, match=r"ray\.trainers is 3 but the Ray cluster has 2 CPUs"):
        RayDevices(config, config.ray.trainers)
