"""The ALE core driven directly: ids, cache, verdict table, updates, timeouts, shutdown.

Every input returns one list of messages; `capture()` and `broker()` split it the way the
shell routes it (by message type).
"""

from __future__ import annotations

import pytest

from kextless.actors.ale.core import (
    TIMEOUT_BATCH_NS,
    TO_CAPTURE,
    AleConfig,
    AleCore,
    Effect,
    Note,
    flow_text,
)
from kextless.base.linebudget import PER_WINDOW
from kextless.protocol import messages as m
from kextless.protocol.commands import (
    CleanEndedConnectionsCommand,
    ClearCacheCommand,
    GetLogsCommand,
    ShutdownCommand,
    UpdateV4Command,
    UpdateV6Command,
    VerdictCommand,
)
from kextless.protocol.enums import Direction, InfoType, PayloadLayer, Severity, Verdict
from kextless.protocol.infos import (
    ConnectionEndEventV4,
    ConnectionIpv4,
    ConnectionIpv6,
    decode_info,
)

S = 1_000_000_000
L4, R4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
L6, R6 = bytes(range(1, 17)), bytes(range(2, 18))
TCP4 = m.Flow(6, L4, 40000, R4, 443)
UDP6 = m.Flow(17, L6, 5353, R6, 53)
ICMP4 = m.Flow(1, L4, 0, R4, 0)
PKT = b"\x45" + bytes(39)


def held(
    hold_id: int, flow: m.Flow = TCP4, direction: Direction = Direction.OUTBOUND, pid: int = 0
) -> m.PacketHeld:
    return m.PacketHeld(hold_id, flow, direction, PKT, 0, pid)


def capture(out: list[Effect]) -> list[Effect]:
    """What the shell sends the capture actor, in order."""
    return [msg for msg in out if type(msg) in TO_CAPTURE]


def broker(out: list[Effect]) -> list[Effect]:
    """What the shell sends the broker, in order."""
    return [msg for msg in out if type(msg) not in TO_CAPTURE and type(msg) is not Note]


def notes(out: list[Effect]) -> list[str]:
    """What the shell writes to the ALE's own log."""
    return [msg.text for msg in out if isinstance(msg, Note)]


def emitted(out: list[Effect]) -> list:  # type: ignore[type-arg]
    return [decode_info(msg.info) for msg in out if isinstance(msg, m.Emit)]


def logs(out: list[Effect]) -> list[m.Log]:
    return [msg for msg in out if isinstance(msg, m.Log)]


def test_miss_issues_ids_from_one_and_emits_full_packet_info() -> None:
    core = AleCore()
    out1 = core.packet_held(held(7, pid=1234), 0)
    out2 = core.packet_held(held(8, UDP6, Direction.INBOUND), 0)
    (i1,), (i2,) = emitted(out1), emitted(out2)
    assert i1 == ConnectionIpv4(
        1, 1234, Direction.OUTBOUND, 6, L4, R4, 40000, 443, PayloadLayer.NETWORK, PKT
    )
    assert i2 == ConnectionIpv6(
        2, 0, Direction.INBOUND, 17, L6, R6, 5353, 53, PayloadLayer.NETWORK, PKT
    )
    assert broker(out1)[0].id == 1 and broker(out1)[0].kind == InfoType.CONNECTION_IPV4
    assert capture(out1) == [] and set(core.id_cache) == {1, 2}
    # The cache entry exists before the event leaves (kext-contract C15-4).
    assert core.connection_cache[TCP4].verdict == Verdict.UNDECIDED


def test_permanent_accept_releases_and_caches() -> None:
    core = AleCore()
    core.packet_held(held(7), 0)
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 1)
    assert capture(out) == [
        m.CacheSet(TCP4, Verdict.PERMANENT_ACCEPT),
        m.Decision((7,), Verdict.PERMANENT_ACCEPT),
    ]
    assert core.id_cache == {}
    # A later packet (capture raced its cache) is answered with no new event or id.
    out = core.packet_held(held(9), 2)
    assert capture(out) == [m.Decision((9,), Verdict.PERMANENT_ACCEPT)]
    assert broker(out) == [] and core.next_id == 2


