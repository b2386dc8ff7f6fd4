"""Issues 10/11 end to end: a redirected connection's bytes are counted against the connection
as the application sees it (its original 5-tuple), both directions, exactly once; and an ICMP
echo is asked as the kext asks it (the request outbound, its reply inbound, the same
local-first key) with the pinging process's pid.

Namespace `a` is guarded by `kextless up --netns a --no-policy` (bandwidth included); the test
plays Portmaster (harness.Answerer): UDP to port 53 gets RedirectNameServer (127.0.0.1 / ::1
port 53, where a server in `a` answers), TCP to `TUNNELED` gets RedirectTunnel (a's own address,
port 717), everything else PermanentAccept. The applications count what they wrote and read;
GetBandwidthStats must report exactly that under the address they contacted (an address of
b's that never sees a packet), and nothing under the redirect target's 5-tuples.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.infos import BandwidthStatsV4, BandwidthStatsV6
from tests import apps
from tests.netns import NetnsPair
from tests.system.harness import Answerer, Conn, System, addr

pytestmark = [pytest.mark.root, pytest.mark.slow]

Key = tuple[int, bytes, int, bytes, int]  # protocol, local ip/port, remote ip/port
TUNNELED = 7443  # the TCP port the answerer redirects to the tunnel
TUNNEL_PORT = 717  # kextless's default --tunnel-port

#: The redirect targets: TCP on every address of `a` (dual stack) reads an 8-byte download
#: size, everything until the peer's half-close, then sends that many bytes and closes; UDP on
#: the addresses given (a resolver answers from the address it was asked on) answers a
#: datagram of n bytes with 2n + 3 bytes, so a mixed-up direction shows.
TARGET = r"""
import socket, sys, threading
port = int(sys.argv[1])
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    def serve(c):
        with c:
            head = b""
            while len(head) < 8:
                head += c.recv(8 - len(head))
            while c.recv(1 << 20):
                pass
            c.sendall(b"d" * int.from_bytes(head, "big"))
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp(host):
    u = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((host, port))
    while True:
        d, a = u.recvfrom(65536)
        u.sendto(b"r" * (2 * len(d) + 3), a)
