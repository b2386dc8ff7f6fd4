"""The lifecycle actor's pure core: who owns each connection, and when it ends.

Inputs are facts the shell has already read and scoped to the guarded namespace (divert FLOW /
SOCKET events, socket-table reads); every method takes `now_ns` (monotonic) and returns the
messages to send, in order: Attribution and ConnectionEnded, all for the ALE (`TO_ALE`).

* Process ids: SOCKET CONNECT (pid + remote, before the SYN) becomes an OPENER attribution,
  FLOW ESTABLISHED (exact 5-tuple + pid; before the first UDP packet) a FLOW attribution,
  SOCKET LISTEN (TCP) / BIND (UDP) a LISTENER one, and the socket-table read at start a FLOW
  attribution per existing connection and a LISTENER per existing listener.
* Ends: FLOW DELETED (the socket is released), a TCP flow no longer synchronized in a socket-
  table read (FIN both ways or RST), or a UDP flow idle longer than `udp_idle_ns`. Each flow
  ends once here; the ALE reports only flows it reported (kext-contract C15-8).
* Expiry (CleanEndedConnections): ended entries leave 60 s after their end, idle ones after
  10 minutes; the table never holds more than `max_flows` (the oldest entry goes first).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from kextless.protocol import messages as m
from kextless.protocol.enums import Direction, IpProtocol

_SECOND = 1_000_000_000
_V = TypeVar("_V")

#: Message types that go to the ALE; the rest (Log) go to the broker.
TO_ALE: frozenset[type[m.Message]] = frozenset({m.Attribution, m.ConnectionEnded})


class FlowEvent(enum.IntEnum):
    """pydivert FLOW layer events."""

    ESTABLISHED = 1
    DELETED = 2


class SocketEvent(enum.IntEnum):
    """pydivert SOCKET layer events."""

    BIND = 3
    CONNECT = 4
    LISTEN = 5
    ACCEPT = 6
    CLOSE = 7


@dataclass(frozen=True, slots=True)
class DivertEvent:
    """One FLOW or SOCKET event of a process in the guarded namespace."""

    event: FlowEvent | SocketEvent
    process_id: int
    endpoint_id: int
    flow: m.Flow  # local side zero where the event does not carry it (CONNECT)


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One socket of the namespace's socket table (sock_diag), with its owner if known."""

    flow: m.Flow
    listening: bool
    synchronized: bool  # TCP: data may still flow (not SYN_SENT/TIME_WAIT/CLOSE); UDP: True
    process_id: int = 0


@dataclass(frozen=True)
class LifecycleConfig:
    #: A UDP flow with no activity seen for this long has ended (the kext never ends them).
    udp_idle_ns: int = 600 * _SECOND
    #: CleanEndedConnections forgets entries that ended longer ago than this (kext: 60 s)...
    ended_grace_ns: int = 60 * _SECOND
    #: ...and live ones idle longer than this (kext: 10 minutes).
    idle_expiry_ns: int = 600 * _SECOND
    #: The flow table's bound; the oldest entry is forgotten first (~200 bytes each).
    max_flows: int = 65_536


@dataclass(slots=True)
class FlowState:
    process_id: int
    direction: Direction
    last_active_ns: int
    ended_ns: int = 0


