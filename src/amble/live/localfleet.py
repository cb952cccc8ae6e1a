"""A local fleet for demos, tests and benchmarks: ``amble serve CONFIG --local-devices N``.

Starts N ``amble device`` processes against the server being started (device ``k`` gets token
``k``, through ``AMBLE_TOKEN`` so it is not on a command line), each really ``--slowdowns[k]``
times slower and with one torch thread unless told otherwise: N processes with a thread per core
each on a small machine slow each other down, and the speed AMBLE learns from would be contention.
Each device's output goes to ``devices/device_<k>.log`` in the run directory. When the run ends the
devices are waited for (they stop on their own once told the run is done) and any still running
are stopped; a device that failed makes ``amble serve`` fail, naming it and its log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from amble.config import ExperimentConfig, is_user_data_path
from amble.errors import AmbleError, ConfigError
from amble.imports import is_import_path, top_package
from amble.server.runtime.pool import stop_processes

STOP_GRACE_S = 5.0
"""How long a device has to exit after it is asked to stop, before it is killed."""


def parse_slowdowns(text: str | None, devices: int) -> list[float]:
    """``"1,1,2"`` as one slowdown per device; one value (or none: 1) applies to every device."""
    if text is None or not text.strip():
        return [1.0] * devices
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--slowdowns must be numbers separated by commas (e.g. 1,1,2,3), not {text!r}") from None
    if len(values) == 1:
        values = values * devices
    if len(values) != devices:
        raise ConfigError(f"--slowdowns gives {len(values)} values for {devices} --local-devices: give one per device")
    if min(values) < 1.0:
        raise ConfigError(f"--slowdowns must each be at least 1 (they multiply real training time), not {text!r}")
    return values


def check_fleet_size(config: ExperimentConfig, devices: int) -> None:
    """Refuse a local fleet that cannot play the config's rounds, before anything starts."""
    if devices < 1:
        raise ConfigError(f"--local-devices must be at least 1, not {devices}")
    if devices > config.data.num_devices:
        raise ConfigError(
            f"--local-devices {devices} is more than the config's data.num_devices ({config.data.num_devices}): "
            "there is no partition for the rest"
        )
    if devices < config.devices_per_round:
        raise ConfigError(
            f"--local-devices {devices} is fewer than devices_per_round ({config.devices_per_round}): the first "
            "round would wait for devices forever; start more devices or lower devices_per_round"
        )


def device_trust(config: ExperimentConfig) -> list[str]:
    """The ``amble device`` options that let a local fleet load what this machine's own config names:
    its import paths' packages and its data file (the operator started both sides)."""
    options = []
    for value in (config.model, config.data.dataset):
        if is_import_path(value):
            options += ["--allow-import", top_package(value)]
    if is_user_data_path(config.data.dataset):
        options += ["--data-root", config.data.dataset]
    return options


def local_url(host: str, port: int, tls: bool) -> str:
    """Where processes on this machine reach a server listening on ``host``."""
    reachable = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in reachable:
        reachable = f"[{reachable}]"
    return f"{'https' if tls else 'http'}://{reachable}:{port}"


@dataclass
class LocalFleet:
    """The device processes this server started (and only those: they are stopped by their own handles)."""

    processes: dict[int, subprocess.Popen[bytes]]
    logs: dict[int, Path]

    @classmethod
    def start(
        cls,
        url: str,
        tokens: Mapping[int, str],
        slowdowns: Sequence[float],
        log_dir: Path,
        threads: int = 1,
        ca_cert: str | None = None,
        trusted: Sequence[str] = (),
    ) -> LocalFleet:
        """Start one ``amble device`` per slowdown, device ``k`` with ``tokens[k]``; ``trusted`` are the
        options that let them load what this server's own config names (:func:`device_trust`)."""
        if threads < 1:
            raise ConfigError(f"--device-threads must be at least 1, not {threads}")
        log_dir.mkdir(parents=True, exist_ok=True)
        fleet = cls({}, {})
        try:
            for device, slowdown in enumerate(slowdowns):
                command = [sys.executable, "-m", "amble", "device", "--server", url]
                command += ["--slowdown", f"{slowdown:g}", "--threads", str(threads), *trusted]
                if ca_cert is not None:
                    command += ["--ca-cert", ca_cert]
                log = log_dir / f"device_{device}.log"
                with log.open("wb") as output:  # the child keeps its own handle
                    fleet.processes[device] = subprocess.Popen(
                        command,
                        env={**os.environ, "AMBLE_TOKEN": tokens[device]},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                fleet.logs[device] = log
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def finish(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for every device to exit, stop the rest; raise AmbleError naming
        each device that failed (a non-zero exit, or still running at the end)."""
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # counted as failed below
                process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        still_running = [d for d, p in self.processes.items() if p.poll() is None]
        self.stop()
        failed = [
            f"device {d} {'did not stop' if d in still_running else f'exited with status {p.returncode}'} "
            f"(log: {self.logs[d]}{_last_line(self.logs[d])})"
            for d, p in self.processes.items()
            if d in still_running or p.returncode != 0
        ]
        if failed:
            raise AmbleError("the local fleet had failures: " + "; ".join(failed))

    def stop(self) -> None:
        """Ask every device still running to stop, then kill those that do not within the grace time."""
        stop_processes(list(self.processes.values()), STOP_GRACE_S)


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f"; last line: {lines[-1][:300]}" if lines else ""
