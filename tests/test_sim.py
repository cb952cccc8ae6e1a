"""The simulator and the command line, end to end on small synthetic data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from amble.cli import main
from amble.config import config_from_dict
from amble.sim import driver, run_experiment

SMALL: dict[str, Any] = {
    "name": "small",
    "seed": 3,
    "data": {"dataset": "synthetic", "partition": {"kind": "shards", "shards_per_device": 2}, "num_devices": 8},
    "model": "mlp",
    "fleet": {
        "kind": "tiers",
        "bandwidth_mbps": [50, 100],
        "t_ref": {16: 0.002, 32: 0.003, 64: 0.005, 128: 0.009, 256: 0.017},
    },
    "rounds": 4,
    "devices_per_round": 4,
    "train": {"batch_size": 16, "local_epochs": 1, "lr": 0.05},
    "strategies": ["fedavg", {"name": "amble", "batch_max": 128}],
    "eval": {"target_accuracy": 0.3},
    "run": {"parallel": 1},  # in this process, so tests can patch the driver (test_run_parallel plays them at once)
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("run")
    return out, run_experiment(config_from_dict(SMALL), out, progress=False)


def test_run_writes_every_output_file(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_run
    for name in ("metrics.jsonl", "devices.jsonl", "summary.json", "report.html", "accuracy_vs_time.png"):
        assert (out / name).is_file(), name
    assert (out / "timeline_amble.png").is_file() and (out / "timeline_fedavg.png").is_file()


def test_metrics_rows_per_strategy_and_round(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_run
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["strategy"], r["round"]) for r in rows] == [(s, r) for s in ("fedavg", "amble") for r in range(4)]
    times = [r["virtual_time_s"] for r in rows if r["strategy"] == "amble"]
    assert times == sorted(times) and times[0] > 0
    assert all(r["participants"] == 4 and r["completed"] == 4 for r in rows)


def test_strategies_see_the_identical_selection_and_fleet(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_run
    devices = read_jsonl(out / "devices.jsonl")

    def selected(strategy: str) -> list[tuple[int, int]]:
        return [(d["round"], d["device"]) for d in devices if d["strategy"] == strategy]

    assert selected("fedavg") == selected("amble")
    fedavg_first = [d for d in devices if d["strategy"] == "fedavg" and d["round"] == 0]
    amble_first = [d for d in devices if d["strategy"] == "amble" and d["round"] == 0]
    # round 0 is every device's profiling round: AMBLE runs the base plan, so timings match FedAvg's
    assert [d["compute_s"] for d in fedavg_first] == [d["compute_s"] for d in amble_first]


def test_amble_adapts_after_profiling(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_run
    devices = read_jsonl(out / "devices.jsonl")
    planned = [d for d in devices if d["strategy"] == "amble" and d["batch_size"] != 16]
    assert planned, "after profiling, some device must get a batch other than B0"
    metrics = read_jsonl(out / "metrics.jsonl")

    def samples(strategy: str) -> int:
        return sum(r["samples_processed"] for r in metrics if r["strategy"] == strategy and r["round"] > 0)

    assert samples("amble") > samples("fedavg")  # fast devices turned waiting into work


def test_summary_holds_config_and_counts(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["config"]["seed"] == 3 and on_disk["config"]["rounds"] == 4
    for name in ("fedavg", "amble"):
        s = on_disk["strategies"][name]
        assert s["updates_aggregated"] == 16 and s["updates_rejected"] == 0
        # per round: plan_round + 4 aggregates + finalize
        assert s["function_invocations"] == 24 == s["cold_starts"] + s["warm_starts"]
        assert 0 < s["train_compute_s"] <= s["wall_time_s"]
        per_round = [r["train_compute_s"] for r in read_jsonl(out / "metrics.jsonl") if r["strategy"] == name]
        assert min(per_round) > 0 and sum(per_round) == pytest.approx(s["train_compute_s"])
        assert s["time_to_target_s"] is None or s["rounds_to_target"] >= 1
    assert summary["strategies"] == on_disk["strategies"]


def test_a_run_is_a_function_of_config_and_seed(small_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = small_run
    run_experiment(config_from_dict(SMALL), tmp_path, progress=False)
    first = [(r["accuracy"], r["samples_processed"]) for r in read_jsonl(out / "metrics.jsonl")]
    again = [(r["accuracy"], r["samples_processed"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert first == again


def test_uploading_in_chunks_changes_nothing(
    small_run: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One device per chunk: every upload is folded before the next device trains.
    monkeypatch.setattr(driver, "UPLOAD_CHUNK", 1)
    out, summary = small_run
    again = run_experiment(config_from_dict(SMALL), tmp_path, progress=False)
    for label in ("fedavg", "amble"):
        assert (tmp_path / f"model_{label}.safetensors").read_bytes() == (
            out / f"model_{label}.safetensors"
        ).read_bytes()
        for key in ("virtual_time_s", "final_accuracy", "cold_starts", "warm_starts", "updates_aggregated"):
            assert again["strategies"][label][key] == summary["strategies"][label][key]
    assert read_jsonl(tmp_path / "devices.jsonl") == read_jsonl(out / "devices.jsonl")


def test_report_rebuilds_from_the_files_alone(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_run
    (out / "report.html").unlink()
    (out / "accuracy_vs_round.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "accuracy_vs_round.png").is_file()


def test_cli_run_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(SMALL))  # JSON is YAML
    out = tmp_path / "out"

    code = main(["run", str(config), "--out", str(out), "--no-progress", "--set", "rounds=2", "--set", "seed=5"])

    assert code == 0
    assert json.loads((out / "summary.json").read_text())["config"]["rounds"] == 2
    assert "fedavg" in capsys.readouterr().out


def test_cli_bad_config_exits_nonzero_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(SMALL))

    code = main(["run", str(config), "--set", "fleet.kind=quantum"])

    err = capsys.readouterr().err
    assert code == 2
    assert "fleet.kind" in err and "Traceback" not in err


def test_cli_missing_dataset_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(SMALL))
    missing = tmp_path / "no-data-here"

    code = main(["run", str(config), "--set", "data.dataset=mnist", "--set", f"data.root={missing}"])

    assert code == 2
    assert str(missing) in capsys.readouterr().err


RESUMABLE: dict[str, Any] = {**SMALL, "rounds": 6, "server": {"keep_alive_s": 0.05, "max_instances": 3}}
"""Instances expire between rounds (keep_alive_s well below a round), so cold starts recur all run long."""
MEASURED_SUMMARY = {"wall_time_s", "train_compute_s", "function_busy_s"}
"""Summary figures measured on the wall clock (function_busy_s: the functions' measured run time, even
with a fixed invocation_s): they differ between any two runs, so a resumed run cannot reproduce them."""
MEASURED_METRICS = {"wall_time_s", "train_compute_s"}


class _Crash(Exception):
    """Stands for the driver dying right after a checkpoint."""


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_experiment(config_from_dict(RESUMABLE), out, progress=False)
    return out


@pytest.mark.parametrize(("stopped", "after_round"), [("fedavg", 1), ("amble", 2)])
def test_a_resumed_run_reproduces_every_output_figure(
    uninterrupted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: str, after_round: int
) -> None:
    # Prepare: a run that dies right after checkpointing round `after_round` of `stopped`.
    checkpoint = driver.Experiment._checkpoint

    def checkpoint_then_crash(server: Any, r: int, tally: Any, wall_time_s: float, snapshot: Path) -> None:
        checkpoint(server, r, tally, wall_time_s, snapshot)
        if r == after_round and snapshot.name == f"{stopped}.safetensors":
            raise _Crash

    monkeypatch.setattr(driver.Experiment, "_checkpoint", staticmethod(checkpoint_then_crash))
    with pytest.raises(_Crash):
        run_experiment(config_from_dict(RESUMABLE), tmp_path, progress=False)
    monkeypatch.undo()

    # Execute
    run_experiment(config_from_dict(RESUMABLE), tmp_path, progress=False, resume=True)

    # Assert: every figure but the wall-clock measurements is the uninterrupted run's, bit for bit.
    reference = json.loads((uninterrupted_run / "summary.json").read_text())
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["config"] == reference["config"] and resumed["calibration"] == reference["calibration"]
    assert reference["strategies"][stopped]["cold_starts"] > RESUMABLE["server"]["max_instances"]
    for label, figures in reference["strategies"].items():
        assert set(resumed["strategies"][label]) == set(figures)
        for name, value in figures.items():
            if name not in MEASURED_SUMMARY:
                assert resumed["strategies"][label][name] == value, (label, name)

    def without(rows: list[dict[str, Any]], measured: set[str]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k not in measured} for row in rows]

    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert without(metrics, MEASURED_METRICS) == without(
        read_jsonl(uninterrupted_run / "metrics.jsonl"), MEASURED_METRICS
    )
    assert read_jsonl(tmp_path / "devices.jsonl") == read_jsonl(uninterrupted_run / "devices.jsonl")