class LifecycleCore:
    def __init__(self, config: LifecycleConfig | None = None) -> None:
        self.config = config or LifecycleConfig()
        #: Every flow seen, oldest first (insertion order), live or ended.
        self.flows: OrderedDict[m.Flow, FlowState] = OrderedDict()
        #: Endpoint ids of accepted sockets (their FLOW events are inbound).
        self._accepted: OrderedDict[int, None] = OrderedDict()
        #: Listening sockets by endpoint id, so their CLOSE can withdraw the listener.
        self._listening: OrderedDict[int, tuple[m.Flow, int]] = OrderedDict()
        #: When on_deadline next scans for idle UDP flows (None: no live UDP flow).
        self._idle_scan_ns: int | None = None
        self.counters: dict[str, float] = {
            "events": 0,
            "attributions": 0,
            "ends": 0,
            "ends_idle": 0,
            "ends_table": 0,
            "expired": 0,
            "evicted": 0,
        }

    # ---- inputs ---------------------------------------------------------------------------

    def divert_event(self, ev: DivertEvent, now_ns: int) -> list[m.Message]:
        """One FLOW / SOCKET event of this namespace."""
        self.counters["events"] += 1
        kind, flow, pid = ev.event, ev.flow, ev.process_id
        if kind is SocketEvent.CONNECT:
            if flow.protocol != IpProtocol.TCP:  # UDP: FLOW ESTABLISHED precedes its packet
                return []
            return [self._attr(m.AttributionKind.OPENER, flow, pid, now_ns)]
        if kind is SocketEvent.ACCEPT:
            self._accepted[ev.endpoint_id] = None
            _trim(self._accepted, self.config.max_flows)
            return []
        if kind is SocketEvent.LISTEN or (
            kind is SocketEvent.BIND and flow.protocol == IpProtocol.UDP
        ):
            self._listening[ev.endpoint_id] = (flow, pid)
            _trim(self._listening, self.config.max_flows)
            return [self._attr(m.AttributionKind.LISTENER, flow, pid, now_ns)]
        if kind is SocketEvent.CLOSE:
            self._accepted.pop(ev.endpoint_id, None)
            listener = self._listening.pop(ev.endpoint_id, None)
            if listener is not None:
                return [self._attr(m.AttributionKind.UNLISTEN, listener[0], listener[1], now_ns)]
            return []
        if kind is FlowEvent.ESTABLISHED:
            inbound = ev.endpoint_id in self._accepted
            direction = Direction.INBOUND if inbound else Direction.OUTBOUND
            self._track(flow, pid, direction, now_ns)
            return [self._attr(m.AttributionKind.FLOW, flow, pid, now_ns)]
        if kind is FlowEvent.DELETED:
            self._accepted.pop(ev.endpoint_id, None)
            return self._end(flow, pid, now_ns)
        return []

    def connect_resolved(self, flow: m.Flow, pid: int, now_ns: int) -> list[m.Message]:
        """A CONNECT's socket found in the socket table (by its cookie): the exact 5-tuple
        while its SYN is still held, long before FLOW ESTABLISHED."""
        return [self._attr(m.AttributionKind.FLOW, flow, pid, now_ns)]

    def existing(self, rows: list[SocketRow], now_ns: int) -> list[m.Message]:
        """The socket table read at start: owners of connections and listeners already there."""
        out: list[m.Message] = []
        listen_ports = {(r.flow.protocol, r.flow.local_port) for r in rows if r.listening}
        for row in rows:
            if row.listening:
                if row.process_id:
                    out.append(
                        self._attr(m.AttributionKind.LISTENER, row.flow, row.process_id, now_ns)
                    )
                continue
            if not row.synchronized:
                continue
            inbound = (row.flow.protocol, row.flow.local_port) in listen_ports
            self._track(
                row.flow,
                row.process_id,
                Direction.INBOUND if inbound else Direction.OUTBOUND,
                now_ns,
            )
            if row.process_id:
                out.append(self._attr(m.AttributionKind.FLOW, row.flow, row.process_id, now_ns))
        return out

    def socket_table(self, tcp_live: set[m.Flow], taken_ns: int, now_ns: int) -> list[m.Message]:
        """A read of the namespace's synchronized TCP sockets, taken at `taken_ns`: a TCP flow
        known from before that read and absent from it has closed (FIN both ways, or RST)."""
        out: list[m.Message] = []
        gone = [
            (flow, st)
            for flow, st in self.flows.items()
            if flow.protocol == IpProtocol.TCP
            and not st.ended_ns
            and st.last_active_ns < taken_ns
            and flow not in tcp_live
        ]
        for flow, st in gone:
            self.counters["ends_table"] += 1
            out += self._end(flow, st.process_id, now_ns)
        return out

    def activity(self, flow: m.Flow, now_ns: int) -> None:
        """The flow moved packets (resets its UDP idle time)."""
        st = self.flows.get(flow)
        if st is not None and not st.ended_ns:
            st.last_active_ns = now_ns

    def next_deadline_ns(self) -> int | None:
        """When the next idle UDP flow may be due (one scan of the table then, not per input)."""
        return self._idle_scan_ns

    def on_deadline(self, now_ns: int) -> list[m.Message]:
        """End the UDP flows idle longer than udp_idle_ns, and schedule the next scan."""
        if self._idle_scan_ns is None or now_ns < self._idle_scan_ns:
            return []
        idle_ns = self.config.udp_idle_ns
        limit = now_ns - idle_ns
        idle: list[tuple[m.Flow, FlowState]] = []
        oldest: int | None = None
        for f, st in self.flows.items():
            if f.protocol != IpProtocol.UDP or st.ended_ns:
                continue
            if st.last_active_ns <= limit:
                idle.append((f, st))
            elif oldest is None or st.last_active_ns < oldest:
                oldest = st.last_active_ns
        # No earlier than a second from now: a scan costs O(table), never once per input.
        self._idle_scan_ns = None if oldest is None else max(oldest + idle_ns, now_ns + _SECOND)
        out: list[m.Message] = []
        for flow, st in idle:
            self.counters["ends_idle"] += 1
            out += self._end(flow, st.process_id, now_ns)
        return out

    def clean_ended(self, now_ns: int) -> list[m.Message]:
        """CleanEndedConnections: forget ended entries after 60 s, idle ones after 10 min."""
        ended_limit = now_ns - self.config.ended_grace_ns
        idle_limit = now_ns - self.config.idle_expiry_ns
        gone = [
            f
            for f, st in self.flows.items()
            if (st.ended_ns and st.ended_ns < ended_limit)
            or (not st.ended_ns and st.last_active_ns < idle_limit)
        ]
        for f in gone:
            del self.flows[f]
        self.counters["expired"] += len(gone)
        return []

    def health(self) -> dict[str, float]:
        return {**self.counters, "flows": len(self.flows), "listeners": len(self._listening)}

    # ---- helpers ----------------------------------------------------------------------------

    def _attr(self, kind: m.AttributionKind, flow: m.Flow, pid: int, now_ns: int) -> m.Message:
        self.counters["attributions"] += 1
        return m.Attribution(kind, flow, pid, now_ns)

    def _track(self, flow: m.Flow, pid: int, direction: Direction, now_ns: int) -> None:
        st = self.flows.get(flow)
        if st is None or st.ended_ns:  # a new connection (or a reused 5-tuple)
            self.flows.pop(flow, None)
            self.flows[flow] = FlowState(pid, direction, now_ns)
            if flow.protocol == IpProtocol.UDP and self._idle_scan_ns is None:
                self._idle_scan_ns = now_ns + self.config.udp_idle_ns
            if len(self.flows) > self.config.max_flows:
                self.flows.popitem(last=False)
                self.counters["evicted"] += 1
        else:
            st.last_active_ns = now_ns
            st.process_id = st.process_id or pid

    def _end(self, flow: m.Flow, pid: int, now_ns: int) -> list[m.Message]:
        """One ConnectionEnded per flow; an unknown flow (seen only by its end) is reported
        too: the ALE drops ends of connections it never reported."""
        st = self.flows.get(flow)
        if st is not None:
            if st.ended_ns:
                return []
            st.ended_ns = now_ns
            pid = st.process_id or pid
            direction = st.direction
        else:
            direction = Direction.OUTBOUND
            self.flows[flow] = FlowState(pid, direction, now_ns, ended_ns=now_ns)
            if len(self.flows) > self.config.max_flows:
                self.flows.popitem(last=False)
                self.counters["evicted"] += 1
        self.counters["ends"] += 1
        return [m.ConnectionEnded(flow, direction, pid, now_ns)]


def _trim(table: OrderedDict[int, _V], cap: int) -> None:
    while len(table) > cap:
        table.popitem(last=False)
