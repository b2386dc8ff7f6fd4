"""Golden byte vectors, written by hand from the kext's layouts (kext-contract C2-3, C2-6), never
produced by our encoder. They pin the wire format in both directions: encode(struct) == bytes
and decode(bytes) == struct. The first vector of each type uses the original kext's own test
values (protocol/src/info.rs, kextinterface/protocol_test.go), including its out-of-enum
direction 3 and payload_layer 7, which Portmaster's parser accepts as plain bytes."""

from __future__ import annotations

import pytest

from kextless.protocol.kext import (
    BandwidthEntry,
    BandwidthStatsV4,
    BandwidthStatsV6,
    CleanEndedConnectionsCommand,
    ClearCacheCommand,
    Command,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
    GetBandwidthStatsCommand,
    GetLogsCommand,
    Info,
    LogLine,
    PrintMemoryStatsCommand,
    ShutdownCommand,
    UpdateV4Command,
    UpdateV6Command,
    Verdict,
    VerdictCommand,
    command_to_json,
    decode_command,
    decode_info,
    encode_command,
    encode_info,
    info_to_json,
)

A4 = bytes([1, 2, 3, 4])
B4 = bytes([2, 3, 4, 5])
A16 = bytes(range(0x01, 0x11))
B16 = bytes(range(0x02, 0x12))
HEX_A16 = "0102030405060708090a0b0c0d0e0f10"
HEX_B16 = "02030405060708090a0b0c0d0e0f1011"
TEN = bytes(range(1, 11))


def h(*parts: str) -> bytes:
    """Join hex fragments (one per wire field) so each vector reads like the layout table."""
    return bytes.fromhex("".join(parts))


# (name, wire bytes, decoded struct)
GOLDEN_INFOS: list[tuple[str, bytes, Info]] = [
    (
        "log-kext-test",
        h("00", "11000000", "01", "7072656669783a2074657374206c6f67"),
        LogLine(1, "prefix: test log"),
    ),
    ("log-utf8", h("00", "04000000", "05", "c3a9", "21"), LogLine(5, "\u00e9!")),
    (
        "conn-v4-kext-test",
        h(
            "01",
            "2d000000",
            "0100000000000000",
            "0200000000000000",
            "03",
            "04",
            "01020304",
            "02030405",
            "0500",
            "0600",
            "07",
            "0a000000",
            "0102030405060708090a",
        ),
        ConnectionIpv4(1, 2, 3, 4, A4, B4, 5, 6, 7, TEN),
    ),
    (
        "conn-v4-inbound-https",
        h(
            "01",
            "23000000",
            "0807060504030201",
            "9210000000000000",
            "01",
            "06",
            "c0a80105",
            "01010101",
            "bb01",
            "00c0",
            "03",
            "00000000",
        ),
        ConnectionIpv4(
            0x0102030405060708,
            4242,
            1,
            6,
            bytes([192, 168, 1, 5]),
            bytes([1, 1, 1, 1]),
            443,
            49152,
            3,
            b"",
        ),
    ),
    (
        "conn-v6-kext-test",
        h(
            "02",
            "45000000",
            "0100000000000000",
            "0200000000000000",
            "03",
            "04",
            HEX_A16,
            HEX_B16,
            "0500",
            "0600",
            "07",
            "0a000000",
            "0102030405060708090a",
        ),
        ConnectionIpv6(1, 2, 3, 4, A16, B16, 5, 6, 7, TEN),
    ),
    (
        "conn-v6-loopback-dns",
        h(
            "02",
            "3d000000",
            "ffffffffffffffff",
            "0000000000000000",
            "00",
            "11",
            "00000000000000000000000000000001",
            "00000000000000000000000000000001",
            "08cf",
            "3500",
            "04",
            "02000000",
            "abcd",
        ),
        ConnectionIpv6(
            2**64 - 1, 0, 0, 17, bytes(15) + b"\x01", bytes(15) + b"\x01", 53000, 53, 4, b"\xab\xcd"
        ),
    ),
    (
        "end-v4-kext-test",
        h("03", "16000000", "0100000000000000", "02", "03", "01020304", "02030405", "0400", "0500"),
        ConnectionEndEventV4(1, 2, 3, A4, B4, 4, 5),
    ),
    (
        "end-v6-kext-test",
        h("04", "2e000000", "0100000000000000", "02", "03", HEX_A16, HEX_B16, "0400", "0500"),
        ConnectionEndEventV6(1, 2, 3, A16, B16, 4, 5),
    ),
    (
        "bandwidth-v4-kext-test",
        h(
            "05",
            "3d000000",
            "01",
            "02000000",
            "01020304",
            "0100",
            "02030405",
            "0200",
            "0300000000000000",
            "0400000000000000",
            "01020304",
            "0500",
            "02030405",
            "0600",
            "0700000000000000",
            "0800000000000000",
        ),
        BandwidthStatsV4(
            1, (BandwidthEntry(A4, 1, B4, 2, 3, 4), BandwidthEntry(A4, 5, B4, 6, 7, 8))
        ),
    ),
    ("bandwidth-v4-empty", h("05", "05000000", "06", "00000000"), BandwidthStatsV4(6, ())),
    (
        "bandwidth-v6-kext-test",
        h(
            "06",
            "6d000000",
            "01",
            "02000000",
            HEX_A16,
            "0100",
            HEX_B16,
            "0200",
            "0300000000000000",
            "0400000000000000",
            HEX_A16,
            "0500",
            HEX_B16,
            "0600",
            "0700000000000000",
            "0800000000000000",
        ),
        BandwidthStatsV6(
            1, (BandwidthEntry(A16, 1, B16, 2, 3, 4), BandwidthEntry(A16, 5, B16, 6, 7, 8))
        ),
    ),
    (
        "bandwidth-v6-big-counters",
        h(
            "06",
            "39000000",
            "11",
            "01000000",
            HEX_A16,
            "bb01",
            HEX_B16,
            "ffff",
            "efcdab8967452301",
            "ffffffffffffffff",
        ),
        BandwidthStatsV6(
            17, (BandwidthEntry(A16, 443, B16, 65535, 0x0123456789ABCDEF, 2**64 - 1),)
        ),
    ),
]