@pytest.mark.parametrize("verdict", [Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP])
def test_temporary_verdict_makes_every_later_packet_a_new_request(verdict: Verdict) -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, verdict), 0)
    ids = [emitted(core.packet_held(held(hold_id), 0))[0].id for hold_id in (2, 3, 4)]
    assert ids == [2, 3, 4]
    out = core.command(VerdictCommand(3, verdict), 0)
    assert capture(out) == [m.Decision((3,), verdict)]  # no CacheSet: verdict unchanged


def test_icmp_is_never_cached() -> None:
    core = AleCore()
    core.packet_held(held(1, ICMP4), 0)
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    assert capture(out) == [m.Decision((1,), Verdict.PERMANENT_ACCEPT)]
    assert ICMP4 not in core.connection_cache
    assert emitted(core.packet_held(held(2, ICMP4), 0))[0].id == 2


def test_unknown_id_logs_like_the_kext() -> None:
    core = AleCore()
    out = core.command(VerdictCommand(99, Verdict.ACCEPT), 0)
    (line,) = logs(out)
    assert line.severity == Severity.ERROR
    assert line.line.startswith("actors/ale/core.py:") and line.line.endswith(
        " Verdict invalid id: 99"
    )
    assert capture(out) == []


def test_ids_are_never_reused_across_verdicts_and_shutdown() -> None:
    core = AleCore()
    for hold_id in range(3):
        core.packet_held(held(hold_id, m.Flow(6, L4, 1000 + hold_id, R4, 80)), 0)
    core.command(ShutdownCommand(), 0)
    out = core.packet_held(held(10), 0)
    assert emitted(out)[0].id == 4


def test_update_is_idempotent_and_direction_agnostic() -> None:
    core = AleCore()
    core.packet_held(held(1, direction=Direction.INBOUND), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    update = UpdateV4Command(6, L4, 40000, R4, 443, Verdict.PERMANENT_BLOCK)
    out = core.command(update, 0)
    assert capture(out) == [m.CacheSet(TCP4, Verdict.PERMANENT_BLOCK)]
    assert capture(core.command(update, 0)) == []  # Portmaster sends it twice
    assert core.connection_cache[TCP4].verdict == Verdict.PERMANENT_BLOCK


def test_update_v6_and_unknown_tuple() -> None:
    core = AleCore()
    core.packet_held(held(1, UDP6), 0)
    out = core.command(UpdateV6Command(17, L6, 5353, R6, 53, Verdict.PERMANENT_DROP), 0)
    assert capture(out) == [m.CacheSet(UDP6, Verdict.PERMANENT_DROP)]
    out = core.command(UpdateV4Command(6, L4, 1, R4, 2, Verdict.PERMANENT_DROP), 0)
    assert capture(out) == [] and core.counters["updates_unknown"] == 1


def test_local_address_is_part_of_the_key() -> None:
    """The kext ignored the local IP (kext-contract C15-6): flows differing only there are two."""
    core = AleCore()
    other = m.Flow(6, bytes([10, 0, 0, 9]), 40000, R4, 443)
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_BLOCK), 0)
    out = core.packet_held(held(2, other), 0)
    assert emitted(out)[0].id == 2


def test_clear_cache_asks_again_but_pending_still_answer() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    out = core.command(ClearCacheCommand(), 0)
    assert capture(out) == [m.CacheClear()] and core.connection_cache == {}
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    assert m.Decision((1,), Verdict.PERMANENT_ACCEPT) in capture(out)
    assert core.connection_cache[TCP4].verdict == Verdict.PERMANENT_ACCEPT


def test_shutdown_resolves_every_pending_as_permanent_block() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.packet_held(held(2, ICMP4), 0)
    out = core.command(ShutdownCommand(), 0)
    assert m.Decision((1,), Verdict.PERMANENT_BLOCK) in capture(out)
    assert m.Decision((2,), Verdict.PERMANENT_BLOCK) in capture(out)
    assert core.id_cache == {}
    assert core.connection_cache[TCP4].verdict == Verdict.PERMANENT_BLOCK


