"""`kextless run ale`: the decision actor in the foreground (what supervisord runs)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from kextless.actors.ale.core import AleConfig, AleCore
from kextless.actors.ale.ids import IdReservation
from kextless.actors.ale.journal import FILE_NAME, Journal, instance_owner
from kextless.actors.ale.shell import AleShell
from kextless.base import logs
from kextless.base.heartbeat import Heartbeat
from kextless.base.rundir import RuntimeDir
from kextless.protocol.enums import Verdict

_VERDICTS = {v.kext_name: v for v in Verdict}


def _verdict(name: str) -> Verdict:
    if name in _VERDICTS:
        return _VERDICTS[name]
    raise argparse.ArgumentTypeError(f"unknown verdict {name!r}; one of {', '.join(_VERDICTS)}")


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be > 0 and <= 3600 seconds")
    return value


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError("must be 0 (unbounded) to 1000000")
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kextless run ale", description=__doc__)
    p.add_argument("--run-dir", type=Path, help="runtime directory (default: the host instance)")
    p.add_argument("--capture-endpoint", help="where capture connects (default: RUN/ale.sock)")
    p.add_argument("--actors-endpoint", help="the broker's actor endpoint (default: RUN)")
    p.add_argument(
        "--verdict-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="held packets older than this get the default verdict (default 10)",
    )
    p.add_argument(
        "--default-verdict",
        type=_verdict,
        default=Verdict.BLOCK,
        metavar="NAME",
        help="verdict for timed-out or refused packets (default Block)",
    )
    p.add_argument(
        "--opener-hints",
        action="store_true",
        help="give an outbound TCP connection the pid of the only process connecting to its "
        "remote, without waiting for its exact attribution (faster, wrong under races)",
    )
    p.add_argument(
        "--attribution-wait",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="how long an outbound connection info waits for its pid while the lifecycle "
        "actor runs (default 0.05; 0 never waits)",
    )
    p.add_argument(
        "--max-pending",
        type=_count,
        default=AleConfig.max_pending,
        metavar="N",
        help="at most N packets wait for a verdict; a new one beyond is dropped unasked "
        f"(default {AleConfig.max_pending}; 0: unbounded)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    run = RuntimeDir.from_arg(args.run_dir).create()
    logs.setup("ale", args.log_level)
    config = AleConfig(
        verdict_timeout_ns=int(args.verdict_timeout * 1e9),
        default_verdict=args.default_verdict,
        attribution_wait_ns=max(0, int(args.attribution_wait * 1e9)),
        opener_hints=args.opener_hints,
        max_pending=args.max_pending,
    )
    ids = IdReservation(run.path / "ale-ids")
    try:
        first_id = ids.first_id()
    except (RuntimeError, OSError) as exc:
        logging.getLogger("ale").error("%s", exc)
        return 1
    log = logging.getLogger("ale")
    log.info("issuing pending ids from %d", first_id)
    core = AleCore(config, first_id)
    journal = Journal(run.path / FILE_NAME, instance_owner(os.getppid()))
    try:
        restored = journal.load()
    except OSError as exc:
        log.error("cannot use the connection journal %s: %s", journal.path, exc)
        return 1
    core.restore(restored, time.monotonic_ns())
    if restored:
        log.info("restored %d decided connection(s) from %s", len(restored), journal.path)
    shell = AleShell(
        core,
        args.capture_endpoint or run.ale_endpoint,
        args.actors_endpoint or run.actors_endpoint,
        ids,
        journal=journal,
        heartbeat=Heartbeat(run.path, "ale"),
    )
    shell.run()
    return 0
