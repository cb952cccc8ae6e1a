"""End to end on real Fashion-MNIST: the quickstart config, shortened, trains and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amble.cli import main
from tests.conftest import FASHION_MNIST

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not FASHION_MNIST.is_dir(),
        reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)",
    ),
]


def test_quickstart_shortened_learns_on_real_data(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"

    code = main(
        [
            "run",
            str(QUICKSTART),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "rounds=6",
            "--set",
            "data.partition.kind=iid",
            "--set",
            "eval.test_samples=2000",
        ]
    )

    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["data"]["dataset"] == "fashion-mnist"
    for name in ("fedavg", "amble"):
        result = summary["strategies"][name]
        assert result["final_accuracy"] > 0.5, (name, result)  # chance is 0.1; 6 IID rounds give ~0.6
        assert result["updates_aggregated"] == 60
    rows = [json.loads(line) for line in (out / "devices.jsonl").read_text().splitlines()]
    amble_late = [r for r in rows if r["strategy"] == "amble" and r["round"] >= 3]
    assert max(r["batch_size"] for r in amble_late) > 32  # fast devices got bigger batches
    assert (out / "report.html").stat().st_size > 10_000
