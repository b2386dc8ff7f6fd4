"""`kextless run broker`: the broker in the foreground (what the supervisor runs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kextless.base import logs
from kextless.base.heartbeat import Heartbeat
from kextless.base.rundir import RuntimeDir
from kextless.broker.core import DEFAULT_QUEUE_BYTES, BrokerCore, NoClient
from kextless.broker.server import BrokerServer, ConfigError, CurveConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kextless run broker",
        description="Serve the kext device over ZeroMQ (docs/broker-wire.md).",
    )
    p.add_argument("--endpoint", help="client ROUTER endpoint (default: ipc://RUN_DIR/kext.sock)")
    p.add_argument(
        "--run-dir", type=Path, help="runtime directory (default: per-user, see deploy/runtime.py)"
    )
    p.add_argument(
        "--actors-endpoint",
        help="actors ROUTER endpoint (default: ipc://RUN_DIR/actors.sock, or "
        "actors.sock beside an ipc --endpoint)",
    )
    p.add_argument(
        "--queue-bytes",
        type=int,
        default=DEFAULT_QUEUE_BYTES,
        help=f"info queue capacity in bytes (default {DEFAULT_QUEUE_BYTES})",
    )
    p.add_argument(
        "--curve-server-secret",
        type=Path,
        help="zmq.auth certificate file with the server's secret key (for tcp://)",
    )
    p.add_argument(
        "--curve-clients",
        type=Path,
        help="directory of authorized client public-key certificates (for tcp://)",
    )
    p.add_argument(
        "--no-client",
        type=NoClient,
        choices=list(NoClient),
        default=NoClient.WAIT,
        help="while no client session is open, connection infos wait for a client or the "
        "ALE's verdict timeout (wait, the default), or are refused at once so the ALE applies "
        "its default verdict now (default)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    log = logs.setup("broker", args.log_level)
    try:
        if args.queue_bytes < 4096:
            raise ConfigError("--queue-bytes must be at least 4096")
        if (args.curve_server_secret is None) != (args.curve_clients is None):
            raise ConfigError("CURVE needs both --curve-server-secret and --curve-clients")
        curve = (
            CurveConfig(args.curve_server_secret, args.curve_clients)
            if args.curve_server_secret
            else None
        )
        endpoint, actors_endpoint = args.endpoint, args.actors_endpoint
        heartbeat = None
        if (
            args.run_dir
            or endpoint is None
            or (actors_endpoint is None and not endpoint.startswith("ipc://"))
        ):
            run_dir = RuntimeDir.from_arg(args.run_dir)
            run_dir.create()
            heartbeat = Heartbeat(run_dir.path, "broker")
            endpoint = endpoint or run_dir.kext_endpoint
            actors_endpoint = actors_endpoint or run_dir.actors_endpoint
        if actors_endpoint is None:
            # Beside the client socket, in the same private directory.
            actors_endpoint = f"ipc://{Path(endpoint[len('ipc://') :]).parent / 'actors.sock'}"
        core = BrokerCore(args.queue_bytes, pid=os.getpid(), no_client=args.no_client)
        if args.no_client is NoClient.DEFAULT:
            log.info("no client: connection infos are refused at once while no session is open")
        server = BrokerServer(core, endpoint, actors_endpoint, curve, log, heartbeat)
        return server.run()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
