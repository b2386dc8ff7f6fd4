"""The capture core's handling of connections that existed before it started."""

from __future__ import annotations

import pytest

from kextless.actors.capture import packets as pk
from kextless.actors.capture.core import (
    Action,
    CaptureCore,
    Config,
    DestroySocket,
    Drop,
    ExistingFlow,
    ExistingMode,
    Inject,
    Pass,
    ScanExisting,
    SetFilter,
    ToAle,
)
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import CacheSet, CaptureReady, Decision, Flow, PacketHeld
from tests.actors.capture import crafted as c
from tests.actors.capture.crafted import a

L4, R4 = "10.0.0.1", "10.0.0.2"
L6, R6 = "fd00::1", "fd00::2"
NOW = 1_000_000_000
MS = 1_000_000

OUT4 = ExistingFlow(Flow(6, a(L4), 40000, a(R4), 80), Direction.OUTBOUND)
IN6 = ExistingFlow(Flow(6, a(L6), 8080, a(R6), 50000), Direction.INBOUND)


class Tok:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Tok({self.name})"


def asked(acts: list[Action]) -> list[PacketHeld]:
    return [x.msg for x in acts if isinstance(x, ToAle) and isinstance(x.msg, PacketHeld)]


def activate(core: CaptureCore, acts: list[Action]) -> list[Action]:
    """What the shell does with SetFilter: open the handle, report it active."""
    out = [x for x in acts if not isinstance(x, SetFilter)]
    for x in acts:
        if isinstance(x, SetFilter):
            out += core.filter_active(x.generation, x.ports, NOW)
    return out


def data_out(seq: int = 5000, ack: int = 9000, payload: bytes = b"hi") -> bytes:
    return c.v4(L4, R4, c.tcp(40000, 80, c.ACK | c.PSH, seq=seq, ack=ack, payload=payload))


def data_in(seq: int = 9000, ack: int = 5000, payload: bytes = b"yo") -> bytes:
    return c.v4(R4, L4, c.tcp(80, 40000, c.ACK | c.PSH, seq=seq, ack=ack, payload=payload))


def test_each_unknown_flow_is_reported_once_and_diverted_per_packet() -> None:
    core = CaptureCore()
    acts = core.existing([OUT4, IN6], NOW)
    held = asked(acts)
    assert [(m.flow, m.direction) for m in held] == [
        (OUT4.flow, Direction.OUTBOUND),
        (IN6.flow, Direction.INBOUND),
    ]
    assert SetFilter(1, frozenset({40000, 8080})) in acts
    # A second scan (or the same flow listed twice) does not ask again.
    assert asked(core.existing([OUT4, IN6], NOW + 1)) == []
    assert core.counters["existing_asked"] == 2 and core.counters["existing_known"] == 2


@pytest.mark.parametrize("e", [OUT4, IN6], ids=["out-v4", "in-v6"])
def test_the_synthetic_packet_agrees_with_the_metadata(e: ExistingFlow) -> None:
    (held,) = asked(CaptureCore().existing([e], NOW))
    p = pk.parse(held.packet)
    assert p is not None and c.l4_checksum_ok(held.packet)
    f = e.flow
    if e.direction is Direction.OUTBOUND:
        assert (p.src, p.sport, p.dst, p.dport) == (
            f.local_ip,
            f.local_port,
            f.remote_ip,
            f.remote_port,
        )
    else:
        assert (p.src, p.sport, p.dst, p.dport) == (
            f.remote_ip,
            f.remote_port,
            f.local_ip,
            f.local_port,
        )
    assert p.version == (6 if f.is_v6 else 4) and p.protocol == pk.TCP
    assert p.flags == pk.TCP_ACK and p.payload_len == 0
    assert len(held.packet) == (40 if p.version == 4 else 60)


def test_the_synthetic_packet_is_never_reinjected() -> None:
    core = CaptureCore()
    (held,) = asked(core.existing([OUT4], NOW))
    out = activate(core, core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW))
    assert not [x for x in out if isinstance(x, Pass | Inject | Drop)], out
    assert core.held == {}


