"""The report package: RunWriter's files, read_run's errors, and the plots and HTML built from files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import amble.report
from amble.errors import AmbleError
from amble.report import RunWriter, build_report, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGET = 0.75


def _metrics_row(strategy: str, round_number: int, time_s: float, accuracy: float) -> dict[str, object]:
    return {
        "strategy": strategy,
        "round": round_number,
        "virtual_time_s": time_s,
        "wall_time_s": round_number * 0.5,
        "accuracy": accuracy,
        "loss": 1.0 - accuracy,
        "participants": 3,
        "completed": 3,
        "dropped": 0,
        "samples_processed": 600,
    }


def _device_row(strategy: str, round_number: int, device: int, status: str = "ok") -> dict[str, object]:
    compute_s = 10.0 * (device + 1)
    return {
        "strategy": strategy,
        "round": round_number,
        "device": device,
        "batch_size": 32,
        "local_steps": 20,
        "epochs": 1,
        "lr": 0.05,
        "compute_s": compute_s,
        "comm_s": 5.0,
        "idle_s": 30.0 - compute_s,
        "status": status,
    }


def _strategy_summary(accuracies: list[float], times_s: list[float]) -> dict[str, object]:
    reached = next((i for i, a in enumerate(accuracies) if a >= TARGET), None)
    return {
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "target_accuracy": TARGET,
        "time_to_target_s": None if reached is None else times_s[reached],
        "rounds_to_target": None if reached is None else reached + 1,
        "virtual_time_s": times_s[-1],
        "wall_time_s": 2.0,
        "rounds": len(accuracies),
        "updates_aggregated": 11,
        "updates_rejected": 1,
        "function_invocations": 17,
        "cold_starts": 2,
        "warm_starts": 15,
        "function_busy_s": 3.5,
    }


def _write_run(run_dir: Path, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    """A run of 4 rounds, 3 devices per round; device 2 drops out in round 2 of every strategy.

    ``curves`` maps strategy -> (accuracy per round, cumulative virtual seconds per round).
    """
    with RunWriter(run_dir) as writer:
        for strategy, (accuracies, times_s) in curves.items():
            for index, (accuracy, time_s) in enumerate(zip(accuracies, times_s, strict=True)):
                round_number = index + 1
                writer.write_round(_metrics_row(strategy, round_number, time_s, accuracy))
                writer.write_devices(
                    _device_row(
                        strategy,
                        round_number,
                        device,
                        "dropped" if (round_number, device) == (2, 2) else "ok",
                    )
                    for device in range(3)
                )
        summaries = {strategy: _strategy_summary(*curve) for strategy, curve in curves.items()}
        writer.write_summary({"config": {"name": "tiny", "eval": {"target_accuracy": TARGET}}, "strategies": summaries})


# fedavg never reaches 0.75; amble reaches it at round 3 (t = 90 s).
NEVER_AND_REACHED = {
    "fedavg": ([0.40, 0.55, 0.65, 0.70], [40.0, 80.0, 120.0, 160.0]),
    "amble": ([0.50, 0.70, 0.80, 0.85], [30.0, 60.0, 90.0, 120.0]),
}


def test_public_api_is_pinned() -> None:
    # Execute / Assert
    assert amble.report.__all__ == ["RunData", "RunWriter", "build_report", "read_run"]


def test_build_report_writes_valid_pngs_and_html(tmp_path: Path) -> None:
    # Prepare
    _write_run(tmp_path, NEVER_AND_REACHED)

    # Execute
    report = build_report(tmp_path)

    # Assert
    assert report == tmp_path / "report.html"
    for name in [
        "accuracy_vs_time.png",
        "accuracy_vs_round.png",
        "timeline_fedavg.png",
        "timeline_amble.png",
    ]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name
    page = report.read_text(encoding="utf-8")
    assert "<th>fedavg</th>" in page and "<th>amble</th>" in page
    assert "<tr><td>Time to target (virtual)</td><td>not reached</td><td>90.0 s</td></tr>" in page
    assert "<tr><td>Rounds to target</td><td>not reached</td><td>3</td></tr>" in page
    assert page.count("data:image/png;base64,") == 4
    assert "tiny" in page and "target_accuracy: 0.75" in page  # run name and the config as YAML


def test_report_has_no_external_assets(tmp_path: Path) -> None:
    # Prepare
    _write_run(tmp_path, NEVER_AND_REACHED)

    # Execute
    page = build_report(tmp_path).read_text(encoding="utf-8")

    # Assert
    assert re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE) is None
    assert "<link" not in page.lower() and "<script" not in page.lower()


def test_speedup_is_time_to_target_over_ambles(tmp_path: Path) -> None:
    # Prepare: fedavg reaches 0.75 at 150 s, amble at 60 s -> 150 / 60 = 2.50
    _write_run(
        tmp_path,
        {
            "fedavg": ([0.50, 0.60, 0.76, 0.80], [50.0, 100.0, 150.0, 200.0]),
            "amble": ([0.60, 0.78, 0.80, 0.82], [30.0, 60.0, 90.0, 120.0]),
        },
    )

    # Execute
    page = build_report(tmp_path).read_text(encoding="utf-8")

    # Assert
    speedup_row = re.search(r'<tr class="speedup">(.*?)</tr>', page)
    assert speedup_row is not None
    assert re.findall(r"<td>([^<]*)</td>", speedup_row.group(1))[1:] == ["2.50×", "1.00×"]


def test_accuracy_plots_leave_out_rounds_not_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: eval.every 2 leaves rounds 1 and 3 with accuracy and loss null
    _write_run(tmp_path, NEVER_AND_REACHED)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["round"] % 2:
            row["accuracy"] = row["loss"] = None
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    drawn: list[tuple[list[float], list[float]]] = []
    plot = amble.report.plots.Axes.plot

    def record(axes: object, *args: object, **kwargs: object) -> object:
        if len(args) >= 2 and isinstance(args[0], list):
            drawn.append((list(args[0]), list(args[1])))  # type: ignore[call-overload]
        return plot(axes, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(amble.report.plots.Axes, "plot", record)

    # Execute
    build_report(tmp_path)

    # Assert: one line per strategy per accuracy plot through rounds 2 and 4 only, no NaN; amble's star at round 4
    lines = [(xs, ys) for xs, ys in drawn if len(xs) > 1]
    assert lines and all(not any(math.isnan(v) for v in xs + ys) for xs, ys in lines)
    by_round = [(xs, ys) for xs, ys in lines if xs == [2.0, 4.0]]
    assert sorted(ys for _, ys in by_round) == [[0.55, 0.70], [0.70, 0.85]]
    assert ([4.0], [0.85]) in drawn  # amble first reaches 0.75 at round 3, which was not evaluated


def test_strategy_names_are_escaped_in_html_and_sanitised_in_file_names(tmp_path: Path) -> None:
    # Prepare
    hostile = "<script>alert(1)</script>"
    _write_run(tmp_path, {hostile: NEVER_AND_REACHED["fedavg"], "amble": NEVER_AND_REACHED["amble"]})

    # Execute
    page = build_report(tmp_path).read_text(encoding="utf-8")

    # Assert
    assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert (tmp_path / "timeline_script_alert_1_script.png").read_bytes().startswith(PNG_SIGNATURE)


def test_nan_and_infinity_are_written_as_null(tmp_path: Path) -> None:
    # Prepare
    row = _metrics_row("fedavg", 1, 10.0, math.nan)
    row["loss"] = math.inf

    # Execute
    with RunWriter(tmp_path) as writer:
        writer.write_round(row)
        writer.write_summary({"config": {}, "strategies": {"fedavg": {"final_accuracy": math.nan}}})

    # Assert
    line = json.loads((tmp_path / "metrics.jsonl").read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert line["accuracy"] is None and line["loss"] is None
    assert "NaN" not in (tmp_path / "summary.json").read_text(encoding="utf-8")
    assert read_run(tmp_path).summary["strategies"]["fedavg"]["final_accuracy"] is None


def test_rows_are_readable_while_the_writer_is_open(tmp_path: Path) -> None:
    # Prepare
    with RunWriter(tmp_path) as writer:
        # Execute
        writer.write_round(_metrics_row("fedavg", 1, 10.0, 0.5))
        writer.write_devices([_device_row("fedavg", 1, 0)])

        # Assert: flushed per round, as a crashed run would leave them
        assert json.loads((tmp_path / "metrics.jsonl").read_text(encoding="utf-8"))["round"] == 1
        assert json.loads((tmp_path / "devices.jsonl").read_text(encoding="utf-8"))["device"] == 0


def test_writer_truncates_unless_appending(tmp_path: Path) -> None:
    # Prepare
    with RunWriter(tmp_path) as writer:
        writer.write_round(_metrics_row("fedavg", 1, 10.0, 0.5))
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"strategy": "fedavg", "rou')  # a crash mid-line

    # Execute
    with RunWriter(tmp_path, append=True) as writer:
        writer.write_round(_metrics_row("fedavg", 2, 20.0, 0.6))
    appended = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    with RunWriter(tmp_path) as writer:
        writer.write_round(_metrics_row("fedavg", 3, 30.0, 0.7))
    truncated = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()

    # Assert
    assert [json.loads(line)["round"] for line in appended] == [1, 2]
    assert [json.loads(line)["round"] for line in truncated] == [3]


def test_writer_rejects_rows_missing_schema_fields(tmp_path: Path) -> None:
    # Prepare
    row = _metrics_row("fedavg", 1, 10.0, 0.5)
    del row["loss"]

    # Execute / Assert
    with RunWriter(tmp_path) as writer, pytest.raises(ValueError, match="loss"):
        writer.write_round(row)


def test_read_run_names_a_missing_summary(tmp_path: Path) -> None:
    # Prepare
    _write_run(tmp_path, NEVER_AND_REACHED)
    (tmp_path / "summary.json").unlink()

    # Execute / Assert
    with pytest.raises(AmbleError, match=r"summary\.json is missing.*amble run"):
        read_run(tmp_path)


def test_read_run_names_the_file_and_line_of_corrupt_json(tmp_path: Path) -> None:
    # Prepare: 8 good metrics rows, then a corrupt 9th line
    _write_run(tmp_path, NEVER_AND_REACHED)
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"strategy": "fedavg", "round": \n')

    # Execute / Assert
    with pytest.raises(AmbleError, match=r"metrics\.jsonl line 9 is not valid JSON.*amble run"):
        read_run(tmp_path)


def test_read_run_names_a_row_with_a_bad_status(tmp_path: Path) -> None:
    # Prepare: 24 good device rows, then one with an unknown status
    _write_run(tmp_path, NEVER_AND_REACHED)
    with (tmp_path / "devices.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps(_device_row("amble", 5, 0, status="lost")) + "\n")

    # Execute / Assert
    with pytest.raises(AmbleError, match=r"devices\.jsonl line 25: 'status' must be one of"):
        read_run(tmp_path)


def test_read_run_returns_rows_in_file_order(tmp_path: Path) -> None:
    # Prepare
    _write_run(tmp_path, NEVER_AND_REACHED)

    # Execute
    run = read_run(tmp_path)

    # Assert
    assert [(row["strategy"], row["round"]) for row in run.metrics[:5]] == [
        ("fedavg", 1), ("fedavg", 2), ("fedavg", 3), ("fedavg", 4), ("amble", 1)
    ]  # fmt: skip
    assert len(run.devices) == 24
    assert [row["device"] for row in run.devices if row["status"] == "dropped"] == [2, 2]
    assert run.strategies == ["fedavg", "amble"]
    assert run.summary["strategies"]["amble"]["time_to_target_s"] == 90.0


def test_read_run_rejects_a_missing_directory(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(AmbleError, match=r"does not exist.*amble run"):
        read_run(tmp_path / "nope")
