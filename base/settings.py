"""The one configuration file (TOML), decoded by msgspec into typed settings.

The same file drives `up`, `run ACTOR`, the policy and the monitor, so every key lives here,
in the shared base, where both `deploy` and the actors can read it. Unknown keys and bad values
are refused with a message that names the key (msgspec's `at $.section.key` path).

Every field's default is the behaviour without a file; the README's configuration reference
lists them (keep the two in step).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

#: The kext's verdict names that make sense as a default (redirects need a target per flow).
DefaultVerdict = Literal[
    "Block", "Drop", "Accept", "PermanentBlock", "PermanentDrop", "PermanentAccept"
]


class SettingsError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class InstanceSettings(_Section):
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


class VerdictSettings(_Section):
    #: How long a held packet waits for a verdict before `default` applies.
    timeout: Seconds = 10.0
    #: The verdict a timed-out (or refused) packet gets.
    default: DefaultVerdict = "Block"
    #: With no client session open: "wait" holds each new connection until `timeout`, then
    #: `default` (the kext's behaviour); "default" gives `default` at once.
    no_client: Literal["wait", "default"] = "wait"


class QueueSettings(_Section):
    #: The broker's info queue (the kext's IOQueue) in bytes; a full queue refuses new infos
    #: and their packets get `verdicts.default`.
    max_bytes: Annotated[int, msgspec.Meta(ge=65536, le=1 << 34)] = 64 * 1024 * 1024


class RedirectSettings(_Section):
    #: Where RedirectNameServer sends DNS (None: the connection's own local address).
    nameserver_v4: str | None = None
    nameserver_v6: str | None = None
    nameserver_port: Port = 53
    #: Where RedirectTunnel sends connections (None: redirect-to-tunnel is refused as Block).
    tunnel_port: Port | None = None


class CaptureSettings(_Section):
    #: TCP connections that exist at start: asked about like new ones, or accepted silently.
    existing_connections: Literal["ask", "accept"] = "ask"
    #: No fail-closed guard: what the divert program lets by unexamined passes.
    fail_open: bool = False


class LifecycleSettings(_Section):
    enabled: bool = True
    #: A UDP flow idle this long has ended.
    udp_idle_timeout: Seconds = 600.0


class BandwidthSettings(_Section):
    enabled: bool = True
    #: How often the kernel counters are read between requests.
    poll_interval: Seconds = 1.0


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class PolicySettings(_Section):
    #: Run the built-in policy (false: an external client answers via the endpoint).
    enabled: bool = True
    #: The rules file (None: the shipped default rules, safe on a real machine).
    rules: str | None = None
    #: Watch the rules file and reload it when it changes (SIGHUP and `kextless reload` too).
    watch: bool = True


class Settings(_Section):
    instance: InstanceSettings = InstanceSettings()
    verdicts: VerdictSettings = VerdictSettings()
    queues: QueueSettings = QueueSettings()
    redirect: RedirectSettings = RedirectSettings()
    capture: CaptureSettings = CaptureSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    bandwidth: BandwidthSettings = BandwidthSettings()
    log: LogSettings = LogSettings()
    policy: PolicySettings = PolicySettings()


def parse_settings(text: str, where: str = "<config>") -> Settings:
    """Decode TOML text; every error names `where` and the offending key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{where}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{where}: {_key_message(str(exc))}") from None


def load_settings(path: Path | None) -> Settings:
    """The file's settings, or the defaults when `path` is None."""
    if path is None:
        return Settings()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_settings(text, str(path))


def _key_message(message: str) -> str:
    """msgspec says `... - at `$.verdicts.timeout``; lead with the key as the file spells it."""
    text, sep, at = message.rpartition(" - at `$.")
    if not sep:
        return message
    key = at.rstrip("`")
    return f"{key}: {text}"
