"""`kextless`: one command line for every tool and process.

`up`, `down`, `status` and `reload` are parsed here; `decode`, `bench`, `monitor`, `demo` and
each `run ACTOR` parse their own arguments. Whatever a command needs is imported only when it
runs, so `kextless decode` or an actor does not pay for supervisor, and `kextless status` not
for the actors.

One configuration file (`--config FILE`, base/settings.py) drives `up`, `down`, `status`,
`reload` and `run ACTOR`; a flag given on the command line overrides the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kextless.deploy.errors import DeployError, UsageError

if TYPE_CHECKING:
    from kextless.base.settings import Settings

_SUBCOMMANDS: dict[str, str] = {
    "up": "start the whole system under supervisord (--netns NAME, or --host)",
    "down": "stop everything `up` started",
    "status": "show processes, guarded interfaces and what went wrong (--verbose: everything)",
    "reload": "make the running policy reload its rules (SIGHUP)",
    "monitor": "a live view of the connections being decided",
    "demo": "a sandbox that shows kextless deciding real traffic (root)",
    "decode": "decode a captured info or command stream into JSON lines",
    "bench": "measure the hot path against a baseline, in throw-away namespaces (root)",
}
_BENCH = "kextless.deploy.bench.runner"
_DECODE = "kextless.protocol.dissect"
#: Commands living in a module of their own that exposes `<name>_main(argv) -> int`.
_TOOLS = ("monitor", "demo")
#: capture's ExistingMode values (not imported: parsing `up` loads no actor).
EXISTING_CHOICES = ("ask", "accept")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_ACTORS: dict[str, str] = {
    "broker": "kextless.broker.main",
    "ale": "kextless.actors.ale.main",
    "capture": "kextless.actors.capture.main",
    "lifecycle": "kextless.actors.lifecycle.main",
    "bandwidth": "kextless.actors.bandwidth.main",
    "policy": "kextless.actors.policy.main",
    "watchdog": "kextless.deploy.watchdog",
}
_ACTOR_JOBS: dict[str, str] = {
    "broker": "the endpoint clients talk to (the kext's device semantics)",
    "ale": "the decision state: connections, pending ids, verdicts, timeouts",
    "capture": "holds packets in the guarded namespace and enforces verdicts",
    "lifecycle": "process ids and connection ends",
    "bandwidth": "per-connection bytes for GetBandwidthStats",
    "policy": "the built-in decision maker (rules file)",
    "watchdog": "kills a hung process (its loop stopped beating) so supervisord restarts it",
}

_USAGE = """usage: kextless <command> [args]
       kextless --version

commands:
{commands}
  run ACTOR [args]  run one process in the foreground ({actors})

`kextless <command> --help` shows each command's arguments; `--config FILE` (TOML) gives
up, down, status, reload, monitor and run their settings, and flags override it."""

_RUN_USAGE = """usage: kextless run ACTOR [--config FILE] [args]

Run one process in the foreground, as supervisord does under `kextless up`. With
--config FILE the file's settings become the actor's flags (those `up` would give it);
flags after it override them. `kextless run ACTOR --help` shows the actor's own flags.

actors:
{actors}"""


def _usage() -> str:
    cmds = "\n".join(f"  {name:<16} {desc}" for name, desc in _SUBCOMMANDS.items())
    return _USAGE.format(commands=cmds, actors=", ".join(_ACTORS))


def _run_usage() -> str:
    return _RUN_USAGE.format(
        actors="\n".join(f"  {name:<10} {_ACTOR_JOBS[name]}" for name in _ACTORS)
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kextless {version('kextless')}"
    except PackageNotFoundError:
        return "kextless (version unknown: not installed as a distribution)"


# ---- the configuration file ---------------------------------------------------------------------


def _config_path(argv: list[str]) -> Path | None:
    """`--config FILE` out of an argv that argparse has not parsed yet (its help aside)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    return known.config  # type: ignore[no-any-return]


def _settings(config: Path | None) -> Settings:
    """The file's settings (UsageError naming the file and key), or the defaults."""
    from kextless.base.settings import SettingsError, load_settings

    try:
        return load_settings(config)
    except SettingsError as e:
        raise UsageError(str(e)) from None


# ---- up, down, status, reload -------------------------------------------------------------------


def _actor_arg(text: str) -> tuple[str, str]:
    actor, sep, arg = text.partition("=")
    if not sep or not actor or not arg:
        raise argparse.ArgumentTypeError(f"expected ACTOR=ARG, got {text!r}")
    return actor, arg


