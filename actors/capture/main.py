"""`kextless run capture`: the capture process of one network namespace.

Run it inside the namespace it guards (`ip netns exec NAME kextless run capture ...`); its
divert handle sees only that namespace. Packets still held by a previous capture process died
with it (the library drops them); CaptureReady makes the ALE resend every known verdict.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

from kextless.actors.capture.core import CaptureCore, Config, ExistingMode
from kextless.actors.capture.kernel_cache import DEFAULT_FLOWS_MAX
from kextless.actors.capture.shell import CaptureShell, ShellConfig, install_signals
from kextless.base import logs
from kextless.base.rundir import RuntimeDir
from kextless.protocol.enums import Verdict


def _addr(version: int) -> Callable[[str], bytes]:
    def parse(text: str) -> bytes:
        ip = ipaddress.ip_address(text)
        if ip.version != version:
            raise argparse.ArgumentTypeError(f"{text} is not an IPv{version} address")
        return ip.packed

    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return port


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kextless run capture", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, help="runtime directory (default: the host instance's)")
    ap.add_argument("--ale-endpoint", help="the ALE's ROUTER (default: <run-dir>/ale.sock)")
    ap.add_argument("--priority", type=int, default=0, help="divert handle priority")
    ap.add_argument(
        "--exclude-port",
        type=_port,
        action="append",
        default=[],
        help="never divert TCP/UDP with this port on either side (repeatable): "
        "the system's own tcp:// control endpoint",
    )
    ap.add_argument("--nameserver-v4", type=_addr(4), default=bytes([127, 0, 0, 1]))
    ap.add_argument("--nameserver-v6", type=_addr(6), default=b"\0" * 15 + b"\x01")
    ap.add_argument("--nameserver-port", type=_port, default=53)
    ap.add_argument("--tunnel-port", type=_port, default=717)
    ap.add_argument("--split-tunnel-port", type=_port, default=719)
    ap.add_argument(
        "--ring-bytes",
        type=int,
        default=0,
        help="eBPF ring buffer per handle (a full ring passes packets unexamined)",
    )
    ap.add_argument(
        "--existing-connections",
        choices=[m.value for m in ExistingMode],
        default=ExistingMode.ASK.value,
        help="TCP connections that exist at start: ask the client about each like a new "
        "one (default), or accept them silently",
    )
    ap.add_argument(
        "--fail-open",
        action="store_true",
        help="no fail-closed guard: packets the divert program lets by unexamined (a full "
        "ring, a stall, no capture running) PASS instead of being dropped",
    )
    ap.add_argument(
        "--no-kernel-cache",
        action="store_true",
        help="decide every flow in Python with per-port filters and handle swaps, as on "
        "platforms without TC BPF (no in-kernel verdicts, no permanent guard)",
    )
    ap.add_argument(
        "--flows-max",
        type=int,
        default=DEFAULT_FLOWS_MAX,
        help="entries of the kernel flow cache (LRU; an evicted flow is asked again)",
    )
    ap.add_argument(
        "--stop-verdict",
        type=_stop_verdict,
        default=Verdict.BLOCK,
        metavar="NAME",
        help="what packets still held when the capture stops get (default Block; `up` passes "
        "the ALE's --default-verdict)",
    )
    ap.add_argument("--log-level", default="INFO")
    return ap


def _stop_verdict(text: str) -> Verdict:
    names = {v.kext_name: v for v in Verdict}
    if text not in names:
        raise argparse.ArgumentTypeError(f"one of {', '.join(names)}")
    return names[text]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup("capture", args.log_level.upper())
    # pydivert logs every open/close with the whole filter; our own lines say it shorter.
    logging.getLogger("pydivert").setLevel(logging.WARNING)
    endpoint = args.ale_endpoint or RuntimeDir.from_arg(args.run_dir).ale_endpoint
    excl = frozenset(args.exclude_port)
    core = CaptureCore(
        Config(
            exclude_ports=excl,
            nameserver_v4=args.nameserver_v4,
            nameserver_v6=args.nameserver_v6,
            nameserver_port=args.nameserver_port,
            tunnel_port=args.tunnel_port,
            split_tunnel_port=args.split_tunnel_port,
            existing=ExistingMode(args.existing_connections),
        )
    )
    shell = CaptureShell(
        core,
        ShellConfig(
            endpoint,
            args.priority,
            excl,
            args.ring_bytes,
            owns_namespace=True,
            kernel_cache=not args.no_kernel_cache,
            fail_open=args.fail_open,
            flows_max=args.flows_max,
            stop_verdict=args.stop_verdict,
            run_dir=RuntimeDir.from_arg(args.run_dir).path,
        ),
    )
    install_signals(shell)
    logging.getLogger("capture").info(
        "capture starting: ALE %s, priority %d, excluded ports %s, %s",
        endpoint,
        args.priority,
        sorted(excl) or "none",
        "FAIL OPEN" if args.fail_open else "fail closed",
    )
    return shell.run()
