"""The ALE actor's pure core: the kext's connection cache, its id cache and verdict semantics.

State in, messages out (the shape of base/cores.py): every input method returns one list of
effects, in the order they must leave: protocol messages, whose type says where they go, with
no wrapper record (Decision, CacheSet and CacheClear to the capture actor, everything else -
Emit, Log, Resolved - to the broker: `TO_CAPTURE`), and `Note`s, lines for the ALE's own log
file (every verdict timeout and refused info, rate-limited by `LineBudget`). No sockets, and
the only clock is the `now_ns` (monotonic) the shell passes in; `next_deadline_ns()` is when
the oldest held packet's verdict timeout falls due, and `on_deadline(now_ns)` applies the
default verdict to what has timed out.

It follows kext-contract C4, C6, C8-C10 and fixes the weaknesses of C15 that live here: the cache
entry exists before its event is emitted (C15-4), keys include the local address (C15-6),
pending packets time out (C15-2), ClearCache keeps answering pending packets (C15-19), an end is
recorded once (C15-8), and expiry uses a monotonic clock (C15-9).

Process ids come from the lifecycle actor's Attribution messages (exact flows, listeners,
connect hints): an outbound connection whose pid is not known yet waits, while that actor is
present, until its pid arrives or `attribution_wait_ns` passes (actors/lifecycle/README.md).
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from kextless.base.linebudget import LineBudget
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

_K = TypeVar("_K")
_V = TypeVar("_V")
_CACHED_PROTOCOLS = frozenset({IpProtocol.TCP, IpProtocol.UDP})
_SECOND = 1_000_000_000
#: Verdict timeouts are applied at most this often, so a stream of unanswered packets costs
#: one wake-up and one log line per 100 ms (the rate of the fixed tick this replaces), not one
#: per packet. A lone packet still gets its default verdict exactly at its deadline.
TIMEOUT_BATCH_NS = 100_000_000

#: Message types that go to the capture actor; every other message goes to the broker.
TO_CAPTURE: frozenset[type[m.Message]] = frozenset({m.Decision, m.CacheSet, m.CacheClear, m.Rehold})
_PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6"}


class Note(msgspec.Struct, frozen=True):
    """A line for the ALE's own log (stderr, which supervisord writes to RUN/logs/ale.log);
    never sent anywhere: GetLogs gets its own Log lines."""

    level: int  # a `logging` level
    text: str


Effect = m.Message | Note


def flow_text(flow: m.Flow, direction: Direction | None = None) -> str:
    """`TCP 10.0.0.1:4000 -> 10.0.0.2:80` (IPv6 in brackets; `<-` inbound, `<->` unknown)."""

    def end(raw: bytes, port: int) -> str:
        ip = ipaddress.ip_address(raw)
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"

    arrow = "<->" if direction is None else "->" if direction is Direction.OUTBOUND else "<-"
    proto = _PROTO_NAMES.get(flow.protocol, f"proto {flow.protocol}")
    return (
        f"{proto} {end(flow.local_ip, flow.local_port)} {arrow} "
        f"{end(flow.remote_ip, flow.remote_port)}"
    )


@dataclass(frozen=True)
class AleConfig:
    #: A held packet older than this gets `default_verdict` (the kext waits forever).
    verdict_timeout_ns: int = 10 * _SECOND
    default_verdict: Verdict = Verdict.BLOCK
    #: CleanEndedConnections forgets connections that ended longer ago than this (kext: 60 s).
    ended_grace_ns: int = 60 * _SECOND
    #: An outbound connection info whose pid is not known yet waits at most this long for the
    #: lifecycle actor's Attribution (only while the lifecycle actor is present; the pid is then
    #: released at once when it arrives). 0 never waits. See actors/lifecycle/README.md.
    attribution_wait_ns: int = 50_000_000
    #: The lifecycle actor counts as present this long after its last Attribution (it sends
    #: PRESENT every second).
    lifecycle_present_ns: int = 3 * _SECOND
    #: An OPENER hint (SOCKET CONNECT: pid and remote, no local port) is used within this time
    #: (its SYN follows the connect() within ~40 us), and only when no other process has an
    #: unused hint for the same remote.
    opener_ttl_ns: int = 200_000_000
    #: Use OPENER hints at all. Off by default: a hint that reaches us after another
    #: process's SYN to the same remote makes "unambiguous" wrong (measured: a few percent of
    #: concurrent connects), while the exact attribution costs well under a millisecond.
    opener_hints: bool = False
    #: Bound of each attribution table (flows, openers, listeners); the oldest entry goes first.
    attribution_cap: int = 65_536
    #: At most this many packets wait for a verdict (ids issued, not yet answered); a new one
    #: beyond it is dropped at once (Drop: not cached, so a TCP resend is asked again) and its
    #: client never sees it. Overload then costs what arrives while the client is behind,
    #: not the seconds it takes to work off a backlog (docs/overload.md). 0: unbounded.
    max_pending: int = 8192


@dataclass(slots=True)
class Connection:
    """A connection cache entry: the verdict for one 5-tuple."""

    verdict: Verdict
    process_id: int
    direction: Direction
    last_seen_ns: int
    ended_ns: int = 0


@dataclass(slots=True)
class _Waiting:
    """Held packets of one outbound flow whose connection info waits for its pid."""

    since_ns: int
    held: list[m.PacketHeld] = field(default_factory=list)


_RemoteKey = tuple[int, bytes, int]  # protocol, remote_ip, remote_port
_LocalKey = tuple[int, bytes, int]  # protocol, local_ip (all zero: any), local_port


@dataclass(slots=True)
class IdCacheEntry:
    """An id cache entry: a held packet waiting for the verdict on its pending id."""

    hold_id: int | None  # the capture's handle; None once that capture process is gone
    flow: m.Flow
    created_ns: int
    direction: Direction = Direction.OUTBOUND
    #: The connection info as emitted, kept to emit it again to a restarted broker (the
    #: record's bytes already exist: this is one reference per pending id).
    emit: m.Emit | None = None
    #: The broker epoch (AleCore.broker_lost) it was emitted in.
    epoch: int = 0
    #: The held packet, to hand a restarted capture again (Rehold); None once it died.
    held: m.PacketHeld | None = None


def _with_pid(msg: m.PacketHeld, pid: int) -> m.PacketHeld:
    return msgspec.structs.replace(msg, process_id=pid)


def _budgeted(
    budget: LineBudget, now_ns: int, summary: Callable[[int], Note], line: Callable[[], str]
) -> list[Effect]:
    """One event's log lines under `budget`: the summary of a finished window, if due, and
    the event's own warning line (built only if it gets one)."""
    n, own_line = budget.note(now_ns)
    out: list[Effect] = [summary(n)] if n else []
    if own_line:
        out.append(Note(logging.WARNING, line()))
    return out


