"""Which processes make up an instance and the argv each runs with: the actor table.

Adding an actor (bandwidth, lifecycle) is one ActorSpec entry in ACTORS; everything else
(config, start order, `--actor-arg`, `down`) follows from the table.

This is also the one place where the configuration file becomes each actor's flags
(`actor_flags`): `up` puts them in the programs' argvs and `kextless run ACTOR --config FILE`
in front of the user's own flags. A setting equal to its built-in default is left unsaid, so
an argv shows only what was asked for (tests check that the defaults agree with the actors').
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kextless.actors.capture.core import ExistingMode
from kextless.base.settings import Settings
from kextless.deploy.errors import UsageError
from kextless.deploy.options import Endpoint, UpOptions

#: How long supervisord waits after SIGTERM before it SIGKILLs a program.
STOPWAITSECS = 10


@dataclass(frozen=True)
class Program:
    """One supervisord [program:x]: its full argv and where it sits in the start order."""

    name: str
    argv: tuple[str, ...]
    priority: int
    startsecs: int = 1
    stopwaitsecs: int = STOPWAITSECS


@dataclass(frozen=True)
class ActorSpec:
    """How one actor joins the system. Adding an actor (bandwidth, lifecycle) is one entry."""

    name: str
    priority: int
    in_netns: bool = False
    enabled: Callable[[UpOptions], bool] = lambda _opts: True
    extra_args: Callable[[UpOptions, Endpoint], list[str]] = lambda _opts, _ep: []
    #: Enter only the namespace's network (`nsenter --net=`), not `ip netns exec`: the divert
    #: FLOW/SOCKET layers need it (pydivert-linux.md 2.6).
    nsenter: bool = False


_DEFAULTS = Settings()


def _changed(flag: str, value: object, default: object) -> list[str]:
    """`[flag, value]` when the setting differs from its default, else nothing."""
    if value == default:
        return []
    return [flag, f"{value:g}" if isinstance(value, float) else str(value)]


def _broker_args(opts: UpOptions, endpoint: Endpoint) -> list[str]:
    s, d = opts.settings, _DEFAULTS
    args = [
        *_changed("--queue-bytes", s.queues.max_bytes, d.queues.max_bytes),
        *_changed("--no-client", s.verdicts.no_client, d.verdicts.no_client),
    ]
    if opts.endpoint is not None:
        args += ["--endpoint", endpoint.url]
    if opts.curve_server_secret is not None:
        args += ["--curve-server-secret", str(opts.curve_server_secret)]
    if opts.curve_clients is not None:
        args += ["--curve-clients", str(opts.curve_clients)]
    return args


def _ale_args(opts: UpOptions, _endpoint: Endpoint) -> list[str]:
    v, d = opts.settings.verdicts, _DEFAULTS.verdicts
    args = _changed("--max-pending", v.max_pending, d.max_pending)
    if opts.verdict_timeout is not None:
        args += ["--verdict-timeout", f"{opts.verdict_timeout:g}"]
    if opts.default_verdict is not None:
        args += ["--default-verdict", opts.default_verdict]
    return args


def _capture_args(opts: UpOptions, endpoint: Endpoint) -> list[str]:
    # The control channel must never wait on a verdict (issue 4, point 4).
    args = ["--exclude-port", str(endpoint.port)] if endpoint.scheme == "tcp" else []
    if opts.existing_connections is not ExistingMode.ASK:  # (the default stays unsaid)
        args += ["--existing-connections", opts.existing_connections.value]
    if opts.fail_open:
        args.append("--fail-open")
    if opts.default_verdict is not None:  # what its held packets get when it stops, too
        args += ["--stop-verdict", opts.default_verdict]
    r, d = opts.settings.redirect, _DEFAULTS.redirect
    args += _changed("--nameserver-v4", r.nameserver_v4, d.nameserver_v4)
    args += _changed("--nameserver-v6", r.nameserver_v6, d.nameserver_v6)
    args += _changed("--nameserver-port", r.nameserver_port, d.nameserver_port)
    args += _changed("--tunnel-port", r.tunnel_port, d.tunnel_port)
    args += _changed("--split-tunnel-port", r.split_tunnel_port, d.split_tunnel_port)
    return args


def _lifecycle_args(opts: UpOptions, _endpoint: Endpoint) -> list[str]:
    s, d = opts.settings.lifecycle, _DEFAULTS.lifecycle
    return _changed("--udp-idle-timeout", s.udp_idle_timeout, d.udp_idle_timeout)


def _bandwidth_args(opts: UpOptions, _endpoint: Endpoint) -> list[str]:
    s, d = opts.settings.bandwidth, _DEFAULTS.bandwidth
    return _changed("--poll-interval", s.poll_interval, d.poll_interval)


def _policy_args(opts: UpOptions, endpoint: Endpoint) -> list[str]:
    # A custom endpoint is where the broker listens; a tcp one needs the policy's CURVE keys
    # (options.check_policy_curve): it is a CURVE client like Portmaster.
    args = ["--endpoint", endpoint.connect_url] if opts.endpoint else []
    if endpoint.scheme == "tcp" and opts.curve_server_secret is not None:
        args += ["--curve-server-public", str(opts.curve_server_secret)]
    if endpoint.scheme == "tcp" and opts.policy_curve_secret is not None:
        args += ["--curve-client-secret", str(opts.policy_curve_secret)]
    if opts.config is not None:  # what only the policy reads there (policy.watch, ...)
        args += ["--config", str(opts.config)]
    if opts.policy_rules is not None:
        args += ["--rules", str(opts.policy_rules)]
    if not opts.settings.policy.watch:
        args.append("--no-watch")
    return args


ACTORS: tuple[ActorSpec, ...] = (
    ActorSpec("broker", 100, extra_args=_broker_args),
    ActorSpec("ale", 200, extra_args=_ale_args),
    # After the ALE (its ale.sock) and before the capture, so the owners of connections that
    # exist at start are known before the capture reports them. Off with `--no-lifecycle`.
    ActorSpec(
        "lifecycle",
        250,
        in_netns=True,
        nsenter=True,
        enabled=lambda opts: opts.lifecycle,
        extra_args=_lifecycle_args,
    ),
    ActorSpec("capture", 300, in_netns=True, extra_args=_capture_args),
    # After the capture, whose kernel programs hold the counters it reads (it follows them
    # if they come later or are replaced). Off with `--no-bandwidth`.
    ActorSpec(
        "bandwidth",
        350,
        in_netns=True,
        enabled=lambda opts: opts.bandwidth,
        extra_args=_bandwidth_args,
    ),
    ActorSpec("policy", 900, enabled=lambda opts: opts.policy, extra_args=_policy_args),
    # Not an actor: it SIGKILLs a program whose loop stopped beating (deploy/watchdog.py), so
    # supervisord restarts a hung process as it does a crashed one. Last to start, so every
    # actor already beats, and first to stop, so it never sees a slow shutdown.
    ActorSpec("watchdog", 950),
)


def kextless_command() -> list[str]:
    """The `kextless` of this interpreter, so supervisord needs no PATH or activated venv."""
    script = Path(sys.executable).parent / "kextless"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "kextless.deploy.cli"]


def ip_command() -> str:
    """iproute2's `ip` by absolute path: supervisord's children may have no useful PATH."""
    return shutil.which("ip") or "/usr/sbin/ip"


def nsenter_command() -> str:
    """util-linux's `nsenter` by absolute path (see ip_command)."""
    return shutil.which("nsenter") or "/usr/bin/nsenter"


