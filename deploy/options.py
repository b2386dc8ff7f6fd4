"""What `up` is asked to do (UpOptions, the client Endpoint) and the checks that refuse bad
input before anything is started, so a mistake never leaves half an instance behind."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kextless.actors.capture.core import ExistingMode
from kextless.base.rundir import RuntimeDir
from kextless.base.security import UnsafePath, check_private, check_private_tree
from kextless.base.settings import Settings
from kextless.deploy.errors import UsageError
from kextless.protocol.enums import Verdict

NETNS_DIR = Path("/var/run/netns")
UP_TIMEOUT = 20.0
SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


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
        if len(path.encode()) > SOCKET_PATH_MAX:
            raise UsageError(f"--endpoint {url!r}: socket path longer than {SOCKET_PATH_MAX}")
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
    """Everything `up` needs; built from the configuration file and the command line
    (`from_settings`, then the flags given), or directly by tests.

    The fields name what `up` itself checks or the command line can override; `settings`
    carries the rest of the file (queue size, redirect targets, idle timeouts, log level...),
    which programs.py maps to each actor's flags. Where a field and `settings` both hold a
    value (verdict timeout, rules, ...), the field is the one used.
    """

    netns: str | None = None
    #: Guard this machine's own namespace: `up` refuses the host unless told so explicitly.
    host: bool = False
    policy: bool = True
    #: The lifecycle actor (process ids, connection ends); off: pid 0, no end events.
    lifecycle: bool = True
    #: The bandwidth actor (per-connection bytes); off: GetBandwidthStats produces no infos.
    bandwidth: bool = True
    #: Capture: no fail-closed guard (no kextless_guard, no nft table): what the divert
    #: program lets by unexamined (a full ring, a stall, no capture running) passes.
    fail_open: bool = False
    endpoint: str | None = None
    run_root: Path | None = None
    curve_server_secret: Path | None = None
    curve_clients: Path | None = None
    #: The built-in policy's own secret certificate for a tcp endpoint (its public key must be
    #: in `curve_clients`): it is a CURVE client like any other.
    policy_curve_secret: Path | None = None
    policy_rules: Path | None = None
    verdict_timeout: float | None = None
    default_verdict: str | None = None
    #: Capture: TCP connections that exist at start are asked about, or accepted silently.
    existing_connections: ExistingMode = ExistingMode.ASK
    #: (actor, argument) pairs appended to that actor's command line, for options `up` does
    #: not name itself (e.g. capture's redirect ports).
    actor_args: tuple[tuple[str, str], ...] = ()
    timeout: float = UP_TIMEOUT
    #: The configuration file these options came from (the policy reads it too), if any.
    config: Path | None = None
    settings: Settings = field(default_factory=Settings)

    @classmethod
    def from_settings(cls, s: Settings, config: Path | None = None) -> UpOptions:
        """The options a configuration file asks for (paths already absolute, see
        load_settings); a value equal to the built-in default is left unsaid (None)."""
        d = Settings()
        inst = s.instance
        return cls(
            netns=inst.netns,
            host=inst.host,
            policy=s.policy.enabled,
            lifecycle=s.lifecycle.enabled,
            bandwidth=s.bandwidth.enabled,
            fail_open=s.capture.fail_open,
            endpoint=inst.endpoint,
            run_root=_path(inst.run_root),
            curve_server_secret=_path(inst.curve_server_secret),
            curve_clients=_path(inst.curve_clients),
            policy_curve_secret=_path(s.policy.curve_client_secret),
            policy_rules=_path(s.policy.rules) if s.policy.enabled else None,
            verdict_timeout=s.verdicts.timeout
            if s.verdicts.timeout != d.verdicts.timeout
            else None,
            default_verdict=s.verdicts.default
            if s.verdicts.default != d.verdicts.default
            else None,
            existing_connections=ExistingMode(s.capture.existing_connections),
            config=config,
            settings=s,
        )

    @property
    def run_dir(self) -> RuntimeDir:
        """The instance's directory: one per namespace, so two instances never share state."""
        return RuntimeDir.for_instance(self.netns, self.run_root)

    def client_endpoint(self) -> Endpoint:
        """`--endpoint`, or the owner-only ipc socket in the run dir."""
        return parse_endpoint(self.endpoint or self.run_dir.kext_endpoint)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def check_host(opts: UpOptions) -> None:
    """Without a namespace, the capture guards this machine's own interfaces (every
    connection of every program here waits for a verdict): only when asked in so many words."""
    if opts.netns is not None and opts.host:
        raise UsageError("--host and --netns: choose one (guard a namespace, or this host)")
    if opts.netns is None and not opts.host:
        raise UsageError(
            "no --netns given: that would guard this host's own interfaces (every connection "
            "here would wait for a verdict); say --netns NAME, or --host (instance.host = true "
            "in the config file) if you mean the host"
        )


