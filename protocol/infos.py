"""Infos (kext -> Portmaster): byte-exact codecs for the seven record types
(kext-contract C2-2 to C2-5).

Every record is a 5-byte header (type u8, body length u32 LE) and a packed little-endian body.
Addresses are raw network-order bytes; ports are host-order numbers written as u16 LE. Note the
field orders: connection infos group addresses then ports, bandwidth entries pair each address
with its port.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar

import msgspec

from kextless.protocol.enums import Direction, InfoType, PayloadLayer, Severity
from kextless.protocol.errors import ProtocolError

HEADER = struct.Struct("<BI")
HEADER_SIZE = HEADER.size  # 5

_CONN_V4 = struct.Struct("<QQBB4s4sHHBI")  # 35 bytes, then the payload
_CONN_V6 = struct.Struct("<QQBB16s16sHHBI")  # 59 bytes, then the payload
_END_V4 = struct.Struct("<QBB4s4sHH")  # 22
_END_V6 = struct.Struct("<QBB16s16sHH")  # 46
_BW_HEAD = struct.Struct("<BI")  # protocol, count
_BW_V4 = struct.Struct("<4sH4sHQQ")  # 28
_BW_V6 = struct.Struct("<16sH16sHQQ")  # 52


def _ip_text(raw: bytes) -> str:
    return str(IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw))


def _check_addr(name: str, raw: bytes, size: int) -> None:
    if type(raw) is not bytes or len(raw) != size:
        raise ProtocolError(f"{name} must be {size} raw bytes, got {raw!r}")


def _pack(s: struct.Struct, kind: str, *values: object) -> bytes:
    try:
        return s.pack(*values)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode {kind}: {exc}") from None


class LogLine(msgspec.Struct, frozen=True):
    #: A Severity when known; any other u8 passes through as a plain int (see _u8_enum).
    severity: int
    line: str
    TYPE: ClassVar[InfoType] = InfoType.LOG_LINE

    def encode(self) -> bytes:
        return encode_info(self)

    def _encode(self) -> bytes:
        text = self.line.encode("utf-8")
        if not text:
            raise ProtocolError("LogLine text must not be empty (Portmaster rejects it)")
        return _pack(HEADER, "LogLine", 0, 1 + len(text)) + bytes((self.severity,)) + text


class _Connection(msgspec.Struct, frozen=True):
    """Fields shared by ConnectionIpv4/Ipv6; the subclass fixes the type and address size."""

    id: int
    process_id: int
    #: Direction / PayloadLayer when known; other u8 values pass through as plain ints.
    direction: int
    protocol: int
    local_ip: bytes
    remote_ip: bytes
    local_port: int
    remote_port: int
    payload_layer: int
    payload: bytes
    TYPE: ClassVar[InfoType]
    _ADDR: ClassVar[int]
    _BODY: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return encode_info(self)  # type: ignore[arg-type]

    def _encode(self) -> bytes:
        _check_addr("local_ip", self.local_ip, self._ADDR)
        _check_addr("remote_ip", self.remote_ip, self._ADDR)
        kind = self.TYPE.kext_name
        n = len(self.payload)
        return (
            _pack(HEADER, kind, self.TYPE, self._BODY.size + n)
            + _pack(
                self._BODY,
                kind,
                self.id,
                self.process_id,
                self.direction,
                self.protocol,
                self.local_ip,
                self.remote_ip,
                self.local_port,
                self.remote_port,
                self.payload_layer,
                n,
            )
            + self.payload
        )


class ConnectionIpv4(_Connection, frozen=True):
    TYPE: ClassVar[InfoType] = InfoType.CONNECTION_IPV4
    _ADDR: ClassVar[int] = 4
    _BODY: ClassVar[struct.Struct] = _CONN_V4


class ConnectionIpv6(_Connection, frozen=True):
    TYPE: ClassVar[InfoType] = InfoType.CONNECTION_IPV6
    _ADDR: ClassVar[int] = 16
    _BODY: ClassVar[struct.Struct] = _CONN_V6


class _ConnectionEnd(msgspec.Struct, frozen=True):
    """Fields shared by ConnectionEndEventV4/V6."""

    process_id: int
    #: A Direction when known; other u8 values pass through as plain ints.
    direction: int
    protocol: int
    local_ip: bytes
    remote_ip: bytes
    local_port: int
    remote_port: int
    TYPE: ClassVar[InfoType]
    _ADDR: ClassVar[int]
    _BODY: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return encode_info(self)  # type: ignore[arg-type]

    def _encode(self) -> bytes:
        _check_addr("local_ip", self.local_ip, self._ADDR)
        _check_addr("remote_ip", self.remote_ip, self._ADDR)
        kind = self.TYPE.kext_name
        return _pack(HEADER, kind, self.TYPE, self._BODY.size) + _pack(
            self._BODY,
            kind,
            self.process_id,
            self.direction,
            self.protocol,
            self.local_ip,
            self.remote_ip,
            self.local_port,
            self.remote_port,
        )


class ConnectionEndEventV4(_ConnectionEnd, frozen=True):
    TYPE: ClassVar[InfoType] = InfoType.CONNECTION_END_EVENT_V4
    _ADDR: ClassVar[int] = 4
    _BODY: ClassVar[struct.Struct] = _END_V4


class ConnectionEndEventV6(_ConnectionEnd, frozen=True):
    TYPE: ClassVar[InfoType] = InfoType.CONNECTION_END_EVENT_V6
    _ADDR: ClassVar[int] = 16
    _BODY: ClassVar[struct.Struct] = _END_V6


class BandwidthEntry(msgspec.Struct, frozen=True):
    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int
    transmitted_bytes: int
    received_bytes: int


class BandwidthStatsV4(msgspec.Struct, frozen=True):
    protocol: int
    values: tuple[BandwidthEntry, ...]
    TYPE: ClassVar[InfoType] = InfoType.BANDWIDTH_STATS_V4

    def encode(self) -> bytes:
        return encode_info(self)

    def _encode(self) -> bytes:
        return _encode_bandwidth(5, self.protocol, self.values, _BW_V4, 4)


class BandwidthStatsV6(msgspec.Struct, frozen=True):
    protocol: int
    values: tuple[BandwidthEntry, ...]
    TYPE: ClassVar[InfoType] = InfoType.BANDWIDTH_STATS_V6

    def encode(self) -> bytes:
        return encode_info(self)

    def _encode(self) -> bytes:
        return _encode_bandwidth(6, self.protocol, self.values, _BW_V6, 16)


def _encode_bandwidth(
    info_type: int,
    protocol: int,
    values: tuple[BandwidthEntry, ...],
    entry: struct.Struct,
    addr_size: int,
) -> bytes:
    kind = InfoType(info_type).kext_name
    parts = [
        _pack(HEADER, kind, info_type, 5 + entry.size * len(values)),
        _pack(_BW_HEAD, kind, protocol, len(values)),
    ]
    for v in values:
        _check_addr("local_ip", v.local_ip, addr_size)
        _check_addr("remote_ip", v.remote_ip, addr_size)
        parts.append(
            _pack(
                entry,
                kind,
                v.local_ip,
                v.local_port,
                v.remote_ip,
                v.remote_port,
                v.transmitted_bytes,
                v.received_bytes,
            )
        )
    return b"".join(parts)


Info = (
    LogLine
    | ConnectionIpv4
    | ConnectionIpv6
    | ConnectionEndEventV4
    | ConnectionEndEventV6
    | BandwidthStatsV4
    | BandwidthStatsV6
)


def encode_info(info: Info) -> bytes:
    """The record's wire bytes, header included. Raises ProtocolError on out-of-range fields."""
    try:
        return info._encode()
    except ProtocolError:
        raise
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {type(info).__name__}: {exc}") from None


