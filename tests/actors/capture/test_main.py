"""Command-line parsing of `kextless run capture`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kextless.actors.capture.main import parser


def test_defaults_are_the_kexts() -> None:
    args = parser().parse_args([])
    assert (args.nameserver_port, args.tunnel_port, args.split_tunnel_port) == (53, 717, 719)
    assert args.nameserver_v4 == bytes([127, 0, 0, 1]) and args.nameserver_v6[-1] == 1
    assert args.exclude_port == [] and args.priority == 0


def test_flags_parse() -> None:
    args = parser().parse_args(
        [
            "--exclude-port",
            "5555",
            "--exclude-port",
            "6666",
            "--nameserver-v4",
            "127.0.0.53",
            "--nameserver-v6",
            "fd00::53",
            "--tunnel-port",
            "7000",
            "--priority",
            "5",
        ]
    )
    assert args.exclude_port == [5555, 6666] and args.tunnel_port == 7000
    assert args.nameserver_v4 == bytes([127, 0, 0, 53]) and args.priority == 5


@pytest.mark.parametrize("bad", [["--nameserver-v4", "::1"], ["--exclude-port", "70000"]])
def test_bad_flags_are_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(bad)


def test_risky_macs_are_reported(tmp_path: Path) -> None:
    from kextless.actors.capture.shell import warn_risky_macs

    for name, mac in (
        ("lo", "00:00:00:00:00:00"),
        ("eth0", "66:00:00:00:00:01"),
        ("eth1", "02:00:00:00:00:01"),
        ("eth2", "4e:00:00:00:00:01"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    assert warn_risky_macs(tmp_path) == ["eth0", "eth2"]
