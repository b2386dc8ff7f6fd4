"""`kextless`: one command line for every tool and process.

`up`, `down` and `status` are parsed here; `decode` and each `run ACTOR` parse their own
arguments. Whatever a command needs is imported only when it runs, so `kextless decode` or an
actor does not pay for supervisor, and `kextless status` not for the actors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from kextless.deploy.errors import DeployError, UsageError

_SUBCOMMANDS: dict[str, str] = {
    "decode": "decode a captured info or command stream into JSON lines",
    "up": "start the whole system under supervisord",
    "down": "stop everything `up` started",
    "status": "show process states and broker counters",
    "bench": "measure the hot path against a baseline, in throw-away namespaces (root)",
}
_BENCH = "kextless.deploy.bench.runner"
_DECODE = "kextless.protocol.dissect"
#: capture's ExistingMode values (not imported: parsing `up` loads no actor).
EXISTING_CHOICES = ("ask", "accept")
_ACTORS: dict[str, str] = {
    "broker": "kextless.broker.main",
    "ale": "kextless.actors.ale.main",
    "capture": "kextless.actors.capture.main",
    "lifecycle": "kextless.actors.lifecycle.main",
    "bandwidth": "kextless.actors.bandwidth.main",
    "policy": "kextless.actors.policy.main",
}

_USAGE = """usage: kextless <command> [args]

commands:
{commands}
  run ACTOR [args]  run one process in the foreground ({actors})

`kextless <command> --help` shows each command's arguments."""


def _usage() -> str:
    cmds = "\n".join(f"  {name:<16} {desc}" for name, desc in _SUBCOMMANDS.items())
    return _USAGE.format(commands=cmds, actors=", ".join(_ACTORS))


# ---- up, down, status ---------------------------------------------------------------------------


def _actor_arg(text: str) -> tuple[str, str]:
    actor, sep, arg = text.partition("=")
    if not sep or not actor or not arg:
        raise argparse.ArgumentTypeError(f"expected ACTOR=ARG, got {text!r}")
    return actor, arg


def _parser(name: str) -> argparse.ArgumentParser:
    from kextless.base.rundir import default_root
    from kextless.deploy.options import UP_TIMEOUT

    descriptions = {
        "up": "Start broker, ALE, capture (and policy) under supervisord; returns once all run.",
        "down": "Stop everything `up` started and check that nothing is left behind.",
        "status": "Show each process's state and the broker's counters.",
    }
    p = argparse.ArgumentParser(prog=f"kextless {name}", description=descriptions[name])
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="the existing network namespace to firewall (default: this host's)",
    )
    p.add_argument(
        "--run-root",
        metavar="DIR",
        type=Path,
        help=f"parent of the per-instance run directories (default {default_root()})",
    )
    if name == "up":
        p.add_argument(
            "--no-policy",
            dest="policy",
            action="store_false",
            help="start no decision maker: an external client answers via the endpoint",
        )
        p.add_argument(
            "--no-lifecycle",
            dest="lifecycle",
            action="store_false",
            help="start no lifecycle actor: connection infos carry pid 0 and no end events come",
        )
        p.add_argument(
            "--no-bandwidth",
            dest="bandwidth",
            action="store_false",
            help="start no bandwidth actor: GetBandwidthStats produces no infos",
        )
        p.add_argument(
            "--fail-open",
            action="store_true",
            help="no fail-closed guard: packets the divert program lets by unexamined (a full "
            "ring, a stall, no capture running) PASS instead of being dropped",
        )
        p.add_argument(
            "--endpoint",
            metavar="URL",
            help="client endpoint, ipc://PATH or tcp://HOST:PORT (default ipc in the run dir)",
        )
        p.add_argument(
            "--curve-server-secret",
            metavar="FILE",
            type=Path,
            help="broker's CURVE secret certificate (required for tcp)",
        )
        p.add_argument(
            "--curve-clients",
            metavar="DIR",
            type=Path,
            help="directory of authorized client public certificates (tcp)",
        )
        p.add_argument(
            "--policy-rules",
            metavar="FILE",
            type=Path,
            help="TOML rules for the built-in policy (default: accept everything)",
        )
        p.add_argument(
            "--verdict-timeout",
            type=float,
            metavar="SECONDS",
            help="ALE: how long a held packet waits for a verdict (default 10)",
        )
        p.add_argument(
            "--default-verdict",
            metavar="NAME",
            help="ALE: the verdict a timed-out packet gets (default Block)",
        )
        p.add_argument(
            "--existing-connections",
            choices=EXISTING_CHOICES,
            default="ask",
            help="capture: TCP connections that exist at start are asked about like new "
            "ones (ask, the default) or accepted silently (accept)",
        )
        p.add_argument(
            "--actor-arg",
            metavar="ACTOR=ARG",
            action="append",
            default=[],
            type=_actor_arg,
            help="append ARG to ACTOR's command line (repeatable), e.g. capture=--tunnel-port=7717",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=UP_TIMEOUT,
            help=f"seconds to wait for every program to run (default {UP_TIMEOUT:g})",
        )
    if name == "status":
        p.add_argument("--json", action="store_true", help="print the status as JSON")
        p.add_argument(
            "--curve-client-secret",
            metavar="FILE",
            type=Path,
            help="client CURVE certificate for a tcp endpoint",
        )
    return p