def _parser(name: str, settings: Settings | None = None) -> argparse.ArgumentParser:
    """The command's parser; `up`'s switches default to `settings` (the file's values)."""
    from kextless.base.rundir import default_root
    from kextless.deploy.options import UP_TIMEOUT

    descriptions = {
        "up": "Start broker, ALE, capture (and policy) under supervisord; returns once all run.",
        "down": "Stop everything `up` started and check that nothing is left behind.",
        "status": "Show each process's state and what went wrong.",
        "reload": "Send the running policy SIGHUP: it reloads its rules file (a broken file is "
        "refused and the last good rules stay).",
    }
    p = argparse.ArgumentParser(prog=f"kextless {name}", description=descriptions[name])
    p.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML settings (see the README's configuration reference); flags override it",
    )
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="the existing network namespace to firewall"
        + (" (or --host)" if name == "up" else " (default: the file's, else the host's)"),
    )
    p.add_argument(
        "--run-root",
        metavar="DIR",
        type=Path,
        help=f"parent of the per-instance run directories (default {default_root()})",
    )
    if name == "up":
        if settings is None:
            from kextless.base.settings import Settings

            settings = Settings()
        s = settings
        p.add_argument(
            "--host",
            action="store_true",
            help="guard THIS machine's own namespace: every connection here waits for a "
            "verdict (required without --netns, so it is never done by accident)",
        )
        p.add_argument(
            "--no-policy",
            dest="policy",
            action="store_false",
            default=s.policy.enabled,
            help="start no decision maker: an external client answers via the endpoint",
        )
        p.add_argument(
            "--no-lifecycle",
            dest="lifecycle",
            action="store_false",
            default=s.lifecycle.enabled,
            help="start no lifecycle actor: connection infos carry pid 0 and no end events come",
        )
        p.add_argument(
            "--no-bandwidth",
            dest="bandwidth",
            action="store_false",
            default=s.bandwidth.enabled,
            help="start no bandwidth actor: GetBandwidthStats produces no infos",
        )
        p.add_argument(
            "--fail-open",
            action="store_true",
            default=s.capture.fail_open,
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
            help="TOML rules for the built-in policy (default: the shipped default rules)",
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
            default=s.capture.existing_connections,
            help="capture: TCP connections that exist at start are asked about like new "
            "ones (ask, the default) or accepted silently (accept)",
        )
        p.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            help="every actor's log level (default INFO)",
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
            help=f"seconds to wait until every program runs and is ready (default {UP_TIMEOUT:g})",
        )
    if name == "status":
        p.add_argument("--json", action="store_true", help="print the status as JSON")
        p.add_argument(
            "--verbose", "-v", action="store_true", help="every counter, not only the summary"
        )
        p.add_argument(
            "--curve-client-secret",
            metavar="FILE",
            type=Path,
            help="client CURVE certificate for a tcp endpoint",
        )
    if name == "down":
        p.add_argument(
            "--purge",
            action="store_true",
            help="also remove the run directory (logs included); by default it is kept",
        )
    return p


def _pick(flag: Any, file: Any) -> Any:
    """A flag given on the command line beats the file."""
    return file if flag is None else flag


def _up(args: argparse.Namespace, settings: Settings | None) -> int:
    import msgspec

    from kextless.actors.capture.core import ExistingMode
    from kextless.deploy.options import UpOptions
    from kextless.deploy.up import up

    if settings is None:  # (deploy_main reads them for `up`; a direct caller may not)
        settings = _settings(None)
    base = UpOptions.from_settings(settings, args.config.resolve() if args.config else None)
    if args.netns is not None and args.host:
        raise UsageError("--host and --netns: choose one (guard a namespace, or this host)")
    netns, host = base.netns, base.host
    if args.netns is not None:
        netns, host = args.netns, False
    elif args.host:
        netns, host = None, True
    # Rules named by the file are moot once the policy is off; named on the command line,
    # they are a contradiction `validate` reports.
    rules = _pick(args.policy_rules, base.policy_rules if args.policy else None)
    if args.log_level is not None:
        log = msgspec.structs.replace(settings.log, level=args.log_level)
        settings = msgspec.structs.replace(settings, log=log)
    opts = dataclasses.replace(
        base,
        netns=netns,
        host=host,
        policy=args.policy,
        lifecycle=args.lifecycle,
        bandwidth=args.bandwidth,
        fail_open=args.fail_open,
        endpoint=_pick(args.endpoint, base.endpoint),
        run_root=_pick(args.run_root, base.run_root),
        curve_server_secret=_pick(args.curve_server_secret, base.curve_server_secret),
        curve_clients=_pick(args.curve_clients, base.curve_clients),
        policy_rules=rules,
        verdict_timeout=_pick(args.verdict_timeout, base.verdict_timeout),
        default_verdict=_pick(args.default_verdict, base.default_verdict),
        existing_connections=ExistingMode(args.existing_connections),
        actor_args=tuple(args.actor_arg),
        timeout=args.timeout,
        settings=settings,
    )
    up(opts)
    return 0


def _instance(
    args: argparse.Namespace, settings: Settings | None
) -> tuple[str | None, Path | None]:
    """(netns, run_root) of the instance a command means: flags, else the file's."""
    if settings is None:
        return args.netns, args.run_root
    root = settings.instance.run_root
    return (
        _pick(args.netns, settings.instance.netns),
        _pick(args.run_root, Path(root) if root is not None else None),
    )


