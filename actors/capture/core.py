"""The capture actor's decision core: packets and ALE messages in, actions out.

No sockets, no handles, no clocks: the shell passes `now_ns` and opaque packet tokens, and
executes the returned actions. That keeps every verdict rule testable with crafted bytes. It
has the shape of every actor core (`kextless.base.cores`): each input method takes the input
and `now_ns` and returns a list of `Action`s; `next_deadline_ns()` says when `on_deadline` next
has work (a held packet to expire, a connection to forget, a filter to re-derive).

Two tables, named as the kext names them:
* the connection cache (`connections`): one `Connection` record per flow, with its verdict
  (or none yet), whether every packet of it is diverted, whether it is live, ended, held or
  redirected;
* the id cache (`held`): packets waiting for a verdict, by hold_id, oldest first.

What needs Python:
* TCP connection openers, FIN/RST, all UDP and all non-TCP/UDP reach us through the base
  filter. Established TCP of a permanently accepted connection never does (bulk speed).
* TCP connections that need every packet (temporary verdicts, redirects, blocked/dropped
  live connections, connections to re-ask after CacheClear) are added to the filter by local
  port; the core asks the shell for a new filter whenever that port set changes, and parks
  the release of a held packet until its connection's later packets are sure to be diverted.

With the kernel flow cache (`Config.kernel_cache`, kernel_cache.py) the filter is fixed instead
(every IP packet not decided in the kernel reaches us) and permanent verdicts go into the
kernel's map: PermanentAccept -> `KernelPut` PASS, PermanentDrop -> `KernelPut` DROP, written
BEFORE the held packets are released (the shell runs actions in order). Every other verdict
keeps the flow out of the map (blocks answer with RST/ICMP from here, temporary verdicts ask
per packet, redirects rewrite per packet), and whenever a verdict goes (changed, cleared,
expired, forgotten) its entry goes too. A flow asked about has its entry deleted first: an
entry we did not write (a killed predecessor's) must never pass a new connection. The map is
an LRU: an evicted entry only sends the flow's packets back here, where the verdict re-puts
it. Flows decided in the kernel send us no packets, so their idle expiry asks the kernel
(`KernelProbe` -> `kernel_activity`).
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kextless.actors.capture import filters
from kextless.actors.capture import packets as pk
from kextless.actors.capture.packets import Parsed
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import (
    CacheClear,
    CacheSet,
    CaptureReady,
    Decision,
    Flow,
    PacketHeld,
)

log = logging.getLogger("capture.core")

_REJECTS = frozenset({Verdict.PERMANENT_BLOCK, Verdict.UNDETERMINABLE, Verdict.FAILED})
_BLOCKS = _REJECTS | {Verdict.BLOCK}
_DROPS = frozenset({Verdict.DROP, Verdict.PERMANENT_DROP, Verdict.UNDECIDED})

#: A port set that shrank because a connection was forgotten outside `on_deadline` is
#: re-derived this much later, not at once: the port is often wanted again right away (a new
#: SYN reusing an ended connection's tuple), and a handle swap costs an open (measurements M1).
_FILTER_RECHECK_NS = 1_000_000_000


# ---- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pass:
    """Reinject the captured packet unmodified (no checksum recalculation)."""

    token: object


@dataclass(frozen=True, slots=True)
class Drop:
    """Forget the captured packet: it never reaches its destination."""

    token: object


@dataclass(frozen=True, slots=True)
class Reroute:
    """Reinject `raw` (rewritten, checksums already fixed) in place of the captured packet.

    `loopback`: deliver it through `lo` (needed for local redirect targets, see kext-contract C7-1).
    """

    token: object
    raw: bytes
    loopback: bool


@dataclass(frozen=True, slots=True)
class Inject:
    """Send a crafted packet (RST / ICMP error) on the captured packet's interface.

    `inbound`: towards the local stack (an answer to an outbound packet), else out to the wire.
    """

    like: object
    raw: bytes
    inbound: bool


@dataclass(frozen=True, slots=True)
class ToAle:
    msg: PacketHeld | CaptureReady


@dataclass(frozen=True, slots=True)
class SetFilter:
    """Divert every packet of TCP connections on these local ports (None: all TCP)."""

    generation: int
    ports: frozenset[int] | None


@dataclass(frozen=True, slots=True)
class ScanExisting:
    """Read the namespace's existing connections and pass them to `CaptureCore.existing`."""


@dataclass(frozen=True, slots=True)
class DestroySocket:
    """Abort the local socket of existing TCP connection `flow` (sock_diag SOCK_DESTROY).

    For a blocked connection that predates us and may be idle: no packet of it may ever come
    to reset it. The local application sees ECONNABORTED at once, and the kernel's abort sends
    the remote its RST, numbered right (we never saw a sequence number); the core passes that
    RST. Only in the namespace the capture owns."""

    flow: Flow


class KernelVerdict(enum.Enum):
    """What the kernel's flow map does with a flow's packets (kernel_cache.Action)."""

    PASS = "pass"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class KernelPut:
    """Decide `flow` in the kernel map, both orientations: its packets (but TCP SYN/FIN/RST)
    no longer reach us."""

    flow: Flow
    verdict: KernelVerdict
    #: The protocol verdict behind it (stored in the entry, for status and restart adoption).
    reason: Verdict


@dataclass(frozen=True, slots=True)
class KernelDelete:
    """Remove `flow`'s map entry, both orientations, if any: its next packet reaches us.

    `keep_counts` (a verdict change, an ask): the entry stays as a miss that keeps its byte
    counters, so the bandwidth actor still reads what it counted since its last poll; the
    record's `_forget` deletes it for good."""

    flow: Flow
    keep_counts: bool = False


@dataclass(frozen=True, slots=True)
class KernelRedirect:
    """The guard counts the re-injected packets of redirected `flow` as the rewrite leaves
    them (local -> `target`, an address and port) under `flow` itself, the connection the
    application sees, or (`counted` False) no longer: the kext counts a redirected
    connection's bytes as its own (kext-spec section 11), and the redirect target's side is
    not a connection of the application's."""

    flow: Flow
    target: tuple[bytes, int]
    counted: bool = True


@dataclass(frozen=True, slots=True)
class KernelClear:
    """Remove every map entry (CacheClear)."""


@dataclass(frozen=True, slots=True)
class KernelProbe:
    """Read when the kernel last passed a packet of each flow; the shell answers with
    `CaptureCore.kernel_activity` (idle expiry of flows whose packets no longer reach us)."""

    flows: tuple[Flow, ...]


@dataclass(frozen=True, slots=True)
class KernelAudit:
    """List the kernel map's flows and pass them to `CaptureCore.kernel_audit` (after the
    ALE's replay at start: entries a killed predecessor wrote for flows nobody vouches for
    any more are deleted)."""


