"""The capture core's verdict rules, driven with crafted packets and ALE messages."""

from __future__ import annotations

import pytest

from kextless.actors.capture import packets as pk
from kextless.actors.capture.core import (
    Action,
    CaptureCore,
    Config,
    Connection,
    Drop,
    Inject,
    Pass,
    Reroute,
    SetFilter,
    ToAle,
)
from kextless.base.cores import Core
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import (
    CacheClear,
    CacheSet,
    CaptureReady,
    Decision,
    Flow,
    Hello,
    PacketHeld,
)
from tests.actors.capture import crafted as c
from tests.actors.capture.crafted import a

L4, R4 = "10.0.0.1", "10.0.0.2"
L6, R6 = "fd00::1", "fd00::2"
NOW = 1_000_000_000


class Tok:
    """Stands in for the shell's captured packet."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Tok({self.name})"


def feed(
    core: CaptureCore,
    raw: bytes,
    outbound: bool = True,
    loopback: bool = False,
    now: int = NOW,
    name: str = "p",
) -> tuple[Tok, list]:
    t = Tok(name)
    return t, core.on_packet(t, raw, outbound, loopback, now)


def asked(acts: list) -> list[PacketHeld]:
    return [x.msg for x in acts if isinstance(x, ToAle) and isinstance(x.msg, PacketHeld)]


def syn_out(sport: int = 40000, dport: int = 80, seq: int = 1000) -> bytes:
    return c.v4(L4, R4, c.tcp(sport, dport, c.SYN, seq=seq))


def tcp_flow(lport: int = 40000, rport: int = 80) -> Flow:
    return Flow(6, a(L4), lport, a(R4), rport)


def accept_connection(core: CaptureCore, verdict: Verdict = Verdict.PERMANENT_ACCEPT) -> Flow:
    _, acts = feed(core, syn_out())
    (held,) = asked(acts)
    core.on_message(CacheSet(held.flow, verdict), NOW)
    out = core.on_message(Decision((held.hold_id,), verdict), NOW)
    for x in out:
        if isinstance(x, SetFilter):
            out += core.filter_active(x.generation, x.ports, NOW)
    return held.flow


def test_start_announces_capture_ready() -> None:
    assert CaptureCore().start(42, NOW) == [ToAle(CaptureReady(42))]


def test_miss_asks_with_a_direction_agnostic_flow() -> None:
    core = CaptureCore()
    _t, acts = feed(core, syn_out())
    (held,) = asked(acts)
    assert (held.hold_id, held.direction, held.flow) == (1, Direction.OUTBOUND, tcp_flow())
    assert held.packet == syn_out() and held.seen_ns == NOW and held.process_id == 0
    raw_in = c.v4(R4, L4, c.tcp(80, 40001, c.SYN))
    _, acts = feed(core, raw_in, outbound=False)
    (held2,) = asked(acts)
    assert held2.hold_id == 2 and held2.direction == Direction.INBOUND
    assert held2.flow == Flow(6, a(L4), 40001, a(R4), 80)  # local side is still ours


def test_permanent_accept_releases_and_passes_later_packets_without_asking() -> None:
    core = CaptureCore()
    t, acts = feed(core, syn_out())
    (held,) = asked(acts)
    core.on_message(CacheSet(held.flow, Verdict.PERMANENT_ACCEPT), NOW)
    assert core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW) == [Pass(t)]
    t2, acts = feed(core, syn_out())  # a later SYN (retransmit) hits the cache
    assert acts == [Pass(t2)]
    t3, acts = feed(core, c.v4(R4, L4, c.tcp(80, 40000, c.FIN | c.ACK)), outbound=False)
    assert acts == [Pass(t3)]


def test_decision_alone_also_caches_the_verdict() -> None:
    core = CaptureCore()
    _, acts = feed(core, c.v4(L4, R4, c.udp(5000, 9999)))
    (held,) = asked(acts)
    core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW)
    t, acts = feed(core, c.v4(L4, R4, c.udp(5000, 9999, b"second")))
    assert acts == [Pass(t)]


@pytest.mark.parametrize("v6", [False, True])
def test_block_resets_tcp_to_the_local_app(v6: bool) -> None:
    core = CaptureCore()
    raw = (
        c.v6(L6, R6, c.tcp(40000, 80, c.SYN, seq=9))
        if v6
        else c.v4(L4, R4, c.tcp(40000, 80, c.SYN, seq=9))
    )
    t, acts = feed(core, raw)
    (held,) = asked(acts)
    out = core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_BLOCK), NOW)
    assert out[0] == Drop(t)
    inj = out[1]
    assert isinstance(inj, Inject) and inj.inbound and inj.like is t
    q = pk.parse(inj.raw)
    assert q is not None and q.flags == c.RST | c.ACK and q.ack == 10 and q.dport == 40000
    assert c.l4_checksum_ok(inj.raw)


def test_inbound_block_resets_the_remote() -> None:
    core = CaptureCore()
    _t, acts = feed(core, c.v4(R4, L4, c.tcp(5555, 22, c.SYN)), outbound=False)
    (held,) = asked(acts)
    out = core.on_message(Decision((held.hold_id,), Verdict.BLOCK), NOW)
    inj = out[1]
    assert isinstance(inj, Inject) and not inj.inbound
    q = pk.parse(inj.raw)
    assert q is not None and (q.src, q.dst, q.dport) == (a(L4), a(R4), 5555)


@pytest.mark.parametrize(
    "verdict", [Verdict.UNDETERMINABLE, Verdict.FAILED, Verdict.BLOCK, Verdict.PERMANENT_BLOCK]
)
def test_udp_block_answers_port_unreachable(verdict: Verdict) -> None:
    core = CaptureCore()
    raw = c.v4(L4, R4, c.udp(5000, 53))
    t, acts = feed(core, raw)
    (held,) = asked(acts)
    drop, inj = core.on_message(Decision((held.hold_id,), verdict), NOW)
    assert drop == Drop(t) and isinstance(inj, Inject) and inj.inbound
    assert inj.raw[20:22] == bytes([3, 3]) and inj.raw[28:48] == raw[:20]


@pytest.mark.parametrize("verdict", [Verdict.DROP, Verdict.PERMANENT_DROP, Verdict.UNDECIDED])
def test_drop_verdicts_are_silent(verdict: Verdict) -> None:
    core = CaptureCore()
    t, acts = feed(core, c.v4(L4, R4, c.udp(5000, 53)))
    (held,) = asked(acts)
    assert core.on_message(Decision((held.hold_id,), verdict), NOW) == [Drop(t)]


def test_permanent_block_and_drop_are_enforced_locally() -> None:
    core = CaptureCore()
    f_block = Flow(17, a(L4), 5000, a(R4), 53)
    f_drop = Flow(17, a(L4), 5001, a(R4), 53)
    core.on_message(CacheSet(f_block, Verdict.PERMANENT_BLOCK), NOW)
    core.on_message(CacheSet(f_drop, Verdict.PERMANENT_DROP), NOW)
    t, acts = feed(core, c.v4(L4, R4, c.udp(5000, 53)))
    assert acts[0] == Drop(t) and isinstance(acts[1], Inject)
    t, acts = feed(core, c.v4(L4, R4, c.udp(5001, 53)))
    assert acts == [Drop(t)]
    assert core.counters["asked"] == 0


def test_icmp_block_is_a_silent_drop_and_icmp_is_never_cached() -> None:
    core = CaptureCore()
    t, acts = feed(core, c.v4(L4, R4, c.icmp_echo()))
    (held,) = asked(acts)
    assert held.flow == Flow(1, a(L4), 0, a(R4), 0)
    assert core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_BLOCK), NOW) == [Drop(t)]
    core.on_message(CacheSet(held.flow, Verdict.PERMANENT_ACCEPT), NOW)
    _, acts = feed(core, c.v4(L4, R4, c.icmp_echo(seq=2)))
    assert len(asked(acts)) == 1  # every ICMP packet is a request


@pytest.mark.parametrize("v6", [False, True], ids=["icmp", "icmpv6"])
def test_an_echo_reply_is_asked_inbound_under_the_requests_local_first_flow(v6: bool) -> None:
    """As the kext does (every ICMP packet is asked, with the direction it travels): the
    reply is not a new outbound connection of the peer's, but the same local-first flow
    coming in, so a client keys both to one connection (Portmaster: proto-local-remote)."""
    core = CaptureCore()
    lip, rip = (L6, R6) if v6 else (L4, R4)
    build = c.v6 if v6 else c.v4
    proto, echo = c.icmp_echo(v6)
    reply = bytes([129 if v6 else 0]) + echo[1:]
    t, acts = feed(core, build(lip, rip, (proto, echo)))
    (out,) = asked(acts)
    assert core.on_message(Decision((out.hold_id,), Verdict.PERMANENT_ACCEPT), NOW) == [Pass(t)]
    t2, acts = feed(core, build(rip, lip, (proto, reply)), outbound=False)
    (back,) = asked(acts)
    assert (out.direction, back.direction) == (Direction.OUTBOUND, Direction.INBOUND)
    assert out.flow == back.flow == Flow(proto, a(lip), 0, a(rip), 0)
    assert core.on_message(Decision((back.hold_id,), Verdict.PERMANENT_ACCEPT), NOW) == [Pass(t2)]
    assert not core.connections  # nothing cached: the next echo is asked again


@pytest.mark.parametrize(
    ("proto", "icmp_type", "kind"),
    [(1, 8, "request"), (1, 0, "reply"), (1, 3, ""), (58, 128, "request"), (58, 129, "reply"),
     (58, 1, ""), (6, 8, "")],
)  # fmt: skip
def test_only_echoes_are_looked_up_for_their_sender(proto: int, icmp_type: int, kind: str) -> None:
    from kextless.actors.capture.shell import _icmp_echo

    v6 = proto == 58
    lip, rip = (L6, R6) if v6 else (L4, R4)
    body = bytes([icmp_type]) + c.icmp_echo(v6)[1][1:]
    raw = (c.v6 if v6 else c.v4)(lip, rip, (proto, body) if proto != 6 else c.tcp(1, 2, c.SYN))
    msg = PacketHeld(1, Flow(proto, a(lip), 0, a(rip), 0), Direction.OUTBOUND, raw, NOW)
    assert _icmp_echo(msg) == kind


def test_ipv6_neighbour_discovery_is_never_held() -> None:
    core = CaptureCore()
    ns = (58, bytes([135, 0, 0, 0]) + b"\0" * 20)
    t, acts = feed(core, c.v6(L6, "ff02::1:ff00:2", ns))
    assert acts == [Pass(t)]


def test_temporary_verdict_asks_for_every_packet_and_diverts_the_connection() -> None:
    core = CaptureCore()
    t, acts = feed(core, syn_out())
    (held,) = asked(acts)
    out = core.on_message(CacheSet(held.flow, Verdict.ACCEPT), NOW)
    assert out == [SetFilter(1, frozenset({40000}))]
    # The SYN must not leave before the SYN-ACK is sure to be diverted.
    assert core.on_message(Decision((held.hold_id,), Verdict.ACCEPT), NOW) == []
    assert core.filter_active(1, frozenset({40000}), NOW) == [Pass(t)]
    hold_ids = set()
    for i, (raw, out_) in enumerate(
        [
            (c.v4(R4, L4, c.tcp(80, 40000, c.SYN | c.ACK)), False),
            (c.v4(L4, R4, c.tcp(40000, 80, c.ACK, seq=1001)), True),
            (c.v4(L4, R4, c.tcp(40000, 80, c.ACK | c.PSH, seq=1001, payload=b"GET")), True),
        ]
    ):
        _, acts = feed(core, raw, outbound=out_, name=f"p{i}")
        (h,) = asked(acts)
        hold_ids.add(h.hold_id)
    assert len(hold_ids) == 3 and held.hold_id not in hold_ids


def test_retransmitted_syn_is_held_without_a_new_request() -> None:
    core = CaptureCore()
    t1, acts = feed(core, syn_out(seq=5))
    (held,) = asked(acts)
    t2, acts = feed(core, syn_out(seq=5), now=NOW + 1_000_000_000)
    assert acts == [] and core.counters["retransmits_held"] == 1
    _t3, acts = feed(core, syn_out(seq=6))  # a different SYN is a new request
    assert len(asked(acts)) == 1
    out = core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW)
    assert out == [Pass(t1), Pass(t2)]


def test_cache_clear_reasks_live_connections_on_their_next_packet() -> None:
    core = CaptureCore()
    flow = accept_connection(core)
    data = c.v4(L4, R4, c.tcp(40000, 80, c.ACK, seq=2000, payload=b"x"))
    t, acts = feed(core, data)
    assert acts == [Pass(t)]  # (only diverted because of port grouping; cache hit)
    out = core.on_message(CacheClear(), NOW)
    assert out == [SetFilter(1, frozenset({40000}))]  # live connection: divert it again
    _, acts = feed(core, data)
    (h,) = asked(acts)
    assert h.flow == flow
    out = core.on_message(CacheSet(flow, Verdict.PERMANENT_ACCEPT), NOW)
    assert out == [SetFilter(2, frozenset())]  # answered for good: back to fast path


def test_update_to_block_diverts_and_resets_a_live_connection() -> None:
    core = CaptureCore()
    flow = accept_connection(core)
    out = core.on_message(CacheSet(flow, Verdict.PERMANENT_BLOCK), NOW)
    assert out == [SetFilter(1, frozenset({40000}))]
    raw = c.v4(R4, L4, c.tcp(80, 40000, c.ACK, seq=1, ack=1001, payload=b"d" * 100))
    t, acts = feed(core, raw, outbound=False)
    drop, to_remote, to_local = acts
    assert drop == Drop(t) and isinstance(to_remote, Inject) and isinstance(to_local, Inject)
    assert not to_remote.inbound and to_local.inbound  # both ends are reset
    r, lo = pk.parse(to_remote.raw), pk.parse(to_local.raw)
    assert r is not None and (r.dst, r.dport, r.seq, r.flags) == (a(R4), 80, 1001, c.RST)
    assert lo is not None and (lo.src, lo.dst, lo.dport, lo.seq) == (a(R4), a(L4), 40000, 1)
    assert c.l4_checksum_ok(to_remote.raw) and c.l4_checksum_ok(to_local.raw)


def test_blocked_connection_attempt_needs_no_filter_change() -> None:
    core = CaptureCore()
    _, acts = feed(core, syn_out())
    (held,) = asked(acts)
    assert core.on_message(CacheSet(held.flow, Verdict.PERMANENT_BLOCK), NOW) == []


def test_too_many_ports_fall_back_to_all_tcp() -> None:
    core = CaptureCore(Config(max_filter_ports=2))
    filters = []
    for port in (1, 2, 3):
        filters += core.on_message(CacheSet(tcp_flow(port), Verdict.ACCEPT), NOW)
    assert filters == [
        SetFilter(1, frozenset({1})),
        SetFilter(2, frozenset({1, 2})),
        SetFilter(3, None),
    ]


def test_redirect_nameserver_rewrites_query_and_reply() -> None:
    core = CaptureCore()
    query = c.v4(L4, "10.0.0.99", c.udp(40000, 53, b"dns?"))
    t, acts = feed(core, query)
    (held,) = asked(acts)
    (r,) = core.on_message(Decision((held.hold_id,), Verdict.REDIRECT_NAME_SERVER), NOW)
    assert isinstance(r, Reroute) and r.token is t and r.loopback
    q = pk.parse(r.raw)
    assert q is not None
    assert (q.src, q.sport, q.dst, q.dport) == (a(L4), 40000, a("127.0.0.1"), 53)
    assert c.l4_checksum_ok(r.raw)
    # The local resolver answers the app's own address (seen on lo, as outbound).
    reply = c.v4("127.0.0.1", L4, c.udp(53, 40000, b"answer"))
    _t2, acts = feed(core, reply, outbound=True, loopback=True)
    (r2,) = acts
    assert isinstance(r2, Reroute) and r2.loopback
    q2 = pk.parse(r2.raw)
    assert q2 is not None
    assert (q2.src, q2.sport, q2.dst, q2.dport) == (a("10.0.0.99"), 53, a(L4), 40000)
    assert c.l4_checksum_ok(r2.raw)
    # Later queries of the connection are redirected without asking.
    _t3, acts = feed(core, query)
    assert isinstance(acts[0], Reroute) and core.counters["asked"] == 1


def test_redirect_tunnel_targets_the_own_address_and_configured_port() -> None:
    core = CaptureCore(Config(tunnel_port=7171))
    _t, acts = feed(core, c.v6(L6, "fd00::99", c.tcp(40000, 443, c.SYN)))
    (held,) = asked(acts)
    core.on_message(CacheSet(held.flow, Verdict.REDIRECT_TUNNEL), NOW)
    core.filter_active(1, frozenset({40000}), NOW)
    (r,) = core.on_message(Decision((held.hold_id,), Verdict.REDIRECT_TUNNEL), NOW)
    assert isinstance(r, Reroute)
    q = pk.parse(r.raw)
    assert q is not None and (q.dst, q.dport, q.src) == (a(L6), 7171, a(L6))
    # The tunnel's own reply traffic (own address on both sides) is not asked about.
    back = c.v6(L6, L6, c.tcp(7171, 40000, c.SYN | c.ACK))
    _, acts = feed(core, back, loopback=True)
    assert isinstance(acts[0], Reroute)
    q = pk.parse(acts[0].raw)
    assert q is not None and (q.src, q.sport) == (a("fd00::99"), 443)


def test_excluded_ports_are_never_held() -> None:
    core = CaptureCore(Config(exclude_ports=frozenset({5555})))
    t, acts = feed(core, c.v4(L4, R4, c.tcp(40000, 5555, c.SYN)))
    assert acts == [Pass(t)]


def test_unparseable_is_dropped_and_fragments_pass() -> None:
    core = CaptureCore()
    t, acts = feed(core, b"\x45\x00garbage")
    assert acts == [Drop(t)] and core.counters["unparseable"] == 1
    t, acts = feed(core, c.v4(L4, R4, c.udp(1, 2), frag_offset=100))
    assert acts == [Pass(t)]


def test_end_of_an_unknown_connection_passes_unasked() -> None:
    core = CaptureCore()
    t, acts = feed(core, c.v4(L4, R4, c.tcp(40000, 80, c.FIN | c.ACK)))
    assert acts == [Pass(t)]


def test_loopback_packets_match_either_orientation() -> None:
    core = CaptureCore()
    flow = Flow(17, a("127.0.0.1"), 5000, a("127.0.0.1"), 6000)
    core.on_message(CacheSet(flow, Verdict.PERMANENT_ACCEPT), NOW)
    t, acts = feed(core, c.v4("127.0.0.1", "127.0.0.1", c.udp(6000, 5000)), loopback=True)
    assert acts == [Pass(t)]


def test_unknown_and_foreign_messages_are_ignored() -> None:
    core = CaptureCore()
    assert core.on_message(Decision((99,), Verdict.ACCEPT), NOW) == []
    assert core.on_message(Hello("x", 1, 1), NOW) == []
    assert core.counters["unknown_hold_id"] == 1


def test_held_packets_expire_fail_closed() -> None:
    core = CaptureCore(Config(hold_ttl_ns=5_000_000_000))
    t, _acts = feed(core, syn_out())
    assert core.on_deadline(NOW + 4_000_000_000) == []
    assert Drop(t) in core.on_deadline(NOW + 6_000_000_000)
    assert core.held == {}


def test_new_syn_after_the_connection_ended_is_asked_again() -> None:
    core = CaptureCore()
    accept_connection(core)
    feed(core, c.v4(R4, L4, c.tcp(80, 40000, c.RST)), outbound=False)
    _, acts = feed(core, syn_out(seq=999999))
    assert len(asked(acts)) == 1


def test_ended_connections_are_forgotten_after_the_grace_period() -> None:
    core = CaptureCore(Config(ended_grace_ns=1_000_000_000))
    flow = accept_connection(core, Verdict.ACCEPT)
    assert core.connections[flow].per_packet
    feed(core, c.v4(R4, L4, c.tcp(80, 40000, c.FIN | c.ACK)), outbound=False)  # asked: held
    out = core.on_deadline(NOW + 3_000_000_000)
    assert SetFilter(2, frozenset()) in out
    # Forgotten; only the count of its packets still held remains, for their Decision.
    assert core.connections[flow] == Connection(flow, pending=1)


def test_block_for_an_unknown_connection_diverts_it() -> None:
    """E.g. resent by the ALE after a capture restart: it may be established, stop it."""
    core = CaptureCore()
    assert core.on_message(CacheSet(tcp_flow(), Verdict.PERMANENT_BLOCK), NOW) == [
        SetFilter(1, frozenset({40000}))
    ]


def test_block_decision_without_cache_set_needs_no_filter_change() -> None:
    core = CaptureCore()
    _t, acts = feed(core, syn_out())
    (held,) = asked(acts)
    out = core.on_message(Decision((held.hold_id,), Verdict.BLOCK), NOW)
    assert not [a for a in out if isinstance(a, SetFilter)]


def test_idle_connections_are_forgotten() -> None:
    core = CaptureCore(Config(idle_ns=10_000_000_000))
    core.on_message(CacheSet(Flow(17, a(L4), 5000, a(R4), 53), Verdict.PERMANENT_ACCEPT), NOW)
    core.on_deadline(NOW + 5_000_000_000)
    assert core.connections
    core.on_deadline(NOW + 11_000_000_000)
    assert not core.connections


def test_quiet_established_tcp_is_not_forgotten() -> None:
    core = CaptureCore(Config(idle_ns=10_000_000_000))
    flow = accept_connection(core)
    core.on_deadline(NOW + 3600_000_000_000)
    assert core.connections[flow].verdict is Verdict.PERMANENT_ACCEPT
    assert core.on_message(CacheClear(), NOW) == [SetFilter(1, frozenset({40000}))]


def test_resync_reasks_what_was_held_before_the_ale_went_away() -> None:
    core = CaptureCore()
    _, acts = feed(core, syn_out(seq=1))
    (first,) = asked(acts)
    mark = core.next_hold_id()
    _, acts = feed(core, syn_out(sport=40001))  # sent while the ALE was away: still queued
    out = core.resync(7, mark, NOW)
    assert out == [ToAle(CaptureReady(7)), ToAle(first)]


# ---- the shape of a core, deadlines, and the connection cache --------------------------------

S = 1_000_000_000


def test_core_has_the_shape_of_every_actor_core() -> None:
    core: Core[Action] = CaptureCore()
    assert core.next_deadline_ns() is None  # nothing to do on its own
    assert core.on_deadline(NOW) == []


def test_held_packet_expires_at_its_deadline_and_not_before() -> None:
    core = CaptureCore(Config(hold_ttl_ns=5 * S))
    t1, _ = feed(core, syn_out(sport=40000), now=NOW)
    t2, _ = feed(core, syn_out(sport=40001), now=NOW + 2 * S)
    deadline = core.next_deadline_ns()
    assert deadline == NOW + 5 * S + 1  # the oldest held packet's
    assert core.on_deadline(deadline - 1) == [] and len(core.held) == 2
    assert core.on_deadline(deadline) == [Drop(t1)]
    assert core.next_deadline_ns() == NOW + 7 * S + 1
    assert core.on_deadline(NOW + 7 * S + 1) == [Drop(t2)]
    assert core.next_deadline_ns() is None and core.connections == {}


def test_a_decided_packet_no_longer_sets_the_deadline() -> None:
    core = CaptureCore(Config(hold_ttl_ns=5 * S))
    _, acts = feed(core, c.v4(L4, R4, c.icmp_echo()), now=NOW)
    feed(core, c.v4(L4, R4, c.icmp_echo(seq=2)), now=NOW + S)
    core.on_message(Decision((asked(acts)[0].hold_id,), Verdict.ACCEPT), NOW + S)
    assert core.next_deadline_ns() == NOW + 6 * S + 1


def test_ended_connection_is_forgotten_at_its_deadline_and_not_before() -> None:
    core = CaptureCore(Config(ended_grace_ns=2 * S))
    flow = accept_connection(core)
    feed(core, c.v4(R4, L4, c.tcp(80, 40000, c.FIN | c.ACK)), outbound=False, now=NOW + S)
    deadline = core.next_deadline_ns()
    assert deadline == NOW + 3 * S + 1
    assert core.on_deadline(deadline - 1) == [] and flow in core.connections
    core.on_deadline(deadline)
    assert flow not in core.connections
    assert core.next_deadline_ns() is None


def test_idle_connection_is_forgotten_at_its_deadline_and_not_before() -> None:
    core = CaptureCore(Config(idle_ns=10 * S))
    flow = Flow(17, a(L4), 5000, a(R4), 53)
    core.on_message(CacheSet(flow, Verdict.PERMANENT_ACCEPT), NOW)
    feed(core, c.v4(L4, R4, c.udp(5000, 53)), now=NOW + 4 * S)  # a cache hit: seen again
    # The first look comes 10 s after the CacheSet; the packet since then moves the expiry.
    assert core.next_deadline_ns() == NOW + 10 * S + 1
    assert core.on_deadline(NOW + 10 * S + 1) == [] and flow in core.connections
    deadline = core.next_deadline_ns()
    assert deadline == NOW + 14 * S + 1
    core.on_deadline(deadline - 1)
    assert flow in core.connections
    core.on_deadline(deadline)
    assert flow not in core.connections and core.next_deadline_ns() is None


def test_quiet_live_tcp_sets_no_deadline() -> None:
    core = CaptureCore(Config(idle_ns=10 * S))
    accept_connection(core)
    core.on_deadline(core.next_deadline_ns() or 0)  # its first look finds it live
    assert core.next_deadline_ns() is None


def test_forget_leaves_no_trace() -> None:
    core = CaptureCore(Config(ended_grace_ns=S))
    _, acts = feed(core, c.v4(L4, R4, c.tcp(40000, 443, c.SYN)))
    (held,) = asked(acts)
    flow = held.flow
    core.on_message(CacheSet(flow, Verdict.REDIRECT_TUNNEL), NOW)
    core.filter_active(1, frozenset({40000}), NOW)
    core.on_message(Decision((held.hold_id,), Verdict.REDIRECT_TUNNEL), NOW)
    conn = core.connections[flow]
    assert conn.live and conn.per_packet and conn.redirect in core.replies
    fin = c.v4(L4, R4, c.tcp(40000, 443, c.FIN | c.ACK))
    feed(core, fin, now=NOW + S)  # redirected, not held
    out = core.on_deadline(NOW + 2 * S + 1)
    assert out == [SetFilter(2, frozenset())]
    assert core.connections == {} and core.replies == {} and core.held == {}
    assert core._port_refs == {} and core._cached == 0
    assert core.next_deadline_ns() is None


def test_a_port_freed_by_a_new_syn_leaves_the_filter_a_second_later() -> None:
    """One re-derivation per second at most, as the per-second sweep did: the port is often
    wanted again at once (the new connection gets the same verdict)."""
    core = CaptureCore()
    accept_connection(core, Verdict.ACCEPT)  # per-packet on 40000
    feed(core, c.v4(R4, L4, c.tcp(80, 40000, c.RST)), outbound=False)
    _, acts = feed(core, syn_out(seq=7), now=NOW + S)  # reuses the ended tuple: forgotten
    assert len(asked(acts)) == 1 and not [x for x in acts if isinstance(x, SetFilter)]
    assert core.next_deadline_ns() == NOW + 2 * S
    assert core.on_deadline(NOW + 2 * S - 1) == []
    assert core.on_deadline(NOW + 2 * S) == [SetFilter(2, frozenset())]


def test_flow_table_bound_forgets_the_oldest_verdict() -> None:
    core = CaptureCore(Config(max_flows=2))
    _, acts = feed(core, syn_out(sport=39999))  # its record exists first, with no verdict
    (held,) = asked(acts)
    first, second = tcp_flow(40001), tcp_flow(40002)
    core.on_message(CacheSet(first, Verdict.PERMANENT_ACCEPT), NOW)
    core.on_message(CacheSet(second, Verdict.PERMANENT_ACCEPT), NOW)
    core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW)
    assert first not in core.connections  # the oldest verdict, not the oldest record
    assert {held.flow, second} <= core.connections.keys()


def test_a_shared_reply_key_outlives_the_connection_that_set_it_first() -> None:
    core = CaptureCore(Config(idle_ns=10 * S))
    to_r4, to_r6 = Flow(17, a(L4), 40000, a(R4), 53), Flow(17, a(L4), 40000, a("10.0.0.6"), 53)
    core.on_message(CacheSet(to_r4, Verdict.REDIRECT_NAME_SERVER), NOW)
    core.on_message(CacheSet(to_r6, Verdict.REDIRECT_NAME_SERVER), NOW + 5 * S)
    core.on_deadline(NOW + 10 * S + 1)  # the first one idles out
    assert to_r4 not in core.connections
    reply = c.v4("127.0.0.1", L4, c.udp(53, 40000, b"answer"))
    (r,) = feed(core, reply, loopback=True)[1]
    q = pk.parse(r.raw) if isinstance(r, Reroute) else None
    assert q is not None and (q.src, q.sport) == (a("10.0.0.6"), 53)


def test_expiry_schedule_stays_bounded_under_churn() -> None:
    core = CaptureCore(Config(max_flows=10))
    for port in range(1, 5001):
        core.on_message(CacheSet(Flow(17, a(L4), port, a(R4), 53), Verdict.ACCEPT), NOW)
        assert len(core._expiry) <= 2 * len(core.connections) + 1025
    assert len(core.connections) == 10
