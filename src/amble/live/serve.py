"""``amble serve``: the parameter server for real devices, behind the HTTP gateway.

It sets up one strategy of a config as the simulator would (initial model from the seed, the
store the config names), issues one bearer token per device and one operator token (written to
files only the owner can read; the store keeps their hashes), plays the rounds with a
:class:`Coordinator` in a background thread, evaluates each published model on the test set, and
serves the gateway with uvicorn (optionally over TLS with uvicorn's certificate options). The
output directory gets what ``amble run`` writes (``metrics.jsonl``, ``devices.jsonl``,
``summary.json``, ``report.html`` and plots, on the wall clock: see :mod:`amble.live.record`), the
fleet as measured (``fleet_trace.json``, which ``fleet.kind: trace`` replays), each round's record
as the coordinator made it (``serve.jsonl``) and the final model (``model_<strategy>.safetensors``).

A run *fails* when its rounds cannot go on: an exception in the round loop (a parameter-server
function dead-lettered so a round was never planned or decided, a store fault, an evaluation
error). Then ``serve.jsonl`` ends with ``{"event": "crashed", "round": ..., "error": ...}``, devices
asking for a task are told, and :func:`serve` raises :class:`AmbleError` (``amble serve`` exits
non-zero with the reason). A round that fails below quorum at its deadline is not a failed run: it
is a recorded outcome (``"status": "failed"``) and the next round starts.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from amble.config import ExperimentConfig, config_to_dict, strategy_label
from amble.durable import write_atomic
from amble.errors import AmbleError, ConfigError
from amble.live.coordinator import Coordinator, RoundRecord, SampleLimits, issue_tokens
from amble.live.gateway import create_app
from amble.live.record import ServedRunFiles
from amble.runsetup import prepare_run, run_namespace
from amble.server.factory import build_server, release_server, wipe_run
from amble.server.tensors import encode
from amble.strategies.base import Params
from amble.strategies.fedbuff import is_asynchronous
from amble.strategies.registry import build_strategy, strategy_class

DEVICE_SECTIONS = ("name", "seed", "data", "model", "model_args", "devices_per_round", "train")
"""What ``/v1/whoami`` tells a device of the config: enough to load its data partition and build its
model and trainer. Not the server section (a store URL may hold a password), strategies or fleet."""


@dataclass
class Served:
    app: FastAPI
    coordinator: Coordinator
    tokens: dict[int, str]
    tokens_file: Path
    label: str
    operator_token: str
    """For ``/v1/status`` and ``/metrics``; also in ``operator.token`` beside ``tokens.json``."""
    log_path: Path
    files: ServedRunFiles
    """The run's metrics, devices, summary, report and fleet trace."""
    max_concurrent_requests: int = 512


def device_config(config: ExperimentConfig) -> dict[str, Any]:
    """The sections of ``config`` a device needs (see :data:`DEVICE_SECTIONS`)."""
    whole = config_to_dict(config)
    return {section: whole[section] for section in DEVICE_SECTIONS}


def prepare(
    config: ExperimentConfig, out_dir: Path, strategy: str | None = None, round_timeout_s: float = 300.0
) -> Served:
    """Everything ``amble serve`` runs, not yet running: app, coordinator, tokens (written to files)."""
    labels = [strategy_label(s) for s in config.strategies]
    if strategy is None and len(labels) > 1:
        raise ConfigError(f"amble serve runs one strategy: pass --strategy with one of {', '.join(labels)}")
    if strategy is not None and strategy not in labels:
        raise ConfigError(f"--strategy {strategy} is not in the config; choose one of {', '.join(labels)}")
    index = 0 if strategy is None else labels.index(strategy)
    if is_asynchronous(strategy_class(config.strategies[index].name)):
        raise ConfigError(
            f"strategy '{labels[index]}' (buffered asynchronous aggregation) is not supported on real devices yet: "
            "run it in simulation (amble run), or serve a synchronous strategy"
        )
    if build_strategy(config.strategies[index], config).uses_control_variates():
        raise ConfigError(
            f"strategy '{labels[index]}' uses control variates (scaffold, or control_variates: true), which are not "
            "supported on real devices yet: serve another strategy, or turn control_variates off"
        )
    setup = prepare_run(config)
    namespace = f"{run_namespace(config, out_dir)}/{labels[index]}"
    wipe_run(config, namespace)
    server = build_server(config, index, namespace)
    # With the config's partition, each device's sample count (its FedAvg weight) is known here, as
    # devices compute it alike: a device cannot register another. Devices with their own data
    # register theirs, within server.max_samples and server.max_weight_share.
    own = config.server.device_data == "own"
    server.initialize(setup.initial, {} if own else setup.num_samples, setup.settings)
    tokens = issue_tokens(server.live, config.data.num_devices)
    operator_token = secrets.token_urlsafe(32)
    server.live.set_operator_token(operator_token)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_file = out_dir / "tokens.json"
    write_atomic(tokens_file, json.dumps({str(d): t for d, t in tokens.items()}, indent=1).encode(), mode=0o600)
    write_atomic(out_dir / "operator.token", operator_token.encode(), mode=0o600)

    def score(params: Params) -> tuple[float, float]:
        accuracy, loss = setup.score(params)  # the simulator's evaluation samples
        return float(accuracy), float(loss)

    log_path = out_dir / "serve.jsonl"
    log_path.write_text("")
    files = ServedRunFiles(config, labels[index], out_dir, setup)

    def on_round(record: RoundRecord) -> None:
        with log_path.open("a") as file:
            file.write(json.dumps(asdict(record)) + "\n")
        files.on_round(record)

    limits = SampleLimits(
        config.server.device_data, config.server.max_samples, config.server.max_weight_share, config.devices_per_round
    )
    coordinator = Coordinator(
        server,
        config.rounds,
        config.devices_per_round,
        round_timeout_s,
        evaluate=score,
        on_round=on_round,
        limits=limits,
    )
    app = create_app(coordinator, device_config(config))
    return Served(
        app,
        coordinator,
        tokens,
        tokens_file,
        labels[index],
        operator_token,
        log_path,
        files,
        config.server.max_concurrent_requests,
    )


