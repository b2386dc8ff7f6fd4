"""Property tests for the kext codec: round trips for every type, stream reassembly under any
chunking, and the promise that no input makes protocol/ raise anything but ProtocolError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kextless.protocol.kext import (
    COMMAND_SIZES,
    BandwidthEntry,
    BandwidthStatsV4,
    BandwidthStatsV6,
    CleanEndedConnectionsCommand,
    ClearCacheCommand,
    Command,
    CommandType,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
    DecodeError,
    GetBandwidthStatsCommand,
    GetLogsCommand,
    Info,
    InfoStreamDecoder,
    LogLine,
    PrintMemoryStatsCommand,
    ProtocolError,
    ShutdownCommand,
    UpdateV4Command,
    UpdateV6Command,
    Verdict,
    VerdictCommand,
    decode_command,
    decode_info,
    encode_command,
    encode_info,
)

FAST = settings(max_examples=150, deadline=None)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)
ip4 = st.binary(min_size=4, max_size=4)
ip6 = st.binary(min_size=16, max_size=16)
payload = st.binary(max_size=64)
text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)


def _entries(ip: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[BandwidthEntry, ...]]:
    entry = st.builds(BandwidthEntry, ip, u16, ip, u16, u64, u64)
    return st.lists(entry, max_size=4).map(tuple)


infos: st.SearchStrategy[Info] = st.one_of(
    st.builds(LogLine, u8, text),
    st.builds(ConnectionIpv4, u64, u64, u8, u8, ip4, ip4, u16, u16, u8, payload),
    st.builds(ConnectionIpv6, u64, u64, u8, u8, ip6, ip6, u16, u16, u8, payload),
    st.builds(ConnectionEndEventV4, u64, u8, u8, ip4, ip4, u16, u16),
    st.builds(ConnectionEndEventV6, u64, u8, u8, ip6, ip6, u16, u16),
    st.builds(BandwidthStatsV4, u8, _entries(ip4)),
    st.builds(BandwidthStatsV6, u8, _entries(ip6)),
)

verdicts = st.sampled_from(Verdict)
commands: st.SearchStrategy[Command] = st.one_of(
    st.sampled_from(
        [
            ShutdownCommand(),
            ClearCacheCommand(),
            GetLogsCommand(),
            GetBandwidthStatsCommand(),
            PrintMemoryStatsCommand(),
            CleanEndedConnectionsCommand(),
        ]
    ),
    st.builds(VerdictCommand, u64, verdicts),
    st.builds(UpdateV4Command, u8, ip4, u16, ip4, u16, verdicts),
    st.builds(UpdateV6Command, u8, ip6, u16, ip6, u16, verdicts),
)


# --- round trips -------------------------------------------------------------------------


@FAST
@given(infos)
def test_info_round_trip(info: Info) -> None:
    wire = encode_info(info)
    assert wire[0] == info.TYPE
    assert int.from_bytes(wire[1:5], "little") == len(wire) - 5
    assert decode_info(wire) == info


@FAST
@given(commands)
def test_command_round_trip(cmd: Command) -> None:
    wire = encode_command(cmd)
    assert wire[0] == cmd.TYPE
    assert len(wire) == COMMAND_SIZES[cmd.TYPE]
    assert decode_command(wire) == cmd


# --- streams -----------------------------------------------------------------------------


def _decode(chunks: list[bytes]) -> list[Info | DecodeError]:
    decoder = InfoStreamDecoder()
    out: list[Info | DecodeError] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out + decoder.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(infos, min_size=1, max_size=4))
def test_stream_split_at_every_byte_offset(records: list[Info]) -> None:
    data = b"".join(encode_info(r) for r in records)
    for cut in range(len(data) + 1):
        assert _decode([data[:cut], data[cut:]]) == records


@FAST
@given(st.lists(infos, min_size=1, max_size=8), st.data())
def test_stream_random_chunking(records: list[Info], data: st.DataObject) -> None:
    stream = b"".join(encode_info(r) for r in records)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _decode(chunks) == records


# --- hostile input -----------------------------------------------------------------------


def _framed(type_byte: int, body: bytes) -> bytes:
    return struct.pack("<BI", type_byte, len(body)) + body


def _mutated(data: st.DataObject, wire: bytes) -> bytes:
    out = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        out[data.draw(st.integers(0, len(out) - 1))] = data.draw(u8)
    return bytes(out)


# Random bytes rarely form a known type with a plausible length, so also try framed bodies
# of known types and valid records with a few bytes overwritten.
hostile_record = st.one_of(
    st.binary(max_size=200),
    st.builds(_framed, st.integers(0, 8), st.binary(max_size=120)),
)


def _check_info_bytes(record: bytes) -> None:
    """Decoding either fails with ProtocolError or yields a record that re-encodes exactly
    (except a LogLine whose invalid UTF-8 was replaced for display)."""
    try:
        info = decode_info(record)
    except ProtocolError:
        return
    assert encode_info(info) == record or isinstance(info, LogLine)


@FAST
@given(st.one_of(hostile_record, st.binary(max_size=50)))
def test_decode_info_raises_only_protocol_error(record: bytes) -> None:
    _check_info_bytes(record)


@FAST
@given(infos, st.data())
def test_decode_info_of_a_mutated_record_raises_only_protocol_error(
    info: Info, data: st.DataObject
) -> None:
    _check_info_bytes(_mutated(data, encode_info(info)))


@FAST
@given(
    st.one_of(
        st.binary(max_size=60),
        st.builds(lambda t, rest: bytes([t]) + rest, st.integers(0, 9), st.binary(max_size=40)),
    )
)
def test_decode_command_raises_only_protocol_error(raw: bytes) -> None:
    try:
        cmd = decode_command(raw)
    except ProtocolError:
        return
    assert encode_command(cmd) == raw


@FAST
@given(st.lists(st.one_of(hostile_record, infos.map(encode_info)), max_size=6), st.data())
def test_stream_decoder_never_raises(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = InfoStreamDecoder(max_body=data.draw(st.integers(0, 300)))
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[a:b])
        assert decoder.buffered <= len(stream)
    out += decoder.close()
    assert all(isinstance(x, DecodeError | Info) for x in out)
    # Errors come with offsets inside the input, in stream order; only the last may be fatal.
    errors = [x for x in out if isinstance(x, DecodeError)]
    assert all(0 <= e.offset < max(len(stream), 1) for e in errors)
    assert [e.offset for e in errors] == sorted(e.offset for e in errors)
    assert not any(e.fatal for e in errors[:-1])
    if errors and errors[-1].fatal:
        assert out[-1] == errors[-1]


@FAST
@given(infos, st.data())
def test_encode_info_rejects_out_of_range_fields_with_protocol_error(
    info: Info, data: st.DataObject
) -> None:
    # Replace one field with an arbitrary int, bytes or string: the encoder either writes a
    # record that decodes back to the same fields, or raises ProtocolError. Nothing else.
    fields = [f for f in info.__struct_fields__ if f != "values"]
    field = data.draw(st.sampled_from(fields))
    value = data.draw(
        st.one_of(st.integers(-(2**70), 2**70), st.binary(max_size=20), st.text(max_size=5))
    )
    changed = type(info)(**{f: getattr(info, f) for f in info.__struct_fields__} | {field: value})
    try:
        wire = encode_info(changed)
    except ProtocolError:
        return
    assert decode_info(wire) == changed


@FAST
@given(commands, st.data())
def test_encode_command_rejects_out_of_range_fields_with_protocol_error(
    cmd: Command, data: st.DataObject
) -> None:
    if not cmd.__struct_fields__:
        return
    field = data.draw(st.sampled_from(cmd.__struct_fields__))
    value = data.draw(st.one_of(st.integers(-(2**70), 2**70), st.binary(max_size=20)))
    changed = type(cmd)(**{f: getattr(cmd, f) for f in cmd.__struct_fields__} | {field: value})
    try:
        wire = encode_command(changed)
    except ProtocolError:
        return
    assert decode_command(wire) == changed


# --- strict command errors ---------------------------------------------------------------

_PAYLOAD_TYPES = [t for t in CommandType if COMMAND_SIZES[t] > 1]


def test_empty_command() -> None:
    with pytest.raises(ProtocolError, match="empty command"):
        decode_command(b"")


@pytest.mark.parametrize("kind", _PAYLOAD_TYPES, ids=lambda t: t.kext_name)
def test_short_command_of_every_length(kind: CommandType) -> None:
    size = COMMAND_SIZES[kind]
    for n in range(1, size):
        with pytest.raises(ProtocolError, match=f"short {kind.kext_name} command: {n} bytes"):
            decode_command(bytes([kind]) + bytes(n - 1))


@pytest.mark.parametrize("kind", list(CommandType), ids=lambda t: t.kext_name)
def test_trailing_bytes_after_any_command(kind: CommandType) -> None:
    wire = bytes([kind]) + bytes(COMMAND_SIZES[kind] - 1) + b"\x00"
    with pytest.raises(ProtocolError, match=f"trailing bytes after {kind.kext_name} command"):
        decode_command(wire)


@pytest.mark.parametrize("type_byte", [9, 10, 0x80, 0xFF])
def test_unknown_command_type(type_byte: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown command type {type_byte}"):
        decode_command(bytes([type_byte]) + bytes(9))


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (bytes.fromhex("0101000000000000000c"), "Verdict"),
        (bytes.fromhex("02060a00000150000a0000025100ff"), "UpdateV4"),
        (bytes.fromhex("0311") + bytes(16) + b"\x35\x00" + bytes(16) + b"\x35\x00\x0c", "UpdateV6"),
    ],
)
def test_unknown_verdict_value(wire: bytes, kind: str) -> None:
    with pytest.raises(ProtocolError, match=f"{kind}: unknown verdict value {wire[-1]}"):
        decode_command(wire)


# --- out-of-range fields on encode -------------------------------------------------------

_A4 = bytes(4)
_A16 = bytes(16)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (UpdateV4Command(6, _A4, 70000, _A4, 80, Verdict.ACCEPT), "cannot encode UpdateV4Command"),
        (UpdateV4Command(6, bytes(5), 80, _A4, 80, Verdict.ACCEPT), "local_address must be 4"),
        (UpdateV6Command(6, _A16, 80, _A4, 80, Verdict.ACCEPT), "remote_address must be 16"),
        (VerdictCommand(-1, Verdict.ACCEPT), "cannot encode VerdictCommand"),
        (VerdictCommand(1, 12), "cannot encode VerdictCommand"),  # type: ignore[arg-type]
        (UpdateV4Command(256, _A4, 80, _A4, 80, Verdict.ACCEPT), "cannot encode UpdateV4Command"),
    ],
)
def test_encode_command_out_of_range(bad: Command, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_command(bad)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (ConnectionIpv4(1, 1, 0, 6, _A4, _A4, 70000, 80, 3, b""), "cannot encode ConnectionIpv4"),
        (ConnectionIpv4(-1, 1, 0, 6, _A4, _A4, 80, 80, 3, b""), "cannot encode ConnectionIpv4"),
        (ConnectionIpv4(1, 1, 0, 6, bytes(5), _A4, 80, 80, 3, b""), "local_ip must be 4"),
        (ConnectionIpv6(1, 1, 0, 6, _A16, _A4, 80, 80, 3, b""), "remote_ip must be 16"),
        (ConnectionEndEventV4(1, 2, 6, _A4, _A4, 80, -5), "cannot encode ConnectionEndEventV4"),
        (
            ConnectionEndEventV6(2**64, 0, 6, _A16, _A16, 80, 80),
            "cannot encode ConnectionEndEventV6",
        ),
        (ConnectionIpv4(1, 1, 256, 6, _A4, _A4, 80, 80, 3, b""), "cannot encode ConnectionIpv4"),
        (BandwidthStatsV4(6, (BandwidthEntry(_A4, 70000, _A4, 1, 0, 0),)), "BandwidthStatsV4"),
        (BandwidthStatsV6(6, (BandwidthEntry(_A4, 1, _A16, 1, 0, 0),)), "local_ip must be 16"),
        (BandwidthStatsV4(6, (BandwidthEntry(_A4, 1, _A4, 1, -1, 0),)), "BandwidthStatsV4"),
        (LogLine(3, ""), "must not be empty"),
        (LogLine(300, "x"), "cannot encode LogLine"),
    ],
)
def test_encode_info_out_of_range(bad: Info, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_info(bad)
    with pytest.raises(ProtocolError, match=match):
        bad.encode()