threading.Thread(target=tcp, daemon=True).start()
for host in sys.argv[2:]:
    threading.Thread(target=udp, args=(host,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

#: UDP: datagrams of the given sizes to host:port, each answered; TCP: upload, download. One
#: JSON line: the local port, who answered, the bytes written and read (the app's own count).
CLIENT = r"""
import json, socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sizes = [int(x) for x in sys.argv[4].split(",")]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
sent = got = 0
if proto == "udp":
    u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(5); u.connect((host, port))
    for n in sizes:
        u.send(b"q" * n); sent += n
        d, peer = u.recvfrom(65536); got += len(d)
    out = {"port": u.getsockname()[1], "peer": list(peer[:2])}
else:
    up, down = sizes
    s = socket.create_connection((host, port), timeout=10)
    out = {"port": s.getsockname()[1], "peer": list(s.getpeername()[:2])}  # (before the end)
    s.sendall(down.to_bytes(8, "big") + b"u" * up); sent = 8 + up
    s.shutdown(socket.SHUT_WR)
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        got += len(d)
out.update(sent=sent, received=got)
print(json.dumps(out), flush=True)
"""


def _outside(p: NetnsPair, v6: bool) -> str:
    """An address of b's that a's applications contact: a redirect sends it elsewhere."""
    return f"fd31:0:0:{p.subnet:x}::99" if v6 else f"10.231.{p.subnet}.99"


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with NetnsPair("kxb") as p:
        p.extra_v4(p.b, _outside(p, False))
        # Deprecated, so b never picks it as a source address for its own packets.
        subprocess.run(
            [
                *("ip", "-n", p.b, "-6", "addr", "add", f"{_outside(p, True)}/128", "dev", "vb"),
                *("nodad", "preferred_lft", "0"),
            ],
            check=True,
            timeout=10,
        )
        # Ping sockets (SOCK_DGRAM ICMP) for every group, in this namespace only.
        subprocess.run(
            ["ip", "netns", "exec", p.a, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
            check=True,
            timeout=10,
        )
        apps.start(p, p.a, TARGET, 53, "127.0.0.1", "::1")
        apps.start(p, p.a, TARGET, TUNNEL_PORT)
        yield p


@pytest.fixture(scope="module")
def system(pair: NetnsPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(pair, tmp_path_factory.mktemp("run"))
    try:
        log = s.run.log_dir / "bandwidth.log"
        deadline = time.monotonic() + 30
        while not (log.exists() and "reading counters of programs" in log.read_text()):
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.1)
        yield s
    finally:
        s.close()


def _decide(info: Conn) -> Verdict:
    if info.protocol == 17 and info.remote_port == 53:
        return Verdict.REDIRECT_NAME_SERVER
    if info.protocol == 6 and info.remote_port == TUNNELED:
        return Verdict.REDIRECT_TUNNEL
    return Verdict.PERMANENT_ACCEPT


@pytest.fixture()
def answerer(system: System) -> Iterator[Answerer]:
    a = Answerer(system.endpoint)
    a.decide = _decide
    a.start()
    try:
        _ask(a)  # start from a clean slate
        yield a
    finally:
        a.stop()
        print(system.logs())  # shown by pytest only when the test failed
        assert not a.errors, a.errors


def _ask(a: Answerer, settle: float = 0.6) -> dict[Key, tuple[int, int]]:
    """One GetBandwidthStats and its answer: (tx, rx) per connection."""
    start = len(a.infos)
    a.client.get_bandwidth_stats()
    time.sleep(settle)
    got: dict[Key, tuple[int, int]] = {}
    for info in a.infos[start:]:
        if isinstance(info, BandwidthStatsV4 | BandwidthStatsV6):
            for v in info.values:
                key = (info.protocol, v.local_ip, v.local_port, v.remote_ip, v.remote_port)
                assert key not in got, "one entry per connection and request"
                got[key] = (v.transmitted_bytes, v.received_bytes)
    return got


def _totals(a: Answerer, rounds: int = 2) -> dict[Key, list[int]]:
    """Every connection's bytes summed over a few requests (a closing connection's last
    bytes may come with the next poll)."""
    out: dict[Key, list[int]] = {}
    for _ in range(rounds):
        for k, (tx, rx) in _ask(a).items():
            entry = out.setdefault(k, [0, 0])
            entry[0] += tx
            entry[1] += rx
    return out


def _client(p: NetnsPair, host: str, port: int, proto: str, sizes: str) -> dict:  # type: ignore[type-arg]
    r = p.run(p.a, [sys.executable, "-c", CLIENT, host, port, proto, sizes], timeout=60)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, r.stderr[-3000:]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_redirected_dns_query_counts_both_directions_for_the_contacted_server(
    pair: NetnsPair, answerer: Answerer, v6: bool
) -> None:
    a_ip, outside = (
        (pair.ip6_a, _outside(pair, True)) if v6 else (pair.ip4_a, _outside(pair, False))
    )
    c = _client(pair, outside, 53, "udp", "37,512,1200")
    assert c["peer"] == [outside, 53]  # the application saw the server it contacted
    assert (c["sent"], c["received"]) == (1749, 2 * 1749 + 9)
    key: Key = (17, addr(a_ip), c["port"], addr(outside), 53)
    got = _totals(answerer)
    print("dns", "v6" if v6 else "v4", got, c, file=sys.stderr)
    assert got.get(key) == [c["sent"], c["received"]], (got, c)
    target = addr("::1" if v6 else "127.0.0.1")
    assert not [k for k in got if target in (k[1], k[3])], got  # nothing for the resolver


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_redirected_tcp_connection_counts_its_streams_for_the_contacted_host(
    pair: NetnsPair, answerer: Answerer, v6: bool
) -> None:
    a_ip, outside = (
        (pair.ip6_a, _outside(pair, True)) if v6 else (pair.ip4_a, _outside(pair, False))
    )
    c = _client(pair, outside, TUNNELED, "tcp", "200000,300000")
    assert c["peer"] == [outside, TUNNELED]
    assert (c["sent"], c["received"]) == (200_008, 300_000)
    key: Key = (6, addr(a_ip), c["port"], addr(outside), TUNNELED)
    got = _totals(answerer)
    print(
        "tcp", "v6" if v6 else "v4", {k: v for k, v in got.items() if k[0] == 6}, c, file=sys.stderr
    )
    assert got.get(key) == [c["sent"], c["received"]], (got, c)
    assert not [k for k in got if TUNNEL_PORT in (k[2], k[4])], got  # nothing for the tunnel


@pytest.mark.parametrize("kind", ["raw", "dgram"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_an_icmp_echo_is_asked_outbound_and_its_reply_inbound_with_the_senders_pid(
    pair: NetnsPair, answerer: Answerer, v6: bool, kind: str
) -> None:
    a_ip, b_ip = (pair.ip6_a, pair.ip6_b) if v6 else (pair.ip4_a, pair.ip4_b)
    proto = 58 if v6 else 1
    before = len(answerer.connections())
    out = apps.run(pair, pair.a, apps.PING, b_ip, 2, 3, kind)
    assert out["replies"] == 2, out
    infos = [
        i
        for i in answerer.connections()[before:]
        if i.protocol == proto and i.remote_ip == addr(b_ip)
    ]

    def icmp_type(i: Conn) -> int:
        raw = bytes(i.payload)
        return raw[40] if v6 else raw[(raw[0] & 15) * 4]

    request, reply = (128, 129) if v6 else (8, 0)
    seen = [(icmp_type(i), i.direction) for i in infos]
    print("icmp", kind, "v6" if v6 else "v4", seen, [i.process_id for i in infos], out)
    # Every packet is a request (the kext never caches ICMP): two echoes, two replies, each
    # with the direction it travelled and the one local-first key.
    assert sorted(seen) == sorted(
        [(request, Direction.OUTBOUND)] * 2 + [(reply, Direction.INBOUND)] * 2
    ), seen
    assert all(i.local_ip == addr(a_ip) and i.local_port == i.remote_port == 0 for i in infos)
    # The sender is known: kextless_pre records the sendto() caller at egress.
    assert [i.process_id for i in infos] == [out["pid"]] * 4, [i.process_id for i in infos]
