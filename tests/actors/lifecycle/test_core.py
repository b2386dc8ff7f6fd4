"""The lifecycle core driven directly, with an injected monotonic clock: attributions from
FLOW/SOCKET events and the socket table, one end per connection, idle UDP, expiry, bounds."""

from __future__ import annotations

from kextless.actors.lifecycle.core import (
    TO_ALE,
    DivertEvent,
    FlowEvent,
    LifecycleConfig,
    LifecycleCore,
    SocketEvent,
    SocketRow,
)
from kextless.protocol import messages as m
from kextless.protocol.enums import Direction

S = 1_000_000_000
L4, R4, Z4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes(4)
TCP = m.Flow(6, L4, 40000, R4, 443)
UDP = m.Flow(17, L4, 5000, R4, 53)
K = m.AttributionKind


def ev(kind: FlowEvent | SocketEvent, flow: m.Flow, pid: int = 100, ep: int = 1) -> DivertEvent:
    return DivertEvent(kind, pid, ep, flow)


def ends(out: list[m.Message]) -> list[m.ConnectionEnded]:
    return [x for x in out if isinstance(x, m.ConnectionEnded)]


def test_connect_is_an_opener_hint_and_established_an_exact_flow() -> None:
    core = LifecycleCore()
    hint = m.Flow(6, Z4, 0, R4, 443)
    out = core.divert_event(ev(SocketEvent.CONNECT, hint, 7), 5)
    assert out == [m.Attribution(K.OPENER, hint, 7, 5)]
    out = core.divert_event(ev(FlowEvent.ESTABLISHED, TCP, 7), 6)
    assert out == [m.Attribution(K.FLOW, TCP, 7, 6)]
    assert all(type(x) in TO_ALE for x in out)


def test_listen_and_udp_bind_are_listeners_withdrawn_on_close() -> None:
    core = LifecycleCore()
    lst = m.Flow(6, Z4, 8080, Z4, 0)
    assert core.divert_event(ev(SocketEvent.LISTEN, lst, 9, ep=3), 0) == [
        m.Attribution(K.LISTENER, lst, 9, 0)
    ]
    assert core.divert_event(ev(SocketEvent.BIND, lst, 9, ep=3), 0) == []  # TCP bind: no
    udp = m.Flow(17, Z4, 53, Z4, 0)
    assert core.divert_event(ev(SocketEvent.BIND, udp, 8, ep=4), 0)[0].kind is K.LISTENER  # type: ignore[union-attr]
    assert core.divert_event(ev(SocketEvent.CLOSE, lst, 9, ep=3), 1) == [
        m.Attribution(K.UNLISTEN, lst, 9, 1)
    ]


def test_an_accepted_socket_is_inbound() -> None:
    core = LifecycleCore()
    core.divert_event(ev(SocketEvent.ACCEPT, TCP, 5, ep=9), 0)
    core.divert_event(ev(FlowEvent.ESTABLISHED, TCP, 5, ep=9), 0)
    assert core.flows[TCP].direction is Direction.INBOUND
    assert ends(core.divert_event(ev(FlowEvent.DELETED, TCP, 5, ep=9), 1))[0].direction is (
        Direction.INBOUND
    )


def test_one_end_per_connection_whatever_reports_it() -> None:
    core = LifecycleCore()
    core.divert_event(ev(FlowEvent.ESTABLISHED, TCP), 0)
    assert core.socket_table({TCP}, 1, 1) == []  # still live
    out = core.socket_table(set(), 2, 2)  # gone from the table: FIN both ways or RST
    assert out == [m.ConnectionEnded(TCP, Direction.OUTBOUND, 100, 2)]
    assert core.divert_event(ev(FlowEvent.DELETED, TCP), 3) == []
    assert core.socket_table(set(), 4, 4) == []


def test_a_table_read_older_than_the_flow_does_not_end_it() -> None:
    core = LifecycleCore()
    core.divert_event(ev(FlowEvent.ESTABLISHED, TCP), 10)
    assert core.socket_table(set(), 9, 11) == []


def test_a_reused_tuple_is_a_new_connection_with_its_own_end() -> None:
    core = LifecycleCore()
    core.divert_event(ev(FlowEvent.ESTABLISHED, UDP, 1), 0)
    assert len(ends(core.divert_event(ev(FlowEvent.DELETED, UDP, 1), 1))) == 1
    core.divert_event(ev(FlowEvent.ESTABLISHED, UDP, 2), 2)
    assert ends(core.divert_event(ev(FlowEvent.DELETED, UDP, 2), 3))[0].process_id == 2


def test_idle_udp_ends_after_the_timeout_activity_postpones_it() -> None:
    core = LifecycleCore(LifecycleConfig(udp_idle_ns=30 * S))
    core.divert_event(ev(FlowEvent.ESTABLISHED, UDP), 0)
    assert core.next_deadline_ns() == 30 * S
    core.activity(UDP, 20 * S)
    assert core.on_deadline(30 * S) == []
    due = core.next_deadline_ns()
    assert due == 50 * S
    assert ends(core.on_deadline(50 * S)) == [
        m.ConnectionEnded(UDP, Direction.OUTBOUND, 100, 50 * S)
    ]
    assert core.next_deadline_ns() is None
    assert core.on_deadline(100 * S) == []


def test_clean_ended_expires_ended_after_60s_and_idle_after_10min() -> None:
    core = LifecycleCore()
    old = m.Flow(6, L4, 1, R4, 1)
    core.divert_event(ev(FlowEvent.ESTABLISHED, TCP), 0)
    core.divert_event(ev(FlowEvent.DELETED, TCP), 10 * S)
    core.divert_event(ev(FlowEvent.ESTABLISHED, old), 0)
    core.clean_ended(70 * S)
    assert TCP in core.flows  # ended exactly 60 s ago: not yet
    core.clean_ended(70 * S + 1)
    assert TCP not in core.flows and old in core.flows
    core.clean_ended(600 * S + 1)
    assert old not in core.flows
    assert core.counters["expired"] == 2


def test_existing_sockets_attribute_connections_and_listeners() -> None:
    core = LifecycleCore()
    lst = m.Flow(6, Z4, 8080, Z4, 0)
    acc = m.Flow(6, L4, 8080, R4, 5555)
    rows = [
        SocketRow(lst, True, False, 11),
        SocketRow(acc, False, True, 12),
        SocketRow(TCP, False, True, 13),
        SocketRow(m.Flow(6, L4, 2, R4, 2), False, False, 14),  # SYN_SENT: asked anyway
    ]
    out = core.existing(rows, 0)
    assert out == [
        m.Attribution(K.LISTENER, lst, 11, 0),
        m.Attribution(K.FLOW, acc, 12, 0),
        m.Attribution(K.FLOW, TCP, 13, 0),
    ]
    assert core.flows[acc].direction is Direction.INBOUND


def test_the_table_is_bounded() -> None:
    core = LifecycleCore(LifecycleConfig(max_flows=50))
    for port in range(1, 500):
        core.divert_event(ev(FlowEvent.ESTABLISHED, m.Flow(17, L4, port, R4, 53)), port)
    assert len(core.flows) == 50
    assert core.counters["evicted"] == 449