def _up(args: argparse.Namespace) -> int:
    from kextless.actors.capture.core import ExistingMode
    from kextless.deploy.options import UpOptions
    from kextless.deploy.up import up

    opts = UpOptions(
        netns=args.netns,
        policy=args.policy,
        lifecycle=args.lifecycle,
        fail_open=args.fail_open,
        bandwidth=args.bandwidth,
        endpoint=args.endpoint,
        run_root=args.run_root,
        curve_server_secret=args.curve_server_secret,
        curve_clients=args.curve_clients,
        policy_rules=args.policy_rules,
        verdict_timeout=args.verdict_timeout,
        default_verdict=args.default_verdict,
        existing_connections=ExistingMode(args.existing_connections),
        actor_args=tuple(args.actor_arg),
        timeout=args.timeout,
    )
    up(opts)
    return 0


def _down(args: argparse.Namespace) -> int:
    from kextless.deploy.down import down

    return 1 if down(args.netns, args.run_root).problems else 0


def _status(args: argparse.Namespace) -> int:
    from kextless.deploy.status import format_status, status

    code, report = status(args.netns, args.run_root, args.curve_client_secret)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return code


_DEPLOY: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": _up,
    "down": _down,
    "status": _status,
}


def deploy_main(name: str, argv: list[str]) -> int:
    """`kextless up|down|status ARGS`: one line on stderr for any failure, and its exit status
    (2 bad input, 1 could not do it, 130 interrupted)."""
    try:
        args = _parser(name).parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error (or the help)
        return int(e.code or 0)
    try:
        return _DEPLOY[name](args)
    except UsageError as e:
        print(f"kextless {name}: error: {e}", file=sys.stderr)
        return 2
    except (DeployError, OSError) as e:  # OSError: e.g. an unwritable --run-root
        print(f"kextless {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kextless {name}: interrupted", file=sys.stderr)
        return 130


# ---- dispatch -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name == "run":
        if not rest or rest[0] not in _ACTORS:
            print(f"kextless run: choose an actor: {', '.join(_ACTORS)}", file=sys.stderr)
            return 2
        module = importlib.import_module(_ACTORS[rest[0]])
        return int(module.main(rest[1:]) or 0)
    if name in _DEPLOY:
        return deploy_main(name, rest)
    if name == "decode":
        return int(importlib.import_module(_DECODE).main(rest) or 0)
    if name == "bench":
        return int(importlib.import_module(_BENCH).main(rest) or 0)
    print(f"kextless: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
