"""The one configuration file (TOML), decoded by msgspec into typed settings.

The same file drives `up`, `run ACTOR`, the policy and the monitor, so every key lives here,
in the shared base, where both `deploy` and the actors can read it. Unknown keys and bad values
are refused with a message that names the key (msgspec's `at $.section.key` path).

Every field's default is the behaviour without a file; the README's configuration reference
lists them (keep the two in step).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from kextless.base.security import UnsafePath, check_private

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
#: The ALE refuses a verdict timeout above an hour (a held packet is a stalled application).
VerdictSeconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
#: The bandwidth actor's range: ended connections stay ~30 s in the kernel cache.
PollSeconds = Annotated[float, msgspec.Meta(ge=0.01, le=25)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
#: `ip netns add` names (they become part of the run directory's name).
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")

#: The kext's verdict names that make sense as a default (redirects need a target per flow).
DefaultVerdict = Literal[
    "Block", "Drop", "Accept", "PermanentBlock", "PermanentDrop", "PermanentAccept"
]


class SettingsError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class InstanceSettings(_Section, frozen=True):
    #: The network namespace to guard (`ip netns add` made it). None and `host = false`: refused.
    netns: str | None = None
    #: Guard this machine's own namespace. Must be said explicitly (also `up --host`).
    host: bool = False
    #: Parent of the per-instance run directories (default /run/kextless for root).
    run_root: str | None = None
    #: The client endpoint: ipc://PATH (owner-only) or tcp://HOST:PORT (CURVE only).
    endpoint: str | None = None
    curve_server_secret: str | None = None
    curve_clients: str | None = None


class VerdictSettings(_Section, frozen=True):
    #: How long a held packet waits for a verdict before `default` applies.
    timeout: VerdictSeconds = 10.0
    #: The verdict a timed-out (or refused) packet gets.
    default: DefaultVerdict = "Block"
    #: With no client session open: "wait" holds each new connection until `timeout`, then
    #: `default` (the kext's behaviour); "default" gives `default` at once.
    no_client: Literal["wait", "default"] = "wait"
    #: At most this many packets wait for a verdict; a new one beyond is dropped unasked (its
    #: client never sees it; TCP resends), so a flood leaves no backlog of seconds behind it
    #: (docs/overload.md). 0: unbounded (the backlog grows until `timeout`).
    max_pending: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 8192


class QueueSettings(_Section, frozen=True):
    #: The broker's info queue (the kext's IOQueue) in bytes; a full queue refuses new infos
    #: and their packets get `verdicts.default`.
    max_bytes: Annotated[int, msgspec.Meta(ge=65536, le=1 << 34)] = 64 * 1024 * 1024


class RedirectSettings(_Section, frozen=True):
    #: Where RedirectNameServer sends IPv4 / IPv6 DNS (the capture's defaults: loopback).
    nameserver_v4: str = "127.0.0.1"
    nameserver_v6: str = "::1"
    nameserver_port: Port = 53
    #: RedirectTunnel / RedirectSplitTunnel: the connection's own local address, this port.
    tunnel_port: Port = 717
    split_tunnel_port: Port = 719


class CaptureSettings(_Section, frozen=True):
    #: TCP connections that exist at start: asked about like new ones, or accepted silently.
    existing_connections: Literal["ask", "accept"] = "ask"
    #: No fail-closed guard: what the divert program lets by unexamined passes.
    fail_open: bool = False


class LifecycleSettings(_Section, frozen=True):
    enabled: bool = True
    #: A UDP flow idle this long has ended.
    udp_idle_timeout: Seconds = 600.0


class BandwidthSettings(_Section, frozen=True):
    enabled: bool = True
    #: How often the kernel counters are read between requests.
    poll_interval: PollSeconds = 1.0


class LogSettings(_Section, frozen=True):
    level: LogLevel = "INFO"


class PolicySettings(_Section, frozen=True):
    #: Run the built-in policy (false: an external client answers via the endpoint).
    enabled: bool = True
    #: The rules file (None: the shipped default rules, safe on a real machine).
    rules: str | None = None
    #: Watch the rules file and reload it when it changes (SIGHUP and `kextless reload` too).
    watch: bool = True
    #: With a tcp:// endpoint: the policy's own zmq.auth secret certificate (its public key
    #: must be in instance.curve_clients); the server's key comes from curve_server_secret.
    curve_client_secret: str | None = None


class Settings(_Section, frozen=True):
    instance: InstanceSettings = InstanceSettings()
    verdicts: VerdictSettings = VerdictSettings()
    queues: QueueSettings = QueueSettings()
    redirect: RedirectSettings = RedirectSettings()
    capture: CaptureSettings = CaptureSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    bandwidth: BandwidthSettings = BandwidthSettings()
    log: LogSettings = LogSettings()
    policy: PolicySettings = PolicySettings()


def parse_settings(text: str, where: str = "<config>", base: Path | None = None) -> Settings:
    """Decode TOML text; every error names `where` and the offending key. Relative paths in
    it are taken relative to `base` (the file's directory), as a reader of the file expects:
    supervisord runs every program in the run directory, not where the file was written."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{where}: not valid TOML: {exc}") from None
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{where}: {_key_message(str(exc))}") from None
    problem = _check(settings)
    if problem:
        raise SettingsError(f"{where}: {problem}")
    return _resolve_paths(settings, base) if base is not None else settings