KEEP_ALIVE_S = 60.0
"""How long an idle device connection stays open. uvicorn's default of 5 s closed pooled connections
that a client was about to reuse, while a burst of uploads kept the server busy for longer than
that; the client then saw the connection reset and its upload was lost."""
SHUTDOWN_TIMEOUT_S = 5
"""How long the gateway waits for requests in flight when it stops; then it cancels them. The run's
files are written before it stops, so a client that never finishes its request cannot keep
``amble serve`` from writing them or from exiting."""


def http_config(
    app: FastAPI,
    host: str,
    port: int,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    limit_concurrency: int | None = 512,
) -> uvicorn.Config:
    """How the gateway is served, by ``amble serve`` and by the tests and benchmarks alike.

    ``limit_concurrency`` (``server.max_concurrent_requests``) bounds the requests in flight: past it
    uvicorn answers 503 at once, which devices retry after a backoff, instead of buffering bodies
    until memory runs out.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=int(KEEP_ALIVE_S),
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
    )


class _Outputs:
    """The run's final files (the model, then ``summary.json`` and the report), written once: by the
    rounds' thread as soon as the rounds end, or after the gateway stopped if that came first."""

    def __init__(self, served: Served, out_dir: Path) -> None:
        self.served, self.out_dir = served, out_dir
        self._lock = threading.Lock()
        self._written = False
        self._failure: Exception | None = None

    def write(self) -> None:
        with self._lock:
            if self._written:
                return
            self._written = True
            coordinator, log = self.served.coordinator, logging.getLogger("amble.serve")
            try:
                model = encode(coordinator.server.model())
                write_atomic(self.out_dir / f"model_{self.served.label}.safetensors", model)
            except Exception as exc:  # a crashed store: say so, and keep the reason the run stopped
                log.error("could not write the final model: %s: %s", type(exc).__name__, exc)
                self._failure = None if coordinator.error is not None else exc
            try:
                self.served.files.finish(coordinator.server.runtime.stats(), coordinator.now_s(), coordinator.error)
            except Exception as exc:  # a crashed store again: the rows written so far stay
                log.error("could not write summary.json: %s: %s", type(exc).__name__, exc)

    def raise_failure(self) -> None:
        """Raise what kept the final model from being written, unless the run had failed anyway."""
        if self._failure is not None:
            raise self._failure


def serve(
    served: Served,
    host: str,
    port: int,
    out_dir: Path,
    linger_s: float = 5.0,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Run the rounds and the gateway until the last round closed (plus ``linger_s`` to tell devices).

    Raises :class:`AmbleError` with the reason when the run failed (see the module docstring) or the
    gateway stopped before the last round.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = http_config(served.app, host, port, ssl_certfile, ssl_keyfile, served.max_concurrent_requests)
    server = uvicorn.Server(config)
    coordinator = served.coordinator
    outputs = _Outputs(served, out_dir)

    def rounds() -> None:
        try:
            coordinator.run()
            if coordinator.error is not None:
                record = {"event": "crashed", "round": coordinator.current, "error": coordinator.error}
                with served.log_path.open("a") as file:
                    file.write(json.dumps(record) + "\n")
            outputs.write()  # now, while the gateway still answers: nothing a client does can hold them up
            time.sleep(linger_s)  # devices polling now learn the run is done (or failed)
        finally:
            server.should_exit = True

    thread = threading.Thread(target=rounds, daemon=True)
    thread.start()
    try:
        server.run()
    finally:
        coordinator.stop()
        thread.join(timeout=10)
        try:
            outputs.write()  # when the gateway stopped first (Ctrl-C): the rounds so far
            outputs.raise_failure()
        finally:
            release_server(coordinator.server)
    if coordinator.error is not None:
        raise AmbleError(f"the run failed in {coordinator.error} (see {served.log_path})")
    if not coordinator.finished:
        raise AmbleError(f"the gateway stopped before the last round (rounds so far in {served.log_path})")