GOLDEN_COMMANDS: list[tuple[str, bytes, Command]] = [
    ("shutdown", h("00"), ShutdownCommand()),
    ("verdict-kext-test", h("01", "0100000000000000", "02"), VerdictCommand(1, Verdict.ACCEPT)),
    (
        "verdict-split-tunnel",
        h("01", "0807060504030201", "0b"),
        VerdictCommand(0x0102030405060708, Verdict.REDIRECT_SPLIT_TUNNEL),
    ),
    (
        "update-v4-kext-test",
        h("02", "01", "01020304", "0200", "02030405", "0300", "04"),
        UpdateV4Command(1, A4, 2, B4, 3, Verdict.BLOCK),
    ),
    (
        "update-v4-https",
        h("02", "06", "0a000001", "00c0", "5db8d822", "bb01", "03"),
        UpdateV4Command(
            6, bytes([10, 0, 0, 1]), 49152, bytes([93, 184, 216, 34]), 443, Verdict.PERMANENT_ACCEPT
        ),
    ),
    (
        "update-v6-kext-test",
        h("03", "01", HEX_A16, "0200", HEX_B16, "0300", "04"),
        UpdateV6Command(1, A16, 2, B16, 3, Verdict.BLOCK),
    ),
    ("clear-cache", h("04"), ClearCacheCommand()),
    ("get-logs", h("05"), GetLogsCommand()),
    ("get-bandwidth-stats", h("06"), GetBandwidthStatsCommand()),
    ("print-memory-stats", h("07"), PrintMemoryStatsCommand()),
    ("clean-ended-connections", h("08"), CleanEndedConnectionsCommand()),
]


def _ids(vectors: list[tuple[str, bytes, object]]) -> list[str]:
    return [name for name, _, _ in vectors]


@pytest.mark.parametrize(("name", "wire", "info"), GOLDEN_INFOS, ids=_ids(GOLDEN_INFOS))
def test_info_encodes_to_golden_bytes(name: str, wire: bytes, info: Info) -> None:
    assert encode_info(info).hex() == wire.hex()
    assert info.encode() == wire


@pytest.mark.parametrize(("name", "wire", "info"), GOLDEN_INFOS, ids=_ids(GOLDEN_INFOS))
def test_golden_bytes_decode_to_info(name: str, wire: bytes, info: Info) -> None:
    decoded = decode_info(wire)
    assert type(decoded) is type(info)
    assert decoded == info


