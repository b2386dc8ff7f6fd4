"""The filter strings compile with the WinDivert compiler and select what the core needs.

Uses libebpfdivert's filter compiler/evaluator only: no handle is opened.
"""

from __future__ import annotations

import pytest
from pydivert import EBPFDivert, Packet

from kextless.actors.capture import filters
from tests.actors.capture import crafted as c

L, R = "10.0.0.1", "10.0.0.2"


def matches(filt: str, raw: bytes, outbound: bool = True) -> bool:
    p = Packet(raw)
    p.direction = p.direction.OUTBOUND if outbound else p.direction.INBOUND
    return p.matches(filt)


@pytest.mark.parametrize(
    "ports",
    [frozenset(), frozenset({40000}), None, frozenset(range(20000, 20000 + filters.MAX_PORTS))],
)
def test_filters_compile(ports: frozenset[int] | None) -> None:
    ok, pos, msg = EBPFDivert.check_filter(filters.build(ports, [5555, 6666]))
    assert ok, (pos, msg)


def test_base_filter_selects_openers_ends_udp_and_other_protocols() -> None:
    f = filters.build(frozenset())
    assert matches(f, c.v4(L, R, c.tcp(40000, 80, c.SYN)))
    assert matches(f, c.v4(R, L, c.tcp(80, 40000, c.SYN)), outbound=False)
    assert not matches(f, c.v4(R, L, c.tcp(80, 40000, c.SYN | c.ACK)), outbound=False)
    assert not matches(f, c.v4(L, R, c.tcp(40000, 80, c.ACK, payload=b"bulk")))
    assert matches(f, c.v4(L, R, c.tcp(40000, 80, c.FIN | c.ACK)))
    assert matches(f, c.v4(L, R, c.udp(5000, 53)))
    assert matches(f, c.v4(L, R, c.icmp_echo()))
    assert matches(f, c.v6("fd00::1", "fd00::2", c.icmp_echo(v6=True)))
    nd = (58, bytes([135, 0, 0, 0]) + b"\0" * 20)
    assert not matches(f, c.v6("fd00::1", "ff02::1:ff00:2", nd))
    gre = (47, b"\0" * 8)
    assert matches(f, c.v4(L, R, gre))
    assert not matches(f, c.v4(L, R, (253, b"\0" * 8)))  # unlisted: see OTHER_PROTOCOLS
    assert not matches(f, c.v6("fd00::1", "fd00::2", gre))  # see filters.BASE: ARP misparse


def test_per_packet_ports_select_both_directions_and_exclusions_win() -> None:
    f = filters.build(frozenset({40000}), [5555])
    assert matches(f, c.v4(L, R, c.tcp(40000, 80, c.ACK, payload=b"x")))
    assert matches(f, c.v4(R, L, c.tcp(80, 40000, c.ACK, payload=b"x")), outbound=False)
    assert not matches(f, c.v4(L, R, c.tcp(40001, 80, c.ACK, payload=b"x")))
    assert not matches(f, c.v4(L, R, c.tcp(40000, 5555, c.SYN)))
    assert not matches(f, c.v4(L, R, c.udp(5555, 53)))
    assert matches(filters.build(None), c.v4(L, R, c.tcp(1, 2, c.ACK)))
