"""`kextless up`, `down` and `status`: the whole system as one supervisord instance per netns.

supervisord restarts a crashed actor and owns its logs; this module only renders its config into
the instance's 0700 run directory, starts it, waits until every program is RUNNING, and later
takes it down again and checks that nothing (process, socket, divert filter) was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kextless.base.rundir import RuntimeDir, default_root

NETNS_DIR = Path("/var/run/netns")
INSTANCE_FILE = "instance.json"
PIDFILE = "supervisord.pid"
SUPERVISORD_LOG = "supervisord.log"
UP_TIMEOUT = 20.0
STOPWAITSECS = 10
RPC_TIMEOUT = 5.0
STATUS_TIMEOUT = 2.0
_SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL
_PROGRAM_MARKER = ";; @program"
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class DeployError(Exception):
    """The system could not be brought up or down: reported as one line, exit status 1."""


# ---- options and endpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """The client endpoint, parsed once so capture can exclude a tcp port from interception."""

    url: str
    scheme: str  # "ipc" or "tcp"
    host: str = ""
    port: int = 0
    path: Path | None = None

    @property
    def connect_url(self) -> str:
        """Where a local client connects: a wildcard bind address means localhost."""
        if self.scheme == "tcp" and self.host in ("*", "0.0.0.0"):
            return f"tcp://127.0.0.1:{self.port}"
        if self.scheme == "tcp" and self.host in ("[::]", "::"):
            return f"tcp://[::1]:{self.port}"
        return self.url


def parse_endpoint(url: str) -> Endpoint:
    """Accept ipc://PATH and tcp://HOST:PORT only; anything else is a usage error."""
    if url.startswith("ipc://"):
        path = url[len("ipc://") :]
        if not path.startswith("/"):
            raise UsageError(f"--endpoint {url!r}: an ipc endpoint needs an absolute path")
        if len(path.encode()) > _SOCKET_PATH_MAX:
            raise UsageError(f"--endpoint {url!r}: socket path longer than {_SOCKET_PATH_MAX}")
        return Endpoint(url, "ipc", path=Path(path))
    if url.startswith("tcp://"):
        host, sep, port = url[len("tcp://") :].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(
                f"--endpoint {url!r}: expected tcp://HOST:PORT with a fixed port 1-65535 "
                "(capture must know the port to keep the control channel out of interception)"
            )
        return Endpoint(url, "tcp", host=host, port=int(port))
    raise UsageError(f"--endpoint {url!r}: only ipc://PATH and tcp://HOST:PORT are supported")


@dataclass(frozen=True)
class UpOptions:
    """Everything `up` needs; built from the command line or directly by tests."""

    netns: str | None = None
    policy: bool = True
    endpoint: str | None = None
    run_root: Path | None = None
    curve_server_secret: Path | None = None
    curve_clients: Path | None = None
    policy_rules: Path | None = None
    verdict_timeout: float | None = None
    default_verdict: str | None = None
    #: (actor, argument) pairs appended to that actor's command line, for options `up` does
    #: not name itself (e.g. capture's redirect ports).
    actor_args: tuple[tuple[str, str], ...] = ()
    timeout: float = UP_TIMEOUT

    @property
    def run_dir(self) -> RuntimeDir:
        return RuntimeDir.for_instance(self.netns, self.run_root)

    def client_endpoint(self) -> Endpoint:
        return parse_endpoint(self.endpoint or self.run_dir.kext_endpoint)


def validate_netns(name: str) -> None:
    """The namespace must be a plain name that `ip netns add` already created."""
    if not _NETNS_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"--netns {name!r}: not a valid namespace name")
    if not (NETNS_DIR / name).exists():
        raise UsageError(
            f"--netns {name!r}: no such network namespace ({NETNS_DIR / name} is missing; "
            f"create it with `ip netns add {name}`)"
        )