@pytest.mark.parametrize("verdict", [Verdict.PERMANENT_BLOCK, Verdict.BLOCK, Verdict.FAILED])
@pytest.mark.parametrize("cache_set_first", [True, False])
def test_a_blocked_existing_connection_has_its_socket_aborted_at_once(
    verdict: Verdict, cache_set_first: bool
) -> None:
    core = CaptureCore()
    acts = core.existing([OUT4], NOW)
    (held,) = asked(acts)
    activate(core, acts)
    if cache_set_first:
        core.on_message(CacheSet(held.flow, verdict), NOW)
    out = core.on_message(Decision((held.hold_id,), verdict), NOW)
    # No packet of it may ever come (idle): its socket is aborted now, nothing is injected.
    assert out == [DestroySocket(OUT4.flow)]
    assert core.counters["existing_destroyed"] == 1
    # The kernel's abort resets the remote: that RST (from the local end) must pass.
    rst = c.v4(L4, R4, c.tcp(40000, 80, c.RST | c.ACK, seq=5000, ack=9000))
    t = Tok("kernel rst")
    assert core.on_packet(t, rst, True, False, NOW + MS) == [Pass(t)]
    # Aborted once: a later CacheSet or scan does not abort it again.
    if not cache_set_first:
        core.on_message(CacheSet(held.flow, verdict), NOW + 2 * MS)
    assert core.existing([OUT4], NOW + 3 * MS) == []


def test_a_rst_of_a_blocked_connection_we_did_not_abort_is_still_dropped() -> None:
    core = CaptureCore()
    core.on_message(CacheSet(OUT4.flow, Verdict.PERMANENT_BLOCK), NOW)
    rst = c.v4(L4, R4, c.tcp(40000, 80, c.RST | c.ACK, seq=5000, ack=9000))
    t = Tok("rst")
    assert core.on_packet(t, rst, True, False, NOW + MS) == [Drop(t)]


@pytest.mark.parametrize("verdict", [Verdict.PERMANENT_ACCEPT, Verdict.ACCEPT])
def test_an_accepted_existing_connection_is_left_alone(verdict: Verdict) -> None:
    core = CaptureCore()
    acts = core.existing([OUT4], NOW)
    (held,) = asked(acts)
    activate(core, acts)
    out = core.on_message(Decision((held.hold_id,), verdict), NOW)
    assert not [x for x in out if isinstance(x, DestroySocket)], out
    assert core.counters["existing_destroyed"] == 0


@pytest.mark.parametrize("verdict", [Verdict.PERMANENT_BLOCK, Verdict.PERMANENT_DROP])
def test_a_blocked_or_dropped_existing_connection_is_enforced_on_its_next_packet(
    verdict: Verdict,
) -> None:
    core = CaptureCore()
    acts = core.existing([OUT4], NOW)
    (held,) = asked(acts)
    activate(core, acts)
    core.on_message(CacheSet(held.flow, verdict), NOW)
    out = core.on_message(Decision((held.hold_id,), verdict), NOW)
    assert not [x for x in out if isinstance(x, Pass | Inject | Drop)], out  # nothing to reset yet
    # A drop is silent, as the kext's (no RST, no abort: kext-spec 4.2); a block aborts it.
    destroys = [x for x in out if isinstance(x, DestroySocket)]
    assert destroys == ([] if verdict is Verdict.PERMANENT_DROP else [DestroySocket(OUT4.flow)])
    assert core.connections[OUT4.flow].per_packet  # still diverted: the next packet is ours
    t = Tok("data")
    out = core.on_packet(t, data_out(), True, False, NOW + MS)
    if verdict is Verdict.PERMANENT_DROP:
        assert out == [Drop(t)]
        return
    assert out[0] == Drop(t)
    injects = [x for x in out if isinstance(x, Inject)]
    assert len(injects) == 2  # reset at both ends
    back = pk.parse(injects[0].raw)
    fwd = pk.parse(injects[1].raw)
    assert back is not None and fwd is not None
    # To the local app (inbound), numbered by the packet's ack; to the remote, by its seq.
    assert injects[0].inbound and (back.src, back.dst, back.seq) == (a(R4), a(L4), 9000)
    assert not injects[1].inbound and (fwd.src, fwd.dst, fwd.seq) == (a(L4), a(R4), 5000)
    assert back.flags & pk.TCP_RST and fwd.flags & pk.TCP_RST
    # An inbound packet of it is reset too.
    t2 = Tok("in")
    out = core.on_packet(t2, data_in(), False, False, NOW + 2 * MS)
    assert out[0] == Drop(t2) and len([x for x in out if isinstance(x, Inject)]) == 2


