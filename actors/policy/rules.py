"""Rules for the built-in policy: first match wins, else the default verdict.

A TOML file, so users can write it by hand:

    default = "PermanentAccept"

    [[rule]]                      # every key but `verdict` is optional
    direction = "outbound"        # outbound | inbound
    protocol = "udp"              # tcp | udp | icmp | icmpv6 | a number
    remote = "10.0.0.0/8"         # address or network
    remote_port = 53              # a port or [low, high]
    local_port = [1024, 65535]
    verdict = "RedirectNameServer"  # any kext verdict name
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6

_VERDICTS = {v.kext_name: v for v in Verdict}
_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_DIRECTIONS = {"outbound": Direction.OUTBOUND, "inbound": Direction.INBOUND}
_KEYS = {"direction", "protocol", "remote", "remote_port", "local_port", "verdict"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RulesError(ValueError):
    """A rules file that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Rule:
    verdict: Verdict
    direction: Direction | None = None
    protocol: int | None = None
    remote: Network | None = None
    remote_port: tuple[int, int] | None = None
    local_port: tuple[int, int] | None = None

    def matches(self, info: ConnectionIpv4 | ConnectionIpv6) -> bool:
        if self.direction is not None and info.direction != self.direction:
            return False
        if self.protocol is not None and info.protocol != self.protocol:
            return False
        if self.remote is not None:
            addr = ipaddress.ip_address(info.remote_ip)
            if addr.version != self.remote.version or addr not in self.remote:
                return False
        if self.remote_port and not self.remote_port[0] <= info.remote_port <= self.remote_port[1]:
            return False
        return not (
            self.local_port and not self.local_port[0] <= info.local_port <= self.local_port[1]
        )


@dataclass(frozen=True)
class Policy:
    default: Verdict = Verdict.PERMANENT_ACCEPT
    rules: tuple[Rule, ...] = ()

    def decide(self, info: ConnectionIpv4 | ConnectionIpv6) -> Verdict:
        for rule in self.rules:
            if rule.matches(info):
                return rule.verdict
        return self.default


def _verdict(value: object, where: str) -> Verdict:
    if isinstance(value, str) and value in _VERDICTS:
        return _VERDICTS[value]
    raise RulesError(f"{where}: unknown verdict {value!r}; one of {', '.join(_VERDICTS)}")


def _ports(value: object, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        low, high = value
    else:
        raise RulesError(f"{where}: a port is a number or [low, high], got {value!r}")
    if not 0 <= low <= high <= 65535:
        raise RulesError(f"{where}: port range {low}..{high} is outside 0..65535")
    return low, high


def _rule(raw: object, index: int) -> Rule:
    where = f"rule {index + 1}"
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if "verdict" not in raw:
        raise RulesError(f"{where}: needs a verdict")
    direction = protocol = remote = None
    if "direction" in raw:
        if raw["direction"] not in _DIRECTIONS:
            raise RulesError(f"{where}: direction is outbound or inbound")
        direction = _DIRECTIONS[raw["direction"]]
    if "protocol" in raw:
        p = raw["protocol"]
        protocol = _PROTOCOLS.get(p) if isinstance(p, str) else p
        if not isinstance(protocol, int) or isinstance(protocol, bool) or not 0 <= protocol < 256:
            raise RulesError(f"{where}: unknown protocol {p!r}")
    if "remote" in raw:
        try:
            remote = ipaddress.ip_network(raw["remote"], strict=False)
        except (ValueError, TypeError) as exc:
            raise RulesError(f"{where}: bad remote {raw['remote']!r}: {exc}") from None
    return Rule(
        _verdict(raw["verdict"], where),
        direction,
        protocol,
        remote,
        _ports(raw["remote_port"], where) if "remote_port" in raw else None,
        _ports(raw["local_port"], where) if "local_port" in raw else None,
    )


def parse(text: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"not valid TOML: {exc}") from None
    unknown = set(data) - {"default", "rule"}
    if unknown:
        raise RulesError(f"unknown top-level key(s) {', '.join(sorted(unknown))}")
    default = _verdict(data.get("default", "PermanentAccept"), "default")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError("`rule` must be an array of tables ([[rule]])")
    return Policy(default, tuple(_rule(r, i) for i, r in enumerate(raw_rules)))


def load(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"cannot read rules file {path}: {exc.strerror}") from None
    return parse(text)