def test_verdict_timeout_applies_default_in_id_order() -> None:
    core = AleCore(AleConfig(verdict_timeout_ns=10 * S, default_verdict=Verdict.DROP))
    core.packet_held(held(1), 0)
    core.packet_held(held(2, UDP6), 5 * S)
    assert capture(core.on_deadline(9 * S)) == []
    out = core.on_deadline(11 * S)
    assert m.Decision((1,), Verdict.DROP) in capture(out)
    assert list(core.id_cache) == [2]
    assert any("verdict timeout" in line.line for line in logs(out))
    out = core.on_deadline(16 * S)
    assert m.Decision((2,), Verdict.DROP) in capture(out) and core.id_cache == {}
    assert core.counters["timeouts"] == 2


def test_a_held_packet_gets_the_default_verdict_at_its_deadline_and_not_before() -> None:
    core = AleCore(AleConfig(verdict_timeout_ns=10 * S, default_verdict=Verdict.DROP))
    assert core.next_deadline_ns() is None and core.on_deadline(100 * S) == []
    core.packet_held(held(7), 3 * S)
    core.packet_held(held(8, UDP6), 5 * S)
    assert core.next_deadline_ns() == 13 * S  # the oldest held packet's timeout
    assert core.on_deadline(13 * S - 1) == []  # early: nothing is due
    assert set(core.id_cache) == {1, 2}
    out = core.on_deadline(13 * S)
    assert capture(out) == [m.CacheSet(TCP4, Verdict.DROP), m.Decision((7,), Verdict.DROP)]
    (line,) = logs(out)
    assert line.line.endswith("verdict timeout: 1 packet(s) got Drop (ids 1..1)")
    assert core.next_deadline_ns() == 15 * S
    core.command(VerdictCommand(2, Verdict.ACCEPT), 14 * S)
    assert core.next_deadline_ns() is None and core.on_deadline(15 * S) == []


def test_an_answered_packet_moves_the_deadline_to_the_next_oldest() -> None:
    core = AleCore(AleConfig(verdict_timeout_ns=10 * S))
    for hold_id in range(1, 4):
        core.packet_held(held(hold_id, m.Flow(6, L4, 1000 + hold_id, R4, 80)), hold_id * S)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 2 * S)
    core.command(VerdictCommand(3, Verdict.PERMANENT_ACCEPT), 2 * S)
    assert core.next_deadline_ns() == 12 * S  # id 2's
    assert core.on_deadline(12 * S) != [] and core.id_cache == {}


def test_timeouts_close_together_are_applied_in_one_batch() -> None:
    """A stream of unanswered packets wakes the core (and logs) at most every 100 ms."""
    core = AleCore(AleConfig(verdict_timeout_ns=10 * S))
    for i in range(5):
        core.packet_held(held(i, m.Flow(6, L4, 1000 + i, R4, 80)), i * 1_000_000)  # 1 ms apart
    first = broker(core.on_deadline(10 * S))  # the first alone, at its deadline
    assert [type(msg) for msg in first] == [m.Log, m.Resolved]
    assert list(core.id_cache) == [2, 3, 4, 5]
    assert core.next_deadline_ns() == 10 * S + TIMEOUT_BATCH_NS  # not 10.001 s
    assert core.on_deadline(10 * S + 50_000_000) == []
    out = core.on_deadline(10 * S + TIMEOUT_BATCH_NS)
    assert [d.hold_ids for d in capture(out) if isinstance(d, m.Decision)] == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]
    (line,) = logs(out)
    assert "4 packet(s)" in line.line and "(ids 2..5)" in line.line
    # Long after the last batch a lone packet is on time again.
    core.packet_held(held(9, UDP6), 20 * S)
    assert core.next_deadline_ns() == 30 * S


def test_deadline_bookkeeping_stays_bounded_behind_a_waiting_packet() -> None:
    core = AleCore()
    core.packet_held(held(0), 0)  # never answered
    for i in range(1, 1001):
        core.packet_held(held(i, UDP6), 0)
        core.command(VerdictCommand(i + 1, Verdict.ACCEPT), 0)
        core.next_deadline_ns()
    assert len(core._timeout_order) <= 2 * len(core.id_cache) + 65
    assert core.next_deadline_ns() == core.config.verdict_timeout_ns


