"""`kextless run lifecycle`: process ids and connection ends, in the foreground (supervisord).

Runs inside the guarded namespace (`nsenter --net=/var/run/netns/NAME`, see deploy/programs.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kextless.actors.lifecycle.core import LifecycleConfig, LifecycleCore
from kextless.actors.lifecycle.shell import LifecycleShell
from kextless.base import logs
from kextless.base.rundir import RuntimeDir


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError("must be > 0 and <= 86400 seconds")
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kextless run lifecycle", description=__doc__)
    p.add_argument("--run-dir", type=Path, help="runtime directory (default: the host instance)")
    p.add_argument("--ale-endpoint", help="the ALE's endpoint (default: RUN/ale.sock)")
    p.add_argument("--actors-endpoint", help="the broker's actor endpoint (default: RUN)")
    p.add_argument(
        "--udp-idle-timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="a UDP flow idle this long has ended (default 600)",
    )
    p.add_argument(
        "--table-interval",
        type=_seconds,
        default=0.25,
        metavar="SECONDS",
        help="how often the socket table is read for closed TCP connections (default 0.25)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    run = RuntimeDir.from_arg(args.run_dir).create()
    logs.setup("lifecycle", args.log_level)
    core = LifecycleCore(LifecycleConfig(udp_idle_ns=int(args.udp_idle_timeout * 1e9)))
    shell = LifecycleShell(
        core,
        args.ale_endpoint or run.ale_endpoint,
        args.actors_endpoint or run.actors_endpoint,
        table_interval_s=args.table_interval,
    )
    shell.run()
    return 0


if __name__ == "__main__":  # `python -m kextless.actors.lifecycle.main`, until cli.py lists it
    sys.exit(main(sys.argv[1:]))
