"""The real capture process on real traffic, inside namespaces the tests create.

Namespace a runs `kextless run capture`; b is the other host. The test plays the ALE as a
real ZMQ ROUTER peer. Outcomes are what applications see: data flows, refused at once,
timed out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import CacheClear, CacheSet, Decision, Flow
from tests import apps
from tests.actors.capture.harness import CaptureEnv, capture_env

pytestmark = [pytest.mark.root]

PORT_A, PORT_B = 18002, 18001


def _servers(env: CaptureEnv) -> None:
    p = env.pair
    apps.start(p, p.b, apps.ECHO_SERVER, PORT_B)
    apps.start(p, p.a, apps.ECHO_SERVER, PORT_A)


def _cases(env: CaptureEnv) -> list[tuple[str, str, str, int, str]]:
    """(label, client ns, server address, port, protocol) for both directions and families."""
    p = env.pair
    out = []
    for fam, ip_a, ip_b in (("v4", p.ip4_a, p.ip4_b), ("v6", p.ip6_a, p.ip6_b)):
        for proto in ("tcp", "udp"):
            out.append((f"out-{proto}-{fam}", p.a, ip_b, PORT_B, proto))
            out.append((f"in-{proto}-{fam}", p.b, ip_a, PORT_A, proto))
    return out


def _client(env: CaptureEnv, ns: str, host: str, port: int, proto: str, timeout: float) -> dict:
    code = apps.TCP_CLIENT if proto == "tcp" else apps.UDP_CLIENT
    return apps.run(env.pair, ns, code, host, port, timeout)


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        pytest.param(Verdict.PERMANENT_ACCEPT, "ok", id="PermanentAccept"),
        pytest.param(Verdict.ACCEPT, "ok", id="Accept"),
        pytest.param(Verdict.PERMANENT_BLOCK, "refused", id="PermanentBlock"),
        pytest.param(Verdict.BLOCK, "refused", id="Block"),
        pytest.param(Verdict.PERMANENT_DROP, "timeout", id="PermanentDrop", marks=pytest.mark.slow),
    ],
)
def test_verdict_outcomes_both_directions_v4_v6_tcp_udp(verdict: Verdict, expected: str) -> None:
    with capture_env(verdict) as env:
        _servers(env)
        timeout = 0.8 if expected == "timeout" else 3.0
        for label, ns, host, port, proto in _cases(env):
            seen = len(env.ale.held)
            res = _client(env, ns, host, port, proto, timeout)
            assert res["result"] == expected, (label, res)
            if expected == "refused":
                assert res["elapsed"] < 0.5, (label, res)  # at once, not after retries
            outbound = label.startswith("out")
            asked = [
                m
                for m in env.ale.held[seen:]
                if m.flow.protocol == (6 if proto == "tcp" else 17)
                and (m.flow.remote_port if outbound else m.flow.local_port) == port
            ]
            assert asked, (label, "no PacketHeld")
            first = asked[0]
            assert first.direction == (
                Direction.OUTBOUND if label.startswith("out") else Direction.INBOUND
            )
            local_port = first.flow.local_port if label.startswith("in") else first.flow.remote_port
            assert local_port == port, (label, first.flow)
            assert first.packet[0] >> 4 == (6 if label.endswith("v6") else 4)


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [(Verdict.PERMANENT_ACCEPT, "ok"), (Verdict.PERMANENT_BLOCK, "refused")],
)
def test_ipv4_options_do_not_hide_the_ports(verdict: Verdict, expected: str) -> None:
    """Kext weakness (kext-contract C15-11): ports were read at a fixed offset 20."""
    with capture_env(verdict) as env:
        _servers(env)
        p = env.pair
        res = apps.run(p, p.a, apps.UDP_CLIENT, p.ip4_b, PORT_B, 2, 1, "01010100")
        assert res["result"] == expected, res
        (held,) = env.held_for(PORT_B)
        assert held.packet[0] == 0x46  # IHL 6: the options really were there
        assert (held.flow.local_port, held.flow.remote_port) == (res["local"][1], PORT_B)


def test_permanent_accept_asks_once_per_connection() -> None:
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        _servers(env)
        p = env.pair
        res = apps.run(p, p.a, apps.UDP_CLIENT, p.ip4_b, PORT_B, 3, 5)
        assert res["result"] == "ok" and len(res["replies"]) == 5
        res = apps.run(p, p.a, apps.TCP_CLIENT, p.ip6_b, PORT_B, 3)
        assert res["result"] == "ok"
        time.sleep(0.2)
        by_flow: dict[Flow, int] = {}
        for m in env.held_for(PORT_B):
            by_flow[m.flow] = by_flow.get(m.flow, 0) + 1
        assert sorted(by_flow.values()) == [1, 1], by_flow


@pytest.mark.parametrize("verdict", [Verdict.PERMANENT_ACCEPT, Verdict.ACCEPT])
def test_two_hundred_concurrent_connections_are_each_decided(verdict: Verdict) -> None:
    """Accept (temporary) needs 200 per-packet ports: the filter falls back to all TCP."""
    with capture_env(verdict) as env:
        _servers(env)
        p = env.pair
        res = apps.run(p, p.a, apps.MANY_CONNECTS, p.ip4_b, PORT_B, 200, 10, timeout=20)
        assert (res["ok"], res["failed"]) == (200, 0), res
        syns = {
            m.flow.local_port
            for m in env.held_for(PORT_B)
            if m.direction == Direction.OUTBOUND and m.packet[33] & 0x02
        }
        assert syns == set(res["ports"])


def test_temporary_accept_asks_for_every_packet() -> None:
    with capture_env(Verdict.ACCEPT) as env:
        _servers(env)
        p = env.pair
        res = apps.run(p, p.a, apps.TCP_CLIENT, p.ip4_b, PORT_B, 3)
        assert res["result"] == "ok", res
        time.sleep(0.3)
        mine = [m for m in env.held_for(PORT_B) if m.flow.local_port == res["local"][1]]
        # SYN, SYN-ACK, ACK, the greeting, its ACK, FINs...: each one a new request.
        assert len(mine) >= 5, [(m.direction, len(m.packet)) for m in mine]
        assert len({m.hold_id for m in mine}) == len(mine)
        assert {m.direction for m in mine} == {Direction.OUTBOUND, Direction.INBOUND}


def test_arp_is_never_diverted() -> None:
    """Regression: ARP frames to a MAC starting with nibble 6 were diverted as IPv6, and lost."""
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        _servers(env)
        p = env.pair
        p.run(p.a, ["ip", "link", "set", "va", "address", "66:00:00:00:00:0a"], check=True)
        p.run(p.b, ["ip", "link", "set", "vb", "address", "46:00:00:00:00:0b"], check=True)
        for _ in range(3):
            p.run(p.a, ["ip", "neigh", "flush", "dev", "va"], check=True)
            p.run(p.b, ["ip", "neigh", "flush", "dev", "vb"], check=True)
            res = apps.run(p, p.a, apps.UDP_CLIENT, p.ip4_b, PORT_B, 1.5)
            assert res["result"] == "ok", res
        assert all(m.packet[0] >> 4 in (4, 6) and m.flow.protocol == 17 for m in env.ale.held)


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [(Verdict.PERMANENT_ACCEPT, "ok"), (Verdict.PERMANENT_BLOCK, "refused")],
)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_connections_are_asked_and_obeyed(
    verdict: Verdict, expected: str, host: str
) -> None:
    with capture_env(verdict) as env:
        p = env.pair
        apps.start(p, p.a, apps.ECHO_SERVER, 18003, host)
        for code in (apps.TCP_CLIENT, apps.UDP_CLIENT):
            res = apps.run(p, p.a, code, host, 18003, 2)
            assert res["result"] == expected, (code[:40], res)
            assert res["elapsed"] < 0.5
        assert {m.flow.protocol for m in env.held_for(18003)} == {6, 17}


@pytest.mark.slow  # ~2 s: it waits out the kernel's first SYN retransmit
def test_retransmitted_syn_waits_for_the_pending_request() -> None:
    """A slow ALE: the SYN retransmit (~1 s) joins the pending request; one answer frees both."""
    with capture_env(lambda m: None) as env:  # the ALE peer holds its answer back
        _servers(env)
        p = env.pair
        client = p.popen(p.a, [sys.executable, "-c", apps.TCP_CLIENT, p.ip4_b, PORT_B, 5])
        assert env.ale.wait_for(lambda: len(env.held_for(PORT_B)) == 1)
        time.sleep(1.6)  # the kernel retransmits the SYN after 1 s
        (req,) = env.held_for(PORT_B)
        env.ale.send(Decision((req.hold_id,), Verdict.PERMANENT_ACCEPT))
        out, _ = client.communicate(timeout=10)
        res = json.loads(out)
        assert res["result"] == "ok", res
        assert res["elapsed"] > 1.5  # it really waited for the verdict
        assert len(env.held_for(PORT_B)) == 1  # the retransmit made no second request


def test_an_ale_restart_gets_the_held_packets_again() -> None:
    with capture_env(lambda m: None) as env:  # the first ALE dies without answering
        _servers(env)
        p = env.pair
        client = p.popen(p.a, [sys.executable, "-c", apps.UDP_CLIENT, p.ip4_b, PORT_B, 5])
        assert env.ale.wait_for(lambda: len(env.held_for(PORT_B)) == 1)
        (lost,) = env.held_for(PORT_B)
        env.set_policy(Verdict.PERMANENT_ACCEPT)
        new = env.restart_ale()
        assert new.ready.wait(5)  # CaptureReady again
        out, _ = client.communicate(timeout=10)
        assert json.loads(out)["result"] == "ok"
        (again,) = [m for m in new.held if m.flow == lost.flow]
        assert again.hold_id == lost.hold_id and again.packet == lost.packet


def test_icmp_echo_is_asked_per_packet_and_obeyed() -> None:
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        p = env.pair
        for host in (p.ip4_b, p.ip6_b):
            res = apps.run(p, p.a, apps.PING, host, 3, 1.0)
            assert res["replies"] == 3, (host, res)
        icmp = [m for m in env.ale.held if m.flow.protocol in (1, 58)]
        # Each echo request (out) and reply (in), per family: never cached.
        assert len(icmp) >= 12, len(icmp)
        env.set_policy(Verdict.PERMANENT_BLOCK)
        res = apps.run(p, p.a, apps.PING, p.ip4_b, 2, 0.5)
        assert res["replies"] == 0


def test_update_to_block_stops_an_accepted_bulk_transfer_within_100ms() -> None:
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        _servers(env)
        p = env.pair
        proc = p.popen(p.a, [sys.executable, "-c", apps.BULK_CLIENT, p.ip4_b, PORT_B, 5])
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())["started"]
        time.sleep(0.8)  # bulk data flows, established, not diverted
        flow = Flow(
            6,
            bytes(map(int, p.ip4_a.split("."))),
            started[1],
            bytes(map(int, p.ip4_b.split("."))),
            PORT_B,
        )
        n_sent = len(env.ale.sent_at)
        env.ale.send(CacheSet(flow, Verdict.PERMANENT_BLOCK))
        out, _ = proc.communicate(timeout=10)
        res = json.loads(out.splitlines()[-1])
        assert env.ale.wait_for(lambda: len(env.ale.sent_at) > n_sent)
        stop_after = res["error_wall"] - env.ale.sent_at[n_sent]
        assert res["result"] in ("ECONNRESET", "EPIPE"), res
        assert res["sent"] > 10_000_000, res  # it was really flowing before
        # Functional bound only: the 100 ms target is measured by
        # tests/benchmarks/bench_system.py (update_block_ms), not by a timed test.
        assert stop_after < 0.5, f"blocked {stop_after * 1000:.0f} ms after the CacheSet"


def test_cache_clear_reasks_a_live_connection() -> None:
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        _servers(env)
        p = env.pair
        proc = p.popen(
            p.a,
            [sys.executable, "-c", apps.INTERACTIVE_TCP, p.ip6_b, PORT_B],
            stdin=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        local_port = json.loads(proc.stdout.readline())["connected"][1]

        def say(text: str) -> dict:
            proc.stdin.write(text.encode() + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            return json.loads(proc.stdout.readline())  # type: ignore[union-attr]

        assert say("one") == {"result": "ok", "data": "echo one"}
        before = len(env.held_for(local_port))
        assert before == 1  # only the SYN was asked
        env.set_policy(Verdict.PERMANENT_BLOCK)  # what the ALE says when asked again
        env.ale.send(CacheClear())
        time.sleep(0.3)  # the capture swaps in a filter that diverts this connection
        res = say("two")
        assert res["result"] in ("ECONNRESET", "EPIPE", "reset"), res
        again = env.held_for(local_port)[before:]
        assert again and again[0].direction == Direction.OUTBOUND


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_dns_redirect_to_a_local_resolver(family: str) -> None:
    def policy(m: object) -> Verdict:
        return Verdict.REDIRECT_NAME_SERVER

    with capture_env(policy) as env:
        p = env.pair
        if family == "v4":
            outside, local = f"10.231.{p.subnet}.99", "127.0.0.1"
            p.extra_v4(p.b, outside)
            me = p.ip4_a
        else:
            outside, local = f"fd31:0:0:{p.subnet:x}::99", "::1"
            p.extra_v6(p.b, outside)
            me = p.ip6_a
        apps.start(p, p.b, apps.ECHO_SERVER, 53)  # the real "outside" server must NOT answer
        apps.start(p, p.a, apps.LOCAL_SERVICE, local, 53)
        res = apps.run(p, p.a, apps.UDP_CLIENT, outside, 53, 2, 3)
        assert res["result"] == "ok", res
        assert res["peer"] == [outside, 53]  # the reply seems to come from where we asked
        # The resolver saw the client's own address and source port (kept, not 127.0.0.1).
        assert res["replies"] == [f"local-service saw ('{me}', {res['local'][1]})"] * 3
        assert len(env.held_for(53)) == 1  # one request; later datagrams enforced locally


def test_tcp_tunnel_redirect_to_port_717() -> None:
    with capture_env(Verdict.REDIRECT_TUNNEL) as env:
        p = env.pair
        outside = f"10.231.{p.subnet}.99"
        p.extra_v4(p.b, outside)
        apps.start(p, p.b, apps.ECHO_SERVER, 443)
        apps.start(p, p.a, apps.LOCAL_SERVICE, p.ip4_a, 717)
        res = apps.run(p, p.a, apps.TCP_CLIENT, outside, 443, 3)
        assert res["result"] == "ok", res
        assert res["peer"] == [outside, 443]
        assert res["data"] == f"local-service saw ('{p.ip4_a}', {res['local'][1]})"


def test_excluded_port_is_never_asked_and_garbage_is_survived() -> None:
    with capture_env(Verdict.PERMANENT_BLOCK, extra_args=("--exclude-port", "18009")) as env:
        p = env.pair
        apps.start(p, p.b, apps.ECHO_SERVER, 18009)
        env.ale.send_raw(b"\xc1 not msgpack")
        env.ale.send_raw(b"\x93\xa8Decision\x91\x01\x63")  # valid msgpack, invalid verdict 99
        res = apps.run(p, p.a, apps.TCP_CLIENT, p.ip4_b, 18009, 3)
        assert res["result"] == "ok", res
        assert env.held_for(18009) == []
        env.stop()
        assert "garbage from the ALE ignored" in env.log()


def test_sigterm_leaves_no_divert_program_behind() -> None:
    with capture_env(Verdict.PERMANENT_ACCEPT) as env:
        p = env.pair

        def filters_on(dev: str) -> str:
            return "".join(
                p.run(p.a, ["tc", "filter", "show", "dev", dev, kind]).stdout
                for kind in ("ingress", "egress")
            )

        assert "divert" in filters_on("va")
        assert env.stop() == 0
        assert "divert" not in filters_on("va") and "divert" not in filters_on("lo")
