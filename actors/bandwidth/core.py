"""The bandwidth actor's pure core: kernel byte counters in, GetBandwidthStats answers out.

The kernel counts, per packet orientation (the 5-tuple as the packet carries it), the TCP/UDP
payload of every accepted packet, in two places (map layouts in base/kernel_maps.py):

* `Source.CACHE`: kextless_pre's PASS entries, i.e. established, permanently accepted flows
  that never reach Python;
* `Source.REINJECTED`: the guard's count of every packet Python let through (re-injected).

Each packet is counted once, in one of them. A redirected connection's rewritten outbound
packets are counted by the guard under the 5-tuple the application sent (the capture's
`redirected` translation), so they too arrive here as the application's own orientation and
need nothing special. The shell reads both maps (`ReadCounters`, every
`poll_ns`, and before every answer) and hands the readings to `poll`. The core keeps the last
value of every counter and adds the growth to the connection the packet belongs to: a packet
from a local address is transmitted by (local=src, remote=dst), one to a local address is
received by (local=dst, remote=src); a packet between two local addresses (loopback) counts
for both ends, as the kext's per-socket counting does. `request` answers GetBandwidthStats
with what accumulated since the previous request (the kext's delta semantics, spec §11) and
forgets it, so a connection that ended in between reports its last bytes once.

A counter lower than its last value was reset (the capture re-wrote the entry: a verdict
change) and counts from zero; one that disappeared is forgotten (its entry was deleted or
evicted). Either way the bytes counted since the previous poll are lost: that, and an LRU
eviction, are the only losses (README.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kextless.base.kernel_maps import FLOW_KEY
from kextless.protocol import messages as m
from kextless.protocol.enums import InfoType, IpProtocol, Severity
from kextless.protocol.infos import BandwidthEntry, BandwidthStatsV4, BandwidthStatsV6
from kextless.protocol.logtag import source_tag

#: How often the counters are read between requests: entries of ended connections stay
#: ~30 s in the capture's cache, so 1 s loses nothing there; it bounds what a reset loses.
DEFAULT_POLL_NS = 1_000_000_000
#: Connections with bytes waiting for the next request, at most (no client asking ever).
DEFAULT_MAX_PENDING = 262_144
#: Entries per info: the kext sends one per table whatever its size; bounded infos keep
#: the broker's queue and a 1024-byte reader moving (52 B per IPv6 entry: ~106 KB).
MAX_ENTRIES_PER_INFO = 2048


class Source(enum.IntEnum):
    """Which kernel map a counter comes from (each packet is counted in exactly one)."""

    CACHE = 0
    REINJECTED = 1


#: One counter as the kernel holds it: its map, its raw 40-byte key (struct flow_key of
#: flowcache.bpf.c: the packet orientation's 5-tuple) and the payload bytes counted so far.
#: Plain tuples, decoded only when a counter moved: a read of 60k entries stays cheap.
Reading = tuple[Source, bytes, int]


def decode_key(raw: bytes) -> tuple[int, bytes, int, bytes, int]:
    """(protocol, src, sport, dst, dport) of a raw map key; IPv4 addresses as 4 bytes."""
    family, proto, sport, dport, _pad, src, dst = FLOW_KEY.unpack(raw)
    if family == 4:
        src, dst = src[:4], dst[:4]
    return proto, src, sport, dst, dport


@dataclass(frozen=True, slots=True)
class ReadCounters:
    """Effect: read both maps now and call `poll` with what they hold."""


Effect = m.Message | ReadCounters

#: (protocol, local_ip, local_port, remote_ip, remote_port): the kext's table key.
ConnKey = tuple[int, bytes, int, bytes, int]
_CounterKey = tuple[Source, bytes]

#: The kext's order of the four tables (spec §11, docs/kext-contract.md C11).
_TABLES = (
    (IpProtocol.TCP, 4),
    (IpProtocol.TCP, 16),
    (IpProtocol.UDP, 4),
    (IpProtocol.UDP, 16),
)


@dataclass
class BandwidthConfig:
    poll_ns: int = DEFAULT_POLL_NS
    max_pending: int = DEFAULT_MAX_PENDING


@dataclass
class BandwidthCore:
    """Counter baselines and the bytes each connection moved since the last request."""

    config: BandwidthConfig = field(default_factory=BandwidthConfig)
    #: The last value of every counter the maps held at the previous poll.
    last: dict[_CounterKey, int] = field(default_factory=dict)
    #: connection -> [transmitted, received] since the previous request.
    pending: dict[ConnKey, list[int]] = field(default_factory=dict)
    #: Ids of the programs whose maps `last` describes (None: never read yet).
    generation: tuple[int, ...] | None = None
    next_poll_ns: int = 0
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "polls",
                "requests",
                "infos",
                "resets",
                "foreign_bytes",
                "dropped_bytes",
                "generations",
            ),
            0,
        )
    )
    _overflowing: bool = False

    # ---- inputs ---------------------------------------------------------------------------

    def start(self, now_ns: int) -> list[Effect]:
        """Read the counters at once (to take the baselines)."""
        self.next_poll_ns = now_ns + self.config.poll_ns
        return [ReadCounters()]

    def poll(
        self,
        readings: list[Reading],
        generation: tuple[int, ...],
        fresh: bool,
        local: frozenset[bytes],
        now_ns: int,
    ) -> list[Effect]:
        """The maps' counters now. `generation`: the ids of the programs they belong to
        (() if none is attached); `fresh`: those programs were loaded after this actor
        started, so everything they counted is new to us; otherwise (we are a restarted
        actor joining running programs) what they hold was counted before our time and is
        only the baseline. `local`: this namespace's addresses."""
        self.counters["polls"] += 1
        self.next_poll_ns = now_ns + self.config.poll_ns
        out: list[Effect] = []
        baseline_only = False
        if generation != self.generation:
            if self.generation is not None or generation:
                self.counters["generations"] += 1
            if self.generation:
                out.append(
                    m.Log(
                        Severity.WARNING,
                        f"{source_tag(0)} kernel counters replaced (programs {list(generation)}):"
                        " bytes since the previous read of the old ones are not reported",
                    )
                )
            self.last.clear()
            baseline_only = bool(generation) and not fresh
            self.generation = generation
        seen: dict[_CounterKey, int] = {}
        last = self.last
        for source, raw, payload in readings:
            key = (source, raw)
            seen[key] = payload
            old = last.get(key)
            if old == payload:
                continue  # the common case: nothing moved
            if old is None:
                delta = 0 if baseline_only else payload
            elif payload > old:
                delta = payload - old
            else:
                self.counters["resets"] += 1
                delta = payload
            if delta:
                out += self._add(decode_key(raw), delta, local)
        self.last = seen
        return out

    def request(self, now_ns: int) -> list[Effect]:
        """GetBandwidthStats: the bytes since the previous request, BandwidthStatsV4/V6 infos
        in the kext's table order (TCP v4, TCP v6, UDP v4, UDP v6), one per table that has
        data (more only past MAX_ENTRIES_PER_INFO entries), entries in ascending key order.
        Call `poll` with a fresh reading first."""
        self.counters["requests"] += 1
        pending, self.pending = self.pending, {}
        self._overflowing = False
        emits: list[m.Emit] = []
        for proto, size in _TABLES:
            rows = sorted(
                (k[1], k[2], k[3], k[4], v[0], v[1])
                for k, v in pending.items()
                if k[0] == proto and len(k[1]) == size
            )
            for i in range(0, len(rows), MAX_ENTRIES_PER_INFO):
                values = tuple(BandwidthEntry(*row) for row in rows[i : i + MAX_ENTRIES_PER_INFO])
                info: BandwidthStatsV4 | BandwidthStatsV6
                if size == 4:
                    info = BandwidthStatsV4(int(proto), values)
                    kind = InfoType.BANDWIDTH_STATS_V4
                else:
                    info = BandwidthStatsV6(int(proto), values)
                    kind = InfoType.BANDWIDTH_STATS_V6
                emits.append(m.Emit(kind, info.encode()))
        self.counters["infos"] += len(emits)
        return [m.Emits(tuple(emits))] if emits else []

    # ---- deadlines ------------------------------------------------------------------------

    def next_deadline_ns(self) -> int | None:
        return self.next_poll_ns

    def on_deadline(self, now_ns: int) -> list[Effect]:
        if now_ns < self.next_poll_ns:
            return []
        self.next_poll_ns = now_ns + self.config.poll_ns
        return [ReadCounters()]

    def health(self) -> dict[str, float]:
        return {
            **{k: float(v) for k, v in self.counters.items()},
            "counters_tracked": float(len(self.last)),
            "connections_pending": float(len(self.pending)),
        }

    # ---- inside ---------------------------------------------------------------------------

    def _add(
        self, key: tuple[int, bytes, int, bytes, int], delta: int, local: frozenset[bytes]
    ) -> list[Effect]:
        proto, src, sport, dst, dport = key
        out: list[Effect] = []
        sent, got = _is_local(src, local), _is_local(dst, local)
        if not (sent or got):
            self.counters["foreign_bytes"] += delta  # forwarded through the namespace
            return out
        if sent:
            out += self._credit((proto, src, sport, dst, dport), 0, delta)
        if got:
            out += self._credit((proto, dst, dport, src, sport), 1, delta)
        return out

    def _credit(self, conn: ConnKey, index: int, delta: int) -> list[Effect]:
        entry = self.pending.get(conn)
        if entry is None:
            if len(self.pending) >= self.config.max_pending:
                self.counters["dropped_bytes"] += delta
                if self._overflowing:
                    return []
                self._overflowing = True
                return [
                    m.Log(
                        Severity.WARNING,
                        f"{source_tag(0)} {self.config.max_pending} connections wait for"
                        " GetBandwidthStats; bytes of further ones are dropped until it comes",
                    )
                ]
            entry = self.pending[conn] = [0, 0]
        entry[index] += delta
        return []


def _is_local(addr: bytes, local: frozenset[bytes]) -> bool:
    return addr in local or (len(addr) == 4 and addr[0] == 127)
