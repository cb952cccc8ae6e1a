"""The ``amble`` command: ``run`` an experiment, ``report`` a finished run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from amble.errors import AmbleError, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amble", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_worker, _add_serve, _add_device, _add_report):
        add(commands)
    return parser


def _add_run(commands: Any) -> None:
    run = commands.add_parser("run", help="run every strategy of a config on the same data, fleet and seed")
    run.add_argument("config", type=Path, nargs="?", help="experiment YAML, e.g. examples/quickstart.yaml")
    run.add_argument("--out", type=Path, default=None, help="output directory (default runs/<name>)")
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last completed round (its config is read from RUN_DIR)",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set rounds=10 --set strategies.1.lr_scaling=sqrt",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_worker(commands: Any) -> None:
    worker = commands.add_parser(
        "worker", help="run parameter-server functions for runs kept in Redis (one function instance per process)"
    )
    worker.add_argument("--store", required=True, help="the Redis URL, e.g. redis://127.0.0.1:6379/0")
    worker.add_argument(
        "--namespace", action="append", default=None, help="serve only this run (repeatable; default: every run)"
    )
    worker.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="let a run spec name a strategy, aggregator or model from this installed package (repeatable)",
    )
    worker.add_argument("--max-events", type=int, default=None, help="exit after running this many events")
    worker.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    worker.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the driver) is gone")
    worker.add_argument("--idle-exit-s", type=float, default=None, help="exit after this many idle seconds")
    worker.add_argument(
        "--spawned-at", type=float, default=None, help="Unix time the process was started (set by the run's pool)"
    )


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve one strategy of a config to real devices over HTTP")
    serve.add_argument("config", type=Path, help="experiment YAML (data, model, rounds, the strategy)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    serve.add_argument(
        "--strategy", default=None, help="the label of the strategy to serve (if the config has several)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--out", type=Path, default=None, help="output directory (default runs/<name>-serve)")
    serve.add_argument("--round-timeout-s", type=float, default=300.0, help="a round's deadline in seconds")
    serve.add_argument("--linger-s", type=float, default=5.0, help="seconds to keep serving after the last round")
    serve.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    serve.add_argument(
        "--local-devices",
        type=int,
        default=None,
        metavar="N",
        help="also start N `amble device` processes on this machine (devices 0..N-1), stopped at the end",
    )
    serve.add_argument(
        "--slowdowns",
        default=None,
        metavar="S1,S2,...",
        help="with --local-devices: how many times slower each device really trains (one value, or one per device)",
    )
    serve.add_argument(
        "--device-threads", type=int, default=1, help="with --local-devices: torch threads per device (default 1)"
    )
    serve.add_argument(
        "--device-exit-s",
        type=float,
        default=60.0,
        help="with --local-devices: how long devices have to exit after the run before they count as failed",
    )


def _add_device(commands: Any) -> None:
    device = commands.add_parser("device", help="run one real device against `amble serve`")
    device.add_argument("--server", required=True, help="the gateway's URL, e.g. http://127.0.0.1:8000")
    device.add_argument("--token", default=None, help="this device's token (default: $AMBLE_TOKEN)")
    device.add_argument("--slowdown", type=float, default=1.0, help="really take this many times longer to train")
    device.add_argument(
        "--data-root",
        default=None,
        help="where the dataset is on this machine (a built-in's folder, or your own file or image folder, "
        "which a device reads only from here; default for built-ins: the config's)",
    )
    device.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="let the server's config name a model or data loader from this installed package (repeatable)",
    )
    device.add_argument("--ca-cert", default=None, help="trust this certificate (PEM) for an https:// server")
    device.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: one per core; 1 if devices share a machine)"
    )


def _add_report(commands: Any) -> None:
    report = commands.add_parser("report", help="rebuild plots and report.html from a run's output files")
    report.add_argument("run_dir", type=Path)


def _run(args: argparse.Namespace) -> int:
    from amble.config import config_to_dict, load_config
    from amble.errors import ConfigError
    from amble.sim import run_experiment
    from amble.sim.driver import load_run_config

    if args.resume is not None:
        out_dir = args.resume
        config = load_run_config(out_dir)  # a password in its store URL reads *** (AMBLE_REDIS_PASSWORD gives it)
        if args.config is not None:
            given = load_config(args.config, args.overrides)
            if config_to_dict(given) != config_to_dict(config):
                raise ConfigError(
                    f"{args.config} (with --set) is not the config of the run in {out_dir}; drop it to resume"
                )
            config = given  # the same run, with the store's password if the config (or --set) gives it
        if args.config is None and args.overrides:
            raise ConfigError("--set cannot change a run being resumed; resume it as it was started")
    elif args.config is None:
        raise ConfigError("amble run needs a config file (e.g. examples/quickstart.yaml) or --resume RUN_DIR")
    else:
        config = load_config(args.config, args.overrides)
        out_dir = args.out or Path("runs") / config.name
    summary = run_experiment(config, out_dir, progress=not args.no_progress, resume=args.resume is not None)
    print(f"\nwrote {out_dir}/ (metrics.jsonl, devices.jsonl, summary.json, report.html, plots)")
    _print_summary(summary["strategies"])
    return _progress_status(summary["strategies"], "metrics.jsonl")


def _progress_status(strategies: dict[str, dict[str, object]], rows_file: str) -> int:
    """Warn on stderr about failed rounds; the exit status: non-zero when a strategy stalled."""
    from amble.report.progress import STALLED_EXIT_STATUS, failed_rounds_warnings, stalled

    for line in failed_rounds_warnings(strategies, rows_file):
        print(f"amble: warning: {line}", file=sys.stderr)
    return STALLED_EXIT_STATUS if any(stalled(result) for result in strategies.values()) else 0


def _print_summary(results: dict[str, dict[str, object]]) -> None:
    header = f"{'strategy':<14}{'final acc':>10}{'best acc':>10}{'time to target':>16}{'virtual time':>14}"
    print(header)
    for label, s in results.items():
        ttt = s.get("time_to_target_s")
        ttt_text = "not reached" if ttt is None else f"{float(str(ttt)):,.0f} s"
        print(
            f"{label:<14}{float(str(s['final_accuracy'])):>10.4f}{float(str(s['best_accuracy'])):>10.4f}"
            f"{ttt_text:>16}{float(str(s['virtual_time_s'])):>12,.0f} s"
        )


def _report(args: argparse.Namespace) -> int:
    from amble.report import build_report

    path = build_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import signal

    import torch

    from amble.imports import ImportPolicy
    from amble.server.factory import handlers_from_store
    from amble.server.runtime.workers import FunctionWorker, store_factory_from_env
    from amble.server.store.redis import check_access

    # Folding is memory-bound: a thread per core in every worker only makes workers wait for each other.
    torch.set_num_threads(args.threads)
    check_access(args.store)  # a bad URL or a missing password fails here, clearly
    worker = FunctionWorker(
        args.store,
        handlers_from_store,
        namespaces=args.namespace,
        parent_pid=args.parent_pid,
        started_at_s=args.spawned_at,
        imports=ImportPolicy(frozenset(args.allow_import), "the run spec in Redis", "a worker"),
    )
    worker.store_factory = store_factory_from_env(worker.consumer)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    count = worker.serve(max_events=args.max_events, idle_exit_s=args.idle_exit_s)
    print(f"amble worker {worker.consumer}: ran {count} events", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from amble.config import load_config
    from amble.live.localfleet import LocalFleet, check_fleet_size, device_trust, local_url, parse_slowdowns
    from amble.live.serve import prepare, serve
    from amble.report.files import read_summary

    config = load_config(args.config, args.overrides)
    out_dir = args.out or Path("runs") / f"{config.name}-serve"
    slowdowns = None
    if args.local_devices is not None:
        check_fleet_size(config, args.local_devices)
        slowdowns = parse_slowdowns(args.slowdowns, args.local_devices)
        if args.device_threads < 1:
            raise ConfigError(f"--device-threads must be at least 1, not {args.device_threads}")
    elif args.slowdowns is not None:
        raise ConfigError("--slowdowns applies to a local fleet: add --local-devices N")
    served = prepare(config, out_dir, args.strategy, args.round_timeout_s)
    tls = args.ssl_certfile is not None
    print(
        f"amble serve: {local_url(args.host, args.port, tls)} (OpenAPI at /docs); device tokens in "
        f"{served.tokens_file}, the operator token (/v1/status, /metrics) in {out_dir / 'operator.token'}"
    )
    fleet = None
    if slowdowns is not None:
        url = local_url(args.host, args.port, tls)
        tokens = served.tokens
        trusted = device_trust(config)
        fleet = LocalFleet.start(
            url, tokens, slowdowns, out_dir / "devices", args.device_threads, args.ssl_certfile, trusted
        )
        print(f"amble serve: started {len(slowdowns)} local devices (logs in {out_dir / 'devices'})")
    try:
        serve(served, args.host, args.port, out_dir, args.linger_s, args.ssl_certfile, args.ssl_keyfile)
    except BaseException:
        if fleet is not None:
            fleet.stop()
        raise
    if fleet is not None:
        fleet.finish(args.device_exit_s)
    print(
        f"amble serve: done; wrote {out_dir}/ (metrics.jsonl, devices.jsonl, summary.json, report.html, "
        "fleet_trace.json, serve.jsonl)"
    )
    return _progress_status(read_summary(out_dir)["strategies"], "serve.jsonl")


def _device(args: argparse.Namespace) -> int:
    import os

    from amble.client.device import DeviceAgent

    token = args.token or os.environ.get("AMBLE_TOKEN")
    if not token:
        raise ConfigError("amble device needs its token: --token TOKEN or AMBLE_TOKEN (from amble serve's tokens.json)")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, not {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    agent = DeviceAgent(
        args.server,
        token,
        args.slowdown,
        data_root=args.data_root,
        ca_cert=args.ca_cert,
        allow_imports=args.allow_import,
    )
    rounds = agent.run()
    print(f"amble device: trained in {len(rounds)} rounds", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "worker":
            return _worker(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "device":
            return _device(args)
        return _report(args)
    except AmbleError as exc:
        print(f"amble: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amble: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