def _u8_enum(cls: type[IntEnum], value: int) -> int:
    """The enum member when the value is known, else the raw byte.

    Portmaster's RecvInfo reads direction, payload_layer and severity as plain bytes and never
    rejects a value (the kext's own protocol test stream uses direction 3 and payload_layer 7),
    so a dissector that shows what Portmaster would see must not reject them either.
    """
    try:
        return cls(value)
    except ValueError:
        return value


def _decode_connection(
    body: bytes, s: struct.Struct, cls: type[ConnectionIpv4 | ConnectionIpv6], kind: str
) -> Info:
    if len(body) < s.size:
        raise ProtocolError(f"{kind}: body of {len(body)} bytes is shorter than {s.size}")
    (id_, pid, direction, proto, local, remote, lport, rport, layer, n) = s.unpack_from(body)
    if len(body) != s.size + n:
        raise ProtocolError(
            f"{kind}: payload_len {n} does not match body length {len(body)} "
            f"(expected {s.size + n})"
        )
    return cls(
        id_,
        pid,
        _u8_enum(Direction, direction),
        proto,
        local,
        remote,
        lport,
        rport,
        _u8_enum(PayloadLayer, layer),
        bytes(body[s.size :]),
    )


def _decode_end(
    body: bytes, s: struct.Struct, cls: type[ConnectionEndEventV4 | ConnectionEndEventV6], kind: str
) -> Info:
    if len(body) != s.size:
        raise ProtocolError(f"{kind}: body is {len(body)} bytes, expected {s.size}")
    pid, direction, proto, local, remote, lport, rport = s.unpack(body)
    return cls(pid, _u8_enum(Direction, direction), proto, local, remote, lport, rport)