def load_settings(path: Path | None) -> Settings:
    """The file's settings, or the defaults when `path` is None. A file another user could
    change is refused (base/security.py): it would let them steer the firewall."""
    if path is None:
        return Settings()
    try:
        check_private(path, "configuration file")
    except UnsafePath as exc:
        raise SettingsError(str(exc)) from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    return parse_settings(text, str(path), path.resolve().parent)


def _check(s: Settings) -> str | None:
    """What msgspec's types cannot say: addresses, names, and settings that contradict."""
    for key, value, version in (
        ("redirect.nameserver_v4", s.redirect.nameserver_v4, 4),
        ("redirect.nameserver_v6", s.redirect.nameserver_v6, 6),
    ):
        try:
            ok = ipaddress.ip_address(value).version == version
        except ValueError:
            ok = False
        if not ok:
            return f"{key}: {value!r} is not an IPv{version} address"
    netns = s.instance.netns
    if netns is not None and (not _NETNS_NAME.fullmatch(netns) or netns in (".", "..")):
        return f"instance.netns: {netns!r} is not a valid namespace name"
    if netns is not None and s.instance.host:
        return "instance.netns and instance.host = true: choose one (a namespace, or the host)"
    endpoint = s.instance.endpoint
    if endpoint is not None and not endpoint.startswith(("ipc://", "tcp://")):
        return f"instance.endpoint: {endpoint!r}: only ipc://PATH and tcp://HOST:PORT"
    return None


def _resolve_paths(s: Settings, base: Path) -> Settings:
    def rel(value: str | None) -> str | None:
        return None if value is None else str(base / Path(value).expanduser())

    inst = msgspec.structs.replace(
        s.instance,
        run_root=rel(s.instance.run_root),
        curve_server_secret=rel(s.instance.curve_server_secret),
        curve_clients=rel(s.instance.curve_clients),
    )
    policy = msgspec.structs.replace(
        s.policy,
        rules=rel(s.policy.rules),
        curve_client_secret=rel(s.policy.curve_client_secret),
    )
    return msgspec.structs.replace(s, instance=inst, policy=policy)


def _key_message(message: str) -> str:
    """msgspec says `... - at `$.verdicts.timeout``; lead with the key as the file spells it,
    and turn "unknown field" into the key's full name and what the section does know."""
    text, sep, at = message.rpartition(" - at `$.")
    key = at.rstrip("`") if sep else ""
    if not sep:
        text = message
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", text)
    if unknown:
        section = _section_type(key)
        known = ", ".join(f.name for f in msgspec.structs.fields(section)) if section else ""
        full = f"{key}.{unknown[1]}" if key else unknown[1]
        return f"{full}: unknown key" + (f" (known here: {known})" if known else "")
    if text.startswith("Invalid enum value") and key:
        choices = _choices(key)
        if choices:
            text += f" (one of {', '.join(map(repr, choices))})"
    return f"{key}: {text}" if key else text


def _choices(key: str) -> tuple[object, ...]:
    """The values a Literal-typed key accepts, for the error message."""
    head, _, name = key.rpartition(".")
    section = _section_type(head)
    if section is None:
        return ()
    hint = typing.get_type_hints(section).get(name)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _section_type(key: str) -> Any:
    """The Struct type at a dotted key ("" is Settings itself), or None."""
    cls: Any = Settings
    for part in filter(None, key.split(".")):
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        if part not in fields or not isinstance(fields[part].default, msgspec.Struct):
            return None
        cls = type(fields[part].default)
    return cls
