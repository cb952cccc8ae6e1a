"""The simulator's clock without round barriers, for asynchronous strategies (FedBuff).

``concurrency`` devices train at once. Each task starts from the latest model the moment the server
hands it out; its virtual duration comes from the same fleet and :class:`VirtualClock` as a round's
(``clock.timing`` keyed by the task id, availability, dropouts), and its upload is an event at its
virtual arrival time, processed in virtual-time order by the buffered functions
(:mod:`amble.server.functions.buffered`). When a task ends (uploaded or dropped), a new one starts at once on a
device drawn, deterministically from the seed and the task id, from the idle available devices.

Outputs are the synchronous driver's: a ``metrics.jsonl`` row per published model (``config.rounds``
of them; ``virtual_time_s`` at the publish), a ``devices.jsonl`` row per finished task (``idle_s`` 0:
a device never waits for a barrier; its ``round`` is the buffer open when it finished), and the
same ``summary.json`` keys. Tasks still in flight at the last publish are not reported. Tasks that
share a start model are trained together (one call of the trainers), when the first of them ends.
An asynchronous run is not checkpointed: ``--resume`` starts it over.
"""

from __future__ import annotations

import copy
import heapq
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from amble.client import derive_seed
from amble.config import ExperimentConfig, StrategyEntry, strategy_label
from amble.durable import write_atomic
from amble.errors import AmbleError, ConfigError
from amble.fleet import RoundTiming
from amble.report import RunWriter
from amble.server import ParameterServer, Published
from amble.server.functions.buffered import Task
from amble.server.tensors import encode
from amble.sim.common import ExperimentView, StrategyRun, Tally, apply_deadline, device_row
from amble.sim.evaluation import Evaluator, score_fields
from amble.sim.training import Trained, TrainJob
from amble.strategies import Params, Report
from amble.strategies.fedbuff import FedBuffSettings, is_asynchronous
from amble.strategies.registry import strategy_class

MAX_FRUITLESS_DRAWS = 1000
"""Availability draws in a row with no idle device available and none in flight before the run fails."""


def asynchronous_entry(config: ExperimentConfig, label: str) -> StrategyEntry | None:
    """The strategy entry filed under ``label`` if it runs without rounds, else None."""
    entry = next(s for s in config.strategies if strategy_label(s) == label)
    return entry if is_asynchronous(strategy_class(entry.name)) else None


@dataclass
class _InFlight:
    task: Task
    timing: RoundTiming
    finish_s: float
    row: dict[str, Any]
    trained: Trained | None = None