def test_packets_while_it_is_asked_join_the_request_and_get_its_verdict() -> None:
    core = CaptureCore()
    acts = core.existing([OUT4], NOW)
    (held,) = asked(acts)
    activate(core, acts)
    t = Tok("data")
    assert core.on_packet(t, data_out(), True, False, NOW + MS) == []  # held, not asked again
    out = core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_BLOCK), NOW + 2 * MS)
    assert out[0] == DestroySocket(OUT4.flow)
    assert out[1] == Drop(t) and len([x for x in out if isinstance(x, Inject)]) == 2


def test_permanent_accept_stops_diverting_it() -> None:
    core = CaptureCore()
    acts = core.existing([OUT4], NOW)
    (held,) = asked(acts)
    activate(core, acts)
    out = core.on_message(CacheSet(held.flow, Verdict.PERMANENT_ACCEPT), NOW)
    out += core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_ACCEPT), NOW)
    assert SetFilter(2, frozenset()) in out
    assert not core.connections[OUT4.flow].per_packet
    t = Tok("data")
    assert core.on_packet(t, data_out(), True, False, NOW + MS) == [Pass(t)]


def test_accept_mode_asks_nothing_and_caches_permanent_accept() -> None:
    core = CaptureCore(Config(existing=ExistingMode.ACCEPT))
    assert core.existing([OUT4, IN6], NOW) == []
    assert core.held == {}
    conn = core.connections[OUT4.flow]
    assert conn.verdict is Verdict.PERMANENT_ACCEPT and conn.live and not conn.per_packet
    t = Tok("data")
    assert core.on_packet(t, data_out(), True, False, NOW + MS) == [Pass(t)]


def test_a_flow_with_a_cached_verdict_is_not_asked() -> None:
    core = CaptureCore()
    core.on_message(CacheSet(OUT4.flow, Verdict.PERMANENT_BLOCK), NOW)  # the ALE's replay
    assert [m.flow for m in asked(core.existing([OUT4, IN6], NOW))] == [IN6.flow]
    assert core.connections[OUT4.flow].verdict is Verdict.PERMANENT_BLOCK


def test_a_flow_the_replay_knows_is_not_asked_whichever_way_round_it_is_listed() -> None:
    core = CaptureCore()
    rev = Flow(6, a(R4), 80, a(L4), 40000)
    core.on_message(CacheSet(rev, Verdict.PERMANENT_ACCEPT), NOW)
    assert asked(core.existing([OUT4], NOW)) == []


def test_excluded_ports_and_udp_are_not_asked() -> None:
    core = CaptureCore(Config(exclude_ports=frozenset({80})))
    udp = ExistingFlow(Flow(17, a(L4), 5353, a(R4), 53), Direction.OUTBOUND)
    assert core.existing([OUT4, udp], NOW) == [] and core.connections == {}


def test_the_scan_waits_for_the_replay_of_cached_verdicts() -> None:
    cfg = Config(
        existing_wait_ns=500 * MS, existing_quiet_ns=100 * MS, existing_max_wait_ns=900 * MS
    )
    core = CaptureCore(cfg)
    assert core.start(7, NOW) == [ToAle(CaptureReady(7))]
    assert core.next_deadline_ns() == NOW + 500 * MS
    assert core.on_deadline(NOW + 499 * MS) == []
    # A replay still arriving near the end pushes the scan back ...
    core.on_message(CacheSet(OUT4.flow, Verdict.PERMANENT_ACCEPT), NOW + 450 * MS)
    assert core.next_deadline_ns() == NOW + 550 * MS
    assert core.on_deadline(NOW + 520 * MS) == []
    # ... but never past the bound.
    core.on_message(CacheSet(IN6.flow, Verdict.PERMANENT_ACCEPT), NOW + 850 * MS)
    assert core.next_deadline_ns() == NOW + 900 * MS
    assert core.on_deadline(NOW + 900 * MS) == [ScanExisting()]
    assert ScanExisting() not in core.on_deadline(NOW + 2_000 * MS)  # once
    assert asked(core.existing([OUT4, IN6], NOW + 901 * MS)) == []  # both were replayed


