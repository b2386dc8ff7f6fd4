"""`kextless run lifecycle`: process ids and connection ends, in the foreground (supervisord).

Runs inside the guarded namespace (`nsenter --net=/var/run/netns/NAME`, see deploy/programs.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kextless.actors.lifecycle.core import LifecycleConfig, LifecycleCore
from kextless.actors.lifecycle.shell import COALESCE_S, LifecycleShell
from kextless.base import logs
from kextless.base.rundir import RuntimeDir


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError("must be > 0 and <= 86400 seconds")
    return value


def _yield_cpu(nice: int) -> None:
    """Let the actors on a connect's path win the CPU: niceness, and SCHED_BATCH so a
    wakeup of ours does not preempt them (the kernel's CPU scheduler decides, no polling)."""
    try:
        os.nice(nice)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:
        logging.getLogger("lifecycle").warning("cannot lower the CPU priority: %s", e)


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
    p.add_argument(
        "--coalesce-ms",
        type=float,
        default=COALESCE_S * 1000,
        metavar="MS",
        help="with outbound owners from the kernel, read events this long after they start "
        f"to arrive, off the connect path (0: at once; default {COALESCE_S * 1000:g})",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        choices=range(20),
        metavar="N",
        help="run at this niceness, under SCHED_BATCH (default 10): ends have 1 s, a "
        "connect's verdict round trip competes for the same CPUs (0: as every actor)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not 0 <= args.coalesce_ms <= 100:
        p.error("--coalesce-ms must be between 0 and 100")
    run = RuntimeDir.from_arg(args.run_dir).create()
    logs.setup("lifecycle", args.log_level)
    if args.nice:
        _yield_cpu(args.nice)
    core = LifecycleCore(LifecycleConfig(udp_idle_ns=int(args.udp_idle_timeout * 1e9)))
    shell = LifecycleShell(
        core,
        args.ale_endpoint or run.ale_endpoint,
        args.actors_endpoint or run.actors_endpoint,
        table_interval_s=args.table_interval,
        coalesce_s=args.coalesce_ms / 1000,
        run_dir=run.path,
    )
    shell.run()
    return 0


if __name__ == "__main__":  # `python -m kextless.actors.lifecycle.main`, until cli.py lists it
    sys.exit(main(sys.argv[1:]))
