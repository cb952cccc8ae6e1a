"""Pins the public API: a change here is a change users see."""

from __future__ import annotations

import amble
import amble.api
import amble.data
import amble.fleet
import amble.report
import amble.server
import amble.strategies


def test_public_names() -> None:
    assert sorted(amble.strategies.__all__) == sorted(
        [
            "AGGREGATORS", "AdaBatch", "AdaBatchSettings", "Aggregator", "Amble", "AmbleSettings", "BaseWork",
            "Contribution", "DeadlineFedAvg", "DeadlineSettings", "DeviceState", "FedAvg", "FedAvgAggregator",
            "FedNova", "FedNovaAggregator", "FedNovaSettings", "FedProx", "Params", "PartialWorkSettings", "Plan",
            "Report", "STRATEGIES", "SpeedModel", "Strategy", "StrategySettings", "base_work", "build_strategy",
            "fit_speed",
        ]
    )  # fmt: skip
    assert sorted(amble.server.__all__) == sorted(
        [
            "Event", "EventLog", "Invocation", "LocalRuntime", "MemoryEventLog", "MemoryStore", "ParameterServer",
            "PoolSettings", "Published", "RoundOutcome", "RoundState", "RunSettings", "Runtime", "RuntimeStats",
            "ServerFunctions", "Store", "Versioned", "select_devices",
        ]
    )  # fmt: skip
    assert sorted(amble.fleet.__all__) == sorted(
        ["DeviceProfile", "RoundTiming", "StepTime", "VirtualClock", "calibrate", "generate_fleet", "load_trace"]
    )
    assert {"load_dataset", "partition_indices", "Dataset"} <= set(amble.data.__all__)
    assert {"RunWriter", "build_report", "read_run"} <= set(amble.report.__all__)
    assert sorted(amble.__all__) == ["RunResult", "load_config", "run"]
    assert (amble.run, amble.RunResult) == (amble.api.run, amble.api.RunResult)