def _decode_bandwidth(
    body: bytes, entry: struct.Struct, cls: type[BandwidthStatsV4 | BandwidthStatsV6], kind: str
) -> Info:
    if len(body) < _BW_HEAD.size:
        raise ProtocolError(f"{kind}: body of {len(body)} bytes is shorter than 5")
    proto, count = _BW_HEAD.unpack_from(body)
    expected = _BW_HEAD.size + entry.size * count
    if len(body) != expected:
        raise ProtocolError(
            f"{kind}: count {count} does not match body length {len(body)} (expected {expected})"
        )
    values = tuple(BandwidthEntry(*e) for e in entry.iter_unpack(body[_BW_HEAD.size :]))
    return cls(proto, values)


def _decode_log(body: bytes) -> Info:
    if len(body) < 1:
        raise ProtocolError("LogLine: empty body, expected a severity byte")
    if len(body) == 1:
        # Portmaster fails to read a zero-length text (kext-contract C14-1).
        raise ProtocolError("LogLine: no text after the severity byte")
    return LogLine(_u8_enum(Severity, body[0]), bytes(body[1:]).decode("utf-8", errors="replace"))


def decode_info_body(info_type: int, body: bytes) -> Info:
    """Decode one record body of a known type. Raises ProtocolError if it does not fit."""
    if info_type == 1:
        return _decode_connection(body, _CONN_V4, ConnectionIpv4, "ConnectionIpv4")
    if info_type == 2:
        return _decode_connection(body, _CONN_V6, ConnectionIpv6, "ConnectionIpv6")
    if info_type == 0:
        return _decode_log(body)
    if info_type == 3:
        return _decode_end(body, _END_V4, ConnectionEndEventV4, "ConnectionEndEventV4")
    if info_type == 4:
        return _decode_end(body, _END_V6, ConnectionEndEventV6, "ConnectionEndEventV6")
    if info_type == 5:
        return _decode_bandwidth(body, _BW_V4, BandwidthStatsV4, "BandwidthStatsV4")
    if info_type == 6:
        return _decode_bandwidth(body, _BW_V6, BandwidthStatsV6, "BandwidthStatsV6")
    raise ProtocolError(f"unknown info type {info_type}")


def decode_info(record: bytes) -> Info:
    """Decode exactly one whole record (header + body)."""
    if len(record) < HEADER_SIZE:
        raise ProtocolError(f"record of {len(record)} bytes is shorter than the 5-byte header")
    info_type, length = HEADER.unpack_from(record)
    if info_type > 6:
        raise ProtocolError(f"unknown info type {info_type}")
    if len(record) - HEADER_SIZE != length:
        raise ProtocolError(
            f"{InfoType(info_type).kext_name}: header says {length} body bytes, "
            f"record has {len(record) - HEADER_SIZE}"
        )
    return decode_info_body(info_type, record[HEADER_SIZE:])


def info_to_json(info: Info) -> dict[str, object]:
    """The dissector's view: kext type and field names, addresses as text, payload as hex."""
    out: dict[str, object] = {"type": info.TYPE.kext_name}
    for field in info.__struct_fields__:
        value = getattr(info, field)
        if field in ("local_ip", "remote_ip"):
            value = _ip_text(value)
        elif field == "payload":
            value = value.hex()
        elif field == "values":
            value = [
                {
                    "local_ip": _ip_text(e.local_ip),
                    "local_port": e.local_port,
                    "remote_ip": _ip_text(e.remote_ip),
                    "remote_port": e.remote_port,
                    "transmitted_bytes": e.transmitted_bytes,
                    "received_bytes": e.received_bytes,
                }
                for e in value
            ]
        elif isinstance(value, int):
            value = int(value)
        out[field] = value
    return out
