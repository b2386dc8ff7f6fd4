"""Rules for the built-in policy: first match wins, else the default verdict.

A TOML file, so users can write it by hand (the README's "Rules" section has an annotated one):

    default = "PermanentAccept"

    [[rule]]                      # every key but `verdict` is optional; all given must match
    name = "dns to the resolver"  # shown in the decision log (else "rule N (line L)")
    process = "curl"              # /proc/PID/comm, a glob (fnmatch)
    exe = "/usr/bin/*"            # /proc/PID/exe, a glob
    pid = 1234
    user = "alice"                # a user name, or a uid as a number
    direction = "outbound"        # outbound | inbound
    protocol = "udp"              # tcp | udp | icmp | icmpv6 | a number
    remote = "10.0.0.0/8"         # an address or network (v4 or v6), or a list of them
    remote_port = 53              # a port or [low, high]
    local_port = [1024, 65535]
    verdict = "RedirectNameServer"  # any kext verdict name (case does not matter)

The matching core is pure: it sees a `Flow` (the connection's addresses) and the
`ProcessFacts` the shell read from /proc once per connection, never /proc itself.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from kextless.actors.policy.view import ProcessFacts
from kextless.base.security import UnsafePath, check_private
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6

_VERDICTS = {v.kext_name.lower(): v for v in Verdict}
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_DIRECTIONS = {"outbound": Direction.OUTBOUND, "inbound": Direction.INBOUND}
_KEYS = {
    "name",
    "process",
    "exe",
    "pid",
    "user",
    "direction",
    "protocol",
    "remote",
    "remote_port",
    "local_port",
    "verdict",
}
_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
_LINE_OF_TOML_ERROR = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_LABEL = "default"


class RulesError(ValueError):
    """A rules file that cannot be used; the message is one line: `FILE:LINE: problem`."""


@dataclass(frozen=True)
class Flow:
    """What a rule sees of a connection, with addresses already parsed (see `flow_of`)."""

    direction: int
    protocol: int
    local_ip: Address
    local_port: int
    remote_ip: Address
    remote_port: int


def flow_of(info: ConnectionIpv4 | ConnectionIpv6) -> Flow:
    return Flow(
        info.direction,
        info.protocol,
        ipaddress.ip_address(info.local_ip),
        info.local_port,
        ipaddress.ip_address(info.remote_ip),
        info.remote_port,
    )


@dataclass(frozen=True)
class Rule:
    verdict: Verdict
    label: str = "rule"
    process: str | None = None
    exe: str | None = None
    pid: int | None = None
    user: str | int | None = None
    direction: Direction | None = None
    protocol: int | None = None
    remote: tuple[Network, ...] | None = None
    remote_port: tuple[int, int] | None = None
    local_port: tuple[int, int] | None = None

    def matches(self, flow: Flow, facts: ProcessFacts) -> bool:
        if self.direction is not None and flow.direction != self.direction:
            return False
        if self.protocol is not None and flow.protocol != self.protocol:
            return False
        if self.remote_port and not self.remote_port[0] <= flow.remote_port <= self.remote_port[1]:
            return False
        if self.local_port and not self.local_port[0] <= flow.local_port <= self.local_port[1]:
            return False
        if self.remote is not None:
            ip = flow.remote_ip
            if not any(ip.version == net.version and ip in net for net in self.remote):
                return False
        if self.pid is not None and facts.pid != self.pid:
            return False
        if self.process is not None and not (facts.name and fnmatchcase(facts.name, self.process)):
            return False
        if self.exe is not None and not (facts.exe and fnmatchcase(facts.exe, self.exe)):
            return False
        if isinstance(self.user, int):
            return facts.uid == self.user
        return self.user is None or (facts.user != "" and facts.user == self.user)


@dataclass(frozen=True)
class Policy:
    default: Verdict = Verdict.PERMANENT_ACCEPT
    rules: tuple[Rule, ...] = ()

    def match(self, flow: Flow, facts: ProcessFacts) -> tuple[Verdict, str]:
        """The first matching rule's verdict and label, else the default's."""
        for rule in self.rules:
            if rule.matches(flow, facts):
                return rule.verdict, rule.label
        return self.default, DEFAULT_LABEL

    def decide(
        self, info: ConnectionIpv4 | ConnectionIpv6, facts: ProcessFacts | None = None
    ) -> Verdict:
        return self.match(flow_of(info), facts or ProcessFacts(pid=info.process_id))[0]


# ---- parsing ---------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _verdict(value: object, where: str) -> Verdict:
    if isinstance(value, str) and value.lower() in _VERDICTS:
        return _VERDICTS[value.lower()]
    names = ", ".join(v.kext_name for v in Verdict)
    raise RulesError(f"{where}unknown verdict {value!r}; one of {names}")


def _ports(key: str, value: object, where: str) -> tuple[int, int]:
    bounds: list[int] = []
    if isinstance(value, int) and not isinstance(value, bool):
        bounds = [value, value]
    elif isinstance(value, list) and len(value) == 2:
        bounds = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if len(bounds) != 2:
        raise RulesError(f"{where}{key} is a port or [low, high], got {value!r}")
    low, high = bounds
    if not 0 <= low <= high <= 65535:
        raise RulesError(f"{where}{key} {low}..{high} is not a range within 0..65535")
    return low, high


def _networks(value: object, where: str) -> tuple[Network, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RulesError(f"{where}remote is an empty list (it would match nothing)")
    out: list[Network] = []
    for item in items:
        if not isinstance(item, str):
            raise RulesError(f"{where}remote is an address or network as text, got {item!r}")
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise RulesError(f"{where}bad remote {item!r}: {exc}") from None
    return tuple(out)


def _text(raw: dict[str, object], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RulesError(f"{where}{key} is a non-empty string, got {value!r}")
    return value


def _rule(raw: object, index: int, line: int | None) -> Rule:
    where = f"rule {index + 1}: "
    if not isinstance(raw, dict):
        raise RulesError(f"{where}must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise RulesError(f"{where}unknown key(s) {', '.join(sorted(unknown))}")
    if "verdict" not in raw:
        raise RulesError(f"{where}needs a verdict")
    name = _text(raw, "name", where)
    label = name or (f"rule {index + 1} (line {line})" if line else f"rule {index + 1}")
    direction = protocol = pid = user = None
    if "direction" in raw:
        if raw["direction"] not in _DIRECTIONS:
            raise RulesError(f"{where}direction is outbound or inbound, got {raw['direction']!r}")
        direction = _DIRECTIONS[raw["direction"]]
    if "protocol" in raw:
        p = raw["protocol"]
        protocol = PROTOCOLS.get(p.lower()) if isinstance(p, str) else p
        if not _is_int(protocol) or not 0 <= protocol < 256:  # type: ignore[operator]
            raise RulesError(f"{where}unknown protocol {p!r}; tcp, udp, icmp, icmpv6 or 0..255")
    if "pid" in raw:
        pid = raw["pid"]
        if not _is_int(pid) or pid < 1:
            raise RulesError(f"{where}pid is a positive number, got {pid!r}")
    if "user" in raw:
        user = raw["user"]
        if not (_is_int(user) and user >= 0) and not (isinstance(user, str) and user):
            raise RulesError(f"{where}user is a user name or a uid number, got {user!r}")
    return Rule(
        verdict=_verdict(raw["verdict"], where),
        label=label,
        process=_text(raw, "process", where),
        exe=_text(raw, "exe", where),
        pid=pid,
        user=user,
        direction=direction,
        protocol=protocol,
        remote=_networks(raw["remote"], where) if "remote" in raw else None,
        remote_port=_ports("remote_port", raw["remote_port"], where)
        if "remote_port" in raw
        else None,
        local_port=_ports("local_port", raw["local_port"], where) if "local_port" in raw else None,
    )


def _header_lines(text: str) -> list[int]:
    """The 1-based line of each `[[rule]]` header, in order (the nth is the nth rule)."""
    return [n for n, line in enumerate(text.splitlines(), 1) if _RULE_HEADER.match(line)]


def _key_line(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for n, line in enumerate(text.splitlines(), 1):
        if _RULE_HEADER.match(line) or line.lstrip().startswith("["):
            return None  # past the top-level keys
        if pattern.match(line):
            return n
    return None


def parse(text: str, where: str = "<rules>") -> Policy:
    """The policy in `text`; RulesError `WHERE:LINE: problem` otherwise."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _LINE_OF_TOML_ERROR.search(message)
        line = (m.group(1) or str(max(1, len(text.splitlines())))) if m else None
        at = f"{where}:{line}" if line else where
        problem = _LINE_OF_TOML_ERROR.sub("", message).strip()
        raise RulesError(f"{at}: not valid TOML: {problem}") from None
    unknown = set(data) - {"default", "rule"}
    if unknown:
        first = min(unknown, key=lambda k: _key_line(text, k) or 0)
        line = _key_line(text, first)
        at = f"{where}:{line}" if line else where
        raise RulesError(
            f"{at}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
            "only `default` and [[rule]] tables"
        )
    try:
        default = _verdict(data.get("default", "PermanentAccept"), "default: ")
    except RulesError as exc:
        line = _key_line(text, "default")
        raise RulesError(f"{where}:{line}: {exc}" if line else f"{where}: {exc}") from None
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError(f"{where}: `rule` must be an array of tables ([[rule]])")
    headers = _header_lines(text)
    lines: list[int | None] = list(headers) if len(headers) == len(raw_rules) else []
    lines += [None] * (len(raw_rules) - len(lines))
    rules = []
    for i, raw in enumerate(raw_rules):
        try:
            rules.append(_rule(raw, i, lines[i]))
        except RulesError as exc:
            at = f"{where}:{lines[i]}" if lines[i] else where
            raise RulesError(f"{at}: {exc}") from None
    return Policy(default, tuple(rules))


def load(path: Path) -> Policy:
    """Read and parse a rules file; RulesError (one line naming the file and line) otherwise,
    also when another user could change it (base/security.py): they would decide verdicts."""
    try:
        check_private(path, "rules file")
    except UnsafePath as exc:
        raise RulesError(str(exc)) from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read the rules file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RulesError(f"{path}: not UTF-8 text: {exc.reason}") from None
    return parse(text, str(path))


#: The rules used when none are given: safe on a real machine (see the file's comments).
DEFAULT_RULES_FILE = Path(__file__).with_name("default-rules.toml")
