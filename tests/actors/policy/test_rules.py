"""The built-in policy's rules: matching on every field, first match wins, the default, rule
labels, and one-line errors that name the file and line."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from kextless.actors.policy.rules import (
    DEFAULT_RULES_FILE,
    Flow,
    Policy,
    RulesError,
    load,
    parse,
)
from kextless.actors.policy.view import ProcessFacts
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

NOBODY = ProcessFacts()
CURL = ProcessFacts(pid=4242, name="curl", exe="/usr/bin/curl", user="alice", uid=1000)


def v4(direction: Direction, proto: int, remote: str, rport: int, lport: int = 40000):  # type: ignore[no-untyped-def]
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


def flow(
    remote: str = "192.0.2.1",
    rport: int = 443,
    lport: int = 40000,
    proto: int = 6,
    direction: int = 0,
    local: str | None = None,
) -> Flow:
    r = ipaddress.ip_address(remote)
    lo = ipaddress.ip_address(local or ("10.0.0.1" if r.version == 4 else "fd00::1"))
    return Flow(direction, proto, lo, lport, r, rport)


def one_rule(body: str, verdict: str = "PermanentBlock") -> Policy:
    return parse(f'default = "PermanentAccept"\n[[rule]]\n{body}\nverdict = "{verdict}"\n')


def blocked(policy: Policy, f: Flow, facts: ProcessFacts = NOBODY) -> bool:
    return policy.match(f, facts)[0] == Verdict.PERMANENT_BLOCK


def test_first_match_wins_else_default() -> None:
    policy = parse(RULES)
    assert policy.decide(v4(Direction.OUTBOUND, 17, "8.8.8.8", 53)) == Verdict.REDIRECT_NAME_SERVER
    assert policy.decide(v4(Direction.INBOUND, 17, "8.8.8.8", 53)) == Verdict.PERMANENT_BLOCK
    assert policy.decide(v4(Direction.OUTBOUND, 6, "10.20.1.1", 8080)) == Verdict.ACCEPT
    assert policy.decide(v4(Direction.OUTBOUND, 6, "10.20.1.1", 8100)) == Verdict.PERMANENT_BLOCK
    assert policy.decide(v4(Direction.OUTBOUND, 6, "10.21.1.1", 8080)) == Verdict.PERMANENT_BLOCK
    assert policy.decide(v4(Direction.OUTBOUND, 1, "1.1.1.1", 0)) == Verdict.PERMANENT_ACCEPT


def test_an_earlier_rule_shadows_a_later_one_and_labels_say_which() -> None:
    policy = parse(
        "default = 'Drop'\n"  # line 1
        "\n"
        "[[rule]]\n"  # line 3
        "protocol = 'tcp'\n"
        "verdict = 'Accept'\n"
        "\n"
        "[[rule]]\n"  # line 7
        "name = 'web'\n"
        "remote_port = 443\n"
        "verdict = 'Block'\n"
        "  [[ rule ]]\n"  # line 11, spacing allowed by TOML
        "verdict = 'PermanentDrop'\n"
    )
    assert policy.match(flow(rport=443, proto=6), NOBODY) == (Verdict.ACCEPT, "rule 1 (line 3)")
    assert policy.match(flow(rport=443, proto=17), NOBODY) == (Verdict.BLOCK, "web")
    assert policy.match(flow(rport=80, proto=17), NOBODY) == (
        Verdict.PERMANENT_DROP,
        "rule 3 (line 11)",
    )
    assert parse("default = 'Drop'").match(flow(), NOBODY) == (Verdict.DROP, "default")


def test_ipv4_and_ipv6_networks_and_addresses() -> None:
    policy = one_rule('remote = ["10.1.0.0/16", "2001:db8::/32", "192.0.2.7"]')
    assert blocked(policy, flow("10.1.255.3"))
    assert not blocked(policy, flow("10.2.0.1"))
    assert blocked(policy, flow("2001:db8:1::5"))
    assert not blocked(policy, flow("2001:db9::5"))
    assert blocked(policy, flow("192.0.2.7"))
    assert not blocked(policy, flow("192.0.2.8"))
    # an IPv4-mapped v6 address is not the v4 network, and a v6 /0 never matches v4
    assert not blocked(policy, flow("::ffff:10.1.0.1"))
    assert not blocked(one_rule('remote = "::/0"'), flow("10.0.0.9"))
    assert blocked(one_rule('remote = "0.0.0.0/0"'), flow("10.0.0.9"))


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


def test_port_ranges_are_inclusive() -> None:
    policy = one_rule("remote_port = [1000, 1002]\nlocal_port = [50000, 50001]")
    for rport in (1000, 1001, 1002):
        assert blocked(policy, flow(rport=rport, lport=50000))
    assert not blocked(policy, flow(rport=999, lport=50000))
    assert not blocked(policy, flow(rport=1003, lport=50000))
    assert blocked(policy, flow(rport=1000, lport=50001))
    assert not blocked(policy, flow(rport=1000, lport=50002))
    assert blocked(one_rule("local_port = 22"), flow(lport=22))
    assert not blocked(one_rule("local_port = 22"), flow(lport=23))


def test_direction_and_protocol_by_name_or_number() -> None:
    inbound = one_rule('direction = "inbound"')
    assert blocked(inbound, flow(direction=1)) and not blocked(inbound, flow(direction=0))
    for name, number in (("tcp", 6), ("UDP", 17), ("icmp", 1), ("icmpv6", 58), ("47", 47)):
        body = f'protocol = "{name}"' if not name.isdigit() else f"protocol = {name}"
        policy = one_rule(body)
        assert blocked(policy, flow(proto=number)), name
        assert not blocked(policy, flow(proto=number + 1)), name


def test_process_name_exe_pid_and_user() -> None:
    assert blocked(one_rule('process = "curl"'), flow(), CURL)
    assert not blocked(one_rule('process = "wget"'), flow(), CURL)
    assert blocked(one_rule('process = "cu*"'), flow(), CURL)  # a glob
    assert blocked(one_rule('exe = "/usr/bin/*"'), flow(), CURL)
    assert not blocked(one_rule('exe = "/usr/sbin/*"'), flow(), CURL)
    assert blocked(one_rule("pid = 4242"), flow(), CURL)
    assert not blocked(one_rule("pid = 4243"), flow(), CURL)
    assert blocked(one_rule('user = "alice"'), flow(), CURL)
    assert not blocked(one_rule('user = "bob"'), flow(), CURL)
    assert blocked(one_rule("user = 1000"), flow(), CURL)
    assert not blocked(one_rule("user = 0"), flow(), CURL)


def test_unknown_process_matches_no_process_key() -> None:
    """pid 0 (the kext did not know) or a vanished pid: empty facts match no process key,
    not even a catch-all glob, so `process = "*"` means "some known process"."""
    for body in ('process = "*"', 'exe = "*"', 'user = "*"', "user = 0", "pid = 1"):
        assert not blocked(one_rule(body), flow(), NOBODY), body
    gone = ProcessFacts(pid=77, name="", exe="", user="", uid=-1)  # read after it exited
    assert not blocked(one_rule('process = "*"'), flow(), gone)
    assert blocked(one_rule("pid = 77"), flow(), gone)


def test_all_keys_of_a_rule_must_match() -> None:
    policy = one_rule(
        'process = "curl"\nprotocol = "tcp"\nremote = "192.0.2.0/24"\nremote_port = 443'
    )
    assert blocked(policy, flow(), CURL)
    assert not blocked(policy, flow(rport=80), CURL)
    assert not blocked(policy, flow(proto=17), CURL)
    assert not blocked(policy, flow("198.51.100.1"), CURL)
    assert not blocked(policy, flow(), ProcessFacts(pid=1, name="wget"))


@pytest.mark.parametrize(
    "name",
    [
        "Accept",
        "Block",
        "Drop",
        "PermanentAccept",
        "PermanentBlock",
        "PermanentDrop",
        "RedirectNameServer",
        "RedirectTunnel",
        "RedirectSplitTunnel",
    ],
)
def test_every_kext_verdict_name_is_an_action(name: str) -> None:
    policy = one_rule("protocol = 6", verdict=name)
    assert policy.match(flow(), NOBODY)[0].kext_name == name
    assert one_rule("protocol = 6", verdict=name.lower()).match(flow(), NOBODY)[0].kext_name == name


def test_empty_file_accepts_everything_permanently() -> None:
    assert parse("").decide(v4(Direction.OUTBOUND, 6, "1.2.3.4", 80)) == Verdict.PERMANENT_ACCEPT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default = 'Allow'", "x.toml:1: default: unknown verdict 'Allow'"),
        ("\n\ndefault = 3", "x.toml:3: default: unknown verdict 3"),
        ("[[rule]]\nprotocol = 'tcp'", "x.toml:1: rule 1: needs a verdict"),
        ("[[rule]]\nverdict = 'Accept'\nport = 3", "x.toml:1: rule 1: unknown key(s) port"),
        (
            "[[rule]]\nverdict='Accept'\n\n[[rule]]\nverdict = 'Accept'\nremote_port = 70000",
            "x.toml:4: rule 2: remote_port 70000..70000 is not a range within 0..65535",
        ),
        ("[[rule]]\nverdict = 'Accept'\nlocal_port = [9, 1]", "x.toml:1: rule 1: local_port 9..1"),
        ("[[rule]]\nverdict = 'Accept'\nlocal_port = [1, 2, 3]", "a port or [low, high]"),
        ("[[rule]]\nverdict = 'Accept'\nremote = 'nope'", "x.toml:1: rule 1: bad remote 'nope'"),
        ("[[rule]]\nverdict = 'Accept'\nremote = []", "remote is an empty list"),
        ("[[rule]]\nverdict = 'Accept'\nremote = 10", "remote is an address or network"),
        ("[[rule]]\nverdict = 'Accept'\nprotocol = 'sctp'", "unknown protocol 'sctp'"),
        ("[[rule]]\nverdict = 'Accept'\nprotocol = 300", "unknown protocol 300"),
        ("[[rule]]\nverdict = 'Accept'\ndirection = 'up'", "direction is outbound or inbound"),
        ("[[rule]]\nverdict = 'Accept'\npid = 0", "pid is a positive number"),
        ("[[rule]]\nverdict = 'Accept'\nuser = -1", "user is a user name or a uid"),
        ("[[rule]]\nverdict = 'Accept'\nprocess = ''", "process is a non-empty string"),
        ("[[rule]]\nverdict = 'Yes'", "x.toml:1: rule 1: unknown verdict 'Yes'"),
        ("rule = 3", "x.toml: `rule` must be an array of tables"),
        ("\ncolour = 'red'", "x.toml:2: unknown top-level key(s) colour"),
        ("default = 'Drop'\n\n[[rule]]\nverdict = ", "x.toml:4: not valid TOML: Invalid value"),
    ],
)
def test_bad_rules_say_file_line_and_problem_in_one_line(text: str, message: str) -> None:
    with pytest.raises(RulesError) as err:
        parse(text, "x.toml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=re.escape(f"{tmp_path}/absent.toml: cannot read")):
        load(tmp_path / "absent.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RulesError, match="not UTF-8"):
        load(tmp_path / "bin.toml")


def test_the_shipped_default_rules_keep_ssh_and_outbound_and_drop_other_inbound() -> None:
    policy = load(DEFAULT_RULES_FILE)
    outbound = policy.match(flow("203.0.113.9", 443), NOBODY)
    assert outbound[0] == Verdict.PERMANENT_ACCEPT
    dns = policy.match(flow("203.0.113.9", 53, proto=17), NOBODY)
    assert dns[0] == Verdict.PERMANENT_ACCEPT
    ssh = policy.match(flow("203.0.113.9", 51000, lport=22, direction=1), NOBODY)
    assert ssh == (Verdict.PERMANENT_ACCEPT, "inbound: ssh")
    assert policy.match(flow("::1", 51000, lport=8080, direction=1, local="::1"), NOBODY)[0] == (
        Verdict.PERMANENT_ACCEPT
    )
    web = policy.match(flow("203.0.113.9", 51000, lport=80, direction=1), NOBODY)
    assert web == (Verdict.PERMANENT_DROP, "default")
    assert policy.match(flow("203.0.113.9", 67, lport=68, proto=17, direction=1), NOBODY)[0] == (
        Verdict.PERMANENT_ACCEPT
    )