def check_actor_args(opts: UpOptions, actors: Sequence[ActorSpec] = ACTORS) -> None:
    """`--actor-arg` may only name an actor this instance runs (a typo must not be ignored)."""
    enabled = {a.name for a in actors if a.enabled(opts)}
    for actor, _arg in opts.actor_args:
        if actor not in enabled:
            raise UsageError(
                f"--actor-arg {actor}=...: no such actor in this instance "
                f"(running: {', '.join(sorted(enabled))})"
            )


def actor_spec(name: str, actors: Sequence[ActorSpec] = ACTORS) -> ActorSpec:
    """The table entry of one actor by name (UsageError naming the choices)."""
    for actor in actors:
        if actor.name == name:
            return actor
    raise UsageError(f"no actor {name!r}; one of {', '.join(a.name for a in actors)}")


def actor_flags(actor: ActorSpec, opts: UpOptions, endpoint: Endpoint) -> list[str]:
    """The flags the options (and so the configuration file) give this actor: its run dir,
    its own settings and the log level. `up` and `run ACTOR --config` both use this."""
    s, d = opts.settings, _DEFAULTS
    return [
        "--run-dir",
        str(opts.run_dir.path),
        *actor.extra_args(opts, endpoint),
        *_changed("--log-level", s.log.level, d.log.level),
    ]


def programs_for(opts: UpOptions, actors: Sequence[ActorSpec] = ACTORS) -> list[Program]:
    """The argv of every enabled actor; netns actors run under `ip netns exec NAME`."""
    endpoint = opts.client_endpoint()
    programs = []
    for actor in actors:
        if not actor.enabled(opts):
            continue
        argv = [
            *kextless_command(),
            "run",
            actor.name,
            *actor_flags(actor, opts, endpoint),
            *(arg for name, arg in opts.actor_args if name == actor.name),
        ]
        if actor.in_netns and opts.netns is not None and actor.nsenter:
            argv = [nsenter_command(), f"--net=/var/run/netns/{opts.netns}", *argv]
        elif actor.in_netns and opts.netns is not None:
            argv = [ip_command(), "netns", "exec", opts.netns, *argv]
        programs.append(Program(actor.name, tuple(argv), actor.priority))
    return programs
