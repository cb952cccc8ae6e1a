"""Scale: a fleet of 10,000 devices with 1,000 training per round fits in 2 GB (memory bounded by the
upload chunk, not by devices x model size). Run in a fresh process so its peak memory is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys, time
from pathlib import Path
from amble.config import config_from_dict
from amble.sim.driver import run_experiment

def peak_mb():
    # VmHWM: this program's own high-water mark (getrusage's maxrss would include the pytest process
    # this one was forked from, whose memory it carried until exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

config = config_from_dict({
    "name": "scale",
    "data": {"dataset": "synthetic", "synthetic_size": [50000, 500], "num_devices": 10000},
    "model": "mlp",
    "fleet": {"kind": "uniform", "t_ref": {5: 0.001}},
    "rounds": 1,
    "devices_per_round": 1000,
    "train": {"batch_size": 5, "local_epochs": 1, "lr": 0.05},
    "strategies": ["fedavg"],
})
began = time.perf_counter()
summary = run_experiment(config, Path(sys.argv[1]), progress=False)["strategies"]["fedavg"]
print(json.dumps({
    "peak_rss_mb": peak_mb(),
    "wall_s": time.perf_counter() - began,
    "updates_aggregated": summary["updates_aggregated"],
}))
"""


@pytest.mark.e2e
def test_ten_thousand_devices_and_a_thousand_per_round_fit_in_two_gigabytes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["updates_aggregated"] == 1000
    assert result["peak_rss_mb"] < 2048
