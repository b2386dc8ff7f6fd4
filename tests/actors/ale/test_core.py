"""The ALE core driven directly: ids, cache, verdict table, updates, timeouts, shutdown."""

from __future__ import annotations

import pytest

from kextless.actors.ale.core import AleConfig, AleCore
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


def emitted(out) -> list:  # type: ignore[no-untyped-def]
    return [decode_info(msg.info) for msg in out.to_broker if isinstance(msg, m.Emit)]


def logs(out) -> list[m.Log]:  # type: ignore[no-untyped-def]
    return [msg for msg in out.to_broker if isinstance(msg, m.Log)]


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
    assert out1.to_broker[0].id == 1 and out1.to_broker[0].kind == InfoType.CONNECTION_IPV4
    assert out1.to_capture == [] and set(core.pending) == {1, 2}
    # The cache entry exists before the event leaves (kext race §15.4).
    assert core.connections[TCP4].verdict == Verdict.UNDECIDED


def test_permanent_accept_releases_and_caches() -> None:
    core = AleCore()
    core.packet_held(held(7), 0)
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 1)
    assert out.to_capture == [
        m.CacheSet(TCP4, Verdict.PERMANENT_ACCEPT),
        m.Decision((7,), Verdict.PERMANENT_ACCEPT),
    ]
    assert core.pending == {}
    # A later packet (capture raced its cache) is answered with no new event or id.
    out = core.packet_held(held(9), 2)
    assert out.to_capture == [m.Decision((9,), Verdict.PERMANENT_ACCEPT)]
    assert out.to_broker == [] and core.next_id == 2


@pytest.mark.parametrize("verdict", [Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP])
def test_temporary_verdict_makes_every_later_packet_a_new_request(verdict: Verdict) -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, verdict), 0)
    ids = [emitted(core.packet_held(held(hold_id), 0))[0].id for hold_id in (2, 3, 4)]
    assert ids == [2, 3, 4]
    out = core.command(VerdictCommand(3, verdict), 0)
    assert out.to_capture == [m.Decision((3,), verdict)]  # no CacheSet: verdict unchanged


def test_icmp_is_never_cached() -> None:
    core = AleCore()
    core.packet_held(held(1, ICMP4), 0)
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    assert out.to_capture == [m.Decision((1,), Verdict.PERMANENT_ACCEPT)]
    assert ICMP4 not in core.connections
    assert emitted(core.packet_held(held(2, ICMP4), 0))[0].id == 2


def test_unknown_id_logs_like_the_kext() -> None:
    core = AleCore()
    out = core.command(VerdictCommand(99, Verdict.ACCEPT), 0)
    (line,) = logs(out)
    assert line.severity == Severity.ERROR
    assert line.line.startswith("actors/ale/core.py:") and line.line.endswith(
        " Verdict invalid id: 99"
    )
    assert out.to_capture == []


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
    assert out.to_capture == [m.CacheSet(TCP4, Verdict.PERMANENT_BLOCK)]
    assert core.command(update, 0).to_capture == []  # Portmaster sends it twice
    assert core.connections[TCP4].verdict == Verdict.PERMANENT_BLOCK


def test_update_v6_and_unknown_tuple() -> None:
    core = AleCore()
    core.packet_held(held(1, UDP6), 0)
    out = core.command(UpdateV6Command(17, L6, 5353, R6, 53, Verdict.PERMANENT_DROP), 0)
    assert out.to_capture == [m.CacheSet(UDP6, Verdict.PERMANENT_DROP)]
    out = core.command(UpdateV4Command(6, L4, 1, R4, 2, Verdict.PERMANENT_DROP), 0)
    assert out.to_capture == [] and core.counters["updates_unknown"] == 1


def test_local_address_is_part_of_the_key() -> None:
    """The kext ignored the local IP (§15.6); two flows differing only there are distinct."""
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
    assert out.to_capture == [m.CacheClear()] and core.connections == {}
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    assert m.Decision((1,), Verdict.PERMANENT_ACCEPT) in out.to_capture
    assert core.connections[TCP4].verdict == Verdict.PERMANENT_ACCEPT


def test_shutdown_resolves_every_pending_as_permanent_block() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.packet_held(held(2, ICMP4), 0)
    out = core.command(ShutdownCommand(), 0)
    assert m.Decision((1,), Verdict.PERMANENT_BLOCK) in out.to_capture
    assert m.Decision((2,), Verdict.PERMANENT_BLOCK) in out.to_capture
    assert core.pending == {}
    assert core.connections[TCP4].verdict == Verdict.PERMANENT_BLOCK


def test_verdict_timeout_applies_default_in_id_order() -> None:
    core = AleCore(AleConfig(verdict_timeout_ns=10 * S, default_verdict=Verdict.DROP))
    core.packet_held(held(1), 0)
    core.packet_held(held(2, UDP6), 5 * S)
    assert core.tick(9 * S).to_capture == []
    out = core.tick(11 * S)
    assert m.Decision((1,), Verdict.DROP) in out.to_capture
    assert list(core.pending) == [2]
    assert any("verdict timeout" in line.line for line in logs(out))
    out = core.tick(16 * S)
    assert m.Decision((2,), Verdict.DROP) in out.to_capture and core.pending == {}
    assert core.counters["timeouts"] == 2


def test_refused_event_gets_default_verdict_at_once() -> None:
    core = AleCore()
    core.packet_held(held(5), 0)
    out = core.emit_refused(1, "queue full", 0)
    assert m.Decision((5,), Verdict.BLOCK) in out.to_capture and core.pending == {}


def test_capture_restart_replays_verdicts_and_orphans_old_packets() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    core.packet_held(held(2, UDP6), 0)
    out = core.capture_ready(0)
    assert out.to_capture == [m.CacheSet(TCP4, Verdict.PERMANENT_ACCEPT)]
    out = core.command(VerdictCommand(2, Verdict.PERMANENT_DROP), 0)
    assert out.to_capture == [m.CacheSet(UDP6, Verdict.PERMANENT_DROP)]  # no stale Decision


def test_connection_end_is_reported_once_and_expires_after_grace() -> None:
    core = AleCore()
    core.packet_held(held(1, pid=42), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    end = m.ConnectionEnded(TCP4, Direction.OUTBOUND, 0, 0)
    (info,) = emitted(core.connection_ended(end, 1 * S))
    assert info == ConnectionEndEventV4(42, Direction.OUTBOUND, 6, L4, R4, 40000, 443)
    assert emitted(core.connection_ended(end, 2 * S)) == []
    core.command(CleanEndedConnectionsCommand(), 30 * S)
    assert TCP4 in core.connections
    core.command(CleanEndedConnectionsCommand(), 62 * S)
    assert TCP4 not in core.connections


def test_commands_it_does_not_own_are_logged() -> None:
    out = AleCore().command(GetLogsCommand(), 0)
    assert "does not handle GetLogs" in logs(out)[0].line