Action = (
    Pass
    | Drop
    | Reroute
    | Inject
    | ToAle
    | SetFilter
    | ScanExisting
    | DestroySocket
    | KernelPut
    | KernelDelete
    | KernelRedirect
    | KernelClear
    | KernelProbe
    | KernelAudit
)


class ExistingMode(enum.Enum):
    """What to do about connections that existed before the capture started."""

    #: Report each like a new connection (a synthetic held packet), so the client decides it.
    ASK = "ask"
    #: Cache PermanentAccept for each, silently.
    ACCEPT = "accept"


@dataclass(frozen=True, slots=True)
class ExistingFlow:
    """A connection found in the kernel's socket table at start, with its direction."""

    flow: Flow
    direction: Direction


# ---- configuration and state ------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    exclude_ports: frozenset[int] = frozenset()
    nameserver_v4: bytes = bytes([127, 0, 0, 1])
    nameserver_v6: bytes = b"\0" * 15 + b"\x01"
    nameserver_port: int = 53
    tunnel_port: int = 717
    split_tunnel_port: int = 719
    #: Above this many per-packet local ports, divert all TCP (filters hold ~250 terms).
    max_filter_ports: int = filters.MAX_PORTS
    #: A held packet nobody decides is dropped after this (the ALE's own timeout is 10 s).
    hold_ttl_ns: int = 30_000_000_000
    #: Past this many held packets new ones are dropped (fail closed, bounded memory).
    max_held: int = 50_000
    #: Ended TCP connections (FIN/RST seen or reset by us) are forgotten after this.
    ended_grace_ns: int = 30_000_000_000
    #: Forget a verdict after this long without a packet (UDP has no end). Not for TCP
    #: connections we let through: their established packets never reach us, so silence
    #: means nothing; they end with the FIN/RST we do see, or by the max_flows bound.
    idle_ns: int = 600_000_000_000
    #: Most connections with a verdict in the connection cache; past it the oldest is forgotten.
    max_flows: int = 200_000
    #: Connections that existed before the start: asked about, or accepted silently.
    existing: ExistingMode = ExistingMode.ASK
    #: The scan for them waits this long after CaptureReady, so the ALE's replay of the
    #: verdicts it knows arrives first (a flow with a replayed verdict is not asked again).
    existing_wait_ns: int = 500_000_000
    #: ... and until no CacheSet came for this long (a big replay is still arriving) ...
    existing_quiet_ns: int = 100_000_000
    #: ... but never longer than this after CaptureReady.
    existing_max_wait_ns: int = 5_000_000_000
    #: The shell loaded the kernel flow cache: fixed all-IP filter, permanent verdicts in the
    #: kernel map (Kernel* actions), no SetFilter, nothing parked. False: the per-port filter
    #: and handle swaps (platforms without TC BPF).
    kernel_cache: bool = False
    #: A packet of a kernel-passed flow that still reaches us re-puts its entry (it was
    #: evicted), at most this often per flow: packets already queued behind the put when it
    #: was written arrive here too, and need no second write.
    kernel_reput_ns: int = 1_000_000

    @property
    def target_ports(self) -> frozenset[int]:
        return frozenset({self.nameserver_port, self.tunnel_port, self.split_tunnel_port})


#: Where a redirect target's answers come from and go to: (protocol, target address, target
#: port, local address, local port), the key its reply packets are looked up by.
ReplyKey = tuple[int, bytes, int, bytes, int]
#: A held packet's retransmit key: TCP (flow, outbound, seq, flags, payload length), UDP
#: (flow, outbound, payload).
RetransKey = tuple[Flow, bool, int, int, int] | tuple[Flow, bool, bytes]
#: A retransmit that joined a held packet: (token, raw, parsed, outbound, loopback).
Follower = tuple[object, bytes, Parsed, bool, bool]


@dataclass(slots=True)
class Connection:
    """One entry of the connection cache: all the capture knows about one flow.

    A record may exist without a verdict (`verdict is None`, so the next packet is asked):
    a connection whose first packets are still held (`pending`), a live TCP connection whose
    verdict CacheClear forgot (`reask`), an ended one waiting out its grace period, or a
    redirect whose replies are still rewritten after CacheClear.
    """

    flow: Flow
    #: The cached verdict; None: none cached, ask about the next packet.
    verdict: Verdict | None = None
    #: TCP whose every packet must be diverted: its local port is in the filter.
    per_packet: bool = False
    #: Live, but CacheClear forgot its verdict: ask on its next packet, even a FIN/RST.
    reask: bool = False
    #: TCP we let a packet through for: it may be established, so silence means nothing.
    live: bool = False
    #: When its FIN/RST was seen or we reset it; forgotten `ended_grace_ns` later.
    ended_ns: int | None = None
    #: The last packet (or CacheSet) while it had a verdict; None while it has none.
    last_seen_ns: int | None = None
    #: Its packets held for a verdict: while > 0 and not live, an attempt in progress.
    pending: int = 0
    #: Its replies' key while it is redirected (`CaptureCore.replies` maps it back here).
    redirect: ReplyKey | None = None
    #: When `on_deadline` next looks at it (its entry in the expiry heap), or None.
    check_ns: int | None = None
    #: The hold_id of the synthetic packet that asks about it, when it existed before the
    #: start: its real packets join that request instead of being asked again.
    existing_hold: int | None = None
    #: Its local socket was aborted by us (`DestroySocket`): the kernel's RST must pass.
    destroyed: bool = False
    #: Its entry in the kernel map as we last wrote it: a KernelVerdict, ABSENT (deleted by
    #: us, or never there since we started), or None (unknown: a predecessor's may be there).
    kernel: KernelVerdict | None = None
    kernel_absent: bool = False
    #: Absent as a decision, yet its entry is still in the map as a miss that keeps its
    #: counters (KernelDelete keep_counts): `_forget` removes it.
    kernel_retired: bool = False
    #: When we last wrote its kernel entry (a re-put of an evicted entry is rate-limited).
    kernel_put_ns: int = 0
    #: An idle check asked the kernel (`KernelProbe`) and waits for `kernel_activity`.
    probing: bool = False


def _unused(conn: Connection) -> bool:
    """Nothing left to know: the record can go."""
    return (
        conn.verdict is None
        and conn.pending == 0
        and conn.ended_ns is None
        and conn.redirect is None
        and not (conn.live or conn.reask or conn.per_packet)
    )


@dataclass(slots=True)
class Held:
    """One entry of the id cache: a packet waiting for its verdict."""

    token: object
    flow: Flow
    parsed: Parsed
    raw: bytes
    outbound: bool
    loopback: bool
    seen_ns: int
    retrans_key: RetransKey | None
    followers: list[Follower] = field(default_factory=list)
    #: Built by us to ask about an existing connection: never reinjected, whatever the verdict.
    synthetic: bool = False


