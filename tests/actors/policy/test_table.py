"""The policy's connection table core: rows from infos, bandwidth deltas, ends, expiry with an
injected clock, the bound, and which live connections a reload re-decides (the Updates)."""

from __future__ import annotations

import ipaddress

import pytest

from kextless.actors.policy.main import decision, update_command
from kextless.actors.policy.rules import flow_of, parse
from kextless.actors.policy.table import ConnectionTable
from kextless.actors.policy.view import ProcessFacts
from kextless.protocol.commands import UpdateV4Command, UpdateV6Command, decode_command
from kextless.protocol.enums import Direction, PayloadLayer, Verdict
from kextless.protocol.infos import (
    BandwidthEntry,
    BandwidthStatsV4,
    BandwidthStatsV6,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
)

S = 1_000_000_000
L4, R4 = ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed
L6, R6 = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed
FACTS = ProcessFacts(pid=7, name="app", exe="/bin/app", user="root", uid=0)


def info(id_: int, rport: int, proto: int = 6, v6: bool = False, lport: int = 40000, pid: int = 7):  # type: ignore[no-untyped-def]
    cls = ConnectionIpv6 if v6 else ConnectionIpv4
    local, remote = (L6, R6) if v6 else (L4, R4)
    return cls(
        id_, pid, Direction.OUTBOUND, proto, local, remote, lport, rport, PayloadLayer.NETWORK, b""
    )


def end(rport: int, proto: int = 6, v6: bool = False, lport: int = 40000):  # type: ignore[no-untyped-def]
    cls = ConnectionEndEventV6 if v6 else ConnectionEndEventV4
    local, remote = (L6, R6) if v6 else (L4, R4)
    return cls(7, Direction.OUTBOUND, proto, local, remote, lport, rport)


def add(t: ConnectionTable, i, verdict: Verdict = Verdict.PERMANENT_ACCEPT, rule: str = "default"):  # type: ignore[no-untyped-def]
    return t.decided(i, flow_of(i), FACTS, verdict, rule, 1000.0)


def test_rows_keyed_by_5_tuple_a_new_id_updates_the_row() -> None:
    t = ConnectionTable()
    add(t, info(1, 80))
    add(t, info(2, 80), Verdict.ACCEPT, "rule 1 (line 3)")  # temporary: asked again
    add(t, info(3, 80, proto=17))
    add(t, info(4, 80, v6=True))
    assert len(t) == 3
    (row,) = [r for r in t.view() if r.protocol == "tcp" and r.local_ip == "10.0.0.1"]
    assert (row.id, row.verdict, row.rule, row.pid, row.process) == (
        2,
        "Accept",
        "rule 1 (line 3)",
        7,
        "app",
    )
    six = next(r for r in t.view() if r.remote_ip == "[fd00::2]")
    assert six.local_ip == "[fd00::1]" and six.direction == "outbound"


def test_bandwidth_deltas_add_up_transmitted_is_sent() -> None:
    t = ConnectionTable()
    add(t, info(1, 80))
    add(t, info(2, 80, v6=True, proto=17))
    t.bandwidth(BandwidthStatsV4(6, (BandwidthEntry(L4, 40000, R4, 80, 100, 2000),)))
    t.bandwidth(BandwidthStatsV4(6, (BandwidthEntry(L4, 40000, R4, 80, 5, 7),)))
    t.bandwidth(BandwidthStatsV6(17, (BandwidthEntry(L6, 40000, R6, 80, 1, 2),)))
    # an unknown flow and the wrong protocol are not counted against any row
    t.bandwidth(BandwidthStatsV4(17, (BandwidthEntry(L4, 40000, R4, 80, 9, 9),)))
    t.bandwidth(BandwidthStatsV4(6, (BandwidthEntry(L4, 1, R4, 80, 9, 9),)))
    rows = {r.protocol: r for r in t.view()}
    assert (rows["tcp"].sent, rows["tcp"].received) == (105, 2007)
    assert (rows["udp"].sent, rows["udp"].received) == (1, 2)
    assert t.unknown_bandwidth == 2


def test_ended_rows_leave_after_60_s_and_a_reused_tuple_starts_again() -> None:
    t = ConnectionTable()
    add(t, info(1, 80))
    add(t, info(2, 81))
    t.bandwidth(BandwidthStatsV4(6, (BandwidthEntry(L4, 40000, R4, 80, 10, 10),)))
    t.ended(end(80), now_ns=10 * S, wall=2000.0)
    t.ended(end(80), now_ns=20 * S, wall=3000.0)  # never twice
    t.ended(end(99), now_ns=20 * S, wall=3000.0)  # unknown
    assert t.unknown_ends == 1
    ended = next(r for r in t.view() if r.remote_port == 80)
    assert ended.ended == 2000.0
    assert t.expire(69 * S) == 0
    assert t.expire(70 * S + 1) == 1
    assert [r.remote_port for r in t.view()] == [81]
    # 81 ends, then its 5-tuple is used again before expiry: a fresh row with no bytes
    t.ended(end(81), now_ns=80 * S, wall=4000.0)
    add(t, info(9, 81))
    row = t.view()[0]
    assert (row.id, row.ended, row.sent) == (9, None, 0)
    assert t.expire(1000 * S) == 0  # it is live now