def test_every_info_type_has_a_golden_vector() -> None:
    assert {wire[0] for _, wire, _ in GOLDEN_INFOS} == set(range(7))


@pytest.mark.parametrize(("name", "wire", "cmd"), GOLDEN_COMMANDS, ids=_ids(GOLDEN_COMMANDS))
def test_command_encodes_to_golden_bytes(name: str, wire: bytes, cmd: Command) -> None:
    assert encode_command(cmd).hex() == wire.hex()


@pytest.mark.parametrize(("name", "wire", "cmd"), GOLDEN_COMMANDS, ids=_ids(GOLDEN_COMMANDS))
def test_golden_bytes_decode_to_command(name: str, wire: bytes, cmd: Command) -> None:
    decoded = decode_command(wire)
    assert type(decoded) is type(cmd)
    assert decoded == cmd


def test_every_command_type_has_a_golden_vector() -> None:
    assert {wire[0] for _, wire, _ in GOLDEN_COMMANDS} == set(range(9))


# Body sizes verified against the kext's rust_info_test.bin (kext-contract C2-3).
@pytest.mark.parametrize(
    ("name", "body_size"),
    [
        ("conn-v4-kext-test", 45),
        ("conn-v6-kext-test", 69),
        ("end-v4-kext-test", 22),
        ("end-v6-kext-test", 46),
        ("bandwidth-v4-kext-test", 61),
        ("bandwidth-v6-kext-test", 109),
        ("log-kext-test", 17),
    ],
)
def test_spec_verified_body_sizes(name: str, body_size: int) -> None:
    wire, info = next((w, i) for n, w, i in GOLDEN_INFOS if n == name)
    for record in (wire, encode_info(info)):
        assert len(record) == 5 + body_size
        assert int.from_bytes(record[1:5], "little") == body_size


# Total command sizes from kext-contract C2-6.
@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("shutdown", 1),
        ("verdict-kext-test", 10),
        ("update-v4-kext-test", 15),
        ("update-v6-kext-test", 39),
        ("clean-ended-connections", 1),
    ],
)
def test_spec_command_sizes(name: str, size: int) -> None:
    cmd = next(c for n, _, c in GOLDEN_COMMANDS if n == name)
    assert len(encode_command(cmd)) == size


def test_info_json_view_uses_kext_names_and_text_addresses() -> None:
    wire = next(w for n, w, _ in GOLDEN_INFOS if n == "conn-v6-loopback-dns")
    assert info_to_json(decode_info(wire)) == {
        "type": "ConnectionIpv6",
        "id": 18446744073709551615,
        "process_id": 0,
        "direction": 0,
        "protocol": 17,
        "local_ip": "::1",
        "remote_ip": "::1",
        "local_port": 53000,
        "remote_port": 53,
        "payload_layer": 4,
        "payload": "abcd",
    }
    wire = next(w for n, w, _ in GOLDEN_INFOS if n == "bandwidth-v4-kext-test")
    assert info_to_json(decode_info(wire)) == {
        "type": "BandwidthStatsV4",
        "protocol": 1,
        "values": [
            {
                "local_ip": "1.2.3.4",
                "local_port": 1,
                "remote_ip": "2.3.4.5",
                "remote_port": 2,
                "transmitted_bytes": 3,
                "received_bytes": 4,
            },
            {
                "local_ip": "1.2.3.4",
                "local_port": 5,
                "remote_ip": "2.3.4.5",
                "remote_port": 6,
                "transmitted_bytes": 7,
                "received_bytes": 8,
            },
        ],
    }


def test_command_json_view_uses_kext_names_and_verdict_numbers() -> None:
    update_v6 = h("03", "01", HEX_A16, "0200", HEX_B16, "0300", "04")
    assert command_to_json(decode_command(update_v6)) == {
        "type": "UpdateV6",
        "protocol": 1,
        "local_address": "102:304:506:708:90a:b0c:d0e:f10",
        "local_port": 2,
        "remote_address": "203:405:607:809:a0b:c0d:e0f:1011",
        "remote_port": 3,
        "verdict": 4,
    }
    assert command_to_json(decode_command(h("01", "0100000000000000", "02"))) == {
        "type": "Verdict",
        "id": 1,
        "verdict": 2,
    }
    assert command_to_json(decode_command(h("08"))) == {"type": "CleanEndedConnections"}
