"""Hand-built IPv4/IPv6 packets for the capture unit tests, with an independent checksum.

Kept deliberately naive (a word-by-word loop, no shared code with actors.capture.packets) so
the tests check the production checksum code instead of repeating it.
"""

from __future__ import annotations

import ipaddress
import struct

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def tcp(
    sport: int,
    dport: int,
    flags: int = SYN,
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
    options: bytes = b"",
) -> tuple[int, bytes]:
    doff = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
    return TCP, hdr + options + payload


def udp(sport: int, dport: int, payload: bytes = b"q") -> tuple[int, bytes]:
    return UDP, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp_echo(v6: bool = False, ident: int = 7, seq: int = 1) -> tuple[int, bytes]:
    return (
        (ICMPV6, struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"ping")
        if v6
        else (ICMP, struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"ping")
    )


def _fill_l4_checksum(proto: int, src: bytes, dst: bytes, seg: bytearray) -> None:
    off = {TCP: 16, UDP: 6, ICMP: 2, ICMPV6: 2}.get(proto)
    if off is None:
        return
    seg[off : off + 2] = b"\0\0"
    s = (
        naive_sum(bytes(seg))
        if proto == ICMP
        else naive_sum(pseudo(src, dst, proto, len(seg)) + bytes(seg))
    )
    seg[off : off + 2] = struct.pack("!H", ~s & 0xFFFF)


def v4(
    src: str, dst: str, l4: tuple[int, bytes], options: bytes = b"", frag_offset: int = 0
) -> bytes:
    proto, seg = l4
    seg = bytearray(seg)
    s, d = a(src), a(dst)
    _fill_l4_checksum(proto, s, d, seg)
    ihl = (20 + len(options)) // 4
    hdr = (
        bytearray(
            struct.pack(
                "!BBHHHBBH4s4s",
                0x40 | ihl,
                0,
                ihl * 4 + len(seg),
                1,
                frag_offset & 0x1FFF,
                64,
                proto,
                0,
                s,
                d,
            )
        )
        + options
    )
    hdr[10:12] = struct.pack("!H", ~naive_sum(bytes(hdr)) & 0xFFFF)
    return bytes(hdr + seg)


def v6(
    src: str, dst: str, l4: tuple[int, bytes], ext: list[tuple[int, bytes]] | None = None
) -> bytes:
    """`ext`: extension headers as (type, body-after-the-first-2-bytes), in order."""
    proto, seg = l4
    seg = bytearray(seg)
    s, d = a(src), a(dst)
    _fill_l4_checksum(proto, s, d, seg)
    chain = ext or []
    first = chain[0][0] if chain else proto
    exts = b""
    for i, (kind, body) in enumerate(chain):
        nxt = chain[i + 1][0] if i + 1 < len(chain) else proto
        if kind == 44:  # fragment: next, reserved, offset/flags, id
            exts += bytes([nxt, 0]) + body
        else:
            total = 2 + len(body)
            assert total % 8 == 0
            exts += bytes([nxt, total // 8 - 1]) + body
    hdr = struct.pack("!IHBB16s16s", 0x60000000, len(exts) + len(seg), first, 64, s, d)
    return hdr + exts + bytes(seg)


def l4_checksum_ok(raw: bytes) -> bool:
    """Verify the IPv4 header and TCP/UDP/ICMP checksum of a packet without options/ext."""
    if raw[0] >> 4 == 4:
        ihl = (raw[0] & 15) * 4
        if naive_sum(raw[:ihl]) != 0xFFFF:
            return False
        proto, src, dst, seg = raw[9], raw[12:16], raw[16:20], raw[ihl:]
    else:
        proto, src, dst, seg = raw[6], raw[8:24], raw[24:40], raw[40:]
    if proto == ICMP:
        return naive_sum(seg) == 0xFFFF
    return naive_sum(pseudo(src, dst, proto, len(seg)) + seg) == 0xFFFF