def test_an_unanswered_synthetic_request_expires_quietly() -> None:
    core = CaptureCore(Config(hold_ttl_ns=10 * MS))
    acts = core.existing([OUT4], NOW)
    activate(core, acts)
    t = Tok("data")
    core.on_packet(t, data_out(), True, False, NOW + MS)
    assert core.on_deadline(NOW + 20 * MS) == [Drop(t)]  # its real packet: fail closed
    # Still unjudged and diverted: its next packet is asked like after CacheClear.
    t2 = Tok("again")
    (m,) = asked(core.on_packet(t2, data_out(seq=5002), True, False, NOW + 30 * MS))
    assert m.flow == OUT4.flow and m.packet == data_out(seq=5002)


def test_the_server_end_of_an_existing_local_connection_joins_its_request() -> None:
    core = CaptureCore()
    lo = a("127.0.0.1")
    e = ExistingFlow(Flow(6, lo, 50000, lo, 7100), Direction.OUTBOUND)
    acts = core.existing([e], NOW)
    (held,) = asked(acts)
    activate(core, acts)
    # On lo every packet is seen once, as outbound: the server's reply has the flow reversed.
    reply = c.v4("127.0.0.1", "127.0.0.1", c.tcp(7100, 50000, c.ACK | c.PSH, payload=b"r"))
    t = Tok("reply")
    assert core.on_packet(t, reply, True, True, NOW + MS) == []  # joined, not a new request
    out = core.on_message(Decision((held.hold_id,), Verdict.PERMANENT_BLOCK), NOW + 2 * MS)
    assert out[0] == DestroySocket(e.flow)  # the shell aborts both local ends
    assert out[1] == Drop(t) and any(isinstance(x, Inject) for x in out)
    # The kernel's RST from either end (the server's seen reversed, on lo) passes.
    for rst in (
        c.v4("127.0.0.1", "127.0.0.1", c.tcp(50000, 7100, c.RST | c.ACK)),
        c.v4("127.0.0.1", "127.0.0.1", c.tcp(7100, 50000, c.RST | c.ACK)),
    ):
        t = Tok("rst")
        assert core.on_packet(t, rst, True, True, NOW + 3 * MS) == [Pass(t)]


def test_a_known_flow_whose_replayed_verdict_blocks_is_aborted_by_the_scan() -> None:
    core = CaptureCore()
    core.on_message(CacheSet(OUT4.flow, Verdict.PERMANENT_BLOCK), NOW)  # the ALE's replay
    core.on_message(CacheSet(IN6.flow, Verdict.PERMANENT_ACCEPT), NOW)
    out = core.existing([OUT4, IN6], NOW + MS)
    assert out == [DestroySocket(OUT4.flow)]  # established (the scan says so) and blocked
    assert core.counters["existing_known"] == 2


def test_a_scan_handed_over_in_parts_asks_as_the_whole_would() -> None:
    flows = [
        ExistingFlow(Flow(6, a(L4), 30000 + i, a(R4), 80), Direction.OUTBOUND) for i in range(10)
    ]
    whole = CaptureCore()
    parted = CaptureCore()
    w = whole.existing(flows, NOW)
    p: list[Action] = []
    for i in range(0, 10, 3):
        p += parted.existing(flows[i : i + 3], NOW, last=i + 3 >= 10)
    assert [(m.hold_id, m.flow) for m in asked(p)] == [(m.hold_id, m.flow) for m in asked(w)]
    assert len(asked(p)) == 10
    # Each part may ask for a wider filter (the shell opens only the newest of those waiting);
    # the last one asked for is the whole scan's.
    sets_w = [x for x in w if isinstance(x, SetFilter)]
    sets_p = [x for x in p if isinstance(x, SetFilter)]
    assert sets_p[-1].ports == sets_w[-1].ports == frozenset(range(30000, 30010))
    assert {k: v for k, v in whole.counters.items() if k != "filter_changes"} == {
        k: v for k, v in parted.counters.items() if k != "filter_changes"
    }
