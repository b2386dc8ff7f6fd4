"""The ALE actor's pure core: connection cache, pending-id cache and verdict semantics.

State in, messages out: no sockets, and the only clock is the `now_ns` (monotonic) the shell
passes in. It follows kext-spec §4, §6, §8-§10 and fixes the weaknesses of §15 that live here:
the cache entry exists before its event is emitted (§15.4), keys include the local address
(§15.6), pending packets time out (§15.2), ClearCache keeps answering pending packets (§15.19),
an end is recorded once (§15.8), and expiry uses a monotonic clock (§15.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kextless.protocol import messages as m
from kextless.protocol.commands import (
    CleanEndedConnectionsCommand,
    ClearCacheCommand,
    Command,
    ShutdownCommand,
    UpdateV4Command,
    UpdateV6Command,
    VerdictCommand,
)
from kextless.protocol.enums import Direction, InfoType, IpProtocol, PayloadLayer, Severity, Verdict
from kextless.protocol.infos import (
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
)
from kextless.protocol.logtag import source_tag

_CACHED_PROTOCOLS = frozenset({IpProtocol.TCP, IpProtocol.UDP})
_SECOND = 1_000_000_000


@dataclass(frozen=True)
class AleConfig:
    #: A held packet older than this gets `default_verdict` (the kext waits forever).
    verdict_timeout_ns: int = 10 * _SECOND
    default_verdict: Verdict = Verdict.BLOCK
    #: CleanEndedConnections forgets connections that ended longer ago than this (kext: 60 s).
    ended_grace_ns: int = 60 * _SECOND


@dataclass(slots=True)
class Connection:
    verdict: Verdict
    process_id: int
    direction: Direction
    last_seen_ns: int
    ended_ns: int = 0


@dataclass(slots=True)
class Pending:
    hold_id: int | None  # the capture's handle; None once that capture process is gone
    flow: m.Flow
    created_ns: int


@dataclass(slots=True)
class Outbox:
    """What one input produced: messages for the capture actor and for the broker."""

    to_capture: list[m.Message] = field(default_factory=list)
    to_broker: list[m.Message] = field(default_factory=list)


def _log(out: Outbox, severity: Severity, message: str) -> None:
    """Queue a kext-style log line, "file:line message", with the caller's location."""
    out.to_broker.append(m.Log(severity, f"{source_tag(1)} {message}"))