def test_the_bound_drops_the_oldest_ended_first_then_the_oldest_live() -> None:
    t = ConnectionTable(limit=3)
    for port in (1, 2, 3):
        add(t, info(port, port))
    t.ended(end(3), 5 * S, 5.0)
    t.ended(end(2), 6 * S, 6.0)
    add(t, info(4, 4))  # over the bound: 3 ended first of the ended ones
    assert sorted(r.remote_port for r in t.view()) == [1, 2, 4]
    add(t, info(5, 5))  # then 2, the only ended one left
    assert sorted(r.remote_port for r in t.view()) == [1, 4, 5]
    add(t, info(6, 6))  # none ended: the oldest live
    assert sorted(r.remote_port for r in t.view()) == [4, 5, 6]
    assert t.dropped == 3
    assert t.expire(10**6 * S) == 0  # dropped rows are gone from the expiry order too
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionTable(limit=0)


def test_reload_updates_only_live_tcp_udp_connections_whose_verdict_changes() -> None:
    old = parse("default = 'PermanentAccept'")
    t = ConnectionTable()
    for i in (
        info(1, 80),  # tcp, will be blocked
        info(2, 443),  # tcp, stays accepted
        info(3, 80, proto=17, v6=True),  # udp v6, will be dropped
        info(4, 80, proto=1),  # icmp: never cached, no Update
        info(5, 80, lport=40001),  # ended: no Update
    ):
        verdict, rule = old.match(flow_of(i), FACTS)
        t.decided(i, flow_of(i), FACTS, verdict, rule, 1.0)
    t.ended(end(80, lport=40001), 1 * S, 1.0)
    new = parse(
        "default = 'PermanentAccept'\n"
        "[[rule]]\nprotocol = 'tcp'\nremote_port = 80\nverdict = 'PermanentBlock'\n"
        "[[rule]]\nname = 'no app'\nprocess = 'app'\nprotocol = 'udp'\nverdict = 'PermanentDrop'\n"
        "[[rule]]\nprotocol = 'icmp'\nverdict = 'Block'\n"
    )
    changes = t.reload(new)
    assert [(c.row.id, c.old, c.verdict, c.rule) for c in changes] == [
        (1, Verdict.PERMANENT_ACCEPT, Verdict.PERMANENT_BLOCK, "rule 1 (line 2)"),
        (3, Verdict.PERMANENT_ACCEPT, Verdict.PERMANENT_DROP, "no app"),
    ]
    rows = {r.id: r for r in t.view()}
    assert rows[1].verdict == "PermanentBlock" and rows[1].rule == "rule 1 (line 2)"
    assert rows[4].verdict == "PermanentAccept"  # icmp untouched
    assert rows[5].verdict == "PermanentAccept"  # ended untouched
    # the commands: V4 for a v4 row, V6 for a v6 one, with the row's 5-tuple
    c4 = decode_command(update_command(changes[0]))
    assert isinstance(c4, UpdateV4Command)
    assert (c4.protocol, c4.local_address, c4.local_port, c4.remote_address, c4.remote_port) == (
        6,
        L4,
        40000,
        R4,
        80,
    )
    assert c4.verdict == Verdict.PERMANENT_BLOCK
    c6 = decode_command(update_command(changes[1]))
    assert isinstance(c6, UpdateV6Command) and c6.remote_address == R6
    assert c6.verdict == Verdict.PERMANENT_DROP
    # and the decision lines say update=true with the new verdict
    d = decision(changes[1].row, 5.0, update=True)
    assert (d.update, d.verdict, d.rule, d.remote_ip, d.protocol) == (
        True,
        "PermanentDrop",
        "no app",
        "[fd00::2]",
        "udp",
    )
    assert t.reload(new) == []  # the same rules again: nothing changes
    assert [c.row.id for c in t.reload(old)] == [1, 3]  # back


def test_an_echo_and_its_reply_share_a_row_but_each_decision_line_has_its_own_direction() -> None:
    t = ConnectionTable()
    out = info(1, 0, proto=1, lport=0)
    back = ConnectionIpv4(2, 7, Direction.INBOUND, 1, L4, R4, 0, 0, PayloadLayer.NETWORK, b"")
    lines = []
    for one in (out, back):
        flow = flow_of(one)
        row = t.decided(one, flow, FACTS, Verdict.ACCEPT, "default", 1.0)
        lines.append(decision(row, 1.0, flow=flow))
    assert len(t.rows) == 1
    assert [line.direction for line in lines] == ["outbound", "inbound"]
    assert [line.id for line in lines] == [1, 2]