class CaptureCore:
    """All capture state; see the module docstring for the rules."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._targets = self.config.target_ports
        #: The connection cache. Insertion order is the order connections got their verdict
        #: (a record that gets one is moved to the end), so the max_flows bound forgets the
        #: oldest verdict first.
        self.connections: dict[Flow, Connection] = {}
        #: Connections in the cache that have a verdict (what max_flows bounds).
        self._cached = 0
        #: A second index into the connection cache, by the redirect reply key: a target's
        #: answer is a packet from the target to the app, whose own flow is not the
        #: redirected connection's, and it must be found without asking (per packet).
        self.replies: dict[ReplyKey, Connection] = {}
        #: Local port -> per-packet connections on it: the filter's port set is its keys,
        #: kept up to date as records change instead of derived from every record.
        self._port_refs: dict[int, int] = {}
        self._ports_dirty = False
        #: The id cache: hold_id order is arrival order.
        self.held: dict[int, Held] = {}
        self._next_hold_id = 1
        #: No hold_id below this is still held (moved forward lazily).
        self._oldest_hold_id = 1
        self._retrans: dict[RetransKey, int] = {}
        #: (check_ns, tie, connection): when to look at a connection that may expire (ended or
        #: idle). Lazy: an entry whose `check_ns` is not its connection's (moved earlier, or
        #: the record deleted: `_delete` clears it) is skipped when it comes up; `_compact`
        #: drops such entries when they pile up.
        self._expiry: list[tuple[int, int, Connection]] = []
        self._tie = itertools.count()
        self._recheck_ns: int | None = None
        self._gen_requested = 0
        self._ports_requested: frozenset[int] | None = frozenset()
        self._ports_active: frozenset[int] | None = frozenset()
        self._parked: list[tuple[int, list[Action]]] = []
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "packets",
                "asked",
                "passed",
                "rejected",
                "dropped",
                "rerouted",
                "unparseable",
                "retransmits_held",
                "expired",
                "unknown_hold_id",
                "filter_changes",
                "existing_asked",
                "existing_accepted",
                "existing_known",
                "existing_destroyed",
                "kernel_puts",
                "kernel_deletes",
            ),
            0,
        )
        #: When to scan for existing connections (`ScanExisting`), and the latest that may be.
        self._scan_ns: int | None = None
        self._scan_limit_ns = 0

    # ---- start ------------------------------------------------------------------------------

    def start(self, pid: int, now_ns: int) -> list[Action]:
        """Announce ourselves; the ALE answers with CacheSet for every connection it knows.

        The scan for connections that predate us (`ScanExisting`) comes once that replay has
        arrived: the ALE sends it in one burst as soon as it reads CaptureReady, and there is
        no end marker, so the scan waits `existing_wait_ns`, longer while CacheSets still
        arrive (`existing_quiet_ns` of silence), at most `existing_max_wait_ns`. A restarted
        capture is a started one: this is its path too. The shell opens the handle first, so
        a connection made after the scan's snapshot was already caught by its SYN."""
        cfg = self.config
        self._scan_ns = now_ns + cfg.existing_wait_ns
        self._scan_limit_ns = now_ns + max(cfg.existing_wait_ns, cfg.existing_max_wait_ns)
        return [ToAle(CaptureReady(pid))]

    def existing(
        self, flows: Iterable[ExistingFlow], now_ns: int, last: bool = True
    ) -> list[Action]:
        """Connections the kernel had before we started: report each we know nothing about.

        ASK: like a new connection - a synthetic packet (IP+TCP, ACK, no payload, agreeing
        with the flow and direction, since the client reads the connection from it) is held
        and sent as PacketHeld. It is never reinjected; the connection is diverted per packet
        meanwhile, and its real packets join that request. A block verdict aborts its local
        socket at once (`DestroySocket`: it may be idle, with no packet to reset it by); its
        packets meanwhile are reset at both ends like any established connection's.
        ACCEPT: PermanentAccept is cached, nobody is asked. A known flow whose cached verdict
        (the ALE's replay) blocks is aborted the same way: the scan proves it is established.

        The shell may hand a large scan over in parts, so that packets are served between
        them; `last` marks the final part (the summary is logged once)."""
        c = self.counters
        cfg = self.config
        asks: list[Action] = []
        for e in flows:
            flow = e.flow
            if flow.protocol != pk.TCP:
                continue  # UDP: every packet reaches us, one without a verdict is asked
            if self._unjudged(flow):
                continue
            rev = _reversed(flow)
            known = self.connections.get(flow) or self.connections.get(rev)
            if known is not None:
                c["existing_known"] += 1  # caught by its SYN/FIN, or replayed by the ALE
                if known.verdict in _BLOCKS and known.ended_ns is None:
                    asks += self._destroy(known, now_ns)
                continue
            conn = self._record(flow)
            conn.live = True  # established: silence means nothing
            if cfg.existing is ExistingMode.ACCEPT:
                c["existing_accepted"] += 1
                asks += self._on_cache_set(flow, Verdict.PERMANENT_ACCEPT, now_ns)
                continue
            if len(self.held) >= cfg.max_held:
                log.warning("held-packet limit reached: existing %s not asked", _fmt(flow))
                conn.reask = True  # asked on its next packet instead
                self._set_per_packet(conn, True)
                continue
            outbound = e.direction is Direction.OUTBOUND
            raw = _synthetic_ack(flow, outbound)
            p = pk.parse(raw)
            assert p is not None  # we just built it
            hold_id = self._next_hold_id
            self._next_hold_id += 1
            self.held[hold_id] = Held(
                None, flow, p, raw, outbound, False, now_ns, None, synthetic=True
            )
            conn.pending += 1
            conn.reask = True
            conn.existing_hold = hold_id
            self._set_per_packet(conn, True)
            c["asked"] += 1
            c["existing_asked"] += 1
            asks += self._kernel_remove(conn)  # its packets must reach us until answered
            asks.append(ToAle(PacketHeld(hold_id, flow, e.direction, raw, now_ns)))
            log.info("existing connection %s %s: asked", e.direction.name.lower(), _fmt(flow))
        if last:
            log.info(
                "existing connections: %d asked, %d accepted silently, %d already known",
                c["existing_asked"],
                c["existing_accepted"],
                c["existing_known"],
            )
        return self._filter_actions() + asks

    def _destroy(self, conn: Connection, now_ns: int) -> list[Action]:
        """Abort a blocked existing connection's socket now, not on its next packet.

        Block only: the kext sends nothing for a drop (kext-spec §4.2, note 16: packets are
        absorbed silently), so a dropped one keeps having its packets dropped, as there."""
        if conn.destroyed:
            return []
        conn.destroyed = True
        conn.live = True
        if conn.ended_ns is None:
            self._mark_ended(conn, now_ns)  # we are resetting it
        self.counters["existing_destroyed"] += 1
        log.info("existing connection %s blocked: aborting its socket", _fmt(conn.flow))
        return [DestroySocket(conn.flow)]

    def _unjudged(self, flow: Flow) -> bool:
        """Traffic `on_packet` passes without asking: excluded ports, a local redirect
        target's own connections."""
        excl = self.config.exclude_ports
        if flow.local_port in excl or flow.remote_port in excl:
            return True
        return flow.local_port in self._targets and flow.local_ip == flow.remote_ip

    def next_hold_id(self) -> int:
        """The hold_id the next held packet will get (a mark for `resync`)."""
        return self._next_hold_id

    def resync(self, pid: int, before_hold_id: int, now_ns: int) -> list[Action]:
        """The ALE came back (restarted): announce ourselves again and re-ask every packet
        still held that was sent before it went away (`before_hold_id`), under the same
        hold_ids - the ones sent while it was gone are still queued and reach it anyway."""
        out: list[Action] = [ToAle(CaptureReady(pid))]
        for hold_id, h in self.held.items():
            if hold_id < before_hold_id:
                direction = Direction.OUTBOUND if h.outbound else Direction.INBOUND
                out.append(ToAle(PacketHeld(hold_id, h.flow, direction, h.raw, h.seen_ns)))
        log.info("ALE reconnected: re-sent %d held packet(s)", len(out) - 1)
        return out

    # ---- packets ----------------------------------------------------------------------------

    def on_packet(
        self,
        token: object,
        raw: bytes | bytearray | memoryview,
        outbound: bool,
        loopback: bool,
        now_ns: int,
    ) -> list[Action]:
        """One captured packet. `loopback` packets are reported once, as outbound."""
        c = self.counters
        c["packets"] += 1
        p = pk.parse(raw)
        if p is None:
            # Fail closed: a packet we cannot read cannot be matched to a verdict, and passing
            # it would let crafted garbage through; the stack would reject a truncated header.
            c["unparseable"] += 1
            log.warning("dropping unparseable packet (%d bytes)", len(raw))
            return [Drop(token)]
        if p.fragment:
            # Non-first fragments carry no ports. The first fragment gets the verdict; without
            # it the rest can never be reassembled, so passing them is safe.
            c["passed"] += 1
            return [Pass(token)]
        proto = p.protocol
        if proto != pk.TCP and proto != pk.UDP:
            if proto == pk.ICMPV6 and p.icmp_type in pk.ICMPV6_LINK_TYPES:
                c["passed"] += 1  # neighbour discovery / MLD: IPv6's ARP, never a connection
                return [Pass(token)]
            flow = self._flow(p, outbound)
            return self._ask(token, raw, p, flow, None, outbound, loopback, now_ns, retrans=False)
        excl = self.config.exclude_ports
        if excl and (p.sport in excl or p.dport in excl):
            c["passed"] += 1
            return [Pass(token)]
        # Only build the reply key while some redirect exists (rare; this runs per packet).
        redirected = (
            self.replies.get((proto, p.src, p.sport, p.dst, p.dport)) if self.replies else None
        )
        if redirected is not None:
            # A redirect target answering the app: make it look like the host it contacted.
            c["rerouted"] += 1
            f = redirected.flow
            return [
                Reroute(
                    token, bytes(pk.rewrite(raw, p, src=f.remote_ip, sport=f.remote_port)), True
                )
            ]
        flow = self._flow(p, outbound)
        if flow.local_port in self._targets and flow.local_ip == flow.remote_ip:
            c["passed"] += 1  # a local redirect target's own traffic (same host on both sides)
            return [Pass(token)]
        conn = self.connections.get(flow)
        verdict = None if conn is None else conn.verdict
        if verdict is None and loopback:
            rev = _reversed(flow)
            rconn = self.connections.get(rev)
            if rconn is not None and (
                rconn.verdict is not None
                # The server's end of an existing local connection being asked about: its
                # packets join that request (it is reported once, as the client's end).
                or (conn is None and rconn.existing_hold is not None)
            ):
                flow, conn, verdict = rev, rconn, rconn.verdict
        pre: list[Action] = []
        control = False  # TCP SYN/FIN/RST: the kernel cache always sends them here
        if proto == pk.TCP:
            flags = p.flags
            control = bool(flags & (pk.TCP_SYN | pk.TCP_FIN | pk.TCP_RST))
            if flags & pk.TCP_SYN and not flags & pk.TCP_ACK:
                if conn is not None and conn.ended_ns is not None:
                    # A new connection reusing the 5-tuple: ask afresh.
                    pre = self._forget(flow, now_ns)
                    conn = self.connections.get(flow)  # only its held-packet count, if any
                    if pre and conn is None:
                        conn = self._record(flow)  # remembers the entry is gone
                        conn.kernel_absent = True
                    verdict = None
            elif flags & (pk.TCP_FIN | pk.TCP_RST):
                if conn is not None and conn.destroyed and flags & pk.TCP_RST:
                    c["passed"] += 1  # the kernel's own reset of a socket we aborted
                    return [Pass(token)]
                if conn is None or (verdict is None and not conn.reask):
                    c["passed"] += 1  # end of a connection we never judged: not ours to stop
                    return [Pass(token)]
                if conn.ended_ns is None:
                    self._mark_ended(conn, now_ns)
        if verdict is None or conn is None:  # (a verdict always has a record)
            return pre + self._ask(token, raw, p, flow, conn, outbound, loopback, now_ns, True)
        conn.last_seen_ns = now_ns
        if (
            self.config.kernel_cache
            and conn.kernel is not None
            and not control
            and now_ns - conn.kernel_put_ns >= self.config.kernel_reput_ns
        ):
            # Decided in the kernel, yet here: its entry was evicted (LRU). Put it back; an
            # eviction only ever costs trips to Python, never a wrong pass.
            conn.kernel = None
            pre = self._kernel_sync(conn, now_ns)
        if verdict is Verdict.PERMANENT_ACCEPT:
            c["passed"] += 1
            if proto == pk.TCP:
                conn.live = True  # may become established: an Update must divert it
            return [*pre, Pass(token)]
        if not verdict.is_permanent:
            return self._ask(token, raw, p, flow, conn, outbound, loopback, now_ns, True)
        return pre + self._enforce(token, raw, p, flow, conn, verdict, outbound, loopback, now_ns)

    def _flow(self, p: Parsed, outbound: bool) -> Flow:
        if outbound:
            return Flow(p.protocol, p.src, p.sport, p.dst, p.dport)
        return Flow(p.protocol, p.dst, p.dport, p.src, p.sport)

    def _ask(
        self,
        token: object,
        raw: bytes | bytearray | memoryview,
        p: Parsed,
        flow: Flow,
        conn: Connection | None,
        outbound: bool,
        loopback: bool,
        now_ns: int,
        retrans: bool,
    ) -> list[Action]:
        c = self.counters
        if conn is not None and conn.existing_hold is not None:
            first = self.held.get(conn.existing_hold)
            if first is not None:
                # An existing connection being asked about: join its request.
                c["retransmits_held"] += 1
                first.followers.append((token, bytes(raw), p, outbound, loopback))
                return []
            conn.existing_hold = None
        key: RetransKey | None = None
        if retrans:
            if p.protocol == pk.TCP:
                key = (flow, outbound, p.seq, p.flags, p.payload_len)
            else:
                key = (flow, outbound, bytes(raw[p.l4 + 8 :]))
            hold_id = self._retrans.get(key)
            if hold_id is not None and hold_id in self.held:
                # Same bytes as a packet still waiting: release both with the one verdict.
                c["retransmits_held"] += 1
                self.held[hold_id].followers.append((token, bytes(raw), p, outbound, loopback))
                return []
        if len(self.held) >= self.config.max_held:
            c["dropped"] += 1
            log.warning(
                "held-packet limit %d reached: dropping %s", self.config.max_held, _fmt(flow)
            )
            return [Drop(token)]
        hold_id = self._next_hold_id
        self._next_hold_id += 1
        data = bytes(raw)
        self.held[hold_id] = Held(token, flow, p, data, outbound, loopback, now_ns, key)
        if conn is None:
            conn = self.connections.get(flow)
            if conn is None:
                conn = self.connections[flow] = Connection(flow)
        conn.pending += 1
        if key is not None:
            self._retrans[key] = hold_id
        c["asked"] += 1
        # Asked about, so no entry may pass its packets meanwhile (a predecessor's, a stale
        # one): deleted before the request goes out, unless we know there is none.
        pre = self._kernel_remove(conn) if p.protocol in (pk.TCP, pk.UDP) else []
        direction = Direction.OUTBOUND if outbound else Direction.INBOUND
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "held %d: %s %s, %d bytes %s",
                hold_id,
                direction.name.lower(),
                _fmt(flow),
                len(data),
                data[:64].hex(),
            )
        return [*pre, ToAle(PacketHeld(hold_id, flow, direction, data, now_ns))]

    # ---- enforcing verdicts -----------------------------------------------------------------

    def _enforce(
        self,
        token: object,
        raw: bytes | bytearray | memoryview,
        p: Parsed,
        flow: Flow,
        conn: Connection | None,
        verdict: Verdict,
        outbound: bool,
        loopback: bool,
        now_ns: int,
    ) -> list[Action]:
        """What `verdict` does to one packet of `flow` (held or just captured)."""
        c = self.counters
        if verdict.passes:
            if verdict.is_redirect and outbound and p.protocol in (pk.TCP, pk.UDP):
                target_ip, target_port, local = self._target(flow, verdict)
                if conn is None:
                    conn = self._record(flow)
                pre = self._add_redirect(conn, target_ip, target_port)
                c["rerouted"] += 1
                return [
                    *pre,
                    Reroute(
                        token,
                        bytes(pk.rewrite(raw, p, dst=target_ip, dport=target_port)),
                        local or loopback,
                    ),
                ]
            # Inbound packets of a redirected connection are not the target's answers: the
            # kext passes them unchanged (its inbound rewrite restores the same addresses).
            c["passed"] += 1
            return [Pass(token)]
        if verdict in _BLOCKS:
            return self._reject(token, raw, p, conn, outbound, now_ns)
        c["dropped"] += 1
        return [Drop(token)]

    def _reject(
        self,
        token: object,
        raw: bytes | bytearray | memoryview,
        p: Parsed,
        conn: Connection | None,
        outbound: bool,
        now_ns: int,
    ) -> list[Action]:
        """Block: make the sender fail at once (TCP RST, UDP port unreachable, else drop);
        an established TCP connection is reset at both ends."""
        self.counters["rejected"] += 1
        inbound = outbound  # the answer goes back to whoever sent the packet
        if p.protocol == pk.TCP:
            if conn is not None and conn.live and conn.ended_ns is None:
                self._mark_ended(conn, now_ns)  # we are resetting it
            if p.flags & pk.TCP_RST:
                return [Drop(token)]  # never answer a reset with a reset
            out: list[Action] = [Drop(token), Inject(token, bytes(pk.build_rst(p)), inbound)]
            if p.flags & pk.TCP_ACK and not p.flags & pk.TCP_SYN:
                # Established: reset the receiver too, so both applications fail at once.
                out.append(Inject(token, bytes(pk.build_rst_forward(p)), not inbound))
            return out
        if p.protocol == pk.UDP:
            return [Drop(token), Inject(token, bytes(pk.build_port_unreachable(raw, p)), inbound)]
        return [Drop(token)]

    def _target(self, flow: Flow, verdict: Verdict) -> tuple[bytes, int, bool]:
        """(address, port, is-local) a redirected connection goes to: the name server, or
        the connection's own local address at the tunnel / split-tunnel port."""
        cfg = self.config
        if verdict is Verdict.REDIRECT_NAME_SERVER:
            ip = cfg.nameserver_v6 if flow.is_v6 else cfg.nameserver_v4
            return ip, cfg.nameserver_port, pk.is_loopback_addr(ip)
        port = cfg.tunnel_port if verdict is Verdict.REDIRECT_TUNNEL else cfg.split_tunnel_port
        return flow.local_ip, port, True  # "unify": the connection's own local address

    def _add_redirect(self, conn: Connection, target_ip: bytes, target_port: int) -> list[Action]:
        """Rewrite `conn`'s replies from now on, and have its bytes counted as its own (the
        translation is written before the first rewritten packet is re-injected)."""
        flow = conn.flow
        key = (flow.protocol, target_ip, target_port, flow.local_ip, flow.local_port)
        if conn.redirect == key and self.replies.get(key) is conn:
            return []
        out = self._drop_redirect(conn)
        conn.redirect = key
        self.replies[key] = conn
        if self.config.kernel_cache:
            out.append(KernelRedirect(flow, (target_ip, target_port)))
        return out

    def _drop_redirect(self, conn: Connection) -> list[Action]:
        key = conn.redirect
        if key is None:
            return []
        conn.redirect = None
        # Two connections from one local port redirected to one target share a reply key
        # (and so a rewritten 5-tuple); the later one owns it, and the earlier one's end must
        # not take it away.
        if self.replies.get(key) is not conn:
            return []
        del self.replies[key]
        if not self.config.kernel_cache:
            return []
        return [KernelRedirect(conn.flow, (key[1], key[2]), counted=False)]

    # ---- ALE messages -----------------------------------------------------------------------

    def on_message(self, msg: object, now_ns: int) -> list[Action]:
        """Decision / CacheSet / CacheClear from the ALE; anything else is logged and ignored."""
        if isinstance(msg, Decision):
            return self._on_decision(msg, now_ns)
        if isinstance(msg, CacheSet):
            if self._scan_ns is not None:  # the ALE's replay may still be arriving
                later = min(self._scan_limit_ns, now_ns + self.config.existing_quiet_ns)
                self._scan_ns = max(self._scan_ns, later)
            return self._on_cache_set(msg.flow, msg.verdict, now_ns)
        if isinstance(msg, CacheClear):
            return self._on_cache_clear()
        log.warning("ignoring unexpected message %s from the ALE", type(msg).__name__)
        return []

    def _on_decision(self, msg: Decision, now_ns: int) -> list[Action]:
        out: list[Action] = []
        verdict = msg.verdict
        for hold_id in msg.hold_ids:
            h = self.held.pop(hold_id, None)
            if h is None:
                self.counters["unknown_hold_id"] += 1
                log.warning(
                    "Decision for unknown packet %d (%s) ignored", hold_id, verdict.kext_name
                )
                continue
            if h.retrans_key is not None and self._retrans.get(h.retrans_key) == hold_id:
                del self._retrans[h.retrans_key]
            flow = h.flow
            tcp = flow.protocol == pk.TCP
            conn = self.connections.get(flow)
            if (tcp or flow.protocol == pk.UDP) and (conn is None or conn.verdict is None):
                # The ALE also sends CacheSet; taking the verdict here too keeps later packets
                # right whichever of the two messages arrives first.
                out += self._on_cache_set(flow, verdict, now_ns)
                conn = self.connections.get(flow)
            self._unpend(flow)
            if h.synthetic:
                acts = []  # built by us: nothing to release
                if conn is not None:
                    conn.existing_hold = None
                    if tcp and verdict in _BLOCKS:
                        acts = self._destroy(conn, now_ns)
            else:
                acts = self._enforce(
                    h.token, h.raw, h.parsed, flow, conn, verdict, h.outbound, h.loopback, now_ns
                )
            for token, raw, p, outbound, loopback in h.followers:
                acts += self._enforce(
                    token, raw, p, flow, conn, verdict, outbound, loopback, now_ns
                )
            if tcp and verdict.passes:
                if conn is None:
                    conn = self._record(flow)
                if not conn.live:
                    conn.live = True
                    out += self._refresh(conn)
                if conn.per_packet and not self._covered(flow):
                    # Its next packets (SYN-ACK, data, redirect replies) must already be
                    # diverted.
                    self._parked.append((self._gen_requested, acts))
                    continue
            out += acts
        return out

    def _on_cache_set(self, flow: Flow, verdict: Verdict, now_ns: int) -> list[Action]:
        if flow.protocol not in (pk.TCP, pk.UDP):
            log.warning("CacheSet for non-TCP/UDP %s ignored (never cached)", _fmt(flow))
            return []
        conns = self.connections
        conn = conns.get(flow)
        if conn is None:
            conn = conns[flow] = Connection(flow)
            self._cached += 1
        elif conn.verdict is None:
            del conns[flow]  # to the end: the order is the order verdicts arrived
            conns[flow] = conn
            self._cached += 1
        conn.verdict = verdict
        conn.reask = False
        out: list[Action] = []
        if verdict.is_redirect:
            ip, port, _ = self._target(flow, verdict)
            out += self._add_redirect(conn, ip, port)
        else:
            out += self._drop_redirect(conn)
        if self._cached > self.config.max_flows:
            oldest = next(x for x in conns.values() if x.verdict is not None)
            log.warning("flow table full: forgetting %s", _fmt(oldest.flow))
            out += self._forget(oldest.flow, now_ns)
        conn.last_seen_ns = now_ns
        conn.probing = False  # a new verdict: a probe's answer is void
        if not conn.live:
            self._check_at(conn, now_ns + self.config.idle_ns + 1)
        out += self._kernel_sync(conn, now_ns)
        if flow.protocol == pk.TCP:
            out += self._refresh(conn)
        return out

    def _refresh(self, conn: Connection) -> list[Action]:
        """Re-decide whether every packet of TCP connection `conn` must be diverted.

        Temporary accepts and redirects: always (each packet is asked / rewritten). Blocks and
        drops: unless it is a connection attempt we are asking about right now and never let
        through - a refused SYN's retransmits already match the base filter, and this avoids
        a handle swap per blocked attempt. A connection we know nothing about (e.g. resent by
        the ALE after our restart) may be established: divert it. After CacheClear: always.
        """
        verdict = conn.verdict
        if conn.reask:
            need = True
        elif verdict is None or verdict is Verdict.PERMANENT_ACCEPT:
            need = False
        else:
            attempt = not conn.live and conn.pending > 0
            need = verdict is Verdict.ACCEPT or verdict.is_redirect or not attempt
        self._set_per_packet(conn, need)
        return self._filter_actions()

    def _on_cache_clear(self) -> list[Action]:
        """Forget every verdict. Live TCP connections are asked about again on their next
        packet, and diverted until then; ended ones still wait out their grace period."""
        forgotten, live = self._cached, 0
        kernel = self.config.kernel_cache
        for flow, conn in list(self.connections.items()):
            conn.verdict = None
            conn.last_seen_ns = None
            conn.probing = False
            if kernel:
                conn.kernel, conn.kernel_absent = None, True  # KernelClear, below
            again = conn.live and conn.ended_ns is None
            if again:
                conn.reask = True
                live += 1
            self._set_per_packet(conn, again)
            if _unused(conn):
                self._delete(flow, conn)
        self._cached = 0
        log.info(
            "CacheClear: forgot %d verdicts, %d live TCP connections will be re-asked",
            forgotten,
            live,
        )
        if kernel:
            return [KernelClear()]
        return self._filter_actions()

    # ---- filter -----------------------------------------------------------------------------

    def _set_per_packet(self, conn: Connection, need: bool) -> None:
        if need == conn.per_packet:
            return
        conn.per_packet = need
        refs = self._port_refs
        port = conn.flow.local_port
        n = refs.get(port, 0)
        if need:
            refs[port] = n + 1
            self._ports_dirty |= n == 0
        elif n > 1:
            refs[port] = n - 1
        else:
            del refs[port]
            self._ports_dirty = True

    def _wanted_ports(self) -> frozenset[int] | None:
        ports = self._port_refs
        return None if len(ports) > self.config.max_filter_ports else frozenset(ports)

    def _filter_actions(self) -> list[Action]:
        self._recheck_ns = None
        if self.config.kernel_cache:
            self._ports_dirty = False  # the filter is fixed: every IP packet reaches us
            return []
        if not self._ports_dirty:
            return []  # the port set is what was last requested
        self._ports_dirty = False
        ports = self._wanted_ports()
        if ports == self._ports_requested:
            return []
        self._gen_requested += 1
        self._ports_requested = ports
        self.counters["filter_changes"] += 1
        return [SetFilter(self._gen_requested, ports)]

    def _covered(self, flow: Flow) -> bool:
        active = self._ports_active
        return self.config.kernel_cache or active is None or flow.local_port in active

    def filter_active(
        self, generation: int, ports: frozenset[int] | None, now_ns: int
    ) -> list[Action]:
        """The shell's handle for `generation` now diverts `ports`: release what waited on it."""
        self._ports_active = ports
        ready = [acts for gen, acts in self._parked if gen <= generation]
        self._parked = [(gen, acts) for gen, acts in self._parked if gen > generation]
        return [a for acts in ready for a in acts]

    # ---- deadlines --------------------------------------------------------------------------

    def next_deadline_ns(self) -> int | None:
        """When `on_deadline` next has work: the oldest held packet's expiry, the earliest
        ended/idle connection check, a pending filter re-derivation; None if none."""
        # (Called once per shell wakeup: kept to a few lookups.)
        best = self._recheck_ns
        scan = self._scan_ns
        if scan is not None and (best is None or scan < best):
            best = scan
        held = self.held
        if held:
            h = held.get(self._oldest_hold_id) or held[self._oldest_held()]
            at = h.seen_ns + self.config.hold_ttl_ns + 1
            if best is None or at < best:
                best = at
        heap = self._expiry
        if heap:
            top = heap[0]
            while top[2].check_ns != top[0]:  # its connection is gone, or looked at earlier
                heapq.heappop(heap)
                if not heap:
                    return best
                top = heap[0]
            if best is None or top[0] < best:
                best = top[0]
        return best

    def on_deadline(self, now_ns: int) -> list[Action]:
        """Expire held packets (fail closed) and forget ended or idle connections whose time
        has come (calling it early is harmless: nothing is due yet)."""
        out: list[Action] = []
        if self._scan_ns is not None and now_ns >= self._scan_ns:
            self._scan_ns = None
            out.append(ScanExisting())
            if self.config.kernel_cache:
                out.append(KernelAudit())
        ttl = self.config.hold_ttl_ns
        held = self.held
        while held:
            hold_id = self._oldest_held()
            h = held[hold_id]
            if now_ns - h.seen_ns <= ttl:
                break  # hold_id order is arrival order: the rest are younger
            del held[hold_id]
            self._unpend(h.flow)
            if h.retrans_key is not None and self._retrans.get(h.retrans_key) == hold_id:
                del self._retrans[h.retrans_key]
            self.counters["expired"] += 1 + len(h.followers)
            log.warning(
                "packet %d of %s waited %.1f s for a decision: dropped",
                hold_id,
                _fmt(h.flow),
                (now_ns - h.seen_ns) / 1e9,
            )
            if h.synthetic:
                conn = self.connections.get(h.flow)
                if conn is not None:
                    conn.existing_hold = None  # still re-asked (reask) on its next packet
            else:
                out.append(Drop(h.token))
            out += [Drop(t) for t, *_ in h.followers]
        heap = self._expiry
        forgot = False
        probes: list[Flow] = []
        while heap and heap[0][0] <= now_ns:
            at, _, conn = heapq.heappop(heap)
            if conn.check_ns != at:
                continue  # its connection is gone, or was looked at earlier
            conn.check_ns = None
            due = self._expires_at(conn)
            if due is None:
                continue
            if due <= now_ns and conn.kernel is KernelVerdict.PASS and conn.ended_ns is None:
                # Its packets pass in the kernel and never reach us: ask the kernel when it
                # last saw one before calling it idle (`kernel_activity`).
                if not conn.probing:
                    conn.probing = True
                    probes.append(conn.flow)
            elif due <= now_ns:
                out += self._forget(conn.flow, None)
                forgot = True
            else:
                self._check_at(conn, due)  # seen since: look again when it can expire
        if probes:
            out.append(KernelProbe(tuple(probes)))
        if forgot or (self._recheck_ns is not None and now_ns >= self._recheck_ns):
            out += self._filter_actions()
        return out

    def _oldest_held(self) -> int:
        """The oldest held packet's hold_id, while there is one (amortised O(1): the search
        passes each hold_id once)."""
        held = self.held
        i = self._oldest_hold_id
        while i not in held:
            i += 1
        self._oldest_hold_id = i
        return i

    def _expires_at(self, conn: Connection) -> int | None:
        """When `conn` is forgotten if nothing happens: ended_grace_ns after its end, idle_ns
        after its last packet unless it is live TCP (never, without an end)."""
        cfg = self.config
        at = None if conn.ended_ns is None else conn.ended_ns + cfg.ended_grace_ns + 1
        if conn.last_seen_ns is not None and not conn.live:
            idle = conn.last_seen_ns + cfg.idle_ns + 1
            at = idle if at is None or idle < at else at
        return at

    def _check_at(self, conn: Connection, at: int) -> None:
        """Make sure `on_deadline` looks at `conn` no later than `at`."""
        if conn.check_ns is not None and conn.check_ns <= at:
            return  # an earlier look re-schedules it
        conn.check_ns = at
        heap = self._expiry
        heapq.heappush(heap, (at, next(self._tie), conn))
        if len(heap) > 2 * len(self.connections) + 1024:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the expiry heap from the live records: forgotten connections and superseded
        checks would otherwise stay in it until their time came (idle_ns: 10 minutes)."""
        self._expiry = [
            (x.check_ns, next(self._tie), x)
            for x in self.connections.values()
            if x.check_ns is not None
        ]
        heapq.heapify(self._expiry)

    # ---- housekeeping -----------------------------------------------------------------------

    def _record(self, flow: Flow) -> Connection:
        conn = self.connections.get(flow)
        if conn is None:
            conn = self.connections[flow] = Connection(flow)
        return conn

    def _mark_ended(self, conn: Connection, now_ns: int) -> None:
        conn.ended_ns = now_ns
        self._check_at(conn, now_ns + self.config.ended_grace_ns + 1)

    def _unpend(self, flow: Flow) -> None:
        conn = self.connections.get(flow)
        if conn is None:
            return
        if conn.pending > 0:
            conn.pending -= 1
        if _unused(conn):
            self._delete(flow, conn)  # e.g. ICMP: asked per packet, never cached

    def _delete(self, flow: Flow, conn: Connection) -> None:
        del self.connections[flow]
        conn.check_ns = None  # its expiry entries are void

    def _forget(self, flow: Flow, now_ns: int | None) -> list[Action]:
        """Drop everything known about `flow`: its record, its reply key, its kernel entry
        (the actions to run).

        `now_ns`: called outside `on_deadline`, which re-derives the filter itself; a port
        set that shrank is then re-derived `_FILTER_RECHECK_NS` later."""
        conn = self.connections.get(flow)
        if conn is None:
            return []
        out = self._kernel_remove(conn, keep_counts=False)
        self._delete(flow, conn)
        if conn.verdict is not None:
            self._cached -= 1
        out += self._drop_redirect(conn)
        self._set_per_packet(conn, False)
        if self._ports_dirty and now_ns is not None and self._recheck_ns is None:
            self._recheck_ns = now_ns + _FILTER_RECHECK_NS
        if conn.pending:
            # Its held packets still wait for their Decision, which counts them off here.
            self.connections[flow] = Connection(
                flow,
                pending=conn.pending,
                kernel_absent=conn.kernel_absent,
                kernel_retired=conn.kernel_retired,
            )
        return out

    # ---- the kernel flow cache ----------------------------------------------------------

    def use_kernel_cache(self, on: bool) -> None:
        """The shell loaded (or adopted) the kernel programs: call before `start`."""
        self.config = replace(self.config, kernel_cache=on)

    def _kernel_want(self, conn: Connection) -> KernelVerdict | None:
        """The entry `conn` should have: permanent accept / drop of a TCP or UDP flow that is
        neither redirected nor passed unjudged; every other verdict is enforced here."""
        flow = conn.flow
        if flow.protocol not in (pk.TCP, pk.UDP) or conn.redirect is not None:
            return None
        if conn.verdict is Verdict.PERMANENT_ACCEPT:
            want = KernelVerdict.PASS
        elif conn.verdict is Verdict.PERMANENT_DROP:
            want = KernelVerdict.DROP
        else:
            return None
        return None if self._unjudged(flow) else want

    def _kernel_sync(self, conn: Connection, now_ns: int) -> list[Action]:
        """Bring `conn`'s kernel entry in line with its verdict."""
        if not self.config.kernel_cache:
            return []
        want = self._kernel_want(conn)
        if want is None:
            return self._kernel_remove(conn)
        if conn.kernel is want:
            return []
        verdict = conn.verdict
        assert verdict is not None  # (_kernel_want)
        conn.kernel, conn.kernel_absent, conn.kernel_put_ns = want, False, now_ns
        conn.kernel_retired = False  # the put takes over its counters
        self.counters["kernel_puts"] += 1
        return [KernelPut(conn.flow, want, verdict)]

    def _kernel_remove(self, conn: Connection, keep_counts: bool = True) -> list[Action]:
        """Take `conn`'s kernel entry out of play unless we know it has none: by default as
        a miss that keeps its counters (nothing it counted is lost to the bandwidth actor);
        `keep_counts=False` (the record is forgotten) deletes it, a retired one too."""
        if not self.config.kernel_cache:
            return []
        if conn.kernel_absent and (keep_counts or not conn.kernel_retired):
            return []
        conn.kernel, conn.kernel_absent, conn.kernel_retired = None, True, keep_counts
        self.counters["kernel_deletes"] += 1
        return [KernelDelete(conn.flow, keep_counts)]

    def kernel_audit(self, flows: Iterable[Flow], now_ns: int) -> list[Action]:
        """The answer to `KernelAudit`: the kernel map's flows, as their packets carry them
        (each decided flow is there in both orientations). Every one that is not a flow we
        put there - an adopted entry the ALE's replay did not confirm - is deleted: its
        packets come here and are asked, so no verdict nobody vouches for passes them, and
        every entry left has a record whose idle expiry removes it."""
        out: list[Action] = []
        seen: set[Flow] = set()
        for flow in flows:
            rev = _reversed(flow)
            if flow in seen or rev in seen:
                continue
            seen.add(flow)
            conn = self.connections.get(flow) or self.connections.get(rev)
            if conn is not None and conn.kernel is not None:
                continue
            self.counters["kernel_deletes"] += 1
            out.append(KernelDelete(flow))
        if out:
            log.info("kernel cache: %d adopted flow(s) nobody vouches for deleted", len(out))
        return out

    def kernel_activity(self, seen: Mapping[Flow, int | None], now_ns: int) -> list[Action]:
        """The answer to `KernelProbe`: when the kernel last passed a packet of each flow
        (monotonic ns; None: no packet since the put, or no entry any more). A flow seen
        since we last did is kept until `idle_ns` after that; the others are forgotten."""
        out: list[Action] = []
        for flow, last in seen.items():
            conn = self.connections.get(flow)
            if conn is None or not conn.probing:
                continue  # forgotten or re-decided since the probe
            conn.probing = False
            if last is not None and (conn.last_seen_ns is None or last > conn.last_seen_ns):
                conn.last_seen_ns = min(last, now_ns)
            due = self._expires_at(conn)
            if due is None:
                continue
            if due <= now_ns:
                out += self._forget(flow, now_ns)
            else:
                self._check_at(conn, due)
        return out