def validate(opts: UpOptions) -> Endpoint:
    """Reject every bad option before anything is started; returns the parsed client endpoint."""
    if opts.netns is not None:
        validate_netns(opts.netns)
        if os.geteuid() != 0:
            raise UsageError("--netns needs root (`ip netns exec` and eBPF)")
    run = opts.run_dir
    if any(c in str(run.path) for c in '"%\n\r\t') or re.search(r"\s[;#]", str(run.path)):
        raise UsageError(f"--run-root {str(opts.run_root)!r}: unusable characters in the path")
    # supervisord first binds "<socket>.<its pid>" and renames it, so leave room for that.
    for sock, limit in (
        (run.supervisor_socket, _SOCKET_PATH_MAX - 8),
        (run.path / "kext.sock", _SOCKET_PATH_MAX),
    ):
        if len(str(sock).encode()) > limit:
            raise UsageError(
                f"--run-root: socket path {str(sock)!r} is longer than {limit} bytes; "
                "choose a shorter --run-root"
            )
    endpoint = opts.client_endpoint()
    curve = (opts.curve_server_secret, opts.curve_clients)
    if endpoint.scheme == "tcp" and None in curve:
        raise UsageError(
            f"--endpoint {endpoint.url}: a tcp endpoint needs CURVE "
            "(--curve-server-secret FILE and --curve-clients DIR); the broker refuses plain tcp"
        )
    if endpoint.scheme == "tcp" and opts.policy:
        raise UsageError(
            f"--endpoint {endpoint.url}: the built-in policy has no CURVE client options yet, "
            "so it could not reach a tcp endpoint; add --no-policy and answer from your client"
        )
    if endpoint.scheme == "ipc" and curve != (None, None):
        raise UsageError("--curve-* options only apply to a tcp:// endpoint")
    if opts.curve_server_secret is not None and not opts.curve_server_secret.is_file():
        raise UsageError(f"--curve-server-secret {opts.curve_server_secret}: no such file")
    if opts.curve_clients is not None and not opts.curve_clients.is_dir():
        raise UsageError(f"--curve-clients {opts.curve_clients}: no such directory")
    if opts.policy_rules is not None and not opts.policy:
        raise UsageError("--policy-rules makes no sense with --no-policy")
    if opts.policy_rules is not None and not opts.policy_rules.is_file():
        raise UsageError(f"--policy-rules {opts.policy_rules}: no such file")
    if not opts.timeout > 0:
        raise UsageError("--timeout must be positive")
    if opts.verdict_timeout is not None and not 0 < opts.verdict_timeout <= 3600:
        raise UsageError("--verdict-timeout must be > 0 and <= 3600 seconds")
    if opts.default_verdict is not None:
        from kextless.protocol.enums import Verdict

        names = [v.kext_name for v in Verdict]
        if opts.default_verdict not in names:
            raise UsageError(
                f"--default-verdict {opts.default_verdict!r}: one of {', '.join(names)}"
            )
    enabled = {a.name for a in ACTORS if a.enabled(opts)}
    for actor, _arg in opts.actor_args:
        if actor not in enabled:
            raise UsageError(
                f"--actor-arg {actor}=...: no such actor in this instance "
                f"(running: {', '.join(sorted(enabled))})"
            )
    return endpoint


# ---- the program list ---------------------------------------------------------------------------


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


def _broker_args(opts: UpOptions, endpoint: Endpoint) -> list[str]:
    args = []
    if opts.endpoint is not None:
        args += ["--endpoint", endpoint.url]
    if opts.curve_server_secret is not None:
        args += ["--curve-server-secret", str(opts.curve_server_secret)]
    if opts.curve_clients is not None:
        args += ["--curve-clients", str(opts.curve_clients)]
    return args


def _ale_args(opts: UpOptions, _endpoint: Endpoint) -> list[str]:
    args = []
    if opts.verdict_timeout is not None:
        args += ["--verdict-timeout", f"{opts.verdict_timeout:g}"]
    if opts.default_verdict is not None:
        args += ["--default-verdict", opts.default_verdict]
    return args


def _capture_args(_opts: UpOptions, endpoint: Endpoint) -> list[str]:
    # The control channel must never wait on a verdict (issue 4, point 4).
    return ["--exclude-port", str(endpoint.port)] if endpoint.scheme == "tcp" else []


def _policy_args(opts: UpOptions, endpoint: Endpoint) -> list[str]:
    # A custom ipc endpoint is where the broker listens; tcp needs CURVE, which policy lacks,
    # so it keeps its default (the run dir's kext.sock).
    args = ["--endpoint", endpoint.url] if opts.endpoint and endpoint.scheme == "ipc" else []
    if opts.policy_rules is not None:
        args += ["--rules", str(opts.policy_rules)]
    return args


