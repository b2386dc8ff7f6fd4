"""Regenerate tests/data/sample-infos.bin: one record of every info type, with realistic values.

The sample lets the README show `kextless decode` before the system runs; a test checks the
committed file still equals what this script writes. Run: python tests/data/make_samples.py
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from kextless.protocol.kext import (
    BandwidthEntry,
    BandwidthStatsV4,
    BandwidthStatsV6,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
    Direction,
    Info,
    IpProtocol,
    LogLine,
    PayloadLayer,
    Severity,
    encode_info,
)

SAMPLE_INFOS = Path(__file__).with_name("sample-infos.bin")

_HOST4 = IPv4Address("192.168.1.5").packed
_WEB4 = IPv4Address("93.184.216.34").packed
_HOST6 = IPv6Address("2001:db8::5").packed
_DNS6 = IPv6Address("2001:4860:4860::8888").packed


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071); the kext recomputes it on every copy it sends."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcp_syn_v4() -> bytes:
    """An outbound IPv4 TCP SYN, 192.168.1.5:49152 -> 93.184.216.34:443 (what layer 3 carries)."""
    tcp = struct.pack("!HHIIBBHHH", 49152, 443, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = _HOST4 + _WEB4 + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, _HOST4, _WEB4)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


def _udp_dns_v6() -> bytes:
    """A UDP DNS query for example.com from its transport header (what the ALE layer,
    payload_layer 4, carries)."""
    query = bytes.fromhex("123401000001000000000000076578616d706c6503636f6d0000010001")
    udp = struct.pack("!HHHH", 53000, 53, 8 + len(query), 0) + query
    pseudo = _HOST6 + _DNS6 + struct.pack("!IxxxB", len(udp), 17)
    return udp[:6] + struct.pack("!H", _checksum(pseudo + udp)) + udp[8:]


def sample_infos() -> list[Info]:
    return [
        LogLine(Severity.INFO, "src/device.rs:201 Verdict invalid id: 7"),
        ConnectionIpv4(
            1,
            4242,
            Direction.OUTBOUND,
            IpProtocol.TCP,
            _HOST4,
            _WEB4,
            49152,
            443,
            PayloadLayer.NETWORK,
            _tcp_syn_v4(),
        ),
        ConnectionIpv6(
            2,
            1337,
            Direction.OUTBOUND,
            IpProtocol.UDP,
            _HOST6,
            _DNS6,
            53000,
            53,
            PayloadLayer.TRANSPORT,
            _udp_dns_v6(),
        ),
        ConnectionEndEventV4(4242, Direction.OUTBOUND, IpProtocol.TCP, _HOST4, _WEB4, 49152, 443),
        ConnectionEndEventV6(1337, Direction.OUTBOUND, IpProtocol.UDP, _HOST6, _DNS6, 53000, 53),
        BandwidthStatsV4(
            IpProtocol.TCP,
            (
                BandwidthEntry(_HOST4, 49152, _WEB4, 443, 517, 4096),
                BandwidthEntry(_HOST4, 49153, _WEB4, 443, 1200, 88000),
            ),
        ),
        BandwidthStatsV6(IpProtocol.UDP, (BandwidthEntry(_HOST6, 53000, _DNS6, 53, 45, 61),)),
    ]


def sample_infos_bytes() -> bytes:
    return b"".join(encode_info(info) for info in sample_infos())


if __name__ == "__main__":
    SAMPLE_INFOS.write_bytes(sample_infos_bytes())
    print(f"wrote {SAMPLE_INFOS} ({SAMPLE_INFOS.stat().st_size} bytes)")
