"""Processes a benchmark starts and measures: a private redis-server, and the peak memory of a run
with everything it starts (Ray and Flower start processes of their own, some re-parented away from
the run, so a run's memory is the sum over its whole process tree, sampled from /proc)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

MB = 2**20


def process_table() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, start time in clock ticks)`` of every process now."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with suppress(OSError, ValueError, IndexError):
                stat = Path(entry.path, "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()  # the name, in brackets, may hold spaces
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def memory_of(pid: int) -> tuple[int, int]:
    """``(RSS, PSS)`` bytes of a process (PSS shares each page among the processes mapping it)."""
    rss = pss = 0
    with suppress(OSError, ValueError, IndexError):
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    return rss, pss


class TreeMemory:
    """Peak memory of a process and of every process it starts, summed, sampled from /proc.

    A process stays in the tree once seen, even if re-parented (Ray daemonises some of its own), as
    long as its pid keeps its start time.
    """

    def __init__(self, root: int, interval_s: float = 0.1) -> None:
        self.root = root
        self.interval_s = interval_s
        self.known: dict[int, int] = {}
        self.peak_rss = self.peak_pss = self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def alive(self) -> dict[int, int]:
        table = process_table()
        tree = {pid: start for pid, start in self.known.items() if table.get(pid, (0, -1))[1] == start}
        if self.root in table:
            tree[self.root] = table[self.root][1]
        grown = True
        while grown:
            new = {pid: start for pid, (parent, start) in table.items() if parent in tree and pid not in tree}
            tree.update(new)
            grown = bool(new)
        self.known = tree
        return tree

    def sample(self) -> None:
        tree = self.alive()
        sizes = [memory_of(pid) for pid in tree]
        self.peak_rss = max(self.peak_rss, sum(rss for rss, _ in sizes))
        self.peak_pss = max(self.peak_pss, sum(pss for _, pss in sizes))
        self.most_processes = max(self.most_processes, len(tree))


def stop_leftovers(pids: list[int]) -> None:
    """Processes a run started and left behind (none expected): TERM, then KILL after 5 s."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    """A private ``redis-server`` on a free loopback port, without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="amble-bench-redis-") as directory:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""]
        args += ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10.0
            while not answers_ping(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True)
class Measured:
    """A finished process as seen from outside: its output, wall time and the peak memory of its tree."""

    returncode: int
    stdout: str
    spawned_at: float
    """``time.time()`` when it was spawned (its own stamps are on the same clock)."""
    wall_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    most_processes: int
    leftovers: int
    """Processes it started and left behind (stopped here)."""


def run_measured(command: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> Measured:
    """Run ``command`` to the end, sampling its process tree; stderr (then stdout) go to ``log_path``.
    A non-zero exit ends the benchmark with the end of the log."""
    spawned_at = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=cwd)
        with TreeMemory(process.pid) as memory:
            stdout, _ = process.communicate()
        wall_s = time.time() - spawned_at
        log.write(stdout)
    leftovers = [pid for pid in memory.alive() if pid != process.pid]
    stop_leftovers(leftovers)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(
            f"{' '.join(command[:4])} ... failed (exit {process.returncode}); the end of {log_path}:\n{tail}"
        )
    return Measured(
        process.returncode,
        stdout,
        spawned_at,
        wall_s,
        memory.peak_rss / MB,
        memory.peak_pss / MB,
        memory.most_processes,
        len(leftovers),
    )
