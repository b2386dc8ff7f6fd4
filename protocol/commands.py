"""Commands (Portmaster -> kext): one per write, byte 0 the type, then a packed payload
(kext-contract C2-6). Decoding is strict where the kext was not (C2-7, C15-1): empty, short,
trailing bytes, unknown type and unknown verdict value all raise ProtocolError and nothing else."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar

import msgspec

from kextless.protocol.enums import CommandType, Verdict
from kextless.protocol.errors import ProtocolError

_VERDICT = struct.Struct("<QB")  # 9
_UPDATE_V4 = struct.Struct("<B4sH4sHB")  # 14
_UPDATE_V6 = struct.Struct("<B16sH16sHB")  # 38


class ShutdownCommand(msgspec.Struct, frozen=True):
    TYPE: ClassVar[CommandType] = CommandType.SHUTDOWN


class VerdictCommand(msgspec.Struct, frozen=True):
    id: int
    verdict: Verdict
    TYPE: ClassVar[CommandType] = CommandType.VERDICT


class UpdateV4Command(msgspec.Struct, frozen=True):
    protocol: int
    local_address: bytes
    local_port: int
    remote_address: bytes
    remote_port: int
    verdict: Verdict
    TYPE: ClassVar[CommandType] = CommandType.UPDATE_V4


class UpdateV6Command(msgspec.Struct, frozen=True):
    protocol: int
    local_address: bytes
    local_port: int
    remote_address: bytes
    remote_port: int
    verdict: Verdict
    TYPE: ClassVar[CommandType] = CommandType.UPDATE_V6


class ClearCacheCommand(msgspec.Struct, frozen=True):
    TYPE: ClassVar[CommandType] = CommandType.CLEAR_CACHE


class GetLogsCommand(msgspec.Struct, frozen=True):
    TYPE: ClassVar[CommandType] = CommandType.GET_LOGS


class GetBandwidthStatsCommand(msgspec.Struct, frozen=True):
    TYPE: ClassVar[CommandType] = CommandType.GET_BANDWIDTH_STATS


class PrintMemoryStatsCommand(msgspec.Struct, frozen=True):
    TYPE: ClassVar[CommandType] = CommandType.PRINT_MEMORY_STATS


class CleanEndedConnectionsCommand(msgspec.Struct, frozen=True):
    TYPE: ClassVar[CommandType] = CommandType.CLEAN_ENDED_CONNECTIONS


Command = (
    ShutdownCommand
    | VerdictCommand
    | UpdateV4Command
    | UpdateV6Command
    | ClearCacheCommand
    | GetLogsCommand
    | GetBandwidthStatsCommand
    | PrintMemoryStatsCommand
    | CleanEndedConnectionsCommand
)

_EMPTY: dict[int, Command] = {
    CommandType.SHUTDOWN: ShutdownCommand(),
    CommandType.CLEAR_CACHE: ClearCacheCommand(),
    CommandType.GET_LOGS: GetLogsCommand(),
    CommandType.GET_BANDWIDTH_STATS: GetBandwidthStatsCommand(),
    CommandType.PRINT_MEMORY_STATS: PrintMemoryStatsCommand(),
    CommandType.CLEAN_ENDED_CONNECTIONS: CleanEndedConnectionsCommand(),
}

#: Total size of each command on the wire, type byte included.
COMMAND_SIZES: dict[CommandType, int] = {
    t: 1 + {CommandType.VERDICT: 9, CommandType.UPDATE_V4: 14, CommandType.UPDATE_V6: 38}.get(t, 0)
    for t in CommandType
}


def command_size(type_byte: int) -> int:
    """Wire size of a command from its first byte; ProtocolError for an unknown type."""
    try:
        return COMMAND_SIZES[CommandType(type_byte)]
    except ValueError:
        raise ProtocolError(f"unknown command type {type_byte}") from None


def _verdict(value: int, kind: str) -> Verdict:
    try:
        return Verdict(value)
    except ValueError:
        raise ProtocolError(f"{kind}: unknown verdict value {value}") from None


def decode_command(data: bytes) -> Command:
    """Decode exactly one command occupying the whole buffer."""
    if not data:
        raise ProtocolError("empty command")
    size = command_size(data[0])
    kind = CommandType(data[0]).kext_name
    if len(data) != size:
        what = "short" if len(data) < size else "trailing bytes after"
        raise ProtocolError(f"{what} {kind} command: {len(data)} bytes, expected {size}")
    t = data[0]
    if t == CommandType.VERDICT:
        id_, v = _VERDICT.unpack_from(data, 1)
        return VerdictCommand(id_, _verdict(v, kind))
    if t == CommandType.UPDATE_V4 or t == CommandType.UPDATE_V6:
        s, cls = (
            (_UPDATE_V4, UpdateV4Command)
            if t == CommandType.UPDATE_V4
            else (_UPDATE_V6, UpdateV6Command)
        )
        proto, local, lport, remote, rport, v = s.unpack_from(data, 1)
        return cls(proto, bytes(local), lport, bytes(remote), rport, _verdict(v, kind))
    return _EMPTY[t]


def encode_command(cmd: Command) -> bytes:
    """The command's wire bytes. Raises ProtocolError on out-of-range fields."""
    try:
        t = cmd.TYPE
        if isinstance(cmd, VerdictCommand):
            return bytes((t,)) + _VERDICT.pack(cmd.id, Verdict(cmd.verdict))
        if isinstance(cmd, UpdateV4Command | UpdateV6Command):
            size = 4 if t == CommandType.UPDATE_V4 else 16
            for name in ("local_address", "remote_address"):
                raw = getattr(cmd, name)
                if type(raw) is not bytes or len(raw) != size:
                    raise ProtocolError(f"{name} must be {size} raw bytes, got {raw!r}")
            s = _UPDATE_V4 if t == CommandType.UPDATE_V4 else _UPDATE_V6
            return bytes((t,)) + s.pack(
                cmd.protocol,
                cmd.local_address,
                cmd.local_port,
                cmd.remote_address,
                cmd.remote_port,
                Verdict(cmd.verdict),
            )
        return bytes((t,))
    except ProtocolError:
        raise
    except (struct.error, ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {type(cmd).__name__}: {exc}") from None


def command_to_json(cmd: Command) -> dict[str, object]:
    """The dissector's view: kext command name and payload fields, verdict as its number."""
    out: dict[str, object] = {"type": cmd.TYPE.kext_name}
    for field in cmd.__struct_fields__:
        value = getattr(cmd, field)
        if field in ("local_address", "remote_address"):
            value = str(IPv4Address(value) if len(value) == 4 else IPv6Address(value))
        elif isinstance(value, int):
            value = int(value)
        out[field] = value
    return out
