"""`kextless decode` end to end, run as a separate process the way a user runs it: JSON lines
field for field, error lines with offsets, exit statuses, stdin, closed pipes and memory."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from kextless.protocol.kext import (
    BandwidthEntry,
    BandwidthStatsV4,
    BandwidthStatsV6,
    ConnectionEndEventV4,
    ConnectionEndEventV6,
    ConnectionIpv4,
    ConnectionIpv6,
    LogLine,
    encode_info,
)
from tests.entry import KEXTLESS

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "sample-infos.bin"

H4 = IPv4Address("192.168.1.5").packed
W4 = IPv4Address("93.184.216.34").packed
H6 = IPv6Address("2001:db8::5").packed
D6 = IPv6Address("2001:4860:4860::8888").packed


def kextless(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*KEXTLESS, *args], cwd=REPO, input=stdin, capture_output=True, timeout=60, check=False
    )


def lines(out: bytes) -> list[dict[str, object]]:
    """Parse the output, checking it is one compact JSON object per newline-terminated line."""
    text = out.decode()
    assert text.endswith("\n") or not text
    parsed = [json.loads(line) for line in text.splitlines()]
    compact = [json.dumps(obj, separators=(",", ":"), ensure_ascii=False) for obj in parsed]
    assert compact == text.splitlines()
    assert all(isinstance(obj, dict) for obj in parsed)
    return parsed


# Every info type, with its JSON view written out by hand from the field list.
EVERY_INFO = [
    (
        LogLine(4, "src/device.rs:201 Verdict invalid id: 7"),
        {"type": "LogLine", "severity": 4, "line": "src/device.rs:201 Verdict invalid id: 7"},
    ),
    (
        ConnectionIpv4(1, 4242, 0, 6, H4, W4, 49152, 443, 3, b"\x45\x00\xff"),
        {
            "type": "ConnectionIpv4",
            "id": 1,
            "process_id": 4242,
            "direction": 0,
            "protocol": 6,
            "local_ip": "192.168.1.5",
            "remote_ip": "93.184.216.34",
            "local_port": 49152,
            "remote_port": 443,
            "payload_layer": 3,
            "payload": "4500ff",
        },
    ),
    (
        ConnectionIpv6(2, 0, 1, 17, H6, D6, 53, 53000, 4, b""),
        {
            "type": "ConnectionIpv6",
            "id": 2,
            "process_id": 0,
            "direction": 1,
            "protocol": 17,
            "local_ip": "2001:db8::5",
            "remote_ip": "2001:4860:4860::8888",
            "local_port": 53,
            "remote_port": 53000,
            "payload_layer": 4,
            "payload": "",
        },
    ),
    (
        ConnectionEndEventV4(4242, 0, 6, H4, W4, 49152, 443),
        {
            "type": "ConnectionEndEventV4",
            "process_id": 4242,
            "direction": 0,
            "protocol": 6,
            "local_ip": "192.168.1.5",
            "remote_ip": "93.184.216.34",
            "local_port": 49152,
            "remote_port": 443,
        },
    ),
    (
        ConnectionEndEventV6(7, 1, 17, H6, D6, 53, 53000),
        {
            "type": "ConnectionEndEventV6",
            "process_id": 7,
            "direction": 1,
            "protocol": 17,
            "local_ip": "2001:db8::5",
            "remote_ip": "2001:4860:4860::8888",
            "local_port": 53,
            "remote_port": 53000,
        },
    ),
    (
        BandwidthStatsV4(6, (BandwidthEntry(H4, 49152, W4, 443, 517, 4096),)),
        {
            "type": "BandwidthStatsV4",
            "protocol": 6,
            "values": [
                {
                    "local_ip": "192.168.1.5",
                    "local_port": 49152,
                    "remote_ip": "93.184.216.34",
                    "remote_port": 443,
                    "transmitted_bytes": 517,
                    "received_bytes": 4096,
                }
            ],
        },
    ),
    (
        BandwidthStatsV6(
            17,
            (
                BandwidthEntry(H6, 53, D6, 53000, 0, 2**64 - 1),
                BandwidthEntry(bytes(16), 1, bytes(15) + b"\x01", 2, 3, 4),
            ),
        ),
        {
            "type": "BandwidthStatsV6",
            "protocol": 17,
            "values": [
                {
                    "local_ip": "2001:db8::5",
                    "local_port": 53,
                    "remote_ip": "2001:4860:4860::8888",
                    "remote_port": 53000,
                    "transmitted_bytes": 0,
                    "received_bytes": 18446744073709551615,
                },
                {
                    "local_ip": "::",
                    "local_port": 1,
                    "remote_ip": "::1",
                    "remote_port": 2,
                    "transmitted_bytes": 3,
                    "received_bytes": 4,
                },
            ],
        },
    ),
]

# The kext's own size-mismatch record: a v6 connection whose type byte says v4 (kext-contract C2-3).
MISMATCHED = (
    b"\x01"
    + encode_info(
        ConnectionIpv6(
            1, 2, 3, 4, bytes(range(1, 17)), bytes(range(2, 18)), 5, 6, 7, bytes(range(1, 11))
        )
    )[1:]
)


def test_every_info_type_with_a_mismatched_record_in_the_middle_and_a_truncated_tail(
    tmp_path: Path,
) -> None:
    wires = [encode_info(info) for info, _ in EVERY_INFO]
    truncated = encode_info(EVERY_INFO[1][0])[:12]
    stream = b"".join(wires[:3]) + MISMATCHED + b"".join(wires[3:]) + truncated
    path = tmp_path / "capture.bin"
    path.write_bytes(stream)

    result = kextless("decode", "--infos", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    got = lines(result.stdout)
    mismatch_at = sum(map(len, wires[:3]))
    tail_at = len(stream) - len(truncated)
    expected = [view for _, view in EVERY_INFO]
    assert got[:3] == expected[:3]
    assert set(got[3]) == {"error", "offset"} and got[3]["offset"] == mismatch_at
    assert "ConnectionIpv4" in str(got[3]["error"])
    assert got[4:8] == expected[3:]
    assert got[8] == {
        "error": "truncated ConnectionIpv4: stream ended after 7 of 38 body bytes",
        "offset": tail_at,
    }
    assert len(got) == 9
    # Keys in the kext's field order (lines() checked the output is compact).
    assert [list(d) for d in got[:3]] == [list(view) for view in expected[:3]]


def test_unknown_info_type_ends_decoding_with_status_1(tmp_path: Path) -> None:
    first = encode_info(EVERY_INFO[0][0])
    path = tmp_path / "capture.bin"
    path.write_bytes(first + b"\x07\x03\x00\x00\x00abc" + encode_info(EVERY_INFO[3][0]))

    result = kextless("decode", "--infos", str(path))

    assert result.returncode == 1
    assert lines(result.stdout) == [
        EVERY_INFO[0][1],
        {"error": "unknown info type 7", "offset": len(first)},
    ]


COMMANDS = [
    ("00", {"type": "Shutdown"}),
    ("012a0000000000000003", {"type": "Verdict", "id": 42, "verdict": 3}),
    (
        "0206c0a8010500c05db8d822bb0105",
        {
            "type": "UpdateV4",
            "protocol": 6,
            "local_address": "192.168.1.5",
            "local_port": 49152,
            "remote_address": "93.184.216.34",
            "remote_port": 443,
            "verdict": 5,
        },
    ),
    (
        "031120010db8000000000000000000000005080020014860486000000000000000008888350008",
        {
            "type": "UpdateV6",
            "protocol": 17,
            "local_address": "2001:db8::5",
            "local_port": 8,
            "remote_address": "2001:4860:4860::8888",
            "remote_port": 53,
            "verdict": 8,
        },
    ),
    ("04", {"type": "ClearCache"}),
    ("05", {"type": "GetLogs"}),
    ("06", {"type": "GetBandwidthStats"}),
    ("07", {"type": "PrintMemoryStats"}),
    ("08", {"type": "CleanEndedConnections"}),
]
EVERY_COMMAND = bytes.fromhex("".join(wire for wire, _ in COMMANDS))


def test_every_command_then_an_unknown_type_ends_with_status_1(tmp_path: Path) -> None:
    path = tmp_path / "commands.bin"
    path.write_bytes(EVERY_COMMAND + b"\x09" + bytes.fromhex("05"))

    result = kextless("decode", "--commands", str(path))

    assert result.returncode == 1
    assert lines(result.stdout) == [view for _, view in COMMANDS] + [
        {"error": "unknown command type 9", "offset": len(EVERY_COMMAND)}
    ]


def test_commands_alone_decode_with_status_0(tmp_path: Path) -> None:
    path = tmp_path / "commands.bin"
    path.write_bytes(EVERY_COMMAND * 2)
    result = kextless("decode", "--commands", str(path))
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [view for _, view in COMMANDS] * 2


# Commands have no length field, so a short one can only be seen at the end of the input.
@pytest.mark.parametrize(
    ("bad", "after", "message"),
    [
        ("0101000000000000000c", "05", "Verdict: unknown verdict value 12"),
        ("0206c0a80105", "", "short UpdateV4 command: 6 bytes, expected 15"),
    ],
)
def test_bad_command_after_good_ones_ends_with_status_1(bad: str, after: str, message: str) -> None:
    good = bytes.fromhex(COMMANDS[1][0])
    result = kextless("decode", "--commands", stdin=good + bytes.fromhex(bad + after))
    assert result.returncode == 1
    assert lines(result.stdout) == [COMMANDS[1][1], {"error": message, "offset": len(good)}]


@pytest.mark.parametrize("file_args", [[], ["-"]], ids=["no-file", "dash"])
def test_reads_standard_input(file_args: list[str]) -> None:
    stream = b"".join(encode_info(info) for info, _ in EVERY_INFO)
    result = kextless("decode", "--infos", *file_args, stdin=stream)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [view for _, view in EVERY_INFO]


def test_empty_input_prints_nothing() -> None:
    for kind in ("--infos", "--commands"):
        result = kextless("decode", kind, stdin=b"")
        assert (result.returncode, result.stdout) == (0, b"")


def test_missing_file_is_a_clear_error_with_status_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    result = kextless("decode", "--infos", str(missing))
    assert result.returncode == 2
    assert result.stdout == b""
    assert str(missing).encode() in result.stderr and b"No such file" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["--infos", "--commands"]], ids=["neither", "both"])
def test_exactly_one_of_infos_and_commands(args: list[str]) -> None:
    result = kextless("decode", *args, stdin=b"")
    assert result.returncode == 2
    assert b"usage: kextless decode" in result.stderr


def _big_stream(path: Path, size: int) -> None:
    """Write about `size` bytes by repeating a ~50 KB block of varied records (fast)."""
    wires = [encode_info(info) for info, _ in EVERY_INFO]
    packet = ConnectionIpv4(9, 1, 0, 6, H4, W4, 1, 2, 3, bytes(range(256)) * 5 + bytes(120))
    table = BandwidthStatsV4(6, tuple(BandwidthEntry(H4, i, W4, i, i, i) for i in range(200)))
    block = b"".join(wires) + encode_info(packet) * 30 + encode_info(table)
    with path.open("wb") as f:
        for _ in range(size // len(block) + 1):
            f.write(block)


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    _big_stream(path, 4 * 1024 * 1024)
    proc = subprocess.Popen(
        [*KEXTLESS, "decode", "--infos", str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # like `| head -n 1`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert json.loads(first) == EVERY_INFO[0][1]
    assert err == b""


_PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_rss_kib(path: Path) -> int:
    """Peak RSS of one decode run, measured in a wrapper so no other child counts."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *KEXTLESS, "decode", "--infos", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out[0] == "0"
    return int(out[1])  # KiB on Linux


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ off Linux")
def test_100_mb_decode_in_constant_memory(tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"".join(encode_info(info) for info, _ in EVERY_INFO))
    big = tmp_path / "big.bin"
    _big_stream(big, 100 * 1024 * 1024)
    assert big.stat().st_size >= 100 * 1024 * 1024

    baseline = _peak_rss_kib(small)
    peak = _peak_rss_kib(big)

    assert peak < 60 * 1024, f"peak RSS {peak} KiB"
    assert peak - baseline < 16 * 1024, f"grew {peak - baseline} KiB over {baseline} KiB"


def test_sample_stream_is_current_and_decodes_cleanly() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_samples", SAMPLE.with_name("make_samples.py")
    )
    assert spec is not None and spec.loader is not None
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    assert SAMPLE.read_bytes() == make_samples.sample_infos_bytes(), (
        "tests/data/sample-infos.bin is stale: run python tests/data/make_samples.py"
    )

    result = kextless("decode", "--infos", str(SAMPLE))
    assert result.returncode == 0, result.stderr
    assert [d["type"] for d in lines(result.stdout)] == [
        "LogLine",
        "ConnectionIpv4",
        "ConnectionIpv6",
        "ConnectionEndEventV4",
        "ConnectionEndEventV6",
        "BandwidthStatsV4",
        "BandwidthStatsV6",
    ]


def test_help_exits_0() -> None:
    result = kextless("decode", "--help")
    assert result.returncode == 0
    assert b"--infos" in result.stdout and b"--commands" in result.stdout


def test_readme_example_output_is_what_the_tool_prints() -> None:
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index("$ kextless decode --infos tests/data/sample-infos.bin") + 1
    shown = readme[start : readme.index("", start)]
    result = kextless("decode", "--infos", "tests/data/sample-infos.bin")
    assert result.stdout.decode().splitlines() == shown