def test_every_input_returns_one_list_of_messages_routed_by_type() -> None:
    core = AleCore()
    outs = [
        core.packet_held(held(1), 0),
        core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0),
        core.command(ClearCacheCommand(), 0),
        core.capture_ready(0),
        core.emit_refused(99, "full", 0),
        core.connection_ended(m.ConnectionEnded(TCP4, Direction.OUTBOUND, 0, 0), 0),
        core.on_deadline(0),
    ]
    assert all(isinstance(out, list) for out in outs)
    kinds = {type(msg) for out in outs for msg in out}
    assert kinds & TO_CAPTURE == {m.CacheSet, m.Decision, m.CacheClear}
    assert kinds - TO_CAPTURE == {m.Emit, m.Log, Note}


def test_refused_event_gets_default_verdict_at_once() -> None:
    core = AleCore()
    core.packet_held(held(5), 0)
    out = core.emit_refused(1, "queue full", 0)
    assert m.Decision((5,), Verdict.BLOCK) in capture(out) and core.id_cache == {}


def test_capture_restart_replays_verdicts_and_orphans_old_packets() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    core.packet_held(held(2, UDP6), 0)
    out = core.capture_ready(0)
    assert capture(out) == [m.CacheSet(TCP4, Verdict.PERMANENT_ACCEPT)]
    out = core.command(VerdictCommand(2, Verdict.PERMANENT_DROP), 0)
    assert capture(out) == [m.CacheSet(UDP6, Verdict.PERMANENT_DROP)]  # no stale Decision


def held_on(
    hold_id: int, flow: m.Flow = TCP4, packet: bytes = PKT, ifindex: int = 3
) -> m.PacketHeld:
    return m.PacketHeld(hold_id, flow, Direction.OUTBOUND, packet, 0, 0, ifindex)


def test_a_restarted_capture_gets_its_predecessors_undecided_packets_back() -> None:
    core = AleCore()
    (emit,) = broker(core.packet_held(held_on(1), 0))
    assert isinstance(emit, m.Emit) and emit.id == 1
    core.packet_held(held_on(2, UDP6, ifindex=0), 0)  # link unknown: cannot be re-held
    out = core.capture_ready(1 * S)
    assert capture(out) == [m.Rehold(PKT, Direction.OUTBOUND, 3)]
    assert core.counters["reholds"] == 1
    # The capture holds it again: the pending id it had takes it, no second info.
    assert core.packet_held(held_on(7), 2 * S) == []
    assert core.id_cache[1].hold_id == 7 and core.counters["reheld"] == 1
    assert core.counters["ids_issued"] == 2
    # The client's answer to the id it already had releases the new hold.
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 3 * S)
    assert m.Decision((7,), Verdict.PERMANENT_ACCEPT) in capture(out)
    # A second packet of the flow after the claim is a new one (a new id, as before).
    core.packet_held(held_on(8, UDP6), 3 * S)
    assert core.counters["ids_issued"] == 3


def test_a_capture_that_dies_again_before_re_holding_gets_them_again() -> None:
    core = AleCore()
    core.packet_held(held_on(1), 0)
    assert len(capture(core.capture_ready(1))) == 1
    assert capture(core.capture_ready(2)) == [m.Rehold(PKT, Direction.OUTBOUND, 3)]


def test_beyond_max_pending_a_new_packet_is_dropped_unasked_and_logged_once_a_second() -> None:
    core = AleCore(AleConfig(max_pending=2))
    flows = [m.Flow(6, L4, 40000 + i, R4, 443) for i in range(6)]
    assert len(broker(core.packet_held(held(1, flows[0]), 0))) == 1
    assert len(broker(core.packet_held(held(2, flows[1]), 0))) == 1
    out = core.packet_held(held(3, flows[2]), 0)
    assert capture(out) == [m.Decision((3,), Verdict.DROP)] and broker(out) == []
    assert len(notes(out)) == 1 and "dropped unasked" in notes(out)[0]
    assert flows[2] not in core.connection_cache  # not remembered: a resend is asked again
    out = core.packet_held(held(4, flows[3]), 1)
    assert capture(out) == [m.Decision((4,), Verdict.DROP)] and notes(out) == []
    assert core.counters["shed"] == 2
    # A permanent verdict already known is still answered, whatever the backlog.
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 2)
    core.packet_held(held(5, flows[4]), 3)  # room again: asked (2 pending)
    out = core.packet_held(held(6, flows[0]), 4)
    assert capture(out) == [m.Decision((6,), Verdict.PERMANENT_ACCEPT)]
    # The suppressed line is summed up once its second is over.
    out = core.on_deadline(2 * S)
    assert any("1 more packet(s) dropped unasked" in n for n in notes(out)), notes(out)
    # 0: unbounded.
    free = AleCore(AleConfig(max_pending=0))
    for i, f in enumerate(flows):
        assert len(broker(free.packet_held(held(i + 1, f), 0))) == 1