_TCP_HDR = struct.Struct("!HHIIBBHHH")


def _synthetic_ack(flow: Flow, outbound: bool) -> bytes:
    """A minimal packet of `flow` as the client expects one: IP + TCP with only ACK set, no
    payload, in the flow's direction (from the local side if outbound), checksums valid."""
    src, sport, dst, dport = flow.local_ip, flow.local_port, flow.remote_ip, flow.remote_port
    if not outbound:
        src, sport, dst, dport = dst, dport, src, sport
    version = 6 if flow.is_v6 else 4
    tcp = _TCP_HDR.pack(sport, dport, 0, 0, 5 << 4, pk.TCP_ACK, 0xFFFF, 0, 0)
    buf = pk._ip_header(version, pk.TCP, src, dst, len(tcp)) + tcp
    pk.fix_checksums(buf, version, 20 if version == 4 else 40, pk.TCP)
    return bytes(buf)


def _reversed(flow: Flow) -> Flow:
    """The same connection seen from its other end (loopback: both ends are ours)."""
    return Flow(flow.protocol, flow.remote_ip, flow.remote_port, flow.local_ip, flow.local_port)


def _fmt(flow: Flow) -> str:
    try:
        lip = ipaddress.ip_address(flow.local_ip)
        rip = ipaddress.ip_address(flow.remote_ip)
    except ValueError:
        return repr(flow)
    return f"proto {flow.protocol} {lip}:{flow.local_port} <-> {rip}:{flow.remote_port}"