def check_netns_name(name: str | None) -> None:
    """A plain name (or None, the host): it becomes part of the run dir's name."""
    if name is not None and not _NETNS_NAME.fullmatch(name):
        raise UsageError(f"--netns {name!r}: not a valid namespace name")


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
    """Reject every bad option before anything is started; returns the parsed client endpoint.
    (Which actors `--actor-arg` may name is the program table's business: programs.py.)"""
    if opts.netns is not None:
        validate_netns(opts.netns)
        if os.geteuid() != 0:
            raise UsageError("--netns needs root (`ip netns exec` and eBPF)")
    run = opts.run_dir
    if any(c in str(run.path) for c in '"%\n\r\t') or re.search(r"\s[;#]", str(run.path)):
        raise UsageError(f"--run-root {str(opts.run_root)!r}: unusable characters in the path")
    # supervisord first binds "<socket>.<its pid>" and renames it, so leave room for that.
    for sock, limit in (
        (run.supervisor_socket, SOCKET_PATH_MAX - 8),
        (run.path / "kext.sock", SOCKET_PATH_MAX),
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
    if endpoint.scheme == "ipc" and curve != (None, None):
        raise UsageError("--curve-* options only apply to a tcp:// endpoint")
    if opts.curve_server_secret is not None and not opts.curve_server_secret.is_file():
        raise UsageError(f"--curve-server-secret {opts.curve_server_secret}: no such file")
    if opts.curve_clients is not None and not opts.curve_clients.is_dir():
        raise UsageError(f"--curve-clients {opts.curve_clients}: no such directory")
    if endpoint.scheme == "tcp" and opts.policy:
        check_policy_curve(opts)
    elif opts.policy_curve_secret is not None and opts.policy:
        raise UsageError("policy.curve_client_secret only applies to a tcp:// endpoint")
    check_private_files(opts)
    if opts.policy_rules is not None and not opts.policy:
        raise UsageError("--policy-rules makes no sense with --no-policy")
    if opts.policy_rules is not None and not opts.policy_rules.is_file():
        raise UsageError(
            f"--policy-rules {opts.policy_rules}: no such file"
            + (" (policy.rules in the config file)" if opts.config is not None else "")
        )
    if not opts.timeout > 0:
        raise UsageError("--timeout must be positive")
    if opts.verdict_timeout is not None and not 0 < opts.verdict_timeout <= 3600:
        raise UsageError("--verdict-timeout must be > 0 and <= 3600 seconds")
    if opts.default_verdict is not None:
        names = [v.kext_name for v in Verdict]
        if opts.default_verdict not in names:
            raise UsageError(
                f"--default-verdict {opts.default_verdict!r}: one of {', '.join(names)}"
            )
    return endpoint


def check_policy_curve(opts: UpOptions) -> None:
    """The built-in policy reaches a tcp endpoint as a CURVE client: its certificate must exist
    and be one the broker lets in, or it would retry forever while `up` waits for it."""
    import zmq.auth

    secret = opts.policy_curve_secret
    if secret is None:
        raise UsageError(
            f"--endpoint {opts.endpoint}: the built-in policy needs its own CURVE certificate "
            "for a tcp endpoint: policy.curve_client_secret = FILE in the config file (a "
            "zmq.auth secret certificate whose public key is in --curve-clients), or --no-policy"
        )
    if not secret.is_file():
        raise UsageError(f"policy.curve_client_secret {secret}: no such file")
    try:
        public, private = zmq.auth.load_certificate(secret)
        allowed = set(zmq.auth.load_certificates(str(opts.curve_clients)).keys())
    except (OSError, ValueError) as exc:
        raise UsageError(f"policy.curve_client_secret {secret}: {exc}") from None
    if private is None:
        raise UsageError(f"policy.curve_client_secret {secret}: holds no secret key")
    if public not in allowed:
        raise UsageError(
            f"policy.curve_client_secret {secret}: its public key is not in --curve-clients "
            f"{opts.curve_clients}, so the broker would refuse the policy; copy its .key there"
        )


def check_private_files(opts: UpOptions) -> None:
    """Every file that steers this instance, refused before anything starts if a user other
    than root and its owner could change it (base/security.py). The configuration file and the
    rules are checked where they are read (load_settings, check_rules); this covers the keys
    and the run directory."""
    try:
        if opts.config is not None:
            check_private(opts.config, "configuration file")
        if opts.curve_server_secret is not None:
            check_private(opts.curve_server_secret, "CURVE server secret", secret=True)
        if opts.curve_clients is not None:
            check_private_tree(opts.curve_clients, "CURVE clients directory")
        if opts.policy and opts.policy_curve_secret is not None:
            check_private(opts.policy_curve_secret, "policy CURVE secret", secret=True)
        run = opts.run_dir
        if run.path.exists() or run.path.is_symlink():
            run.check()
        else:  # `up` creates it 0700: what is above it must already be safe
            existing = next(p for p in run.path.parents if p.exists())
            check_private(existing, "run directory's parent", directory=True)
    except UnsafePath as exc:
        raise UsageError(str(exc)) from None
