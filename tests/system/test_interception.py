"""Issue 4 end to end: real connections in a namespace wait for, and obey, a client's verdicts.

Namespace `a` is firewalled by a whole `kextless up --netns a --no-policy`; namespace `b` is
its peer across a veth pair. The test's Answerer plays Portmaster through the broker endpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from kextless.protocol.enums import Direction, PayloadLayer, Verdict
from tests import apps
from tests.entry import KEXTLESS
from tests.netns import NetnsPair
from tests.system.harness import Answerer, Conn, System, addr

pytestmark = [pytest.mark.root, pytest.mark.slow]

_PORTS = itertools.count(21000)


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with NetnsPair("s") as p:
        p.extra_v4(p.b, f"10.231.{p.subnet}.99")
        # Deprecated (preferred_lft 0), so b never picks it as a source address for replies.
        subprocess.run(
            [
                "ip",
                "-n",
                p.b,
                "-6",
                "addr",
                "add",
                f"fd31:0:0:{p.subnet:x}::99/128",
                "dev",
                "vb",
                "nodad",
                "preferred_lft",
                "0",
            ],
            check=True,
            timeout=10,
        )
        yield p


@pytest.fixture()
def port() -> int:
    return next(_PORTS)


def flow_of(port: int, proto: int) -> object:
    return lambda i: i.protocol == proto and port in (i.local_port, i.remote_port)


def ip_header(payload: bytes) -> tuple[int, int, bytes, bytes]:
    """(version, protocol, src, dst) of a layer-3 payload."""
    version = payload[0] >> 4
    if version == 4:
        return 4, payload[9], payload[12:16], payload[16:20]
    return 6, payload[6], payload[8:24], payload[24:40]


def check_info(
    info: Conn,
    *,
    direction: Direction,
    proto: int,
    local: str,
    remote: str,
    local_port: int,
    remote_port: int,
) -> None:
    """Every field, byte for byte, and a payload that is the packet the fields describe."""
    assert info.direction == direction
    assert info.protocol == proto
    assert info.local_ip == addr(local) and info.remote_ip == addr(remote)
    assert (info.local_port, info.remote_port) == (local_port, remote_port)
    assert info.payload_layer == PayloadLayer.NETWORK
    assert info.id >= 1
    version, p, src, dst = ip_header(info.payload)
    assert version == (6 if ":" in local else 4) and p == proto
    if direction == Direction.OUTBOUND:
        assert (src, dst) == (info.local_ip, info.remote_ip)
    else:
        assert (src, dst) == (info.remote_ip, info.local_ip)


# ---- TCP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_outbound_tcp_permanent_accept(pair, answerer, port, v6) -> None:
    server_ip = pair.ip6_b if v6 else pair.ip4_b
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    out = apps.run(pair, pair.a, apps.TCP_CLIENT, server_ip, port, 3)
    assert out["result"] == "ok", out
    (info,) = answerer.connections(flow_of(port, 6))
    check_info(
        info,
        direction=Direction.OUTBOUND,
        proto=6,
        local=pair.ip6_a if v6 else pair.ip4_a,
        remote=server_ip,
        local_port=out["local"][1],
        remote_port=port,
    )
    tcp = info.payload[(40 if v6 else (info.payload[0] & 15) * 4) :]
    assert tcp[13] & 0x12 == 0x02  # the held packet is the SYN
    # Later packets (SYN-ACK, data, echo, FIN) never became requests.
    time.sleep(0.3)
    assert len(answerer.connections(flow_of(port, 6))) == 1


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_inbound_tcp_permanent_accept(pair, answerer, port, v6) -> None:
    apps.start(pair, pair.a, apps.ECHO_SERVER, port)
    target = pair.ip6_a if v6 else pair.ip4_a
    out = apps.run(pair, pair.b, apps.TCP_CLIENT, target, port, 3)
    assert out["result"] == "ok", out
    (info,) = answerer.connections(flow_of(port, 6))
    check_info(
        info,
        direction=Direction.INBOUND,
        proto=6,
        local=target,
        remote=out["local"][0],
        local_port=port,
        remote_port=out["local"][1],
    )


@pytest.mark.parametrize(
    "verdict", [Verdict.PERMANENT_BLOCK, Verdict.BLOCK, Verdict.UNDETERMINABLE, Verdict.FAILED]
)
def test_tcp_block_refuses_at_once(pair, answerer, port, verdict) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    answerer.decide = lambda info: verdict
    out = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 3)
    assert out["result"] == "refused", out
    assert out["elapsed"] < 1.0


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_inbound_tcp_block_refuses_the_remote_client(pair, answerer, port, v6) -> None:
    apps.start(pair, pair.a, apps.ECHO_SERVER, port)
    answerer.decide = lambda info: Verdict.PERMANENT_BLOCK
    out = apps.run(pair, pair.b, apps.TCP_CLIENT, pair.ip6_a if v6 else pair.ip4_a, port, 3)
    assert out["result"] == "refused", out


@pytest.mark.parametrize("verdict", [Verdict.PERMANENT_DROP, Verdict.DROP])
def test_tcp_drop_times_out(pair, answerer, port, verdict) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    answerer.decide = lambda info: verdict
    out = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 1.5)
    assert out["result"] == "timeout", out
    n = len(answerer.connections(flow_of(port, 6)))
    # A temporary Drop makes the SYN retransmitted after ~1 s a new request; a permanent one
    # is enforced locally without asking again.
    assert n >= 2 if verdict == Verdict.DROP else n == 1


# ---- UDP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_udp_outbound_verdicts(pair, answerer, v6) -> None:
    server = pair.ip6_b if v6 else pair.ip4_b
    cases = {
        Verdict.PERMANENT_ACCEPT: "ok",
        Verdict.PERMANENT_BLOCK: "refused",
        Verdict.PERMANENT_DROP: "timeout",
    }
    for verdict, expected in cases.items():
        p = next(_PORTS)
        apps.start(pair, pair.b, apps.ECHO_SERVER, p)
        answerer.decide = lambda info, v=verdict: v
        out = apps.run(pair, pair.a, apps.UDP_CLIENT, server, p, 1.0, 3)
        assert out["result"] == expected, (verdict, out)
        infos = answerer.connections(flow_of(p, 17))
        assert len(infos) == 1, (verdict, infos)  # permanent: one request for the flow
        check_info(
            infos[0],
            direction=Direction.OUTBOUND,
            proto=17,
            local=pair.ip6_a if v6 else pair.ip4_a,
            remote=server,
            local_port=out["local"][1],
            remote_port=p,
        )


def test_udp_inbound_accept(pair, answerer, port) -> None:
    apps.start(pair, pair.a, apps.ECHO_SERVER, port)
    out = apps.run(pair, pair.b, apps.UDP_CLIENT, pair.ip4_a, port, 2, 3)
    assert out["result"] == "ok" and len(out["replies"]) == 3, out
    (info,) = answerer.connections(flow_of(port, 17))
    check_info(
        info,
        direction=Direction.INBOUND,
        proto=17,
        local=pair.ip4_a,
        remote=pair.ip4_b,
        local_port=port,
        remote_port=out["local"][1],
    )


def test_temporary_accept_asks_for_every_packet(pair, answerer, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    answerer.decide = lambda info: Verdict.ACCEPT
    out = apps.run(pair, pair.a, apps.UDP_CLIENT, pair.ip4_b, port, 2, 4)
    assert len(out["replies"]) == 4, out
    infos = answerer.connections(flow_of(port, 17))
    # 4 datagrams out and 4 replies in: each one its own request with its own id.
    assert len(infos) == 8, [(i.id, i.direction) for i in infos]
    assert len({i.id for i in infos}) == 8
    assert [i.direction for i in infos].count(Direction.INBOUND) == 4


def test_temporary_accept_tcp_data_packets_are_requests(pair, answerer, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    answerer.decide = lambda info: Verdict.ACCEPT
    out = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 3)
    assert out["result"] == "ok", out
    infos = answerer.connections(flow_of(port, 6))
    # SYN, SYN-ACK, ACK, data, echo, ... all asked: far more than the single SYN.
    assert len(infos) >= 4


# ---- ICMP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_icmp_echo_every_packet_is_a_request(pair, answerer, v6) -> None:
    target = pair.ip6_b if v6 else pair.ip4_b
    proto = 58 if v6 else 1
    answerer.decide = lambda info: Verdict.PERMANENT_ACCEPT
    before = len(answerer.connections(lambda i: i.protocol == proto))
    out = apps.run(pair, pair.a, apps.PING, target, 2, 2)
    assert out["replies"] == 2, out
    infos = answerer.connections(lambda i: i.protocol == proto)[before:]
    echo = [i for i in infos if i.remote_ip == addr(target)]
    assert len(echo) >= 4  # 2 requests out + 2 replies in, even with a permanent verdict
    assert all(i.local_port == 0 and i.remote_port == 0 for i in echo)
    answerer.decide = lambda info: Verdict.PERMANENT_DROP if info.protocol == proto else None
    assert apps.run(pair, pair.a, apps.PING, target, 1, 0.7)["replies"] == 0


# ---- redirects ----------------------------------------------------------------------------


def _outside(pair: NetnsPair, v6: bool) -> str:
    """An address of b's that a's applications contact; redirects must send it elsewhere."""
    return f"fd31:0:0:{pair.subnet:x}::99" if v6 else f"10.231.{pair.subnet}.99"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_dns_redirect_to_local_resolver(pair, answerer, v6) -> None:
    outside = _outside(pair, v6)
    apps.start(pair, pair.a, apps.LOCAL_SERVICE, "::1" if v6 else "127.0.0.1", 53)
    answerer.decide = lambda info: (
        Verdict.REDIRECT_NAME_SERVER if info.remote_port == 53 else Verdict.PERMANENT_ACCEPT
    )
    out = apps.run(pair, pair.a, apps.UDP_CLIENT, outside, 53, 3)
    assert out["result"] == "ok", out
    assert out["peer"] == [outside, 53]  # the reply appears to come from the outside address
    # The resolver saw the client's own source address and port.
    assert out["replies"] == [f"local-service saw {tuple(out['local'])!r}"]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tcp_redirect_to_tunnel(pair, answerer, port, v6) -> None:
    outside = _outside(pair, v6)
    apps.start(pair, pair.a, apps.LOCAL_SERVICE, pair.ip6_a if v6 else pair.ip4_a, 717)
    answerer.decide = lambda info: (
        Verdict.REDIRECT_TUNNEL if info.remote_port == port else Verdict.PERMANENT_ACCEPT
    )
    out = apps.run(pair, pair.a, apps.TCP_CLIENT, outside, port, 3)
    assert out["result"] == "ok", out
    assert out["peer"] == [outside, port]  # the app still sees the host it contacted
    assert out["data"] == f"local-service saw {tuple(out['local'])!r}"


# ---- updates, clear cache, shutdown, timeout ------------------------------------------------


def test_update_blocks_established_bulk_transfer(pair, answerer, port) -> None:
    sink = pair.popen(pair.b, [sys.executable, "-c", apps.BULK_SINK, str(port)])
    assert sink.stdout.readline().strip() == b"ready"
    sender = pair.popen(
        pair.a, [sys.executable, "-c", apps.BULK_SENDER, pair.ip4_b, str(port), "6"]
    )
    first = json.loads(sender.stdout.readline())
    time.sleep(1.0)  # bulk data is flowing, not through Python
    system_client = answerer.client
    t_update = time.monotonic()
    for _ in range(2):  # Portmaster sends every update twice; must be idempotent
        system_client.send_update_v4(
            6,
            addr(pair.ip4_a),
            first["local_port"],
            addr(pair.ip4_b),
            port,
            Verdict.PERMANENT_BLOCK,
        )
    out = json.loads(sink.stdout.readline())
    assert out["total"] > 1_000_000, out  # it really was flowing before
    assert out["last"] - t_update < 0.5, out["last"] - t_update
    sender.kill()


def test_clear_cache_asks_existing_connections_again(pair, answerer, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    client = pair.popen(
        pair.a,
        [sys.executable, "-c", apps.INTERACTIVE_TCP, pair.ip4_b, str(port)],
        stdin=subprocess.PIPE,
    )

    def say(text: str) -> dict:
        client.stdin.write(text.encode() + b"\n")
        client.stdin.flush()
        return json.loads(client.stdout.readline())

    json.loads(client.stdout.readline())  # {"connected": ...}
    assert say("one") == {"result": "ok", "data": "echo one"}
    assert len(answerer.connections(flow_of(port, 6))) == 1
    answerer.client.clear_cache()
    time.sleep(0.3)
    assert say("two") == {"result": "ok", "data": "echo two"}  # asked again, accepted
    again = answerer.wait_for(flow_of(port, 6), count=2)
    assert len(again) >= 2 and again[1].id > again[0].id


def test_shutdown_blocks_pending_and_next_session_continues_ids(pair, system, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    a = Answerer(system.endpoint)
    a.decide = lambda info: None  # leave every request pending
    a.start()
    try:
        result: dict[str, object] = {}
        t = threading.Thread(
            target=lambda: result.update(
                apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 8)
            )
        )
        t.start()
        (pending,) = a.wait_for(flow_of(port, 6))
        a.client.shutdown()
        t.join(timeout=15)
        assert result["result"] == "refused", result  # PermanentBlock rejects at once
        assert result["elapsed"] < 5
    finally:
        a.stop()
    b = Answerer(system.endpoint).start()
    try:
        p2 = next(_PORTS)
        apps.start(pair, pair.b, apps.ECHO_SERVER, p2)
        assert apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, p2, 3)["result"] == "ok"
        (info,) = b.connections(flow_of(p2, 6))
        assert info.id > pending.id
    finally:
        b.stop()


def test_verdict_timeout_applies_default(pair, answerer, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    answerer.decide = lambda info: None
    out = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 8)
    # The system runs with --verdict-timeout 3 and the default verdict Block (reject).
    assert out["result"] == "refused", out
    assert 2.5 < out["elapsed"] < 6


def test_two_hundred_concurrent_connections_each_decided(pair, answerer, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    out = apps.run(pair, pair.a, apps.MANY_CONNECTS, pair.ip4_b, port, 200, 30, timeout=60)
    assert (out["ok"], out["failed"]) == (200, 0), out
    infos = answerer.connections(flow_of(port, 6))
    assert {i.local_port for i in infos} == set(out["ports"])
    assert len({i.id for i in infos}) == len(infos)


def test_status_shows_processes_and_counters(system) -> None:
    res = subprocess.run(
        [
            *KEXTLESS,
            "status",
            "--netns",
            system.pair.a,
            "--run-root",
            str(system.run_root),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    text = json.dumps(report)
    for name in ("broker", "ale", "capture"):
        assert name in text
    assert "RUNNING" in text


def _status(system: System) -> dict:  # type: ignore[type-arg]
    res = subprocess.run(
        [
            *KEXTLESS,
            "status",
            "--netns",
            system.pair.a,
            "--run-root",
            str(system.run_root),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(res.stdout)


def test_ale_restart_never_reuses_ids(pair, system, answerer, port) -> None:
    apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    assert apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 3)["result"] == "ok"
    before = max(i.id for i in answerer.connections())
    (ale,) = [p for p in _status(system)["programs"] if p["name"] == "ale"]
    os.kill(ale["pid"], signal.SIGKILL)  # a crash; supervisord restarts it
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        (now,) = [p for p in _status(system)["programs"] if p["name"] == "ale"]
        if now["state"] == "RUNNING" and now["pid"] != ale["pid"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the ALE was not restarted")
    p2 = next(_PORTS)
    apps.start(pair, pair.b, apps.ECHO_SERVER, p2)
    deadline = time.monotonic() + 10  # capture re-announces itself once the ALE is back
    while apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, p2, 2)["result"] != "ok":
        assert time.monotonic() < deadline, "no connection got through after the restart"
    after = answerer.connections(flow_of(p2, 6))
    assert after and min(i.id for i in after) > before
