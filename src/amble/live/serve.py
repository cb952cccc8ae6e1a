"""``amble serve``: the parameter server for real devices, behind the HTTP gateway.

It sets up one strategy of a config as the simulator would (initial model from the seed, the
store the config names), issues one bearer token per device (written to a file only the owner can
read; the store keeps their hashes), plays the rounds with a :class:`Coordinator` in a background
thread, evaluates each published model on the test set, and serves the gateway with uvicorn
(optionally over TLS with uvicorn's certificate options). Round records go to ``serve.jsonl`` and
the final model to ``model_<strategy>.safetensors`` in the output directory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from amble.config import ExperimentConfig, config_to_dict, strategy_label
from amble.durable import write_atomic
from amble.errors import ConfigError
from amble.live.coordinator import Coordinator, RoundRecord, issue_tokens
from amble.live.gateway import create_app
from amble.runsetup import prepare_run, run_namespace
from amble.server.factory import build_server, release_server, wipe_run
from amble.server.tensors import encode
from amble.strategies.base import Params


@dataclass
class Served:
    app: FastAPI
    coordinator: Coordinator
    tokens: dict[int, str]
    tokens_file: Path
    label: str


def prepare(
    config: ExperimentConfig, out_dir: Path, strategy: str | None = None, round_timeout_s: float = 300.0
) -> Served:
    """Everything ``amble serve`` runs, not yet running: app, coordinator, tokens (written to a file)."""
    labels = [strategy_label(s) for s in config.strategies]
    if strategy is None and len(labels) > 1:
        raise ConfigError(f"amble serve runs one strategy: pass --strategy with one of {', '.join(labels)}")
    if strategy is not None and strategy not in labels:
        raise ConfigError(f"--strategy {strategy} is not in the config; choose one of {', '.join(labels)}")
    index = 0 if strategy is None else labels.index(strategy)
    setup = prepare_run(config)
    namespace = f"{run_namespace(config, out_dir)}/{labels[index]}"
    wipe_run(config, namespace)
    server = build_server(config, index, namespace)
    # Each device's sample count (its FedAvg weight) is known from the config's partition, which
    # devices compute alike: a device cannot register another.
    server.initialize(setup.initial, setup.num_samples, setup.settings)
    tokens = issue_tokens(server.store, config.data.num_devices)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_file = out_dir / "tokens.json"
    write_atomic(tokens_file, json.dumps({str(d): t for d, t in tokens.items()}, indent=1).encode())
    os.chmod(tokens_file, 0o600)

    def score(params: Params) -> float:
        accuracy, _ = setup.score(params)  # the simulator's evaluation samples
        return float(accuracy)

    log_path = out_dir / "serve.jsonl"
    log_path.write_text("")

    def on_round(record: RoundRecord) -> None:
        with log_path.open("a") as file:
            file.write(json.dumps(asdict(record)) + "\n")

    coordinator = Coordinator(
        server, config.rounds, config.devices_per_round, round_timeout_s, evaluate=score, on_round=on_round
    )
    public = config_to_dict(config)
    public["server"] = {}  # the store URL may hold a password; devices need none of it
    return Served(create_app(coordinator, public), coordinator, tokens, tokens_file, labels[index])


KEEP_ALIVE_S = 60.0
"""How long an idle device connection stays open. uvicorn's default of 5 s closed pooled connections
that a client was about to reuse, while a burst of uploads kept the server busy for longer than
that; the client then saw the connection reset and its upload was lost."""


def http_config(
    app: FastAPI, host: str, port: int, ssl_certfile: str | None = None, ssl_keyfile: str | None = None
) -> uvicorn.Config:
    """How the gateway is served, by ``amble serve`` and by the tests and benchmarks alike."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=int(KEEP_ALIVE_S),
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )


def serve(
    served: Served,
    host: str,
    port: int,
    out_dir: Path,
    linger_s: float = 5.0,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Run the rounds and the gateway until the last round closed (plus ``linger_s`` to tell devices)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = uvicorn.Server(http_config(served.app, host, port, ssl_certfile, ssl_keyfile))
    coordinator = served.coordinator

    def rounds() -> None:
        try:
            coordinator.run()
            time.sleep(linger_s)  # devices polling now learn the run is done
        finally:
            server.should_exit = True

    thread = threading.Thread(target=rounds, daemon=True)
    thread.start()
    try:
        server.run()
    finally:
        coordinator.stop()
        thread.join(timeout=10)
        write_atomic(out_dir / f"model_{served.label}.safetensors", encode(coordinator.server.model()))
        release_server(coordinator.server)
