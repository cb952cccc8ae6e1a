"""One strategy of a run played in a process of its own (``run.parallel``; see ``parallel.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from amble.config import config_from_dict
from amble.durable import write_atomic
from amble.errors import AmbleError
from amble.fleet.steptime import StepTime
from amble.report import RunWriter
from amble.sim.driver import Experiment
from amble.sim.parallel import ERROR_FILE, watch_parent


def main() -> int:
    """One strategy of a run, in this process: the job comes as JSON on stdin (see the module's docstring)."""
    job = json.loads(sys.stdin.read())
    watch_parent(job["parent_pid"])
    rows_dir = Path(job["rows_dir"])
    try:
        config = config_from_dict(job["config"], "the run's strategy process")
        torch.set_num_threads(config.run.threads)
        experiment = Experiment(config, step_time=StepTime.from_mapping({int(b): t for b, t in job["t_ref"].items()}))
        experiment.bar_position = job["index"]
        try:
            with RunWriter(rows_dir) as writer:
                experiment.run_strategy(
                    job["index"], writer, job["progress"], job["namespace"], Path(job["state_dir"]), job["resume"]
                )
        finally:
            experiment.close()
    except AmbleError as error:
        write_atomic(rows_dir / ERROR_FILE, json.dumps({"error": str(error)}).encode())
        return 1
    return 0
