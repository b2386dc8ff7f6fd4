"""The built-in policy's rules: matching, first-match-wins, and clear errors on bad files."""

from __future__ import annotations

import re

import pytest

from kextless.actors.policy.rules import RulesError, load, parse
from kextless.protocol.enums import Direction, PayloadLayer, Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6

RULES = """
default = "PermanentBlock"

[[rule]]
direction = "outbound"
protocol = "udp"
remote_port = 53
verdict = "RedirectNameServer"

[[rule]]
remote = "10.20.0.0/16"
remote_port = [8000, 8099]
verdict = "Accept"

[[rule]]
protocol = "icmp"
verdict = "PermanentAccept"

[[rule]]
remote = "fd00::/8"
local_port = 22
verdict = "PermanentDrop"
"""


def v4(direction: Direction, proto: int, remote: str, rport: int, lport: int = 40000):
    return ConnectionIpv4(
        1,
        0,
        direction,
        proto,
        bytes([10, 0, 0, 1]),
        bytes(int(x) for x in remote.split(".")),
        lport,
        rport,
        PayloadLayer.NETWORK,
        b"",
    )


def test_first_match_wins_else_default() -> None:
    policy = parse(RULES)
    assert policy.decide(v4(Direction.OUTBOUND, 17, "8.8.8.8", 53)) == Verdict.REDIRECT_NAME_SERVER
    assert policy.decide(v4(Direction.INBOUND, 17, "8.8.8.8", 53)) == Verdict.PERMANENT_BLOCK
    assert policy.decide(v4(Direction.OUTBOUND, 6, "10.20.1.1", 8080)) == Verdict.ACCEPT
    assert policy.decide(v4(Direction.OUTBOUND, 6, "10.20.1.1", 8100)) == Verdict.PERMANENT_BLOCK
    assert policy.decide(v4(Direction.OUTBOUND, 6, "10.21.1.1", 8080)) == Verdict.PERMANENT_BLOCK
    assert policy.decide(v4(Direction.OUTBOUND, 1, "1.1.1.1", 0)) == Verdict.PERMANENT_ACCEPT


def test_ipv6_network_does_not_match_ipv4_and_vice_versa() -> None:
    policy = parse(RULES)
    six = ConnectionIpv6(
        1,
        0,
        Direction.INBOUND,
        6,
        bytes(16),
        bytes([0xFD]) + bytes(15),
        22,
        5000,
        PayloadLayer.NETWORK,
        b"",
    )
    assert policy.decide(six) == Verdict.PERMANENT_DROP
    assert policy.decide(v4(Direction.INBOUND, 6, "10.20.1.1", 5000, lport=22)) == (
        Verdict.PERMANENT_BLOCK
    )


def test_empty_file_accepts_everything_permanently() -> None:
    assert parse("").decide(v4(Direction.OUTBOUND, 6, "1.2.3.4", 80)) == Verdict.PERMANENT_ACCEPT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default = 'Allow'", "unknown verdict 'Allow'"),
        ("[[rule]]\nprotocol = 'tcp'", "rule 1: needs a verdict"),
        ("[[rule]]\nverdict = 'Accept'\nport = 3", "rule 1: unknown key(s) port"),
        ("[[rule]]\nverdict = 'Accept'\nremote_port = 70000", "outside 0..65535"),
        ("[[rule]]\nverdict = 'Accept'\nremote_port = [9, 1]", "outside 0..65535"),
        ("[[rule]]\nverdict = 'Accept'\nremote = 'nope'", "bad remote 'nope'"),
        ("[[rule]]\nverdict = 'Accept'\nprotocol = 'sctp'", "unknown protocol 'sctp'"),
        ("[[rule]]\nverdict = 'Accept'\ndirection = 'up'", "outbound or inbound"),
        ("rule = 3", "array of tables"),
        ("colour = 'red'", "unknown top-level key(s) colour"),
        ("default = ", "not valid TOML"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=re.escape(message)):
        parse(text)


def test_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RulesError, match="cannot read rules file"):
        load(tmp_path / "absent.toml")
