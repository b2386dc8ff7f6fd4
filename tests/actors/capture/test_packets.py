"""Raw parsing, rewriting and reject-packet building on hand-crafted packets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kextless.actors.capture import packets as pk
from tests.actors.capture import crafted as c
from tests.actors.capture.crafted import a


def test_parse_ipv4_tcp_fields() -> None:
    raw = c.v4("10.0.0.1", "10.0.0.2", c.tcp(40000, 443, c.SYN, seq=77, payload=b"hi"))
    p = pk.parse(raw)
    assert p is not None
    assert (p.version, p.protocol, p.src, p.dst) == (4, 6, a("10.0.0.1"), a("10.0.0.2"))
    assert (p.sport, p.dport, p.flags, p.seq, p.payload_len, p.l4) == (40000, 443, c.SYN, 77, 2, 20)


def test_parse_ipv4_options_shift_the_transport_header() -> None:
    # Record-route style options (8 bytes): the kext read ports at a fixed offset 20
    # (kext-contract C15-11).
    raw = c.v4("10.0.0.1", "10.0.0.2", c.udp(5353, 53), options=b"\x07\x07\x04" + b"\0" * 5)
    p = pk.parse(raw)
    assert p is not None and p.l4 == 28
    assert (p.sport, p.dport, p.payload_len) == (5353, 53, 1)


def test_parse_ipv6_extension_headers_are_walked() -> None:
    hop = (0, b"\x01\x04\0\0\0\0")  # hop-by-hop, PadN, 8 bytes total
    dst = (60, b"\x01\x0c" + b"\0" * 12)  # destination options, 16 bytes
    frag = (44, struct.pack("!HI", 0x0001, 0xABCD))  # first fragment (offset 0, M=1)
    raw = c.v6("fd00::1", "fd00::2", c.tcp(1234, 80, c.SYN), ext=[hop, dst, frag])
    p = pk.parse(raw)
    assert p is not None and not p.fragment
    assert (p.protocol, p.sport, p.dport, p.l4) == (6, 1234, 80, 40 + 8 + 16 + 8)


def test_parse_non_first_fragments_have_no_ports() -> None:
    v4 = pk.parse(c.v4("10.0.0.1", "10.0.0.2", c.udp(1, 2), frag_offset=185))
    v6 = pk.parse(
        c.v6("fd00::1", "fd00::2", c.udp(1, 2), ext=[(44, struct.pack("!HI", 185 << 3, 1))])
    )
    assert v4 is not None and v4.fragment and v4.sport == 0
    assert v6 is not None and v6.fragment and v6.protocol == 17


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x45" * 10,
        b"\x20" * 60,  # short, short, not IP
        c.v4("10.0.0.1", "10.0.0.2", c.tcp(1, 2))[:30],  # truncated TCP header
        bytes([0x46]) + c.v4("10.0.0.1", "10.0.0.2", c.udp(1, 2))[1:22],  # IHL beyond the data
        c.v6("fd00::1", "fd00::2", c.udp(1, 2))[:44],  # truncated UDP
    ],
)
def test_parse_rejects_garbage(raw: bytes) -> None:
    assert pk.parse(raw) is None


def test_parse_icmp_type() -> None:
    p = pk.parse(c.v6("fd00::1", "fd00::2", c.icmp_echo(v6=True)))
    assert p is not None and (p.protocol, p.icmp_type) == (58, 128)


@given(st.binary(max_size=3000))
def test_ones_sum_matches_the_naive_loop(data: bytes) -> None:
    assert pk.ones_sum(data) == c.naive_sum(data)


@given(st.binary(min_size=1, max_size=1500))
def test_parse_never_raises(data: bytes) -> None:
    pk.parse(data)


@pytest.mark.parametrize("builder", ["v4", "v4opt", "v6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_rewrite_changes_addresses_and_ports_with_valid_checksums(builder: str, proto: str) -> None:
    l4 = (
        c.tcp(40000, 53, c.PSH | c.ACK, payload=b"x" * 301)
        if proto == "tcp"
        else c.udp(40000, 53, b"query" * 41)
    )
    if builder == "v6":
        raw, new_dst = c.v6("fd00::1", "fd00::99", l4), a("::1")
    else:
        opts = b"\x01\x01\x01\x01" if builder == "v4opt" else b""
        raw, new_dst = c.v4("10.0.0.1", "10.0.0.99", l4, options=opts), a("127.0.0.1")
    p = pk.parse(raw)
    assert p is not None
    out = bytes(pk.rewrite(raw, p, dst=new_dst, dport=5353))
    q = pk.parse(out)
    assert q is not None
    assert (q.src, q.sport, q.dst, q.dport) == (p.src, 40000, new_dst, 5353)
    assert (
        out[q.l4 + (20 if proto == "tcp" else 8) :] == raw[p.l4 + (20 if proto == "tcp" else 8) :]
    )
    # Verify with the independent implementation (options are part of the v4 header sum).
    if q.version == 4:
        assert c.naive_sum(out[: q.l4]) == 0xFFFF
    seg = out[q.l4 :]
    assert c.naive_sum(c.pseudo(q.src, q.dst, q.protocol, len(seg)) + seg) == 0xFFFF


def test_rewrite_ignores_a_partial_offload_checksum() -> None:
    """Outbound packets carry only the pseudo-header sum (CHECKSUM_PARTIAL): recompute fully."""
    raw = bytearray(c.v4("10.0.0.1", "10.0.0.99", c.udp(40000, 53, b"abc")))
    raw[26:28] = b"\x12\x34"  # whatever the stack left there
    p = pk.parse(raw)
    assert p is not None
    out = bytes(pk.rewrite(raw, p, src=a("10.0.0.99"), sport=53))
    assert c.l4_checksum_ok(out)


def test_rst_for_an_outbound_syn_is_rst_ack_from_the_remote() -> None:
    raw = c.v4("10.0.0.1", "10.0.0.2", c.tcp(40000, 80, c.SYN, seq=1000))
    p = pk.parse(raw)
    assert p is not None
    rst = bytes(pk.build_rst(p))
    q = pk.parse(rst)
    assert q is not None
    assert (q.src, q.sport, q.dst, q.dport) == (a("10.0.0.2"), 80, a("10.0.0.1"), 40000)
    assert q.flags == c.RST | c.ACK and q.ack == 1001 and q.seq == 0
    assert c.l4_checksum_ok(rst)


def test_rst_for_an_established_packet_uses_its_ack_as_sequence() -> None:
    raw = c.v6(
        "fd00::1", "fd00::2", c.tcp(80, 40000, c.ACK | c.PSH, seq=5, ack=123456, payload=b"data")
    )
    p = pk.parse(raw)
    assert p is not None
    q = pk.parse(bytes(pk.build_rst(p)))
    assert q is not None
    assert q.flags == c.RST and q.seq == 123456 and (q.sport, q.dport) == (40000, 80)
    assert c.l4_checksum_ok(bytes(pk.build_rst(p)))


@pytest.mark.parametrize("v6", [False, True])
def test_port_unreachable_quotes_the_datagram(v6: bool) -> None:
    raw = (
        c.v6("fd00::1", "fd00::2", c.udp(40000, 9999, b"x" * 2000))
        if v6
        else c.v4("10.0.0.1", "10.0.0.2", c.udp(40000, 9999, b"x" * 2000))
    )
    p = pk.parse(raw)
    assert p is not None
    err = bytes(pk.build_port_unreachable(raw, p))
    q = pk.parse(err)
    assert q is not None
    assert (q.src, q.dst) == (p.dst, p.src)
    if v6:
        assert (q.protocol, err[40], err[41]) == (58, 1, 4)
        assert len(err) <= 1280 and err[48 : 48 + 100] == raw[:100]
    else:
        assert (q.protocol, err[20], err[21]) == (1, 3, 3)
        assert len(err) <= 576 and err[28 : 28 + 28] == raw[:28]
    assert c.l4_checksum_ok(err)


def test_loopback_addresses() -> None:
    assert pk.is_loopback_addr(a("127.3.0.1")) and pk.is_loopback_addr(a("::1"))
    assert not pk.is_loopback_addr(a("10.0.0.1")) and not pk.is_loopback_addr(a("fd00::1"))


def test_forward_rst_takes_the_place_of_the_packet() -> None:
    raw = c.v4(
        "10.0.0.2", "10.0.0.1", c.tcp(80, 40000, c.ACK | c.PSH, seq=777, ack=5, payload=b"x" * 50)
    )
    p = pk.parse(raw)
    assert p is not None
    fwd = bytes(pk.build_rst_forward(p))
    q = pk.parse(fwd)
    assert q is not None
    assert (q.src, q.sport, q.dst, q.dport, q.seq, q.flags) == (p.src, 80, p.dst, 40000, 777, c.RST)
    assert c.l4_checksum_ok(fwd)