class _BufferedRun:
    """One asynchronous strategy's run: the event loop over task ends, publishes and new tasks."""

    def __init__(
        self,
        experiment: ExperimentView,
        server: ParameterServer,
        label: str,
        writer: RunWriter,
        settings: FedBuffSettings,
    ) -> None:
        self.experiment, self.server, self.label, self.writer = experiment, server, label, writer
        config = experiment.config
        self.config = config
        self.concurrency = settings.concurrency_for(config.devices_per_round)
        if self.concurrency > config.data.num_devices:
            raise ConfigError(
                f"strategy '{label}': concurrency {self.concurrency} exceeds data.num_devices "
                f"({config.data.num_devices}); lower concurrency (default: devices_per_round)"
            )
        self.tally = Tally()
        self.in_flight: dict[int, _InFlight] = {}
        self.busy: set[int] = set()
        self.queue: list[tuple[float, int]] = []
        self.models: dict[int, Params] = {}
        """Start models of tasks not yet trained, by version (a task trains from the model it started on)."""
        self.next_task = 0
        self.draws = 0
        self.published = 0
        self.evaluator = Evaluator(experiment.config, copy.deepcopy(experiment.model), experiment.test)
        self.rows: list[dict[str, Any]] = []
        self.samples = 0
        self.train_compute_s = 0.0
        self.dropped = 0
        self.began = time.perf_counter()
        self.last_arrival_s = 0.0

    def run(self, progress: bool) -> dict[str, Any]:
        self.bar = tqdm(
            total=self.config.rounds,
            desc=f"{self.label:>10}",
            unit="publish",
            disable=not progress,
            position=self.experiment.bar_position,
        )
        self._fill(0.0)
        while self.published < self.config.rounds:
            if not self.queue:
                raise AmbleError(
                    f"strategy '{self.label}': no device was available to train after {MAX_FRUITLESS_DRAWS} "
                    "draws; raise fleet.availability"
                )
            finish_s, task_id = heapq.heappop(self.queue)
            self.tally.now_s = max(self.tally.now_s, finish_s)
            announced = self._finish(self.in_flight[task_id])
            del self.in_flight[task_id]
            for outcome in announced:
                if self.published < self.config.rounds:
                    self._record_publish(outcome)
            if self.published < self.config.rounds:
                self._fill(self.tally.now_s)
        self.bar.close()
        write_atomic(self.writer.run_dir / f"model_{self.label}.safetensors", encode(self.server.model()))
        return self.tally.summary(self.server, self.config, time.perf_counter() - self.began)

    def _fill(self, at_s: float) -> None:
        """Start tasks until ``concurrency`` are in flight or no idle device is available."""
        experiment = self.experiment
        fruitless = 0
        while len(self.in_flight) < self.concurrency:
            self.draws += 1
            idle = [
                k
                for k, profile in enumerate(experiment.fleet)
                if k not in self.busy and experiment.clock.is_available(profile, self.draws, k)
            ]
            if not idle:
                fruitless += 1
                if self.in_flight or fruitless >= MAX_FRUITLESS_DRAWS:
                    return  # wait for a task to end (or fail above with no task left)
                continue
            task, announced = self.server.start_task(self.next_task, idle, at_s)
            self.next_task += 1
            for outcome in announced:  # none in practice: publishes follow uploads
                self._record_publish(outcome)
            self._start(task)

    def _start(self, task: Task) -> None:
        experiment = self.experiment
        k, plan = task.device, task.plan
        timing = experiment.clock.timing(experiment.fleet[k], task.task, k, plan.batch_size, plan.local_steps)
        plan, timing = apply_deadline(plan, timing)
        task = Task(task.task, k, plan, task.base_version, task.started_at_s)
        row = device_row(self.label, None, k, plan, timing, len(experiment.device_data[k][1]))
        if timing.dropped_at_s is not None:
            finish_s = task.started_at_s + timing.dropped_at_s
        else:
            finish_s = task.started_at_s + timing.total_s
            if task.base_version not in self.models:
                self.models[task.base_version] = self.server.model(task.base_version)
        self.in_flight[task.task] = _InFlight(task, timing, finish_s, row)
        self.busy.add(k)
        heapq.heappush(self.queue, (finish_s, task.task))

    def _train_from(self, version: int) -> None:
        """Train every in-flight task that starts from ``version`` and is not trained yet, together."""
        waiting = [
            job
            for job in self.in_flight.values()
            if job.task.base_version == version and job.trained is None and job.timing.dropped_at_s is None
        ]
        jobs = [
            TrainJob(job.task.device, job.task.plan, derive_seed(self.config.seed, job.task.task, job.task.device))
            for job in waiting
        ]
        trained = self.experiment.devices().train(self.models.pop(version), jobs)
        for job in waiting:
            job.trained = trained[job.task.device]

    def _finish(self, job: _InFlight) -> list[Published]:
        """A task ended: upload its update at its arrival time (or record its drop); publishes it caused."""
        task, timing, row = job.task, job.timing, job.row
        self.busy.discard(task.device)
        self.rows.append(row)
        if timing.dropped_at_s is not None:
            spent_computing = min(max(timing.dropped_at_s - timing.download_s, 0.0), timing.compute_s)
            row.update(compute_s=spent_computing, comm_s=timing.dropped_at_s - spent_computing, status="dropped")
            self.dropped += 1
            return []
        if job.trained is None:  # trained now, with every other in-flight task of its start model
            self._train_from(task.base_version)
        result = job.trained
        if result is None:
            raise AmbleError(f"task {task.task} was not trained")
        k = task.device
        report = Report(
            task.task,
            k,
            len(self.experiment.device_data[k][1]),
            result.steps,
            task.plan.batch_size,
            timing.compute_s,
            timing.download_s,
            timing.upload_s,
        )
        self.samples += result.samples
        self.train_compute_s += result.compute_s
        self.tally.samples += result.samples
        self.tally.train_compute_s += result.compute_s
        self.last_arrival_s = job.finish_s
        announced = self.server.upload_task(report, result.update, job.finish_s)
        stored = self.server.task(task.task)
        if stored is not None and stored.buffer is not None:
            self.tally.updates_aggregated += 1
            cut = result.steps < task.plan.local_steps
            row["status"] = "partial" if cut or row["epochs"] < self.config.train.local_epochs else "ok"
        else:
            self.tally.updates_rejected += 1
            row["status"] = "failed"
        return announced

    def _record_publish(self, outcome: Published) -> None:
        """A published model is a ``metrics.jsonl`` row; the tasks that ended since the last are its devices."""
        config, tally = self.config, self.tally
        r = outcome.buffer
        tally.now_s = max(tally.now_s, outcome.at_s)
        score = None
        if self.evaluator.due(r):
            reached = tally.reached(config.eval.target_accuracy)
            score = self.evaluator.score(self.server.model(outcome.version), r, reached)
            tally.accuracies.append((r, outcome.at_s, score.accuracy))
            self.bar.set_postfix(acc=f"{score.accuracy:.3f}", vtime=f"{outcome.at_s:,.0f}s")
        finalized = outcome.status == "finalized"
        tally.latencies.append(outcome.at_s - self.last_arrival_s)
        tally.rounds_failed += not finalized
        self.writer.write_round(
            {
                "strategy": self.label,
                "round": r,
                "virtual_time_s": outcome.at_s,
                "wall_time_s": time.perf_counter() - self.began,
                **score_fields(score),
                "participants": outcome.counted,
                "completed": outcome.counted if finalized else 0,
                "dropped": self.dropped,
                "samples_processed": self.samples,
                "train_compute_s": self.train_compute_s,
                "status": outcome.status,
            }
        )
        for row in self.rows:
            row["round"] = r
        self.writer.write_devices(self.rows)
        self.rows, self.samples, self.train_compute_s, self.dropped = [], 0, 0.0, 0
        self.published += 1
        self.bar.update(1)


def run_buffered(
    experiment: ExperimentView, server: ParameterServer, entry: StrategyEntry, writer: RunWriter, progress: bool
) -> StrategyRun:
    """Run one asynchronous strategy of ``experiment`` on ``server`` (already built for it)."""
    label = strategy_label(entry)
    settings = entry.settings()
    if not isinstance(settings, FedBuffSettings):
        raise ConfigError(f"strategy '{label}' is asynchronous but its settings are not FedBuffSettings")
    server.initialize(experiment.initial, experiment.setup.num_samples, experiment.setup.settings)
    summary = _BufferedRun(experiment, server, label, writer, settings).run(progress)
    return StrategyRun(label, summary)
