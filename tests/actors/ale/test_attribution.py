"""The ALE's pid attribution, driven directly: tables from the lifecycle actor, the bounded
wait for a pid that is on its way, and no wait at all while no lifecycle actor is present."""

from __future__ import annotations

from kextless.actors.ale.core import AleConfig, AleCore
from kextless.protocol import messages as m
from kextless.protocol.commands import ShutdownCommand
from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.infos import decode_info

MS = 1_000_000
S = 1000 * MS
L4, R4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
Z4 = bytes(4)
TCP4 = m.Flow(6, L4, 40000, R4, 443)
TCP4B = m.Flow(6, L4, 40001, R4, 443)
UDP4 = m.Flow(17, L4, 5000, R4, 53)
IN4 = m.Flow(6, L4, 8080, R4, 50000)
PKT = b"\x45" + bytes(39)
ZERO = m.Flow(0, Z4, 0, Z4, 0)


def held(
    hold_id: int, flow: m.Flow = TCP4, direction: Direction = Direction.OUTBOUND
) -> m.PacketHeld:
    return m.PacketHeld(hold_id, flow, direction, PKT, 0, 0)


def attr(kind: m.AttributionKind, flow: m.Flow, pid: int, now: int = 0) -> m.Attribution:
    return m.Attribution(kind, flow, pid, now)


def opener(flow: m.Flow) -> m.Flow:
    return m.Flow(flow.protocol, Z4, 0, flow.remote_ip, flow.remote_port)


def pids(out: list[m.Message]) -> list[int]:
    return [decode_info(x.info).process_id for x in out if isinstance(x, m.Emit)]


def present(core: AleCore, now: int = 0) -> None:
    assert core.attribution(attr(m.AttributionKind.PRESENT, ZERO, 0, now), now) == []


def test_without_a_lifecycle_actor_nothing_waits() -> None:
    core = AleCore()
    assert pids(core.packet_held(held(1), 0)) == [0]
    assert core.next_deadline_ns() == 10 * S  # only the verdict timeout


HINTS = AleConfig(opener_hints=True)


def test_opener_hints_are_off_by_default() -> None:
    core = AleCore()
    present(core)
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 4242, 1), 1)
    assert core.packet_held(held(1), 2) == []  # waits for the exact attribution


def test_opener_hint_before_the_syn_gives_its_pid_at_once() -> None:
    core = AleCore(HINTS)
    present(core)
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 4242, 1), 1)
    assert pids(core.packet_held(held(1), 2)) == [4242]
    # The hint was used up: the next connection to the same remote waits for its own.
    assert core.packet_held(held(2, TCP4B), 3) == []


def test_a_waiting_info_leaves_when_its_pid_arrives() -> None:
    core = AleCore()
    present(core)
    assert core.packet_held(held(1), 10) == []
    assert core.packet_held(held(2), 11) == []  # a retransmit joins the wait
    # A hint alone never releases a waiting flow: it might be another process's connect.
    assert core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 66), 10) == []
    out = core.attribution(attr(m.AttributionKind.FLOW, TCP4, 77), 10 + MS)
    assert pids(out) == [77, 77]
    assert core.counters["pid_wait_max_us"] == 1000
    assert core.waiting == {}


def test_an_exact_flow_attribution_releases_only_that_flow() -> None:
    core = AleCore()
    present(core)
    core.packet_held(held(1, TCP4), 0)
    core.packet_held(held(2, UDP4), 0)
    assert pids(core.attribution(attr(m.AttributionKind.FLOW, UDP4, 9), 1)) == [9]
    assert list(core.waiting) == [TCP4]


def test_the_wait_is_bounded_and_then_pid_zero() -> None:
    core = AleCore(AleConfig(attribution_wait_ns=5 * MS))
    present(core)
    core.packet_held(held(1), 100)
    assert core.next_deadline_ns() == 100 + 5 * MS
    assert core.on_deadline(100 + 5 * MS - 1) == []
    assert pids(core.on_deadline(100 + 5 * MS)) == [0]
    assert core.counters["pid_wait_timeouts"] == 1


def test_a_lifecycle_actor_gone_silent_stops_the_waiting() -> None:
    core = AleCore()
    present(core, 0)
    assert pids(core.packet_held(held(1), 4 * S)) == [0]


def test_inbound_takes_the_listeners_pid_without_waiting() -> None:
    core = AleCore()
    present(core)
    core.attribution(attr(m.AttributionKind.LISTENER, m.Flow(6, Z4, 8080, Z4, 0), 555), 0)
    assert pids(core.packet_held(held(1, IN4, Direction.INBOUND), 1)) == [555]
    core.attribution(attr(m.AttributionKind.UNLISTEN, m.Flow(6, Z4, 8080, Z4, 0), 555), 2)
    assert pids(
        core.packet_held(held(2, m.Flow(6, L4, 8080, R4, 50001), Direction.INBOUND), 3)
    ) == [0]


