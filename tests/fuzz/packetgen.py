"""Hypothesis strategies for hostile IP packets, and an independent reference parser.

The generator builds packets field by field (IPv4 options, IPv6 extension-header chains,
fragments, any TCP flags and data offset), then optionally damages them (truncation, bad
IHL / total length / payload length / data offset). `reference_parse` is written from the
RFCs without looking at `actors/capture/packets.py`, so comparing the two is a real check,
not a copy of the code under test. Also used by the atheris harnesses in `fuzz/`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOP, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
EXT = (HOP, ROUTING, FRAGMENT, AH, DSTOPTS)


@dataclass(frozen=True)
class Ref:
    """What a correct parser must report (the fields the capture uses)."""

    version: int
    protocol: int
    src: bytes
    dst: bytes
    l4: int
    end: int
    sport: int = 0
    dport: int = 0
    flags: int = 0
    seq: int = 0
    ack: int = 0
    payload_len: int = 0
    fragment: bool = False
    icmp_type: int = -1


def reference_parse(raw: bytes) -> Ref | None:
    """RFC 791 / 8200 / 793 / 768 reading of `raw`; None where no transport header can be
    trusted. Lengths: a v4 total length outside [IHL, buffer] and a v6 payload length of 0
    or past the buffer mean "the buffer is the packet" (GSO super-packets, jumbograms)."""
    n = len(raw)
    if n == 0:
        return None
    version = raw[0] >> 4
    if version == 4:
        if n < 20:
            return None
        ihl = 4 * (raw[0] & 15)
        if ihl < 20 or ihl > n:
            return None
        total = int.from_bytes(raw[2:4], "big")
        end = total if ihl <= total <= n else n
        proto, src, dst = raw[9], raw[12:16], raw[16:20]
        if int.from_bytes(raw[6:8], "big") & 0x1FFF:
            return Ref(4, proto, src, dst, ihl, end, fragment=True)
        return _ref_l4(4, proto, src, dst, raw, ihl, end)
    if version != 6 or n < 40:
        return None
    plen = int.from_bytes(raw[4:6], "big")
    end = 40 + plen if plen > 0 and 40 + plen <= n else n
    nh, src, dst, off = raw[6], raw[8:24], raw[24:40], 40
    while nh in EXT:
        if end - off < 8:
            return None  # every extension header is at least 8 bytes
        following = raw[off]
        if nh == FRAGMENT:
            offset_field = int.from_bytes(raw[off + 2 : off + 4], "big") >> 3
            if offset_field:
                return Ref(6, following, src, dst, off + 8, end, fragment=True)
            size = 8
        elif nh == AH:
            size = 4 * (raw[off + 1] + 2)
        else:
            size = 8 * (raw[off + 1] + 1)
        nh, off = following, off + size
    if off > end:
        return None
    return _ref_l4(6, nh, src, dst, raw, off, end)


def _ref_l4(
    version: int, proto: int, src: bytes, dst: bytes, raw: bytes, l4: int, end: int
) -> Ref | None:
    seg = raw[l4:end]
    if proto == TCP:
        if len(seg) < 20 or 4 * (seg[12] >> 4) < 20 or 4 * (seg[12] >> 4) > len(seg):
            return None
        sport, dport, seq, ack = struct.unpack("!HHII", seg[:12])
        doff = 4 * (seg[12] >> 4)
        return Ref(
            version, proto, src, dst, l4, end, sport, dport, seg[13], seq, ack, len(seg) - doff
        )
    if proto == UDP:
        if len(seg) < 8:
            return None
        sport, dport = struct.unpack("!HH", seg[:4])
        return Ref(version, proto, src, dst, l4, end, sport, dport, payload_len=len(seg) - 8)
    if proto in (ICMP, ICMPV6):
        return Ref(version, proto, src, dst, l4, end, icmp_type=seg[0] if seg else -1)
    return Ref(version, proto, src, dst, l4, end)


# ---- generation ---------------------------------------------------------------------------

#: A small address/port pool so that generated packets share flows (the core keeps state).
V4 = [bytes([10, 0, 0, i]) for i in (1, 2, 3)]
V6 = [bytes.fromhex("fd00" + "00" * 13) + bytes([i]) for i in (1, 2, 3)]
ports = st.sampled_from([53, 80, 443, 717, 40000, 40001]) | st.integers(0, 0xFFFF)


@st.composite
def transport(draw: st.DrawFn, proto: int) -> bytes:
    if proto == TCP:
        opts = draw(st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
        doff = draw(st.one_of(st.just((20 + len(opts)) // 4), st.integers(0, 15)))
        hdr = struct.pack(
            "!HHIIBBHHH",
            draw(ports),
            draw(ports),
            draw(st.integers(0, 2**32 - 1)),
            draw(st.integers(0, 2**32 - 1)),
            doff << 4 | draw(st.integers(0, 15)),
            draw(st.integers(0, 255)),  # any flag combination: SYN+FIN, SYN+RST, none ...
            draw(st.integers(0, 0xFFFF)),
            draw(st.integers(0, 0xFFFF)),
            0,
        )
        return hdr + opts + draw(st.binary(max_size=64))
    if proto == UDP:
        body = draw(st.binary(max_size=64))
        length = draw(st.one_of(st.just(8 + len(body)), st.integers(0, 0xFFFF)))
        return struct.pack("!HHHH", draw(ports), draw(ports), length, 0) + body
    if proto in (ICMP, ICMPV6):
        return bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=40))
    return draw(st.binary(max_size=40))


protocols = st.sampled_from([TCP, UDP, ICMP, ICMPV6]) | st.integers(0, 255)


@st.composite
def ipv4(draw: st.DrawFn) -> bytes:
    proto = draw(protocols)
    l4 = draw(transport(proto))
    opts = draw(st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
    ihl = (20 + len(opts)) // 4
    frag = draw(
        st.one_of(
            st.just(0),  # whole
            st.just(0x2000),  # first fragment (MF, offset 0)
            st.builds(
                lambda off, mf: off | mf, st.integers(1, 0x1FFF), st.sampled_from([0, 0x2000])
            ),
            st.integers(0, 0xFFFF),  # DF, the reserved bit, anything
        )
    )
    total = ihl * 4 + len(l4)
    total = draw(st.one_of(st.just(total), st.just(0), st.integers(0, 0xFFFF)))
    src, dst = draw(st.sampled_from(V4)), draw(st.sampled_from(V4))
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0, src, dst)
    return hdr + opts + l4


@st.composite
def ipv6(draw: st.DrawFn) -> bytes:
    proto = draw(protocols)
    l4 = draw(transport(proto))
    kinds = draw(
        st.one_of(
            st.lists(st.sampled_from(EXT), max_size=6),
            st.lists(st.sampled_from([HOP, DSTOPTS]), min_size=20, max_size=120),  # long chains
        )
    )
    chain = b""
    for i, kind in enumerate(kinds):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else proto
        if kind == FRAGMENT:
            offset = draw(st.one_of(st.just(0), st.integers(0, 0x1FFF)))
            chain += struct.pack("!BBHI", nxt, 0, offset << 3 | draw(st.integers(0, 7)), 7)
        elif kind == AH:
            units = draw(st.integers(1, 4))  # (units + 2) * 4 bytes
            chain += bytes([nxt, units]) + bytes((units + 2) * 4 - 2)
        else:
            units = draw(st.integers(0, 3))  # (units + 1) * 8 bytes
            chain += bytes([nxt, units]) + bytes((units + 1) * 8 - 2)
    first = kinds[0] if kinds else proto
    plen = draw(st.one_of(st.just(len(chain) + len(l4)), st.just(0), st.integers(0, 0xFFFF)))
    src, dst = draw(st.sampled_from(V6)), draw(st.sampled_from(V6))
    return struct.pack("!IHBB16s16s", 0x60000000, plen, first, 64, src, dst) + chain + l4


@st.composite
def damaged(draw: st.DrawFn, packet: st.SearchStrategy[bytes]) -> bytes:
    raw = bytearray(draw(packet))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["truncate", "byte", "ihl", "pad"]))
        if how == "truncate" and raw:
            del raw[draw(st.integers(0, len(raw) - 1)) :]
        elif how == "byte" and raw:
            raw[draw(st.integers(0, min(len(raw), 80) - 1))] = draw(st.integers(0, 255))
        elif how == "ihl" and raw:
            raw[0] = (raw[0] & 0xF0) | draw(st.integers(0, 15))
        elif how == "pad":
            raw += draw(st.binary(max_size=30))  # Ethernet-style trailing bytes
    return bytes(raw)


#: Every shape at once: well formed, damaged, and plain noise.
packets = st.one_of(
    ipv4(),
    ipv6(),
    damaged(ipv4()),
    damaged(ipv6()),
    st.binary(max_size=120),
)


def for_flow(
    protocol: int,
    local_ip: bytes,
    local_port: int,
    remote_ip: bytes,
    remote_port: int,
    outbound: bool,
    flags: int,
    options: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    """A well-formed IPv4 TCP/UDP packet of a flow (seen from the local side), either way."""
    src, sport, dst, dport = (
        (local_ip, local_port, remote_ip, remote_port)
        if outbound
        else (remote_ip, remote_port, local_ip, local_port)
    )
    if protocol == TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 1024, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    opts = options[: len(options) // 4 * 4]
    ihl = 5 + len(opts) // 4
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), 1, 0, 64, protocol, 0, src, dst
    )
    return hdr + opts + l4