class AleCore:
    def __init__(self, config: AleConfig | None = None, first_id: int = 1) -> None:
        self.config = config or AleConfig()
        self.connections: dict[m.Flow, Connection] = {}
        #: Insertion order is id order, so the oldest pending packet is always first.
        self.pending: dict[int, Pending] = {}
        self.next_id = first_id
        self.counters: dict[str, float] = {
            "ids_issued": 0,
            "verdicts": 0,
            "verdicts_unknown_id": 0,
            "updates": 0,
            "updates_unknown": 0,
            "timeouts": 0,
            "refused": 0,
            "clear_cache": 0,
            "shutdowns": 0,
            "ended": 0,
            "expired": 0,
        }

    # ---- inputs -------------------------------------------------------------------------

    def packet_held(self, msg: m.PacketHeld, now_ns: int) -> Outbox:
        """Capture holds a packet: answer from the cache, or issue a new pending id + event."""
        out = Outbox()
        flow = msg.flow
        cached = flow.protocol in _CACHED_PROTOCOLS
        conn = self.connections.get(flow) if cached else None
        if conn is not None:
            conn.last_seen_ns = now_ns
            if conn.verdict.is_permanent:
                # Capture asked before our CacheSet reached it: answer without an event.
                out.to_capture.append(m.Decision((msg.hold_id,), conn.verdict))
                return out
        elif cached:
            conn = Connection(Verdict.UNDECIDED, msg.process_id, msg.direction, now_ns)
            self.connections[flow] = conn
        pid = msg.process_id or (conn.process_id if conn else 0)
        if conn is not None and msg.process_id and not conn.process_id:
            conn.process_id = msg.process_id
        new_id = self.next_id
        self.next_id += 1
        self.counters["ids_issued"] += 1
        self.pending[new_id] = Pending(msg.hold_id, flow, now_ns)
        if flow.is_v6:
            info = ConnectionIpv6(
                new_id,
                pid,
                msg.direction,
                flow.protocol,
                flow.local_ip,
                flow.remote_ip,
                flow.local_port,
                flow.remote_port,
                PayloadLayer.NETWORK,
                msg.packet,
            )
            kind = InfoType.CONNECTION_IPV6
        else:
            info = ConnectionIpv4(
                new_id,
                pid,
                msg.direction,
                flow.protocol,
                flow.local_ip,
                flow.remote_ip,
                flow.local_port,
                flow.remote_port,
                PayloadLayer.NETWORK,
                msg.packet,
            )
            kind = InfoType.CONNECTION_IPV4
        out.to_broker.append(m.Emit(kind, info.encode(), new_id))
        return out

    def command(self, cmd: Command, now_ns: int) -> Outbox:
        """Apply one validated kext command routed to us by the broker."""
        if isinstance(cmd, VerdictCommand):
            return self._verdict(cmd.id, cmd.verdict, now_ns)
        if isinstance(cmd, UpdateV4Command | UpdateV6Command):
            return self._update(cmd, now_ns)
        if isinstance(cmd, ClearCacheCommand):
            return self._clear_cache()
        if isinstance(cmd, ShutdownCommand):
            return self._shutdown(now_ns)
        if isinstance(cmd, CleanEndedConnectionsCommand):
            return self._clean_ended(now_ns)
        out = Outbox()
        _log(out, Severity.ERROR, f"ALE does not handle {cmd.TYPE.kext_name}")
        return out

    def emit_refused(self, pending_id: int, reason: str, now_ns: int) -> Outbox:
        """The broker's queue could not take our event: nobody will answer, so decide now."""
        self.counters["refused"] += 1
        out = self._resolve(pending_id, self.config.default_verdict, now_ns)
        _log(
            out,
            Severity.WARNING,
            f"event {pending_id} refused by the broker ({reason}); applied "
            f"{self.config.default_verdict.kext_name}",
        )
        return out

    def tick(self, now_ns: int) -> Outbox:
        """Resolve pending packets older than the verdict timeout with the default verdict."""
        out = Outbox()
        deadline = now_ns - self.config.verdict_timeout_ns
        expired = []
        for pid_, pending in self.pending.items():
            if pending.created_ns > deadline:
                break
            expired.append(pid_)
        for pid_ in expired:
            self.counters["timeouts"] += 1
            sub = self._resolve(pid_, self.config.default_verdict, now_ns)
            out.to_capture += sub.to_capture
            out.to_broker += sub.to_broker
        if expired:
            _log(
                out,
                Severity.WARNING,
                f"verdict timeout: {len(expired)} packet(s) got "
                f"{self.config.default_verdict.kext_name} (ids {expired[0]}..{expired[-1]})",
            )
        return out

    def capture_ready(self, now_ns: int) -> Outbox:
        """A (re)started capture holds nothing: orphan old hold_ids and replay every verdict."""
        out = Outbox()
        for pending in self.pending.values():
            pending.hold_id = None
        for flow, conn in self.connections.items():
            if conn.verdict != Verdict.UNDECIDED:
                out.to_capture.append(m.CacheSet(flow, conn.verdict))
        return out

    def connection_ended(self, msg: m.ConnectionEnded, now_ns: int) -> Outbox:
        """Record an end once and report it (the kext re-ended entries, §15.8)."""
        out = Outbox()
        conn = self.connections.get(msg.flow)
        if conn is None or conn.ended_ns:
            return out
        conn.ended_ns = now_ns
        self.counters["ended"] += 1
        f = msg.flow
        cls = ConnectionEndEventV6 if f.is_v6 else ConnectionEndEventV4
        info = cls(
            msg.process_id or conn.process_id,
            conn.direction,
            f.protocol,
            f.local_ip,
            f.remote_ip,
            f.local_port,
            f.remote_port,
        )
        kind = InfoType.CONNECTION_END_EVENT_V6 if f.is_v6 else InfoType.CONNECTION_END_EVENT_V4
        out.to_broker.append(m.Emit(kind, info.encode()))
        return out

    def health(self) -> dict[str, float]:
        return {
            **self.counters,
            "pending": len(self.pending),
            "connections": len(self.connections),
            "next_id": self.next_id,
        }

    # ---- commands -------------------------------------------------------------------------

    def _verdict(self, pending_id: int, verdict: Verdict, now_ns: int) -> Outbox:
        if pending_id not in self.pending:
            self.counters["verdicts_unknown_id"] += 1
            out = Outbox()
            _log(out, Severity.ERROR, f"Verdict invalid id: {pending_id}")
            return out
        self.counters["verdicts"] += 1
        return self._resolve(pending_id, verdict, now_ns)

    def _resolve(self, pending_id: int, verdict: Verdict, now_ns: int) -> Outbox:
        """Release one pending packet and make its verdict the connection's verdict."""
        out = Outbox()
        pending = self.pending.pop(pending_id, None)
        if pending is None:
            return out
        flow = pending.flow
        if flow.protocol in _CACHED_PROTOCOLS:
            conn = self.connections.get(flow)
            if conn is None:
                # ClearCache ran while this packet waited: the verdict still describes the
                # connection, so remember it rather than asking again (§15.19).
                conn = Connection(verdict, 0, Direction.OUTBOUND, now_ns)
                self.connections[flow] = conn
            conn.last_seen_ns = now_ns
            if conn.verdict != verdict:
                conn.verdict = verdict
                out.to_capture.append(m.CacheSet(flow, verdict))
        if pending.hold_id is not None:
            out.to_capture.append(m.Decision((pending.hold_id,), verdict))
        return out

    def _update(self, cmd: UpdateV4Command | UpdateV6Command, now_ns: int) -> Outbox:
        out = Outbox()
        flow = m.Flow(
            cmd.protocol, cmd.local_address, cmd.local_port, cmd.remote_address, cmd.remote_port
        )
        conn = self.connections.get(flow)
        if conn is None:
            # The kext ignores unknown 5-tuples silently; Portmaster sends updates for
            # connections that may have ended. Count it so it is visible.
            self.counters["updates_unknown"] += 1
            return out
        self.counters["updates"] += 1
        if conn.verdict != cmd.verdict:  # idempotent: Portmaster sends every update twice
            conn.verdict = cmd.verdict
            out.to_capture.append(m.CacheSet(flow, cmd.verdict))
        return out

    def _clear_cache(self) -> Outbox:
        self.counters["clear_cache"] += 1
        self.connections.clear()
        out = Outbox()
        out.to_capture.append(m.CacheClear())
        return out

    def _shutdown(self, now_ns: int) -> Outbox:
        """Resolve every pending packet as PermanentBlock (kext-spec §8.6)."""
        self.counters["shutdowns"] += 1
        out = Outbox()
        for pending_id in list(self.pending):
            sub = self._resolve(pending_id, Verdict.PERMANENT_BLOCK, now_ns)
            out.to_capture += sub.to_capture
        return out

    def _clean_ended(self, now_ns: int) -> Outbox:
        """Forget connections that ended more than the grace period ago.

        Unlike the kext, idle-but-live connections are not expired here: established TCP no
        longer reaches the ALE, so "no lookups for 10 min" would forget live connections and
        make Portmaster's later UpdateV4/V6 for them silently ineffective.
        """
        deadline = now_ns - self.config.ended_grace_ns
        gone = [f for f, c in self.connections.items() if c.ended_ns and c.ended_ns < deadline]
        for flow in gone:
            del self.connections[flow]
        self.counters["expired"] += len(gone)
        return Outbox()