ACTORS: tuple[ActorSpec, ...] = (
    ActorSpec("broker", 100, extra_args=_broker_args),
    ActorSpec("ale", 200, extra_args=_ale_args),
    ActorSpec("capture", 300, in_netns=True, extra_args=_capture_args),
    ActorSpec("policy", 900, enabled=lambda opts: opts.policy, extra_args=_policy_args),
)


def kextless_command() -> list[str]:
    """The `kextless` of this interpreter, so supervisord needs no PATH or activated venv."""
    script = Path(sys.executable).parent / "kextless"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "kextless.deploy.cli"]


def ip_command() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def programs_for(opts: UpOptions, actors: Sequence[ActorSpec] = ACTORS) -> list[Program]:
    """The argv of every enabled actor; netns actors run under `ip netns exec NAME`."""
    endpoint = opts.client_endpoint()
    run_dir = str(opts.run_dir.path)
    programs = []
    for actor in actors:
        if not actor.enabled(opts):
            continue
        argv = [
            *kextless_command(),
            "run",
            actor.name,
            "--run-dir",
            run_dir,
            *actor.extra_args(opts, endpoint),
            *(arg for name, arg in opts.actor_args if name == actor.name),
        ]
        if actor.in_netns and opts.netns is not None:
            argv = [ip_command(), "netns", "exec", opts.netns, *argv]
        programs.append(Program(actor.name, tuple(argv), actor.priority))
    return programs


# ---- rendering ----------------------------------------------------------------------------------


def _conf_value(value: str) -> str:
    """Escape one value for supervisord's ini parser (expansion and inline comments)."""
    if "\n" in value or "\r" in value:
        raise UsageError(f"value {value!r} contains a line break")
    if re.search(r"\s[;#]", value):
        raise UsageError(f"value {value!r} would be cut by supervisord's inline comments")
    return value.replace("%", "%%")


def _env_value(env: dict[str, str]) -> str:
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or '"' in value:
            raise UsageError(f"environment {key}={value!r} cannot be passed to supervisord")
    return ",".join(f'{k}="{v}"' for k, v in env.items())


TEMPLATE = Path(__file__).with_name("supervisord.conf.template")


def load_template() -> str:
    """Read beside this module: importlib.resources fails when the editable install's finder
    turns `deploy` into a namespace package (seen when run from outside the checkout)."""
    try:
        return TEMPLATE.read_text()
    except OSError as e:
        raise DeployError(f"cannot read the supervisord template {TEMPLATE}: {e}") from None


def render_config(
    run: RuntimeDir, programs: Sequence[Program], env: dict[str, str], identifier: str = "kextless"
) -> str:
    """The supervisord.conf text for this instance (one [program:x] section per program)."""
    if "%" in str(run.path):
        # supervisord expands log paths twice, so no escaping of '%' survives in them.
        raise UsageError(f"run directory {str(run.path)!r}: '%' is not supported in the path")
    head, marker, block = load_template().partition(_PROGRAM_MARKER)
    if not marker:
        raise DeployError(f"supervisord.conf.template lacks the {_PROGRAM_MARKER!r} marker")
    block = block.split("\n", 1)[1]  # drop the rest of the marker line
    names = [p.name for p in programs]
    if len(set(names)) != len(names) or not programs:
        raise UsageError(f"program names must be unique and non-empty: {names}")
    out = [
        string.Template(head).substitute(
            run_dir=_conf_value(str(run.path)),
            socket=_conf_value(str(run.supervisor_socket)),
            logfile=_conf_value(str(run.path / SUPERVISORD_LOG)),
            pidfile=_conf_value(str(run.path / PIDFILE)),
            log_dir=_conf_value(str(run.log_dir)),
            identifier=_conf_value(identifier),
            environment=_conf_value(_env_value(env)),
        )
    ]
    for prog in sorted(programs, key=lambda p: p.priority):
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", prog.name):
            raise UsageError(f"program name {prog.name!r} is not usable in supervisord")
        out.append(
            string.Template(block).substitute(
                name=prog.name,
                command=_conf_value(shlex.join(prog.argv)),
                priority=prog.priority,
                startsecs=prog.startsecs,
                stopwaitsecs=prog.stopwaitsecs,
                logfile=_conf_value(str(run.log_dir / f"{prog.name}.log")),
            )
        )
    return "\n".join(out)


