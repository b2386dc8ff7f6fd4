"""The policy's connection table: a pure core (no sockets, clocks or /proc; `now_ns` and the
wall clock come in), the source of the snapshot the monitor shows and of the live connections
a rules reload re-decides.

Key: protocol + local ip/port + remote ip/port, local first whatever the direction (as the
kext keys its cache and bandwidth entries). A temporary verdict brings a new info (new id) per
packet for the same key: the row is updated, not duplicated. An info for a key whose row has
ended is a new connection on a reused 5-tuple: the row starts again.

Bounded: at most `limit` rows (default 20,000). Ended rows leave `ended_keep_ns` (60 s, as
CleanEndedConnections forgets them) after their end; past the limit the oldest ended row goes
first, and only when none has ended the oldest live one (counted in `dropped`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kextless.actors.policy.rules import Flow, Policy
from kextless.actors.policy.view import ConnectionRow, ProcessFacts, bracketed
from kextless.protocol.enums import Verdict
from kextless.protocol.infos import (
    BandwidthStatsV4,
    BandwidthStatsV6,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
)

Key = tuple[int, bytes, int, bytes, int]
DEFAULT_LIMIT = 20_000
ENDED_KEEP_NS = 60 * 1_000_000_000
#: Update works on cached connections only; the kext (and kextless) cache TCP and UDP.
UPDATABLE_PROTOCOLS = frozenset({6, 17})

_PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


def protocol_name(number: int) -> str:
    return _PROTOCOL_NAMES.get(number, str(number))


def direction_name(direction: int) -> str:
    return "inbound" if direction else "outbound"


@dataclass
class Row:
    key: Key
    id: int
    flow: Flow
    facts: ProcessFacts
    verdict: Verdict
    rule: str
    started: float  # wall clock
    sent: int = 0
    received: int = 0
    ended_ns: int | None = None
    ended: float | None = None  # wall clock

    @property
    def v6(self) -> bool:
        return len(self.key[1]) == 16

    def to_view(self) -> ConnectionRow:
        f = self.flow
        return ConnectionRow(
            id=self.id,
            pid=self.facts.pid,
            process=self.facts.name,
            exe=self.facts.exe,
            user=self.facts.user,
            direction=direction_name(f.direction),
            protocol=protocol_name(f.protocol),
            local_ip=bracketed(str(f.local_ip)),
            local_port=f.local_port,
            remote_ip=bracketed(str(f.remote_ip)),
            remote_port=f.remote_port,
            verdict=self.verdict.kext_name,
            rule=self.rule,
            sent=self.sent,
            received=self.received,
            started=self.started,
            ended=self.ended,
        )


@dataclass(frozen=True)
class Change:
    """A live connection whose verdict a reload changed: send an Update for it."""

    row: Row
    old: Verdict
    verdict: Verdict
    rule: str


@dataclass
class ConnectionTable:
    limit: int = DEFAULT_LIMIT
    ended_keep_ns: int = ENDED_KEEP_NS
    rows: OrderedDict[Key, Row] = field(default_factory=OrderedDict)  # by first sight
    _ended: OrderedDict[Key, int] = field(default_factory=OrderedDict)  # by end time
    dropped: int = 0
    unknown_bandwidth: int = 0
    unknown_ends: int = 0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"table limit must be at least 1, got {self.limit}")

    def __len__(self) -> int:
        return len(self.rows)

    def decided(
        self,
        info: ConnectionIpv4 | ConnectionIpv6,
        flow: Flow,
        facts: ProcessFacts,
        verdict: Verdict,
        rule: str,
        wall: float,
    ) -> Row:
        key: Key = (info.protocol, info.local_ip, info.local_port, info.remote_ip, info.remote_port)
        row = self.rows.get(key)
        if row is not None and row.ended_ns is None:
            row.id, row.verdict, row.rule = info.id, verdict, rule
            if facts.pid or not row.facts.pid:
                row.facts = facts
            return row
        if row is not None:  # the 5-tuple reused after an end: a new connection
            del self.rows[key]
            self._ended.pop(key, None)
        row = Row(key, info.id, flow, facts, verdict, rule, wall)
        self.rows[key] = row
        self._bound()
        return row

    def ended(
        self, event: ConnectionEndEventV4 | ConnectionEndEventV6, now_ns: int, wall: float
    ) -> None:
        key: Key = (
            event.protocol,
            event.local_ip,
            event.local_port,
            event.remote_ip,
            event.remote_port,
        )
        row = self.rows.get(key)
        if row is None or row.ended_ns is not None:
            self.unknown_ends += row is None
            return
        row.ended_ns, row.ended = now_ns, wall
        self._ended[key] = now_ns

    def bandwidth(self, stats: BandwidthStatsV4 | BandwidthStatsV6) -> None:
        """Add one GetBandwidthStats answer's deltas: transmitted is what the local side sent
        (kext-spec §5.5, the kext's tx), received what it got."""
        rows = self.rows
        for e in stats.values:
            row = rows.get((stats.protocol, e.local_ip, e.local_port, e.remote_ip, e.remote_port))
            if row is None:
                self.unknown_bandwidth += 1
                continue
            row.sent += e.transmitted_bytes
            row.received += e.received_bytes

    def expire(self, now_ns: int) -> int:
        """Forget rows ended more than `ended_keep_ns` ago; how many went."""
        deadline = now_ns - self.ended_keep_ns
        n = 0
        while self._ended:
            key, at = next(iter(self._ended.items()))
            if at > deadline:
                break
            del self._ended[key]
            del self.rows[key]
            n += 1
        return n

    def _bound(self) -> None:
        while len(self.rows) > self.limit:
            if self._ended:
                key, _ = self._ended.popitem(last=False)
            else:
                key = next(iter(self.rows))
            del self.rows[key]
            self.dropped += 1

    def live(self) -> list[Row]:
        return [r for r in self.rows.values() if r.ended_ns is None]

    def reload(self, policy: Policy) -> list[Change]:
        """Re-decide every live TCP/UDP connection under `policy`; the rows whose verdict
        changes are updated (verdict, rule) and returned, for UpdateV4/V6. A row whose verdict
        stays takes the new rule's label too (rules may have moved), without an Update."""
        changes = []
        for row in self.rows.values():
            if row.ended_ns is not None or row.key[0] not in UPDATABLE_PROTOCOLS:
                continue
            verdict, rule = policy.match(row.flow, row.facts)
            if verdict != row.verdict:
                changes.append(Change(row, row.verdict, verdict, rule))
            row.verdict, row.rule = verdict, rule
        return changes

    def view(self) -> list[ConnectionRow]:
        return [r.to_view() for r in self.rows.values()]