def test_a_dual_stack_listener_owns_ipv4_connections() -> None:
    core = AleCore()
    core.attribution(
        attr(m.AttributionKind.LISTENER, m.Flow(6, bytes(16), 8080, bytes(16), 0), 5), 0
    )
    assert pids(core.packet_held(held(1, IN4, Direction.INBOUND), 1)) == [5]


def test_the_end_event_carries_the_attributed_pid() -> None:
    core = AleCore()
    present(core)
    core.packet_held(held(1), 0)
    core.attribution(attr(m.AttributionKind.FLOW, TCP4, 31), 1)
    out = core.connection_ended(m.ConnectionEnded(TCP4, Direction.OUTBOUND, 0, 2), 2)
    assert decode_info(out[0].info).process_id == 31  # type: ignore[union-attr]


def test_shutdown_blocks_waiting_packets_without_an_id() -> None:
    core = AleCore()
    present(core)
    core.packet_held(held(7), 0)
    out = core.command(ShutdownCommand(), 1)
    assert m.Decision((7,), Verdict.PERMANENT_BLOCK) in out
    assert core.waiting == {} and core.next_id == 1


def test_attribution_tables_are_bounded() -> None:
    core = AleCore(AleConfig(attribution_cap=10))
    for port in range(100):
        core.attribution(attr(m.AttributionKind.FLOW, m.Flow(6, L4, port + 1, R4, 1), 1), 0)
        core.attribution(attr(m.AttributionKind.OPENER, m.Flow(6, Z4, 0, R4, port + 1), 1), 0)
        core.attribution(attr(m.AttributionKind.LISTENER, m.Flow(6, Z4, port + 1, Z4, 0), 1), 0)
    assert len(core.flow_pids) == len(core.openers) == len(core.listeners) == 10


def test_hints_of_two_processes_to_one_remote_are_ambiguous() -> None:
    core = AleCore(HINTS)
    present(core)
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 1), 0)
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 2), 0)
    assert core.packet_held(held(1, TCP4), 1) == []  # waits for its exact attribution
    assert pids(core.attribution(attr(m.AttributionKind.FLOW, TCP4, 2), 2)) == [2]
    # Process 2's connect is accounted for: what is left is process 1's, unambiguous.
    assert pids(core.packet_held(held(2, TCP4B), 3)) == [1]


def test_a_hint_used_by_its_syn_is_not_taken_twice() -> None:
    core = AleCore(HINTS)
    present(core)
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 5), 0)
    assert pids(core.packet_held(held(1, TCP4), 1)) == [5]
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 5), 2)  # next connect
    core.attribution(attr(m.AttributionKind.FLOW, TCP4, 5), 3)  # the first one, resolved
    core.attribution(attr(m.AttributionKind.FLOW, TCP4, 5), 4)  # and its FLOW ESTABLISHED
    assert pids(core.packet_held(held(2, TCP4B), 5)) == [5]


def test_a_stale_hint_is_not_used() -> None:
    core = AleCore(AleConfig(opener_ttl_ns=200 * MS, opener_hints=True))
    core.attribution(attr(m.AttributionKind.OPENER, opener(TCP4), 5), 0)
    assert core.packet_held(held(1, TCP4), 201 * MS) == []  # not taken: waits for its own
    assert pids(core.on_deadline(201 * MS + core.config.attribution_wait_ns)) == [0]


def _copy(flow: m.Flow) -> m.Flow:
    """An equal Flow that is another object, as each decoded message carries its own."""
    return m.decode(m.encode(m.Attribution(m.AttributionKind.FLOW, flow, 0, 0))).flow  # type: ignore[union-attr]


def test_a_connection_keeps_one_flow_object_in_both_tables() -> None:
    for attributed_first in (True, False):
        core = AleCore()
        present(core)
        by_attr, by_packet = _copy(TCP4), _copy(TCP4)
        assert by_attr == by_packet and by_attr is not by_packet
        if attributed_first:  # the pid is known when the SYN arrives
            core.attribution(attr(m.AttributionKind.FLOW, by_attr, 77), 1)
            assert pids(core.packet_held(held(1, by_packet), 2)) == [77]
        else:  # the SYN waits for its pid
            assert core.packet_held(held(1, by_packet), 1) == []
            assert pids(core.attribution(attr(m.AttributionKind.FLOW, by_attr, 77), 2)) == [77]
        (cache_key,) = core.connection_cache
        (pid_key,) = core.flow_pids
        assert cache_key is pid_key  # one Flow (~200 B) per connection, not two
        assert core.flow_pids[pid_key] == 77 and core.connection_cache[cache_key].process_id == 77
