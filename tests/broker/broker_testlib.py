"""Encoded infos of every kind and size for the broker tests (real codecs, no canned bytes)."""

from __future__ import annotations

from protocol.enums import Direction, InfoType, PayloadLayer, Severity
from protocol.infos import (
    BandwidthEntry,
    BandwidthStatsV4,
    ConnectionEndEventV4,
    ConnectionIpv4,
    Info,
    LogLine,
)


def conn(id_: int, payload: int = 0) -> ConnectionIpv4:
    return ConnectionIpv4(id_, 1000 + id_, Direction.OUTBOUND, 6, b"\x0a\x00\x00\x01",
                          b"\x01\x02\x03\x04", 40000 + id_ % 1000, 443, PayloadLayer.NETWORK,
                          bytes(i % 251 for i in range(payload)))


def log(text: str, severity: Severity = Severity.ERROR) -> LogLine:
    return LogLine(severity, text)


def bandwidth(n: int) -> BandwidthStatsV4:
    return BandwidthStatsV4(6, tuple(
        BandwidthEntry(b"\x0a\x00\x00\x01", 1000 + i, b"\x01\x02\x03\x04", 443, i, 2 * i)
        for i in range(n)))


def end(pid: int) -> ConnectionEndEventV4:
    return ConnectionEndEventV4(pid, Direction.INBOUND, 17, b"\x0a\x00\x00\x01",
                                b"\x01\x02\x03\x04", 53, 5353)


def kind(info: Info) -> InfoType:
    return info.TYPE