def test_connection_end_is_reported_once_and_expires_after_grace() -> None:
    core = AleCore()
    core.packet_held(held(1, pid=42), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    end = m.ConnectionEnded(TCP4, Direction.OUTBOUND, 0, 0)
    (info,) = emitted(core.connection_ended(end, 1 * S))
    assert info == ConnectionEndEventV4(42, Direction.OUTBOUND, 6, L4, R4, 40000, 443)
    assert emitted(core.connection_ended(end, 2 * S)) == []
    core.command(CleanEndedConnectionsCommand(), 30 * S)
    assert TCP4 in core.connection_cache
    core.command(CleanEndedConnectionsCommand(), 62 * S)
    assert TCP4 not in core.connection_cache


def test_commands_it_does_not_own_are_logged() -> None:
    out = AleCore().command(GetLogsCommand(), 0)
    assert "does not handle GetLogs" in logs(out)[0].line


# ---- what is left of a timeout: the broker told, the log file written -----------------------


def test_timed_out_ids_are_sent_to_the_broker_in_one_resolved_and_noted_one_by_one() -> None:
    core = AleCore(AleConfig(verdict_timeout_ns=2 * S))
    core.packet_held(held(1), 0)
    core.packet_held(held(2, UDP6, Direction.INBOUND), 0)
    core.packet_held(held(3, m.Flow(6, L4, 40001, R4, 443)), 0)
    core.command(VerdictCommand(3, Verdict.ACCEPT), 1 * S)  # answered: not resolved by timeout
    out = core.on_deadline(2 * S)
    assert [msg for msg in out if isinstance(msg, m.Resolved)] == [m.Resolved((1, 2))]
    assert notes(out) == [
        "id 1 TCP 10.0.0.1:40000 -> 10.0.0.2:443 timed out after 2 s without a verdict: Block",
        "id 2 UDP [102:304:506:708:90a:b0c:d0e:f10]:5353 <- "
        "[203:405:607:809:a0b:c0d:e0f:1011]:53 timed out after 2 s without a verdict: Block",
    ]
    assert core.counters["decided.Block"] == 2 and core.counters["decided.Accept"] == 1
    assert core.health()["decided.Block"] == 2


def test_a_timeout_storm_is_noted_up_to_a_rate_then_summed_up_once() -> None:
    core = AleCore(AleConfig(verdict_timeout_ns=2 * S))
    for i in range(50):
        core.packet_held(held(i, m.Flow(6, L4, 1000 + i, R4, 80)), 0)
    out = core.on_deadline(2 * S)
    assert len([msg for msg in out if isinstance(msg, m.Resolved)]) == 1
    assert len(notes(out)) == PER_WINDOW
    assert core.next_deadline_ns() == 3 * S  # the summary's
    assert notes(core.on_deadline(3 * S - 1)) == []
    (summary,) = notes(core.on_deadline(3 * S))
    assert summary.startswith(f"verdict timeout: {50 - PER_WINDOW} more id(s) timed out")
    assert core.next_deadline_ns() is None


def test_flow_text_brackets_v6_and_names_unknown_protocols() -> None:
    assert flow_text(ICMP4) == "ICMP 10.0.0.1:0 <-> 10.0.0.2:0"
    assert flow_text(m.Flow(47, L4, 0, R4, 0), Direction.INBOUND).startswith("proto 47 ")


def test_a_refused_info_is_noted_with_its_flow() -> None:
    core = AleCore()
    core.packet_held(held(5), 0)
    out = core.emit_refused(1, "no client session open", 0)
    assert notes(out) == [
        "id 1 TCP 10.0.0.1:40000 -> 10.0.0.2:443 refused by the broker "
        "(no client session open): Block"
    ]
    assert not [msg for msg in out if isinstance(msg, m.Resolved)]  # never queued
