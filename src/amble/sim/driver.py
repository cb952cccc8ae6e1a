"""The simulation driver: rounds on a virtual clock, every update through the parameter server.

Per round: the driver asks the server to start the round (``plan_round`` selects devices and writes
plans), trains each planned device for real on its own data, charges the virtual clock from the
device's hidden profile, uploads each update at its virtual arrival time (each upload is an event
that triggers ``aggregate``), then lets ``finalize`` publish the next model. The driver owns all
waiting and clocks; the strategies and functions never see the profiles.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from amble import raycluster
from amble.client import derive_seed
from amble.config import ExperimentConfig, config_from_dict, config_to_dict, strategy_label, trains_on_ray
from amble.data import Dataset
from amble.durable import write_atomic
from amble.errors import AmbleError, ConfigError
from amble.fleet import DeviceProfile, RoundTiming, VirtualClock, generate_fleet
from amble.fleet.steptime import StepTime
from amble.models import ModelFactory
from amble.problem import reference_step_time
from amble.report import RunWriter, build_report
from amble.report.writer import to_json_value
from amble.runsetup import prepare_run, run_namespace
from amble.server import ParameterServer
from amble.server.factory import build_server, discard_snapshot, release_server, saved_checkpoint, wipe_run
from amble.server.tensors import encode
from amble.sim.asyncdriver import asynchronous_entry, run_buffered
from amble.sim.common import RoundRecord, StrategyRun, Tally, apply_deadline, device_row
from amble.sim.evaluation import Evaluator, score_fields
from amble.sim.parallel import gather_rows, processes_for, run_parallel, torch_threads
from amble.sim.raytraining import RayDevices
from amble.sim.training import DeviceTrainers, TrainJob, local_devices
from amble.strategies import Params, Report

Progress = Callable[[str], None]
UPLOAD_CHUNK = 256
"""Devices a round trains and uploads at a time (the rest of the round's updates are not yet in memory)."""
GLOBAL_RNG_STREAM = 0x6C0BA1
"""Seed part of a strategy's draws from torch's global RNG."""


class Experiment:
    """What every strategy of one config shares: data, partition, fleet, clock and initial model."""

    def __init__(
        self,
        config: ExperimentConfig,
        cache_dir: Path | None = None,
        model_factory: ModelFactory | None = None,
        step_time: StepTime | None = None,
    ) -> None:
        """``step_time``: the reference device's step times measured by the run's first process (a
        strategy played in a process of its own charges the same clock)."""
        self.config = config
        self.bar_position: int | None = None
        """Where this process's progress bars go (a strategy in a process of its own: its index)."""
        seed = config.seed
        self.setup = prepare_run(config, model_factory)
        self.dataset: Dataset = self.setup.dataset
        self.device_data = self.setup.device_data
        self.fleet: list[DeviceProfile] = generate_fleet(config.fleet, config.data.num_devices, seed)
        self.model = self.setup.model
        self.initial: Params = self.setup.initial
        update_bytes = sum(v.numel() * v.element_size() for v in self.initial.values() if v.is_floating_point())

        if step_time is None:
            step_time = reference_step_time(config, self.dataset, self.setup.build_model, self.model, cache_dir)
        self.step_time = step_time
        self.clock = VirtualClock(step_time, update_bytes, seed)

        self.test = self.setup.test
        self._devices: DeviceTrainers | None = None

    def run(
        self,
        writer: RunWriter,
        progress: bool = True,
        namespace: str = "run",
        state_dir: Path | None = None,
        resume: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """Run every strategy in turn. With ``state_dir``, each round is checkpointed there (and, with a
        Redis store, in the store); with ``resume`` a strategy with a checkpoint continues after it."""
        results = {}
        try:
            for index in range(len(self.config.strategies)):
                outcome = self.run_strategy(index, writer, progress, namespace, state_dir, resume)
                results[outcome.label] = outcome.summary
        finally:
            self.close()
        return results

    def devices(self) -> DeviceTrainers:
        """Where this experiment's devices train (started on first use, kept for every strategy)."""
        if self._devices is None:
            config = self.config
            if trains_on_ray(config):
                raycluster.connect(config.ray.address, config.ray.num_cpus)
                self._devices = RayDevices(config, config.ray.trainers)
            else:
                self._devices = local_devices(config, self.dataset, self.device_data, copy.deepcopy(self.model))
        return self._devices

    def close(self) -> None:
        """Stop the training actors and the Ray instance this process started, if any."""
        if self._devices is not None:
            self._devices.close()
            self._devices = None
        raycluster.disconnect()

    def run_strategy(
        self,
        index: int,
        writer: RunWriter,
        progress: bool,
        namespace: str = "run",
        state_dir: Path | None = None,
        resume: bool = False,
    ) -> StrategyRun:
        """Run (or resume) the config's ``index``-th strategy; a Redis store keeps it in ``namespace/label``."""
        config = self.config
        label = strategy_label(config.strategies[index])
        done = None if state_dir is None else state_dir / f"{label}.summary.json"
        if resume and done is not None and done.is_file():
            return StrategyRun(label, json.loads(done.read_text()))
        space = f"{namespace}/{label}"
        snapshot = None if state_dir is None else state_dir / f"{label}.safetensors"
        checkpoint = saved_checkpoint(config, space, snapshot) if resume and snapshot is not None else None
        if checkpoint is None:
            wipe_run(config, space)
        # Whatever a model draws from torch's global RNG (dropout) depends on the strategy alone, not on
        # which strategies this process played before it (run.parallel plays each in a process of its own).
        torch.manual_seed(derive_seed(config.seed, GLOBAL_RNG_STREAM, index))
        server = build_server(
            config, index, space, snapshot if checkpoint and config.server.store == "memory" else None
        )
        try:
            outcome = self._run_strategy(server, label, writer, progress, checkpoint, snapshot)
        finally:
            release_server(server)
        if done is not None and snapshot is not None:
            write_atomic(done, json.dumps(to_json_value(outcome.summary)).encode())
            discard_snapshot(snapshot)
        wipe_run(config, space)
        return outcome

    def _run_strategy(
        self,
        server: ParameterServer,
        label: str,
        writer: RunWriter,
        progress: bool,
        checkpoint: dict[str, Any] | None,
        snapshot: Path | None,
    ) -> StrategyRun:
        config = self.config
        asynchronous = asynchronous_entry(config, label)
        if asynchronous is not None:  # no rounds: the asynchronous clock (not checkpointed)
            return run_buffered(self, server, asynchronous, writer, progress)
        server.initialize(self.initial, self.setup.num_samples, self.setup.settings)
        if checkpoint is not None and checkpoint.get("pool") is not None:
            server.runtime.restore_pool(checkpoint["pool"])
        evaluator = Evaluator(config, copy.deepcopy(self.model), self.test)
        tally = Tally.from_json(checkpoint["tally"]) if checkpoint else Tally()
        first = checkpoint["round"] + 1 if checkpoint else 0
        began = time.perf_counter() - (checkpoint["wall_time_s"] if checkpoint else 0.0)
        rounds = range(first, config.rounds)
        bar = tqdm(
            rounds, desc=f"{label:>10}", unit="round", disable=not progress, initial=first, position=self.bar_position
        )
        for r in bar:
            record = self._play_round(server, label, r, tally)
            score = None
            if evaluator.due(r):
                reached = tally.reached(config.eval.target_accuracy)
                score = evaluator.score(server.model(record.outcome.version), r, reached)
                tally.accuracies.append((r, tally.now_s, score.accuracy))
                bar.set_postfix(acc=f"{score.accuracy:.3f}", vtime=f"{tally.now_s:,.0f}s")
            finalized = record.outcome.status == "finalized"
            writer.write_round(
                {
                    "strategy": label,
                    "round": r,
                    "virtual_time_s": tally.now_s,
                    "wall_time_s": time.perf_counter() - began,
                    **score_fields(score),
                    "participants": len(record.devices),
                    "completed": len(record.outcome.counted) if finalized else 0,
                    "dropped": sum(1 for row in record.devices if row["status"] == "dropped"),
                    "samples_processed": record.samples,
                    "train_compute_s": record.train_compute_s,
                    "status": record.outcome.status,
                }
            )
            writer.write_devices(record.devices)
            if snapshot is not None:
                self._checkpoint(server, r, tally, time.perf_counter() - began, snapshot)
        bar.close()
        write_atomic(writer.run_dir / f"model_{label}.safetensors", encode(server.model()))
        return StrategyRun(label, tally.summary(server, config, time.perf_counter() - began))

    @staticmethod
    def _checkpoint(server: ParameterServer, r: int, tally: Tally, wall_time_s: float, snapshot: Path) -> None:
        """After round ``r``'s rows are written: what a resumed run continues from (with the simulated
        instance pool, so the resumed run's cold and warm starts, and its clock, are the same)."""
        state = {"round": r, "tally": asdict(tally), "wall_time_s": wall_time_s, "pool": server.runtime.pool_state()}
        server.save_checkpoint(state, snapshot)

    def _play_round(self, server: ParameterServer, label: str, r: int, tally: Tally) -> RoundRecord:
        """One round: plan, train every planned device, upload at virtual arrival times, finalise."""
        available = [k for k, p in enumerate(self.fleet) if self.clock.is_available(p, r, k)]
        plans, start_s = server.start_round(r, available, tally.now_s)
        planned_steps = {k: p.local_steps for k, p in plans.items()}
        state = server.round_state(r)
        if state is None:
            raise AmbleError(f"round {r} has no state after it was planned")
        # Resuming a round the server had already decided (the driver died before its checkpoint):
        # train again for the rows and tallies, but do not upload what was already aggregated.
        decided = not state.is_open
        start_params = server.model(state.base_version)
        rows: list[dict[str, Any]] = []
        finished_s: dict[int, float] = {}
        drop_times: list[float] = []
        timings: dict[int, RoundTiming] = {}
        samples = 0
        train_compute_s = 0.0
        jobs: list[TrainJob] = []
        for k, plan in sorted(plans.items()):
            timing = self.clock.timing(self.fleet[k], r, k, plan.batch_size, plan.local_steps)
            plan, timing = apply_deadline(plan, timing)
            row = device_row(label, r, k, plan, timing, len(self.device_data[k][1]))
            rows.append(row)
            if timing.dropped_at_s is not None:
                # It vanished part-way (or gave up at the deadline): charge what it spent, upload nothing.
                spent_computing = min(max(timing.dropped_at_s - timing.download_s, 0.0), timing.compute_s)
                row.update(compute_s=spent_computing, comm_s=timing.dropped_at_s - spent_computing, status="dropped")
                drop_times.append(start_s + timing.dropped_at_s)
                continue
            jobs.append(TrainJob(k, plan, derive_seed(self.config.seed, r, k)))
            timings[k] = timing
            finished_s[k] = start_s + timing.total_s  # its upload's arrival, known before it trains
        # In arrival order, a chunk at a time: each chunk's updates are folded before the next trains,
        # so memory holds at most UPLOAD_CHUNK updates however many devices the round has.
        jobs.sort(key=lambda job: (finished_s[job.device], job.device))
        by_device = {row["device"]: row for row in rows}
        for begin in range(0, len(jobs), UPLOAD_CHUNK):
            chunk = jobs[begin : begin + UPLOAD_CHUNK]
            shifts = server.corrections([job.device for job in chunk], state.base_version)
            if shifts is not None:  # SCAFFOLD: each device's c - c_k (None: no control variate yet, all zero)
                chunk = [replace(job, correction=shifts[job.device]) for job in chunk]
            trained = self.devices().train(start_params, chunk)
            for job in chunk:
                k = job.device
                result, timing, row = trained[k], timings[k], by_device[k]
                train_compute_s += result.compute_s
                samples += result.samples
                report = Report(
                    r,
                    k,
                    len(self.device_data[k][1]),
                    result.steps,
                    job.plan.batch_size,
                    timing.compute_s,
                    timing.download_s,
                    timing.upload_s,
                )
                cut = result.steps < planned_steps[k]
                row["status"] = "partial" if cut or row["epochs"] < self.config.train.local_epochs else "ok"
                if not decided:
                    server.upload(report, result.update, finished_s[k])
            server.run_functions()
        last_event_s = max([*finished_s.values(), *drop_times], default=start_s)
        outcome = server.close_round(r, last_event_s)
        end_s = max(outcome.ended_at_s, last_event_s)
        finalized = outcome.status == "finalized"
        for row in rows:
            k = row["device"]
            if k in finished_s:
                row["idle_s"] = end_s - finished_s[k]
                if not finalized or k not in outcome.counted:
                    row["status"] = "failed"  # rejected, or received by a round that failed
        record = RoundRecord(outcome, rows, samples, train_compute_s)
        tally.count(record, max(finished_s.values(), default=None), end_s)
        return record


RUN_FILE = "run.json"
"""The resolved config and store namespace of a run, written first: what ``--resume`` reads."""


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    progress: bool = True,
    cache_dir: Path | None = None,
    resume: bool = False,
    model_factory: ModelFactory | None = None,
) -> dict[str, Any]:
    """Run every strategy of ``config`` on the identical partition, fleet and seed; write the outputs.

    Every round is checkpointed in ``out_dir/state`` (and in the Redis store, when that is the store);
    with ``resume`` each strategy continues after its last checkpointed round instead of starting over.
    ``model_factory`` (the Python API's in-memory model) builds the model in this process instead of
    ``config.model``; it cannot reach Ray training actors.
    """
    if model_factory is not None and trains_on_ray(config):
        raise ConfigError(
            "a model factory passed in memory cannot reach Ray training actors in other processes: name the model "
            "by an import path installed on every node (model: 'package.module:function'), or set ray.train: false"
        )
    namespace = run_namespace(config, out_dir)
    state_dir = out_dir / "state"
    processes = processes_for(config, model_factory)
    keep: dict[str, int] = {}
    if resume:
        gather_rows(out_dir, [strategy_label(s) for s in config.strategies])
        keep = resume_points(config, out_dir)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    # Everything a run computes (data preparation, calibration, training, evaluation) uses run.threads
    # torch threads: float sums split by thread, so a thread count of the machine's would leak into results.
    with torch_threads(config.run.threads):
        experiment = Experiment(config, cache_dir, model_factory)
        with RunWriter(out_dir, append=resume, keep_rounds=keep) as writer:
            write_atomic(
                out_dir / RUN_FILE, json.dumps({"config": config_to_dict(config), "namespace": namespace}).encode()
            )
            if processes > 1:
                results = run_parallel(
                    config, experiment.step_time.to_json(), processes, progress, namespace, state_dir, resume
                )
            else:
                results = experiment.run(writer, progress, namespace, state_dir, resume)
            summary = {
                "config": config_to_dict(config),
                "calibration": {"t_ref_s": experiment.step_time.to_json()},
                "strategies": results,
            }
            writer.write_summary(summary)
    gather_rows(out_dir, [strategy_label(s) for s in config.strategies])  # a parallel run's rows
    shutil.rmtree(state_dir, ignore_errors=True)
    build_report(out_dir)
    return summary


def resume_points(config: ExperimentConfig, out_dir: Path) -> dict[str, int]:
    """The last completed round of each strategy of a run in ``out_dir`` (-1: start it over)."""
    namespace, state_dir = run_namespace(config, out_dir), out_dir / "state"
    points = {}
    for strategy in config.strategies:
        label = strategy_label(strategy)
        if (state_dir / f"{label}.summary.json").is_file():
            points[label] = config.rounds - 1
            continue
        checkpoint = saved_checkpoint(config, f"{namespace}/{label}", state_dir / f"{label}.safetensors")
        points[label] = -1 if checkpoint is None else int(checkpoint["round"])
    return points


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """The config a run in ``run_dir`` was started with (to resume it)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise AmbleError(f"{run_dir} holds no run to resume ({RUN_FILE} is missing): start it with `amble run CONFIG`")
    return config_from_dict(json.loads(path.read_text())["config"], str(path))