def program_env(opts: UpOptions, endpoint: Endpoint) -> dict[str, str]:
    """What every program gets besides its argv (which names the run dir): unbuffered logs,
    so each event line reaches supervisord's log at once."""
    return {"PYTHONUNBUFFERED": "1"}


# ---- supervisord's XML-RPC ----------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """supervisor's own unix connection has no timeout; a stopped supervisord must not hang us."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def rpc(run: RuntimeDir, timeout: float = RPC_TIMEOUT) -> Any:
    """A proxy for supervisord's XML-RPC interface over the instance's unix socket."""
    from supervisor.xmlrpc import SupervisorTransport

    path = str(run.supervisor_socket)
    transport = SupervisorTransport(None, None, serverurl=f"unix://{path}")
    transport._get_connection = lambda: _UnixHTTPConnection(path, timeout)
    return xmlrpc.client.ServerProxy("http://localhost", transport=transport, allow_none=True)


def supervisord_alive(run: RuntimeDir) -> bool:
    """True when a supervisord answers on this instance's socket."""
    if not run.supervisor_socket.exists():
        return False
    try:
        return rpc(run, timeout=2.0).supervisor.getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Error, http.client.HTTPException):
        return False


# ---- processes ----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a daemonized supervisord may be reaped late, or never)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _names_instance(cmdline: bytes, run: RuntimeDir) -> bool:
    """Every process `up` starts has the run dir (or, for supervisord, its config) as one whole
    argument; a user's `tail -f RUN/logs/x.log` does not, so it is never mistaken for ours."""
    args = cmdline.split(b"\0")
    return str(run.path).encode() in args or str(run.supervisor_conf).encode() in args


def pid_is_ours(pid: int, run: RuntimeDir) -> bool:
    """Guards against PID reuse: is this live process one that `up` started for `run`?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _names_instance(cmdline, run) and pid_alive(pid)


def instance_processes(run: RuntimeDir) -> list[int]:
    """Live processes of this instance, found by argv: also those restarted after `up`
    recorded their PIDs, which matters once supervisord itself is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if _names_instance((entry / "cmdline").read_bytes(), run):
                    found.append(int(entry.name))
    return [p for p in found if pid_alive(p)]


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Poll until every pid has exited; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# ---- the instance file --------------------------------------------------------------------------