def _down(args: argparse.Namespace, settings: Settings | None) -> int:
    from kextless.deploy.down import down

    netns, run_root = _instance(args, settings)
    return 1 if down(netns, run_root, purge=args.purge).problems else 0


def _status(args: argparse.Namespace, settings: Settings | None) -> int:
    from kextless.deploy.status import format_status, status

    netns, run_root = _instance(args, settings)
    code, report = status(netns, run_root, args.curve_client_secret)
    print(
        json.dumps(report, indent=2) if args.json else format_status(report, verbose=args.verbose)
    )
    return code


def _reload(args: argparse.Namespace, settings: Settings | None) -> int:
    from kextless.deploy.supervisor_rpc import signal_policy

    netns, run_root = _instance(args, settings)
    taken, message = signal_policy(netns, run_root)
    print(message, file=sys.stdout if taken else sys.stderr)
    return 0 if taken else 1


_DEPLOY: dict[str, Callable[[argparse.Namespace, Settings | None], int]] = {
    "up": _up,
    "down": _down,
    "status": _status,
    "reload": _reload,
}


def deploy_main(name: str, argv: list[str]) -> int:
    """`kextless up|down|status|reload ARGS`: one line on stderr for any failure, and its exit
    status (2 bad input, 1 could not do it, 130 interrupted). Nothing starts before the
    configuration file and every flag were checked."""
    try:
        config = _config_path(argv)
        # `status` and `down` without a file must not pay for msgspec (the dispatcher test).
        settings = _settings(config) if config is not None or name == "up" else None
        args = _parser(name, settings).parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error (or the help)
        return int(e.code or 0)
    except UsageError as e:
        print(f"kextless {name}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _DEPLOY[name](args, settings)
    except UsageError as e:
        print(f"kextless {name}: error: {e}", file=sys.stderr)
        return 2
    except (DeployError, OSError) as e:  # OSError: e.g. an unwritable --run-root
        print(f"kextless {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kextless {name}: interrupted", file=sys.stderr)
        return 130


# ---- run ACTOR, monitor, demo -------------------------------------------------------------------


def run_main(argv: list[str]) -> int:
    """`kextless run ACTOR [--config FILE] ARGS`: the file's flags for ACTOR (exactly those
    `up` gives it, programs.actor_flags), then ARGS, which override them."""
    if not argv:
        print(_run_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_run_usage())
        return 0
    actor, rest = argv[0], argv[1:]
    if actor not in _ACTORS:
        print(f"kextless run: no actor {actor!r}; choose one of: {', '.join(_ACTORS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if any(a == "--config" or a.startswith("--config=") for a in rest):
        try:
            rest = _with_config(actor, rest)
        except UsageError as e:
            print(f"kextless run {actor}: error: {e}", file=sys.stderr)
            return 2
    from kextless.base.security import UnsafePath

    module = importlib.import_module(_ACTORS[actor])
    try:
        return int(module.main(rest) or 0)
    except UnsafePath as e:  # a run dir or key file others could change: one line, no trace
        print(f"kextless run {actor}: error: {e}", file=sys.stderr)
        return 2


def _with_config(actor: str, argv: list[str]) -> list[str]:
    pre = argparse.ArgumentParser(prog=f"kextless run {actor}", add_help=False)
    pre.add_argument("--config", type=Path, required=True)
    known, rest = pre.parse_known_args(argv)
    from kextless.deploy.options import UpOptions
    from kextless.deploy.programs import actor_flags, actor_spec

    opts = UpOptions.from_settings(_settings(known.config), known.config.resolve())
    flags = actor_flags(actor_spec(actor), opts, opts.client_endpoint())
    return [*flags, *rest]


def tool_main(name: str, argv: list[str]) -> int:
    """`kextless monitor|demo ARGS`: the module's `<name>_main(argv)`, imported only now."""
    module_name = f"kextless.deploy.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"kextless {name}: not available in this build ({module_name} is missing)",
              file=sys.stderr)  # fmt: skip
        return 1
    entry = getattr(module, f"{name}_main", None)
    if not callable(entry):
        print(f"kextless {name}: {module_name} has no {name}_main(argv)", file=sys.stderr)
        return 1
    return int(entry(argv) or 0)


# ---- dispatch -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        print(_version())
        return 0
    name, rest = args[0], args[1:]
    if name == "run":
        return run_main(rest)
    if name in _DEPLOY:
        return deploy_main(name, rest)
    if name in _TOOLS:
        return tool_main(name, rest)
    if name == "decode":
        return int(importlib.import_module(_DECODE).main(rest) or 0)
    if name == "bench":
        return int(importlib.import_module(_BENCH).main(rest) or 0)
    print(f"kextless: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
