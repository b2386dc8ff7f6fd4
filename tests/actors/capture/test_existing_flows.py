"""Turning sock_diag answers into flows (no kernel needed)."""

from __future__ import annotations

from pyroute2.netlink.diag import SS_ESTABLISHED, SS_FIN_WAIT2, SS_SYN_SENT, SS_TIME_WAIT

from kextless.actors.capture.existing import flows_from
from kextless.protocol.enums import Direction
from kextless.protocol.messages import Flow
from tests.actors.capture.crafted import a


def _m(state: int, src: str, sport: int, dst: str, dport: int) -> dict[str, object]:
    return {
        "idiag_state": state,
        "idiag_src": src,
        "idiag_sport": sport,
        "idiag_dst": dst,
        "idiag_dport": dport,
    }


def test_direction_mapped_addresses_states_and_garbage() -> None:
    listening = [_m(10, "::", 8080, "::", 0)]
    connected = [
        _m(SS_ESTABLISHED, "10.0.0.1", 40000, "10.0.0.2", 80),
        _m(SS_ESTABLISHED, "::ffff:10.0.0.1", 8080, "::ffff:10.0.0.3", 5000),  # dual stack
        _m(SS_FIN_WAIT2, "fd00::1", 40001, "fd00::2", 443),
        _m(SS_SYN_SENT, "10.0.0.1", 40002, "10.0.0.2", 80),  # its SYN is diverted anyway
        _m(SS_TIME_WAIT, "10.0.0.1", 40003, "10.0.0.2", 80),
        _m(SS_ESTABLISHED, "not an address", 1, "10.0.0.2", 2),  # skipped, not a crash
    ]
    assert [(e.flow, e.direction) for e in flows_from(connected, listening)] == [
        (Flow(6, a("10.0.0.1"), 40000, a("10.0.0.2"), 80), Direction.OUTBOUND),
        (Flow(6, a("10.0.0.1"), 8080, a("10.0.0.3"), 5000), Direction.INBOUND),
        (Flow(6, a("fd00::1"), 40001, a("fd00::2"), 443), Direction.OUTBOUND),
    ]


def test_a_local_connection_is_kept_once_as_the_clients_end() -> None:
    listening = [_m(10, "0.0.0.0", 7100, "0.0.0.0", 0)]
    connected = [
        _m(SS_ESTABLISHED, "127.0.0.1", 50000, "127.0.0.1", 7100),
        _m(SS_ESTABLISHED, "127.0.0.1", 7100, "127.0.0.1", 50000),
    ]
    (e,) = flows_from(connected, listening)
    assert e.direction is Direction.OUTBOUND and e.flow.local_port == 50000
