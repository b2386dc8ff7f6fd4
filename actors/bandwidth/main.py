"""`kextless run bandwidth`: per-connection byte counts for GetBandwidthStats (supervisord).

Runs inside the guarded namespace (`ip netns exec NAME`, see deploy/programs.py), where it
reads the capture's kernel counters read-only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kextless.actors.bandwidth.core import BandwidthConfig, BandwidthCore
from kextless.actors.bandwidth.shell import BandwidthShell
from kextless.base import logs
from kextless.base.rundir import RuntimeDir


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.01 <= value <= 25:
        raise argparse.ArgumentTypeError(
            "must be between 0.01 and 25 s (ended connections stay ~30 s in the kernel cache)"
        )
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kextless run bandwidth", description=__doc__)
    p.add_argument("--run-dir", type=Path, help="runtime directory (default: the host instance)")
    p.add_argument("--actors-endpoint", help="the broker's actor endpoint (default: RUN)")
    p.add_argument(
        "--poll-interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how often the kernel counters are read between requests (default 1)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    run = RuntimeDir.from_arg(args.run_dir).create()
    logs.setup("bandwidth", args.log_level)
    core = BandwidthCore(BandwidthConfig(poll_ns=int(args.poll_interval * 1e9)))
    BandwidthShell(core, args.actors_endpoint or run.actors_endpoint, run_dir=run.path).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
