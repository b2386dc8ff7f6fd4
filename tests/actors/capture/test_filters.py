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


L6, R6 = "fd00::1", "fd00::2"
#: Hop-by-hop header with a router alert, as MLD is sent (RFC 2711 option 5, then PadN).
HBH_RA = (0, bytes([5, 2, 0, 0, 1, 0]))


@pytest.mark.parametrize("proto", [2, 47, 61, 132, 200, 253, 255])
def test_every_protocol_but_tcp_is_asked_in_both_families(proto: int) -> None:
    f = filters.build(frozenset())
    assert matches(f, c.v4(L, R, (proto, b"\0" * 8)))
    assert matches(f, c.v4(R, L, (proto, b"\0" * 8)), outbound=False)
    assert matches(f, c.v6(L6, R6, (proto, b"\0" * 8)))
    assert matches(f, c.v6(R6, L6, (proto, b"\0" * 8)), outbound=False)
    # behind extension headers (destination options; hop-by-hop) too
    assert matches(f, c.v6(L6, R6, (proto, b"\0" * 8), ext=[(60, b"\0" * 6)]))
    assert matches(f, c.v6(L6, R6, (proto, b"\0" * 8), ext=[HBH_RA]))


def test_udp_icmp_asked_in_both_families_also_behind_extension_headers() -> None:
    f = filters.build(frozenset())
    assert matches(f, c.v6(L6, R6, c.udp(5000, 53)))
    assert matches(f, c.v6(L6, R6, c.udp(5000, 53), ext=[HBH_RA]))
    assert matches(f, c.v6(L6, R6, c.icmp_echo(v6=True), ext=[(60, b"\0" * 6)]))
    assert matches(f, c.v4(L, R, c.udp(5000, 53)))
    # established TCP stays in the kernel, also behind an extension header
    assert not matches(f, c.v6(L6, R6, c.tcp(40000, 80, c.ACK, payload=b"x")))
    assert not matches(f, c.v6(L6, R6, c.tcp(40000, 80, c.ACK, payload=b"x"), ext=[HBH_RA]))
    assert matches(f, c.v6(L6, R6, c.tcp(40000, 80, c.SYN), ext=[(60, b"\0" * 6)]))


@pytest.mark.parametrize("icmp_type", [130, 131, 132, 133, 134, 135, 136, 137, 143])
def test_neighbour_discovery_and_mld_are_not_asked(icmp_type: int) -> None:
    f = filters.build(frozenset(), [5555])
    msg = (58, bytes([icmp_type, 0, 0, 0]) + b"\0" * 20)
    assert not matches(f, c.v6(L6, "ff02::1:ff00:2", msg))
    assert not matches(f, c.v6("fe80::1", "ff02::16", msg, ext=[HBH_RA]))
    assert not matches(f, c.v6("fe80::1", "ff02::16", msg, ext=[HBH_RA]), outbound=False)
    other = (58, bytes([icmp_type - 2 if icmp_type == 130 else 138, 0, 0, 0]) + b"\0" * 20)
    assert matches(f, c.v6(L6, R6, other))


def test_per_packet_ports_select_both_directions_and_exclusions_win() -> None:
    f = filters.build(frozenset({40000}), [5555])
    assert matches(f, c.v4(L, R, c.tcp(40000, 80, c.ACK, payload=b"x")))
    assert matches(f, c.v4(R, L, c.tcp(80, 40000, c.ACK, payload=b"x")), outbound=False)
    assert not matches(f, c.v4(L, R, c.tcp(40001, 80, c.ACK, payload=b"x")))
    assert not matches(f, c.v4(L, R, c.tcp(40000, 5555, c.SYN)))
    assert not matches(f, c.v4(L, R, c.udp(5555, 53)))
    assert not matches(f, c.v4(L, R, c.udp(53, 5555)))
    assert not matches(f, c.v6(L6, R6, c.udp(5555, 53)))
    assert not matches(f, c.v6(L6, R6, c.tcp(40000, 5555, c.SYN)))
    assert matches(f, c.v6(L6, R6, c.udp(5556, 53)))
    assert matches(f, c.v4(L, R, (253, b"5555")))  # other protocols have no ports
    assert matches(filters.build(None), c.v4(L, R, c.tcp(1, 2, c.ACK)))
    assert matches(filters.build(None), c.v6(L6, R6, c.tcp(1, 2, c.ACK)))
    assert not matches(filters.build(None, [5555]), c.v4(L, R, c.tcp(1, 5555, c.ACK)))