def _rehold(msg: m.PacketHeld) -> m.Rehold:
    return m.Rehold(msg.packet, msg.direction, msg.ifindex)


def _percentiles(name: str, samples: deque[int]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    return {
        f"{name}_p50_us": ordered[len(ordered) // 2],
        f"{name}_p99_us": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)],
    }


def _trim(table: OrderedDict[_K, _V], cap: int) -> None:
    """Keep a table within its bound by forgetting its oldest entries."""
    while len(table) > cap:
        table.popitem(last=False)


def _log(severity: Severity, message: str) -> m.Log:
    """A kext-style log line, "file:line message", with the caller's location."""
    return m.Log(severity, f"{source_tag(1)} {message}")


class AleCore:
    def __init__(self, config: AleConfig | None = None, first_id: int = 1) -> None:
        self.config = config or AleConfig()
        #: The kext's connection cache: a verdict per 5-tuple (TCP and UDP only).
        self.connection_cache: dict[m.Flow, Connection] = {}
        #: The kext's id cache: held packets by pending id. Insertion order is id order.
        self.id_cache: dict[int, IdCacheEntry] = {}
        self.next_id = first_id
        #: Pending ids in issue order, for the oldest one's deadline; resolved ids are skipped
        #: (and dropped) lazily. Finding the oldest by iterating `id_cache` would cost a scan
        #: over every entry deleted from its front since the dict last resized.
        self._timeout_order: deque[int] = deque()
        #: When on_deadline last applied verdict timeouts (see TIMEOUT_BATCH_NS).
        self._timeouts_applied_ns: int | None = None
        #: Attribution tables (from the lifecycle actor), each bounded by attribution_cap.
        self.flow_pids: OrderedDict[m.Flow, int] = OrderedDict()
        self.openers: OrderedDict[_RemoteKey, deque[tuple[int, int]]] = OrderedDict()
        self.listeners: OrderedDict[_LocalKey, int] = OrderedDict()
        #: Outbound flows whose info waits for a pid, in arrival order (deadline order).
        self.waiting: dict[m.Flow, _Waiting] = {}
        #: Pending ids whose packet died with a killed capture and was handed to its successor
        #: (Rehold), by flow: the PacketHeld that comes back takes the id instead of a new one.
        self.orphans: dict[m.Flow, deque[int]] = {}
        #: Flows whose pid came from an OPENER hint (their exact attribution is still to come).
        self._hinted: OrderedDict[m.Flow, None] = OrderedDict()
        self._lifecycle_seen_ns: int | None = None
        #: How long the last infos that got their pid by waiting waited (for health/measuring).
        self.wait_samples_us: deque[int] = deque(maxlen=1024)
        #: Log-file lines for timed-out and for refused infos: one each up to a rate.
        self.timeout_lines = LineBudget()
        self.refused_lines = LineBudget()
        self.unknown_id_lines = LineBudget()
        self.shed_lines = LineBudget(per_window=1)
        #: Counts broker losses: a pending info emitted in an earlier epoch may have died with
        #: the broker that queued it, and is emitted again when a broker is back.
        self._broker_epoch = 0
        #: Connections whose decided state changed since the last `take_journal()` (the
        #: shell appends them to the journal once per loop pass, actors/ale/journal.py), and
        #: whether a ClearCache came first.
        self._dirty: dict[m.Flow, None] = {}
        self._cleared = False
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
            "pid_waits": 0,
            "pid_wait_timeouts": 0,
            "pid_wait_max_us": 0,
            "pid_found": 0,
            "pid_unknown": 0,
            "reemitted": 0,
            "restored": 0,
            "reholds": 0,
            "reheld": 0,
            "shed": 0,
        }

    # ---- inputs -------------------------------------------------------------------------

    def packet_held(self, msg: m.PacketHeld, now_ns: int) -> list[Effect]:
        """Capture holds a packet: answer from the cache, or issue a new pending id + event.

        An outbound connection whose pid nobody knows yet waits (bounded by
        attribution_wait_ns) while the lifecycle actor is present: its pid is on its way."""
        flow = msg.flow
        waiting = self.waiting.get(flow)
        if waiting is not None:
            waiting.held.append(msg)
            return []
        if msg.process_id == 0:
            conn = self.connection_cache.get(flow)
            if conn is None or not conn.process_id:
                pid = self._lookup_pid(flow, msg.direction, now_ns)
                if pid:
                    msg = _with_pid(msg, pid)
                elif self._should_wait(msg, now_ns) and conn is None:
                    self.counters["pid_waits"] += 1
                    self.waiting[flow] = _Waiting(now_ns, [msg])
                    return []
        return self._emit_held(msg, now_ns)

    def attribution(self, msg: m.Attribution, now_ns: int) -> list[Effect]:
        """Learn who owns a flow; release the infos that were waiting for exactly this."""
        self._lifecycle_seen_ns = now_ns
        kind, flow, pid = msg.kind, msg.flow, msg.process_id
        cap = self.config.attribution_cap
        if kind is m.AttributionKind.FLOW and pid:
            known = self.flow_pids.get(flow) == pid  # (FLOW ESTABLISHED after a resolve)
            self.flow_pids[flow] = pid
            self.flow_pids.move_to_end(flow)
            _trim(self.flow_pids, cap)
            conn = self.connection_cache.get(flow)
            if conn is not None and not conn.process_id:
                conn.process_id = pid
                self._touch(flow, conn)
            # This connect's hint is accounted for now (unless its SYN already used it).
            if flow in self._hinted:
                del self._hinted[flow]
            elif not known:
                hints = self.openers.get((flow.protocol, flow.remote_ip, flow.remote_port))
                for h in hints or ():
                    if h[0] == pid:
                        hints.remove(h)  # type: ignore[union-attr]
                        break
            if flow in self.waiting:
                return self._release(flow, pid, now_ns)
        elif kind is m.AttributionKind.OPENER and pid:
            # Never released on a hint alone: several processes may be connecting to the
            # same remote; the exact FLOW attribution (its local port) follows within ~1 ms.
            key = (flow.protocol, flow.remote_ip, flow.remote_port)
            hints = self.openers.get(key)
            if hints is None:
                hints = self.openers[key] = deque(maxlen=64)
                _trim(self.openers, cap)
            hints.append((pid, now_ns))
        elif kind is m.AttributionKind.LISTENER and pid:
            lkey = (flow.protocol, flow.local_ip, flow.local_port)
            self.listeners[lkey] = pid
            self.listeners.move_to_end(lkey)
            _trim(self.listeners, cap)
        elif kind is m.AttributionKind.UNLISTEN:
            lkey = (flow.protocol, flow.local_ip, flow.local_port)
            if self.listeners.get(lkey) == pid or not pid:
                self.listeners.pop(lkey, None)
        return []

    def _should_wait(self, msg: m.PacketHeld, now_ns: int) -> bool:
        seen = self._lifecycle_seen_ns
        return (
            self.config.attribution_wait_ns > 0
            and seen is not None
            and now_ns - seen <= self.config.lifecycle_present_ns
            and msg.direction is Direction.OUTBOUND
            and msg.flow.protocol in _CACHED_PROTOCOLS
        )

    def _lookup_pid(self, flow: m.Flow, direction: Direction, now_ns: int) -> int:
        """The pid the attribution tables give this flow now, or 0."""
        pid = self.flow_pids.get(flow, 0)
        if pid:
            return pid
        if direction is Direction.INBOUND:
            for lip in (flow.local_ip, bytes(len(flow.local_ip)), bytes(16)):  # [::] dual
                pid = self.listeners.get((flow.protocol, lip, flow.local_port), 0)
                if pid:
                    return pid
            return 0
        if not self.config.opener_hints:
            return 0
        hints = self.openers.get((flow.protocol, flow.remote_ip, flow.remote_port))
        while hints and now_ns - hints[0][1] > self.config.opener_ttl_ns:
            hints.popleft()
        if hints and all(h[0] == hints[0][0] for h in hints):
            # Unambiguous: every process connecting there now is this one.
            self._hinted[flow] = None
            _trim(self._hinted, self.config.attribution_cap)
            return hints.popleft()[0]
        return 0

    def _share_key(self, flow: m.Flow) -> None:
        """Key flow_pids by the same Flow object as connection_cache: an attribution and a
        held packet decode two equal Flows, and keeping both cost ~200 B per connection."""
        pid = self.flow_pids.pop(flow, None)
        if pid is not None:
            self.flow_pids[flow] = pid  # also most recent now, as a lookup makes it

    def _release(self, flow: m.Flow, pid: int, now_ns: int) -> list[Effect]:
        """Emit the infos of a flow that waited for its pid (pid 0: it did not come)."""
        waiting = self.waiting.pop(flow)
        waited_us = (now_ns - waiting.since_ns) // 1000
        if pid:
            self.counters["pid_wait_max_us"] = max(self.counters["pid_wait_max_us"], waited_us)
            self.wait_samples_us.append(waited_us)
        out: list[Effect] = []
        for held in waiting.held:
            out += self._emit_held(_with_pid(held, pid) if pid else held, now_ns)
        return out

    def _emit_held(self, msg: m.PacketHeld, now_ns: int) -> list[Effect]:
        flow = msg.flow
        cached = flow.protocol in _CACHED_PROTOCOLS
        conn = self.connection_cache.get(flow) if cached else None
        if conn is not None:
            conn.last_seen_ns = now_ns
            if conn.verdict.is_permanent:
                # Capture asked before our CacheSet reached it: answer without an event.
                return [m.Decision((msg.hold_id,), conn.verdict)]
        if flow in self.orphans and self._claim_orphan(msg):
            return []  # the client has this packet's info already: its answer releases it
        cap = self.config.max_pending
        if cap and len(self.id_cache) >= cap:
            return self._shed(msg, now_ns)
        if conn is None and cached:
            conn = Connection(Verdict.UNDECIDED, msg.process_id, msg.direction, now_ns)
            self.connection_cache[flow] = conn
            self._share_key(flow)
        pid = msg.process_id or (conn.process_id if conn else 0)
        if conn is not None and msg.process_id and not conn.process_id:
            conn.process_id = msg.process_id
            self._touch(flow, conn)
        self.counters["pid_found" if pid else "pid_unknown"] += 1
        new_id = self.next_id
        self.next_id += 1
        self.counters["ids_issued"] += 1
        entry = IdCacheEntry(
            msg.hold_id, flow, now_ns, msg.direction, None, self._broker_epoch, msg
        )
        self.id_cache[new_id] = entry
        self._timeout_order.append(new_id)
        info = ConnectionIpv6 if flow.is_v6 else ConnectionIpv4
        record = info(
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
        ).encode()
        entry.emit = m.Emit(info.TYPE, record, new_id)
        return [entry.emit]

    def command(self, cmd: Command, now_ns: int) -> list[Effect]:
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
        return [_log(Severity.ERROR, f"ALE does not handle {cmd.TYPE.kext_name}")]

    def emit_refused(self, pending_id: int, reason: str, now_ns: int) -> list[Effect]:
        """The broker's queue could not take our event: nobody will answer, so decide now."""
        self.counters["refused"] += 1
        out: list[Effect] = []
        verdict = self.config.default_verdict.kext_name
        entry = self.id_cache.get(pending_id)
        self._resolve(pending_id, self.config.default_verdict, now_ns, out)
        line = f"event {pending_id} refused by the broker ({reason}); applied {verdict}"
        out.append(_log(Severity.WARNING, line))
        what = flow_text(entry.flow, entry.direction) if entry else "(no longer held)"
        out += _budgeted(
            self.refused_lines,
            now_ns,
            self._refused_summary,
            lambda: f"id {pending_id} {what} refused by the broker ({reason}): {verdict}",
        )
        return out

    def _shed(self, msg: m.PacketHeld, now_ns: int) -> list[Effect]:
        """The client is `max_pending` packets behind: drop this one unasked (see AleConfig)."""
        self.counters["shed"] += 1
        out: list[Effect] = [m.Decision((msg.hold_id,), Verdict.DROP)]
        out += _budgeted(
            self.shed_lines,
            now_ns,
            self._shed_summary,
            lambda: (
                f"overload: {self.config.max_pending} packets wait for a verdict; "
                f"{flow_text(msg.flow, msg.direction)} dropped unasked (its sender may resend; "
                "counter shed)"
            ),
        )
        return out

    def _shed_summary(self, n: int) -> Note:
        return Note(
            logging.WARNING,
            f"overload: {n} more packet(s) dropped unasked within a second (counter shed)",
        )

    def _refused_summary(self, n: int) -> Note:
        verdict = self.config.default_verdict.kext_name
        return Note(
            logging.WARNING,
            f"refused: {n} more info(s) refused by the broker within a second got {verdict} "
            "(not logged one by one; counter refused)",
        )

    def _timeout_summary(self, n: int) -> Note:
        verdict = self.config.default_verdict.kext_name
        return Note(
            logging.WARNING,
            f"verdict timeout: {n} more id(s) timed out within a second and got {verdict} "
            "(not logged one by one; counter timeouts)",
        )

    def _unknown_id_summary(self, n: int) -> Note:
        return Note(
            logging.WARNING,
            f"invalid id: {n} more verdict(s) for invalid ids within a second ignored "
            "(not logged one by one; counter verdicts_unknown_id)",
        )

    def next_deadline_ns(self) -> int | None:
        """The earliest of the verdict deadline, the oldest pid wait's end and a due summary
        of log lines left out."""
        due = self._verdict_deadline_ns()
        if self.waiting:
            first = next(iter(self.waiting.values()))
            wait_due = first.since_ns + self.config.attribution_wait_ns
            due = wait_due if due is None else min(due, wait_due)
        for budget, _summary in self._line_budgets():
            b = budget.due_ns()
            if b is not None:
                due = b if due is None else min(due, b)
        return due

    def on_deadline(self, now_ns: int) -> list[Effect]:
        """Emit infos whose pid wait is over (pid 0), then apply verdict timeouts."""
        out: list[Effect] = []
        limit = now_ns - self.config.attribution_wait_ns
        while self.waiting:
            flow, first = next(iter(self.waiting.items()))
            if first.since_ns > limit:
                break
            self.counters["pid_wait_timeouts"] += 1
            out += self._release(flow, 0, now_ns)
        out += self._verdict_timeouts(now_ns)
        for budget, summary in self._line_budgets():
            n = budget.flush(now_ns)
            if n:
                out.append(summary(n))
        return out

    def _line_budgets(self) -> tuple[tuple[LineBudget, Callable[[int], Note]], ...]:
        """Each rate-limited kind of log line with the summary of what it left out."""
        return (
            (self.timeout_lines, self._timeout_summary),
            (self.refused_lines, self._refused_summary),
            (self.unknown_id_lines, self._unknown_id_summary),
            (self.shed_lines, self._shed_summary),
        )

    def _verdict_deadline_ns(self) -> int | None:
        """When the oldest held packet's verdict timeout falls due (None: nothing is held).

        Within TIMEOUT_BATCH_NS of the last timeouts applied, the deadline waits for the end
        of that batch window, so timeouts are never applied early, at most that much late."""
        order, cache = self._timeout_order, self.id_cache
        while order and order[0] not in cache:
            order.popleft()
        if not order:
            return None
        if len(order) > 2 * len(cache) + 64:
            # Many ids were resolved behind one that still waits: keep this bounded by the
            # id cache, not by every id issued within a verdict timeout.
            order = self._timeout_order = deque(cache)
        due = cache[order[0]].created_ns + self.config.verdict_timeout_ns
        last = self._timeouts_applied_ns
        if last is not None and due < last + TIMEOUT_BATCH_NS:
            return last + TIMEOUT_BATCH_NS
        return due

    def _verdict_timeouts(self, now_ns: int) -> list[Effect]:
        """Resolve held packets older than the verdict timeout with the default verdict."""
        due = self._verdict_deadline_ns()
        if due is None or now_ns < due:
            return []
        cutoff = now_ns - self.config.verdict_timeout_ns
        cache = self.id_cache
        expired = []
        for pending_id in self._timeout_order:
            entry = cache.get(pending_id)
            if entry is None:
                continue
            if entry.created_ns > cutoff:
                break
            expired.append(pending_id)
        out: list[Effect] = []
        if not expired:
            return out
        self._timeouts_applied_ns = now_ns
        verdict = self.config.default_verdict
        after = self.config.verdict_timeout_ns / 1e9
        budget = self.timeout_lines
        for pending_id in expired:
            self.counters["timeouts"] += 1
            entry = cache[pending_id]
            summary, own_line = budget.note(now_ns)
            if summary:
                out.append(self._timeout_summary(summary))
            if own_line:
                out.append(
                    Note(
                        logging.WARNING,
                        f"id {pending_id} {flow_text(entry.flow, entry.direction)} timed out "
                        f"after {after:g} s without a verdict: {verdict.kext_name}",
                    )
                )
            self._resolve(pending_id, verdict, now_ns, out)
        out.append(
            _log(
                Severity.WARNING,
                f"verdict timeout: {len(expired)} packet(s) got "
                f"{verdict.kext_name} (ids {expired[0]}..{expired[-1]})",
            )
        )
        # Their infos may still wait in the broker's queue: a later reader must not get them.
        out.append(m.Resolved(tuple(expired)))
        return out

    def capture_ready(self, now_ns: int) -> list[Effect]:
        """A (re)started capture holds nothing: replay every verdict, then hand it back the
        packets its predecessor held that are still undecided (Rehold; their connections
        would otherwise wait for the sender's resend, 1 s for a TCP SYN). Their pending ids
        stay: the PacketHeld each one comes back as takes its id (`_claim_orphan`). (A SYN
        decided as the capture died, its Decision lost, comes back from the kernel instead:
        actors/capture/parked.py, shadow SYNs.)"""
        out: list[Effect] = [
            m.CacheSet(flow, conn.verdict)
            for flow, conn in self.connection_cache.items()
            if conn.verdict != Verdict.UNDECIDED
        ]
        self.orphans.clear()
        for pending_id, entry in self.id_cache.items():
            # (hold_id None too: handed to a capture that died before it held it again)
            if entry.held is not None and entry.held.ifindex:
                self.orphans.setdefault(entry.flow, deque()).append(pending_id)
                out.append(_rehold(entry.held))
            entry.hold_id = None
        for waiting in self.waiting.values():  # no id yet: they come back and wait again
            out.extend(_rehold(h) for h in waiting.held if h.ifindex)
        self.waiting.clear()
        n = sum(type(e) is m.Rehold for e in out)
        self.counters["reholds"] += n
        return out

    def _claim_orphan(self, msg: m.PacketHeld) -> bool:
        """Give `msg` the pending id of its flow that lost its packet in a capture restart."""
        ids = self.orphans[msg.flow]
        while ids:
            entry = self.id_cache.get(ids.popleft())
            if entry is not None and entry.hold_id is None:
                entry.hold_id, entry.held = msg.hold_id, msg
                if not ids:
                    del self.orphans[msg.flow]
                self.counters["reheld"] += 1
                return True
        del self.orphans[msg.flow]
        return False

    def connection_ended(self, msg: m.ConnectionEnded, now_ns: int) -> list[Effect]:
        """Record an end once and report it (the kext re-ended entries, kext-contract C15-8)."""
        conn = self.connection_cache.get(msg.flow)
        if conn is None or conn.ended_ns:
            return []
        conn.ended_ns = now_ns
        self._touch(msg.flow, conn)
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
        return [m.Emit(kind, info.encode())]

    # ---- restarts ---------------------------------------------------------------------------

    def broker_lost(self, now_ns: int) -> list[Effect]:
        """The broker connection dropped: every info emitted so far may have died in its
        queue (what the shell sends from now on waits in the socket for the next broker)."""
        self._broker_epoch += 1
        return []

    def broker_back(self, now_ns: int) -> list[Effect]:
        """A (new) broker is connected: emit again, same ids and in order, every still
        pending info emitted before the broker was lost. A client that already holds one
        answers it once; a second answer is an unknown id, which changes nothing."""
        epoch = self._broker_epoch
        again: list[m.Emit] = []
        for entry in self.id_cache.values():
            if entry.epoch < epoch and entry.emit is not None:
                entry.epoch = epoch
                again.append(entry.emit)
        if not again:
            return []
        self.counters["reemitted"] += len(again)
        note = Note(
            logging.INFO,
            f"broker back: emitted {len(again)} pending connection info(s) again "
            f"(ids {again[0].id}..{again[-1].id})",
        )
        return [*again, note]

    def _touch(self, flow: m.Flow, conn: Connection) -> None:
        """A decided connection's pid or end changed: it goes to the journal (an undecided
        one is never journaled: a restart asks about it again anyway)."""
        if conn.verdict is not Verdict.UNDECIDED:
            self._dirty[flow] = None

    def take_journal(self) -> tuple[bool, list[tuple[m.Flow, Connection | None]]]:
        """What changed since the last call, for the journal: whether the cache was cleared
        first, then each changed flow with its current entry (None: forgotten, or no longer
        decided)."""
        cleared, self._cleared = self._cleared, False
        if not self._dirty:
            return cleared, []
        cache = self.connection_cache
        changes: list[tuple[m.Flow, Connection | None]] = []
        for flow in self._dirty:
            conn = cache.get(flow)
            changes.append(
                (flow, conn if conn is not None and conn.verdict != Verdict.UNDECIDED else None)
            )
        self._dirty = {}
        return cleared, changes

    def restore(self, connections: dict[m.Flow, Connection], now_ns: int) -> None:
        """Decided connections of this instance's previous ALE process (its journal): an
        Update or an end for them works as if the ALE had never stopped."""
        for flow, conn in connections.items():
            if flow.protocol in _CACHED_PROTOCOLS and conn.verdict != Verdict.UNDECIDED:
                conn.last_seen_ns = now_ns
                self.connection_cache[flow] = conn
        self.counters["restored"] = len(self.connection_cache)

    def health(self) -> dict[str, float]:
        return {
            **self.counters,
            "pending": len(self.id_cache),
            "connections": len(self.connection_cache),
            "next_id": self.next_id,
            "pid_waiting": len(self.waiting),
            **_percentiles("pid_wait", self.wait_samples_us),
            "attributed_flows": len(self.flow_pids),
            "listeners": len(self.listeners),
        }

    # ---- commands -------------------------------------------------------------------------

    def _verdict(self, pending_id: int, verdict: Verdict, now_ns: int) -> list[Effect]:
        out: list[Effect] = []
        if pending_id not in self.id_cache:
            self.counters["verdicts_unknown_id"] += 1
            out.append(_log(Severity.ERROR, f"Verdict invalid id: {pending_id}"))
            out += _budgeted(
                self.unknown_id_lines,
                now_ns,
                self._unknown_id_summary,
                lambda: (
                    f"verdict {verdict.kext_name} for invalid id {pending_id} ignored "
                    "(never issued, already answered or timed out)"
                ),
            )
            return out
        self.counters["verdicts"] += 1
        self._resolve(pending_id, verdict, now_ns, out)
        return out

    def _resolve(self, pending_id: int, verdict: Verdict, now_ns: int, out: list[Effect]) -> None:
        """Release one held packet and make its verdict the connection's verdict."""
        entry = self.id_cache.pop(pending_id, None)
        if entry is None:
            return
        key = f"decided.{verdict.kext_name}"
        self.counters[key] = self.counters.get(key, 0) + 1
        flow = entry.flow
        if flow.protocol in _CACHED_PROTOCOLS:
            conn = self.connection_cache.get(flow)
            if conn is None:
                # ClearCache ran while this packet waited: the verdict still describes the
                # connection, so remember it rather than asking again (kext-contract C15-19).
                conn = Connection(verdict, 0, Direction.OUTBOUND, now_ns)
                self.connection_cache[flow] = conn
            conn.last_seen_ns = now_ns
            if conn.verdict != verdict:
                conn.verdict = verdict
                self._dirty[flow] = None
                out.append(m.CacheSet(flow, verdict))
        if entry.hold_id is not None:
            out.append(m.Decision((entry.hold_id,), verdict))

    def _update(self, cmd: UpdateV4Command | UpdateV6Command, now_ns: int) -> list[Effect]:
        flow = m.Flow(
            cmd.protocol, cmd.local_address, cmd.local_port, cmd.remote_address, cmd.remote_port
        )
        conn = self.connection_cache.get(flow)
        if conn is None:
            # The kext ignores unknown 5-tuples silently; Portmaster sends updates for
            # connections that may have ended. Count it so it is visible.
            self.counters["updates_unknown"] += 1
            return []
        self.counters["updates"] += 1
        if conn.verdict == cmd.verdict:  # idempotent: Portmaster sends every update twice
            return []
        conn.verdict = cmd.verdict
        self._dirty[flow] = None
        return [m.CacheSet(flow, cmd.verdict)]

    def _clear_cache(self) -> list[Effect]:
        self.counters["clear_cache"] += 1
        self.connection_cache.clear()
        self._dirty.clear()
        self._cleared = True
        return [m.CacheClear()]

    def _shutdown(self, now_ns: int) -> list[Effect]:
        """Resolve every held packet as PermanentBlock (kext-contract C8-6)."""
        self.counters["shutdowns"] += 1
        out: list[Effect] = []
        for waiting in self.waiting.values():  # never reported: blocked without an id
            out.append(m.Decision(tuple(h.hold_id for h in waiting.held), Verdict.PERMANENT_BLOCK))
        self.waiting.clear()
        for pending_id in list(self.id_cache):
            self._resolve(pending_id, Verdict.PERMANENT_BLOCK, now_ns, out)
        return out

    def _clean_ended(self, now_ns: int) -> list[Effect]:
        """Forget connections that ended more than the grace period ago.

        Unlike the kext, idle-but-live connections are not expired here: established TCP no
        longer reaches the ALE, so "no lookups for 10 min" would forget live connections and
        make Portmaster's later UpdateV4/V6 for them silently ineffective.
        """
        deadline = now_ns - self.config.ended_grace_ns
        cache = self.connection_cache
        gone = [f for f, c in cache.items() if c.ended_ns and c.ended_ns < deadline]
        for flow in gone:
            del cache[flow]
            self.flow_pids.pop(flow, None)
            self._dirty[flow] = None
        self.counters["expired"] += len(gone)
        ttl = self.config.opener_ttl_ns
        for key in [k for k, h in self.openers.items() if not h or now_ns - h[-1][1] > ttl]:
            del self.openers[key]
        return []
