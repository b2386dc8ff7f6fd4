"""The capture actor's decision core: packets and ALE messages in, actions out.

No sockets, no handles, no clocks: the shell passes `now_ns` and opaque packet tokens, and
executes the returned actions. That keeps every verdict rule testable with crafted bytes.

What needs Python (kext-spec §4, §5.2, §7, §9, improved per §15):
* TCP connection openers, FIN/RST, all UDP and all non-TCP/UDP reach us through the base
  filter. Established TCP of a permanently accepted connection never does (bulk speed).
* TCP connections that need every packet (temporary verdicts, redirects, blocked/dropped
  live connections, connections to re-ask after CacheClear) are added to the filter by local
  port; the core asks the shell for a new filter whenever that port set changes, and parks
  the release of a held packet until its connection's later packets are sure to be diverted.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

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

    `loopback`: deliver it through `lo` (needed for local redirect targets, see the reference).
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


Action = Pass | Drop | Reroute | Inject | ToAle | SetFilter


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
    max_flows: int = 200_000

    @property
    def target_ports(self) -> frozenset[int]:
        return frozenset({self.nameserver_port, self.tunnel_port, self.split_tunnel_port})


@dataclass(slots=True)
class Held:
    token: object
    flow: Flow
    parsed: Parsed
    raw: bytes
    outbound: bool
    loopback: bool
    seen_ns: int
    retrans_key: tuple | None
    followers: list[tuple[object, bytes, Parsed, bool, bool]] = field(default_factory=list)


@dataclass(slots=True)
class _Redirect:
    flow: Flow
    target_ip: bytes
    target_port: int


class CaptureCore:
    """All capture state; see the module docstring for the rules."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._targets = self.config.target_ports
        self.cache: dict[Flow, Verdict] = {}
        self.held: dict[int, Held] = {}
        self._next_hold_id = 1
        self._retrans: dict[tuple, int] = {}
        #: TCP connections whose every packet must be diverted.
        self.per_packet: set[Flow] = set()
        #: Live TCP connections forgotten by CacheClear: ask on their next packet.
        self.reask: set[Flow] = set()
        #: TCP connections we let a packet through for: they may be established.
        self.live: set[Flow] = set()
        self.ended: dict[Flow, int] = {}
        self._seen: dict[Flow, int] = {}
        #: Held requests per connection: a connection with one is an attempt in progress.
        self._pending: dict[Flow, int] = {}
        self._redirects: dict[Flow, tuple] = {}
        self._replies: dict[tuple, _Redirect] = {}
        self._gen_requested = 0
        self._ports_requested: frozenset[int] | None = frozenset()
        self._ports_active: frozenset[int] | None = frozenset()
        self._parked: list[tuple[int, list[Action]]] = []
        self._last_sweep_ns = 0
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
            ),
            0,
        )

    # ---- start ------------------------------------------------------------------------------

    def start(self, pid: int) -> list[Action]:
        """Announce ourselves; the ALE answers with CacheSet for every connection it knows."""
        return [ToAle(CaptureReady(pid))]

    def next_hold_id(self) -> int:
        """The hold_id the next held packet will get (a mark for `resync`)."""
        return self._next_hold_id

    def resync(self, pid: int, before_hold_id: int) -> list[Action]:
        """The ALE came back (restarted): announce ourselves again and re-ask every packet
        still held that was sent before it went away (`before_hold_id`), under the same hold_ids -
        the ones sent while it was gone are still queued and reach it anyway."""
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
            return self._ask(
                token, raw, p, self._flow(p, outbound), outbound, loopback, now_ns, retrans=False
            )
        excl = self.config.exclude_ports
        if excl and (p.sport in excl or p.dport in excl):
            c["passed"] += 1
            return [Pass(token)]
        # Only build the reply key while some redirect exists (rare; this runs per packet).
        redirect = (
            self._replies.get((proto, p.src, p.sport, p.dst, p.dport)) if self._replies else None
        )
        if redirect is not None:
            # A redirect target answering the app: make it look like the host it contacted.
            c["rerouted"] += 1
            f = redirect.flow
            return [
                Reroute(
                    token, bytes(pk.rewrite(raw, p, src=f.remote_ip, sport=f.remote_port)), True
                )
            ]
        flow = self._flow(p, outbound)
        if flow.local_port in self._targets and flow.local_ip == flow.remote_ip:
            c["passed"] += 1  # a local redirect target's own traffic (kext §5.2.3, plus 719)
            return [Pass(token)]
        verdict = self.cache.get(flow)
        if verdict is None and loopback:
            rev = Flow(proto, flow.remote_ip, flow.remote_port, flow.local_ip, flow.local_port)
            verdict = self.cache.get(rev)
            if verdict is not None:
                flow = rev
        if proto == pk.TCP:
            flags = p.flags
            if flags & pk.TCP_SYN and not flags & pk.TCP_ACK:
                if flow in self.ended:  # a new connection reusing the 5-tuple: ask afresh
                    self._forget(flow)
                    verdict = None
            elif flags & (pk.TCP_FIN | pk.TCP_RST):
                if verdict is None and flow not in self.reask:
                    c["passed"] += 1  # end of a connection we never judged: not ours to stop
                    return [Pass(token)]
                self.ended.setdefault(flow, now_ns)
        if verdict is not None:
            self._seen[flow] = now_ns
        if verdict is None:
            return self._ask(token, raw, p, flow, outbound, loopback, now_ns, retrans=True)
        if verdict is Verdict.PERMANENT_ACCEPT:
            c["passed"] += 1
            if proto == pk.TCP:
                self.live.add(flow)  # may become established: an Update must divert it
            return [Pass(token)]
        if not verdict.is_permanent:
            return self._ask(token, raw, p, flow, outbound, loopback, now_ns, retrans=True)
        return self._enforce(token, raw, p, flow, verdict, outbound, loopback, now_ns)

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
        outbound: bool,
        loopback: bool,
        now_ns: int,
        retrans: bool,
    ) -> list[Action]:
        c = self.counters
        key = None
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
        self._pending[flow] = self._pending.get(flow, 0) + 1
        if key is not None:
            self._retrans[key] = hold_id
        c["asked"] += 1
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
        return [ToAle(PacketHeld(hold_id, flow, direction, data, now_ns))]

    # ---- enforcing verdicts -----------------------------------------------------------------

    def _enforce(
        self,
        token: object,
        raw: bytes | bytearray | memoryview,
        p: Parsed,
        flow: Flow,
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
                self._add_redirect(flow, target_ip, target_port)
                c["rerouted"] += 1
                return [
                    Reroute(
                        token,
                        bytes(pk.rewrite(raw, p, dst=target_ip, dport=target_port)),
                        local or loopback,
                    )
                ]
            # Inbound packets of a redirected connection are not the target's answers: the
            # kext passes them unchanged (its inbound rewrite restores the same addresses).
            c["passed"] += 1
            return [Pass(token)]
        if verdict in _BLOCKS:
            return self._reject(token, raw, p, flow, outbound, loopback, now_ns)
        c["dropped"] += 1
        return [Drop(token)]

    def _reject(
        self,
        token: object,
        raw: bytes | bytearray | memoryview,
        p: Parsed,
        flow: Flow,
        outbound: bool,
        loopback: bool,
        now_ns: int,
    ) -> list[Action]:
        """Block: make the sender fail at once (TCP RST, UDP port unreachable, else drop);
        an established TCP connection is reset at both ends."""
        self.counters["rejected"] += 1
        inbound = outbound  # the answer goes back to whoever sent the packet
        if p.protocol == pk.TCP:
            if flow in self.live:
                self.ended.setdefault(flow, now_ns)  # we are resetting it
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
        """(address, port, is-local) a redirected connection goes to (kext §7)."""
        cfg = self.config
        if verdict is Verdict.REDIRECT_NAME_SERVER:
            ip = cfg.nameserver_v6 if flow.is_v6 else cfg.nameserver_v4
            return ip, cfg.nameserver_port, pk.is_loopback_addr(ip)
        port = cfg.tunnel_port if verdict is Verdict.REDIRECT_TUNNEL else cfg.split_tunnel_port
        return flow.local_ip, port, True  # "unify": the connection's own local address

    def _add_redirect(self, flow: Flow, target_ip: bytes, target_port: int) -> None:
        key = (flow.protocol, target_ip, target_port, flow.local_ip, flow.local_port)
        old = self._redirects.get(flow)
        if old == key:
            return
        if old is not None:
            self._replies.pop(old, None)
        self._redirects[flow] = key
        self._replies[key] = _Redirect(flow, target_ip, target_port)

    def _drop_redirect(self, flow: Flow) -> None:
        key = self._redirects.pop(flow, None)
        if key is not None:
            self._replies.pop(key, None)

    # ---- ALE messages -----------------------------------------------------------------------

    def on_message(self, msg: object, now_ns: int) -> list[Action]:
        """Decision / CacheSet / CacheClear from the ALE; anything else is logged and ignored."""
        if isinstance(msg, Decision):
            return self._on_decision(msg, now_ns)
        if isinstance(msg, CacheSet):
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
            cacheable = flow.protocol in (pk.TCP, pk.UDP)
            if cacheable and flow not in self.cache:
                # The ALE also sends CacheSet; taking the verdict here too keeps later packets
                # right whichever of the two messages arrives first.
                out += self._on_cache_set(flow, verdict, now_ns)
            self._unpend(flow)
            acts = self._enforce(
                h.token, h.raw, h.parsed, flow, verdict, h.outbound, h.loopback, now_ns
            )
            for token, raw, p, outbound, loopback in h.followers:
                acts += self._enforce(token, raw, p, flow, verdict, outbound, loopback, now_ns)
            if flow.protocol == pk.TCP and verdict.passes and flow not in self.live:
                self.live.add(flow)
                out += self._refresh(flow)
            if (
                flow.protocol == pk.TCP
                and flow in self.per_packet
                and verdict.passes
                and not self._covered(flow)
            ):
                # Its next packets (SYN-ACK, data, redirect replies) must already be diverted.
                self._parked.append((self._gen_requested, acts))
            else:
                out += acts
        return out

    def _on_cache_set(self, flow: Flow, verdict: Verdict, now_ns: int) -> list[Action]:
        if flow.protocol not in (pk.TCP, pk.UDP):
            log.warning("CacheSet for non-TCP/UDP %s ignored (never cached)", _fmt(flow))
            return []
        self.cache[flow] = verdict
        self.reask.discard(flow)
        if verdict.is_redirect:
            ip, port, _ = self._target(flow, verdict)
            self._add_redirect(flow, ip, port)
        else:
            self._drop_redirect(flow)
        if len(self.cache) > self.config.max_flows:
            oldest = next(iter(self.cache))
            log.warning("flow table full: forgetting %s", _fmt(oldest))
            self._forget(oldest)
        self._seen[flow] = now_ns
        if flow.protocol == pk.TCP:
            return self._refresh(flow)
        return []

    def _refresh(self, flow: Flow) -> list[Action]:
        """Re-decide whether every packet of TCP `flow` must be diverted.

        Temporary accepts and redirects: always (each packet is asked / rewritten). Blocks and
        drops: unless it is a connection attempt we are asking about right now and never let
        through - a refused SYN's retransmits already match the base filter, and this avoids
        a handle swap per blocked attempt. A connection we know nothing about (e.g. resent by
        the ALE after our restart) may be established: divert it. After CacheClear: always.
        """
        verdict = self.cache.get(flow)
        if flow in self.reask:
            need = True
        elif verdict is None or verdict is Verdict.PERMANENT_ACCEPT:
            need = False
        else:
            attempt = flow not in self.live and flow in self._pending
            need = verdict is Verdict.ACCEPT or verdict.is_redirect or not attempt
        if need:
            self.per_packet.add(flow)
        else:
            self.per_packet.discard(flow)
        return self._filter_actions()

    def _on_cache_clear(self) -> list[Action]:
        live = [f for f in self.live if f not in self.ended]
        log.info(
            "CacheClear: forgetting %d verdicts, %d live TCP connections will be re-asked",
            len(self.cache),
            len(live),
        )
        self.cache.clear()
        self._seen.clear()
        self.reask.update(live)
        self.per_packet = set(live)
        return self._filter_actions()

    # ---- filter -----------------------------------------------------------------------------

    def _wanted_ports(self) -> frozenset[int] | None:
        ports = frozenset(f.local_port for f in self.per_packet)
        return None if len(ports) > self.config.max_filter_ports else ports

    def _filter_actions(self) -> list[Action]:
        ports = self._wanted_ports()
        if ports == self._ports_requested:
            return []
        self._gen_requested += 1
        self._ports_requested = ports
        self.counters["filter_changes"] += 1
        return [SetFilter(self._gen_requested, ports)]

    def _covered(self, flow: Flow) -> bool:
        active = self._ports_active
        return active is None or flow.local_port in active

    def filter_active(self, generation: int, ports: frozenset[int] | None) -> list[Action]:
        """The shell's handle for `generation` now diverts `ports`: release what waited on it."""
        self._ports_active = ports
        ready = [acts for gen, acts in self._parked if gen <= generation]
        self._parked = [(gen, acts) for gen, acts in self._parked if gen > generation]
        return [a for acts in ready for a in acts]

    # ---- housekeeping -----------------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Action]:
        """Expire held packets and forgotten connections; call a few times per second."""
        out: list[Action] = []
        ttl = self.config.hold_ttl_ns
        expired = []
        for (
            hold_id,
            h,
        ) in self.held.items():  # hold_id order is arrival order: stop at the first young
            if now_ns - h.seen_ns <= ttl:
                break
            expired.append(hold_id)
        for hold_id in expired:
            h = self.held.pop(hold_id)
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
            out.append(Drop(h.token))
            out += [Drop(t) for t, *_ in h.followers]
        if now_ns - self._last_sweep_ns >= 1_000_000_000:
            self._last_sweep_ns = now_ns
            grace = self.config.ended_grace_ns
            for f in [f for f, t in self.ended.items() if now_ns - t > grace]:
                self._forget(f)
            idle = self.config.idle_ns
            live = self.live
            for f in [f for f, t in self._seen.items() if now_ns - t > idle and f not in live]:
                self._forget(f)
            out += self._filter_actions()
        return out

    def _unpend(self, flow: Flow) -> None:
        n = self._pending.get(flow, 0) - 1
        if n > 0:
            self._pending[flow] = n
        else:
            self._pending.pop(flow, None)

    def _forget(self, flow: Flow) -> None:
        self.cache.pop(flow, None)
        self.ended.pop(flow, None)
        self._seen.pop(flow, None)
        self.per_packet.discard(flow)
        self.reask.discard(flow)
        self.live.discard(flow)
        self._drop_redirect(flow)


def _fmt(flow: Flow) -> str:
    try:
        lip = ipaddress.ip_address(flow.local_ip)
        rip = ipaddress.ip_address(flow.remote_ip)
    except ValueError:
        return repr(flow)
    return f"proto {flow.protocol} {lip}:{flow.local_port} <-> {rip}:{flow.remote_port}"