def read_instance(run: RuntimeDir) -> dict[str, Any] | None:
    try:
        data = json.loads((run.path / INSTANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_instance(run: RuntimeDir, data: dict[str, Any]) -> None:
    """Written atomically, readable only by the owner (it names the endpoint and key paths)."""
    tmp = run.path / (INSTANCE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, run.path / INSTANCE_FILE)


def _instance_name(netns: str | None) -> str:
    return f"netns {netns}" if netns else "the host namespace"


# ---- up -----------------------------------------------------------------------------------------


@dataclass
class UpResult:
    """What `up` reports (and tests inspect): the endpoint and each program's pid."""

    endpoint: str
    supervisord_pid: int
    pids: dict[str, int] = field(default_factory=dict)


def _launch_supervisord(run: RuntimeDir) -> None:
    from supervisor import supervisord  # noqa: F401  (fail early and clearly if not installed)

    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(run.supervisor_conf)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        umask=0o077,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or log_tail(run.path / SUPERVISORD_LOG)
        raise DeployError(f"supervisord did not start (exit {proc.returncode}): {detail}")


def _wait_running(run: RuntimeDir, names: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    """Poll until every program is RUNNING; raise naming the first that failed or hung."""
    deadline = time.monotonic() + timeout
    proxy = rpc(run)
    infos: list[dict[str, Any]] = []
    while True:
        try:
            infos = proxy.supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise DeployError("supervisord did not answer on its socket in time") from None
            time.sleep(0.1)
            continue
        by_name = {i["name"]: i for i in infos}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DeployError(f"supervisord does not know program(s) {missing}")
        failed = [
            by_name[n]
            for n in names
            if by_name[n]["statename"] in ("FATAL", "EXITED", "STOPPED", "UNKNOWN")
        ]
        if failed:
            raise _program_failed(run, failed[0])
        if all(by_name[n]["statename"] == "RUNNING" for n in names):
            return [by_name[n] for n in names]
        if time.monotonic() > deadline:
            slow = next(by_name[n] for n in names if by_name[n]["statename"] != "RUNNING")
            raise _program_failed(run, slow, f"not RUNNING after {timeout:g} s")
        time.sleep(0.1)


def _program_failed(run: RuntimeDir, info: dict[str, Any], why: str = "") -> DeployError:
    why = why or f"{info['statename']}" + (f" ({info['spawnerr']})" if info["spawnerr"] else "")
    log = run.log_dir / f"{info['name']}.log"
    return DeployError(
        f"program {info['name']} failed to start: {why}\n"
        f"--- last lines of {log} ---\n{log_tail(log)}"
    )


def up(
    opts: UpOptions, programs: Sequence[Program] | None = None, out: Callable[[str], None] = print
) -> UpResult:
    """Start supervisord with every program and return once all are RUNNING (or raise, clean).

    `programs` replaces the actor list (tests prove the mechanics with trivial programs).
    """
    endpoint = validate(opts)
    run = opts.run_dir
    progs = list(programs) if programs is not None else programs_for(opts)
    for prog in progs:
        if str(run.path) not in prog.argv:
            raise UsageError(
                f"program {prog.name}: its argv must name the run dir {run.path} "
                "(that is how `down` finds it again if supervisord is gone)"
            )
    if supervisord_alive(run):
        raise DeployError(
            f"already running for {_instance_name(opts.netns)} ({run.path}); "
            f"run `kextless down{_flags(opts)}` first"
        )
    leftovers = _stale_processes(run)
    if leftovers:
        raise DeployError(
            f"processes of a previous instance are still alive: {leftovers}; "
            f"run `kextless down{_flags(opts)}` first"
        )
    _remove_state(run, read_instance(run))
    if opts.netns is not None:
        # Orphans of a killed capture still run on every packet; say so before adding ours.
        with contextlib.suppress(DeployError, OSError, subprocess.SubprocessError):
            for line in divert_filters(opts.netns):
                out(f"WARNING: divert filter already attached in netns {opts.netns}: {line}")
    run.create()
    run.log_dir.mkdir(mode=0o700, exist_ok=True)
    conf = render_config(
        run, progs, program_env(opts, endpoint), identifier=f"kextless-{opts.netns or 'host'}"
    )
    fd = os.open(run.supervisor_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(conf)
    instance: dict[str, Any] = {
        "netns": opts.netns,
        "run_dir": str(run.path),
        "endpoint": endpoint.url,
        "connect": endpoint.connect_url,
        "curve_server_secret": str(opts.curve_server_secret or "") or None,
        "programs": {
            p.name: {"argv": list(p.argv), "priority": p.priority, "pid": 0}
            for p in sorted(progs, key=lambda p: p.priority)
        },
        "supervisord_pid": 0,
        "started": time.time(),
    }
    write_instance(run, instance)
    try:
        _launch_supervisord(run)
        sup_pid = int(rpc(run).supervisor.getPID())
        instance["supervisord_pid"] = sup_pid
        write_instance(run, instance)
        infos = _wait_running(run, [p.name for p in progs], opts.timeout)
    except BaseException:
        report = _teardown(run, instance, opts.netns, check_filters=opts.netns is not None)
        for line in report.problems:
            out(f"kextless up: cleanup: {line}")
        raise
    for info in infos:
        instance["programs"][info["name"]]["pid"] = info["pid"]
    write_instance(run, instance)
    result = UpResult(endpoint.connect_url, sup_pid, {i["name"]: i["pid"] for i in infos})
    out(f"kextless is running for {_instance_name(opts.netns)} (run dir {run.path})")
    for info in infos:
        out(f"  {info['name']:<10} RUNNING  pid {info['pid']}")
    out(f"client endpoint: {endpoint.connect_url}")
    return result


def _flags(opts: UpOptions) -> str:
    """The --netns/--run-root part of a command we suggest, so it hits this instance."""
    flags = [
        *(["--netns", opts.netns] if opts.netns else []),
        *(["--run-root", str(opts.run_root)] if opts.run_root else []),
    ]
    return " " + shlex.join(flags) if flags else ""


# ---- down ---------------------------------------------------------------------------------------


@dataclass
class DownReport:
    """What `down` found: `stopped` is informational, any `problems` mean something was left."""

    was_running: bool = False
    stopped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Programs that ignored SIGTERM for stopwaitsecs and were killed (a bug in that program:
    #: a killed capture cannot detach its divert filters).
    killed: list[str] = field(default_factory=list)


def _stale_processes(run: RuntimeDir) -> list[int]:
    return instance_processes(run) if run.path.is_dir() else []


def _remove_state(run: RuntimeDir, inst: dict[str, Any] | None) -> list[str]:
    """Remove sockets, config, pidfile and instance file; keep logs for the post-mortem."""
    problems = []
    paths = [run.supervisor_conf, run.path / PIDFILE, run.path / INSTANCE_FILE]
    if run.path.is_dir():
        paths += [p for p in run.path.iterdir() if p.is_socket()]
    endpoint = (inst or {}).get("endpoint") or ""
    if endpoint.startswith("ipc://"):
        ep = Path(endpoint[len("ipc://") :])
        if ep.is_socket():
            paths.append(ep)
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            problems.append(f"could not remove {path}: {e}")
    return problems


def divert_filters(netns: str) -> list[str]:
    """Every tc filter in the namespace that is a pydivert program (`tc_divert_*`)."""
    links = subprocess.run(
        [ip_command(), "-n", netns, "-o", "link", "show"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if links.returncode != 0:
        raise DeployError(f"cannot list interfaces of netns {netns}: {links.stderr.strip()}")
    found = []
    tc = shutil.which("tc") or "/usr/sbin/tc"
    for line in links.stdout.splitlines():
        ifname = line.split(":", 2)[1].strip().split("@", 1)[0]
        for hook in ("ingress", "egress"):
            res = subprocess.run(
                [tc, "-n", netns, "filter", "show", "dev", ifname, hook],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            found += [
                f"{ifname} {hook}: {f.strip()}" for f in res.stdout.splitlines() if "tc_divert" in f
            ]
    return found


def _teardown(
    run: RuntimeDir, inst: dict[str, Any] | None, netns: str | None, check_filters: bool
) -> DownReport:
    """Stop supervisord (and so every program), then prove nothing is left behind."""
    report = DownReport()
    inst = inst or {}
    pids = {n: int(p.get("pid") or 0) for n, p in (inst.get("programs") or {}).items()}
    sup_pid = int(inst.get("supervisord_pid") or 0)
    stopwait = STOPWAITSECS * max(1, len(pids)) + 10
    log = run.path / SUPERVISORD_LOG
    log_start = log.stat().st_size if log.exists() else 0
    if supervisord_alive(run):
        report.was_running = True
        proxy = rpc(run)
        with contextlib.suppress(OSError, xmlrpc.client.Error, http.client.HTTPException):
            sup_pid = int(proxy.supervisor.getPID())
            for info in proxy.supervisor.getAllProcessInfo():
                if info["pid"]:
                    pids[info["name"]] = info["pid"]
        try:
            proxy.supervisor.shutdown()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException) as e:
            report.problems.append(f"supervisor.shutdown failed: {e}")
    else:
        pidfile_pid = _read_pidfile(run)
        sup_pid = sup_pid or pidfile_pid
        if sup_pid and pid_is_ours(sup_pid, run):
            # It lives but does not answer: SIGTERM makes supervisord stop its programs too.
            report.was_running = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup_pid, signal.SIGTERM)
    if sup_pid and pid_alive(sup_pid):
        report.was_running = True
        if wait_gone([sup_pid], stopwait):
            report.problems.append(f"supervisord pid {sup_pid} did not exit in {stopwait} s")
    names = {pid: name for name, pid in pids.items() if pid}
    argvs = {n: p.get("argv") or [] for n, p in (inst.get("programs") or {}).items()}
    left = instance_processes(run) if run.path.is_dir() else []
    for pid in left:
        report.was_running = True
        name = names.get(pid) or _program_of(pid, argvs)
        what = f"program {name}" if name else f"process ({shlex.join(_argv(pid))[:200]})"
        report.problems.append(f"{what} pid {pid} outlived supervisord; killed")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in wait_gone(left, 5):
        report.problems.append(f"pid {pid} survives SIGKILL")
    report.stopped += [f"{name} (pid {pid})" for pid, name in names.items() if pid not in left]
    report.killed = _sigkilled_since(log, log_start)
    report.problems += _remove_state(run, inst)
    if check_filters and netns is not None and (NETNS_DIR / netns).exists():
        try:
            left = divert_filters(netns)
        except (DeployError, OSError, subprocess.SubprocessError) as e:
            report.problems.append(f"could not check divert filters: {e}")
        else:
            report.problems += [f"divert filter left in netns {netns}: {f}" for f in left]
    return report


def _sigkilled_since(log: Path, offset: int) -> list[str]:
    """Programs supervisord had to SIGKILL while stopping, from its own log."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [
        f"{m[1]} (pid {m[2]})"
        for m in re.finditer(r"killing '([^']+)' \((\d+)\) with SIGKILL", text)
    ]


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def _program_of(pid: int, argvs: dict[str, list[str]]) -> str | None:
    """Which program a process is, when supervisord restarted it under a PID we never saw.
    Its argv and the configured one end alike: `ip netns exec NS` has exec'd away, or a
    script's interpreter was put in front."""
    argv = _argv(pid)
    for name, configured in argvs.items():
        k = min(len(argv), len(configured))
        if k and argv[-k:] == configured[-k:]:
            return name
    return None


def _read_pidfile(run: RuntimeDir) -> int:
    try:
        return int((run.path / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return 0


def down(
    netns: str | None = None, run_root: Path | None = None, out: Callable[[str], None] = print
) -> DownReport:
    """Stop the instance if any; idempotent. The report lists anything that was left behind."""
    if netns is not None and not _NETNS_NAME.fullmatch(netns):
        raise UsageError(f"--netns {netns!r}: not a valid namespace name")
    run = RuntimeDir.for_instance(netns, run_root)
    inst = read_instance(run)
    report = _teardown(run, inst, netns, check_filters=netns is not None)
    if not report.was_running and inst is None:
        out(f"kextless is not running for {_instance_name(netns)}")
    else:
        out(
            f"kextless stopped for {_instance_name(netns)}: "
            + (", ".join(report.stopped) or "no programs were running")
        )
    for name in report.killed:
        out(f"WARNING: {name} ignored SIGTERM for its stopwaitsecs and was SIGKILLed")
    for problem in report.problems:
        out(f"LEFTOVER: {problem}")
    return report


# ---- status -------------------------------------------------------------------------------------


def broker_counters(
    inst: dict[str, Any], timeout: float = STATUS_TIMEOUT, client_cert: Path | None = None
) -> dict[str, Any]:
    """Ask the broker for its counters: one frame `S`, reply [b"S", json]. Raises on silence."""
    import zmq

    url = inst.get("connect") or inst.get("endpoint") or ""
    if url.startswith("ipc://") and not Path(url[len("ipc://") :]).is_socket():
        raise DeployError(f"the broker is not listening: {url[len('ipc://') :]} does not exist")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if url.startswith("tcp://"):
            _curve_client(sock, inst, client_cert)
        sock.connect(url)
        sock.send(b"S")
        if not sock.poll(int(timeout * 1000)):
            raise DeployError(f"the broker did not answer on {url} within {timeout:g} s")
        frames = sock.recv_multipart()
    finally:
        sock.close()
    if len(frames) != 2 or frames[0] != b"S":
        raise DeployError(f"unexpected status reply from the broker: {frames[:3]!r}")
    try:
        counters = json.loads(frames[1])
    except ValueError as e:
        raise DeployError(f"the broker's status is not JSON: {e}") from None
    if not isinstance(counters, dict):
        raise DeployError("the broker's status is not a JSON object")
    return counters


def _curve_client(sock: Any, inst: dict[str, Any], client_cert: Path | None) -> None:
    import zmq.auth

    server = inst.get("curve_server_secret")
    if client_cert is None or not server:
        raise DeployError("a tcp endpoint needs --curve-client-secret FILE to ask the broker")
    try:
        server_public, _ = zmq.auth.load_certificate(server)
        public, secret = zmq.auth.load_certificate(client_cert)
    except (OSError, ValueError) as e:
        raise DeployError(f"cannot load CURVE certificates: {e}") from None
    if secret is None:
        raise DeployError(f"{client_cert} holds no secret key")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def status(
    netns: str | None = None, run_root: Path | None = None, client_cert: Path | None = None
) -> tuple[int, dict[str, Any]]:
    """(exit code, report): 0 all RUNNING and the broker answered, 1 degraded, 3 not running."""
    if netns is not None and not _NETNS_NAME.fullmatch(netns):
        raise UsageError(f"--netns {netns!r}: not a valid namespace name")
    run = RuntimeDir.for_instance(netns, run_root)
    inst = read_instance(run)
    report: dict[str, Any] = {
        "netns": netns,
        "run_dir": str(run.path),
        "running": False,
        "programs": [],
        "broker": None,
        "broker_error": None,
    }
    if inst is None or not supervisord_alive(run):
        report["broker_error"] = "not running"
        return 3, report
    report.update(running=True, endpoint=inst.get("connect") or inst.get("endpoint"))
    try:
        infos = rpc(run).supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error, http.client.HTTPException) as e:
        report["broker_error"] = f"supervisord stopped answering: {e}"
        return 1, report
    order = list(inst.get("programs") or {})  # start order, as `up` wrote it
    infos.sort(key=lambda i: order.index(i["name"]) if i["name"] in order else len(order))
    for info in infos:
        up_s = max(0, info["now"] - info["start"]) if info["statename"] == "RUNNING" else None
        report["programs"].append(
            {
                "name": info["name"],
                "state": info["statename"],
                "pid": info["pid"] or None,
                "uptime_s": up_s,
                "description": info["description"],
            }
        )
    code = 0 if all(p["state"] == "RUNNING" for p in report["programs"]) else 1
    try:
        report["broker"] = broker_counters(inst, client_cert=client_cert)
    except DeployError as e:
        report["broker_error"] = str(e)
        code = 1
    return code, report


def format_status(report: dict[str, Any]) -> str:
    """Human-readable status: one line per program, then the broker's counters."""
    where = _instance_name(report["netns"])
    if not report["running"]:
        return f"kextless is not running for {where} ({report['run_dir']})"
    lines = [f"kextless for {where}: run dir {report['run_dir']}, endpoint {report['endpoint']}"]
    for p in report["programs"]:
        uptime = "" if p["uptime_s"] is None else f"  uptime {_hms(p['uptime_s'])}"
        pid = f"pid {p['pid']}" if p["pid"] else "-"
        lines.append(f"  {p['name']:<10} {p['state']:<9} {pid}{uptime}")
    if report["broker"] is not None:
        lines.append("broker counters:")
        lines += [f"  {k}: {v}" for k, v in _flatten(report["broker"])]
    else:
        lines.append(f"broker: DOWN ({report['broker_error']})")
    return "\n".join(lines)


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested counters as dotted keys (`queue.depth: 3`), in the broker's own order."""
    flat: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---- command line -------------------------------------------------------------------------------


def _actor_arg(text: str) -> tuple[str, str]:
    actor, sep, arg = text.partition("=")
    if not sep or not actor or not arg:
        raise argparse.ArgumentTypeError(f"expected ACTOR=ARG, got {text!r}")
    return actor, arg


def _parser(name: str) -> argparse.ArgumentParser:
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


def main(name: str, argv: list[str]) -> int:
    """Entry point of `kextless up|down|status`; returns the exit status."""
    if name not in ("up", "down", "status"):
        print(f"kextless: {name!r} is not a supervise command", file=sys.stderr)
        return 2
    try:
        args = _parser(name).parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return int(e.code or 0)
    try:
        if name == "up":
            opts = UpOptions(
                netns=args.netns,
                policy=args.policy,
                endpoint=args.endpoint,
                run_root=args.run_root,
                curve_server_secret=args.curve_server_secret,
                curve_clients=args.curve_clients,
                policy_rules=args.policy_rules,
                verdict_timeout=args.verdict_timeout,
                default_verdict=args.default_verdict,
                actor_args=tuple(args.actor_arg),
                timeout=args.timeout,
            )
            up(opts)
            return 0
        if name == "down":
            return 1 if down(args.netns, args.run_root).problems else 0
        code, report = status(args.netns, args.run_root, args.curve_client_secret)
        print(json.dumps(report, indent=2) if args.json else format_status(report))
        return code
    except UsageError as e:
        print(f"kextless {name}: error: {e}", file=sys.stderr)
        return 2
    except DeployError as e:
        print(f"kextless {name}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. an unwritable --run-root
        print(f"kextless {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kextless {name}: interrupted", file=sys.stderr)
        return 130
