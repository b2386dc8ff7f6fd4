"""Reading a namespace's existing TCP connections from the kernel (sock_diag), on real sockets."""

from __future__ import annotations

import json
import sys

import pytest

from tests.netns import NetnsPair

pytestmark = [pytest.mark.root]

#: Run in namespace a: connections out to b, in from b (accepted here), over loopback (v4 and
#: v6, one end each way), one half closed by us, plus a listener with no connection.
_SNIPPET = r"""
import json, socket, sys, time
ip4_b, ip6_b = sys.argv[1], sys.argv[2]
def listener(fam, addr, port):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr, port)); s.listen(8); return s
keep = []
srv = listener(socket.AF_INET6, "::", 7100)  # dual stack: v4 peers are v4-mapped
keep.append(listener(socket.AF_INET, "0.0.0.0", 7101))  # nobody connects
out4 = socket.create_connection((ip4_b, 7200)); keep.append(out4)
out6 = socket.create_connection((ip6_b, 7200)); keep.append(out6)
lo4 = socket.create_connection(("127.0.0.1", 7100)); keep.append(lo4)
lo6 = socket.create_connection(("::1", 7100)); keep.append(lo6)
half = socket.create_connection((ip4_b, 7200)); half_port = half.getsockname()[1]
half.close()  # FIN_WAIT2: b may still send, so it is still a connection
print("ready", flush=True)
inbound = []
while len(inbound) < 4:  # the two loopback ones and two from b
    c, peer = srv.accept(); keep.append(c); inbound.append(peer)
time.sleep(0.2)
from kextless.actors.capture import existing
flows = existing.read()
print(json.dumps({
    "out": [s.getsockname()[1] for s in (out4, out6, lo4, lo6)] + [half_port],
    "flows": [[e.flow.protocol, e.flow.local_ip.hex(), e.flow.local_port,
               e.flow.remote_ip.hex(), e.flow.remote_port, e.direction.name]
              for e in existing.read()],
}), flush=True)
"""

_SERVER_B = r"""
import socket, threading
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", 7200)); s.listen(8)
print("ready", flush=True)
keep = []
while True:
    c, _ = s.accept(); keep.append(c)
"""

_CLIENTS_B = r"""
import socket, sys, time
a = socket.create_connection((sys.argv[1], 7100)); b = socket.create_connection((sys.argv[2], 7100))
print("ready", flush=True)
time.sleep(30)
"""


def _hex(ip: str) -> str:
    import ipaddress

    return ipaddress.ip_address(ip).packed.hex()


def test_read_finds_established_tcp_with_direction_v4_v6_and_loopback_once() -> None:
    with NetnsPair() as p:
        srv = p.popen(p.b, [sys.executable, "-c", _SERVER_B])
        assert srv.stdout is not None and b"ready" in srv.stdout.readline()
        prog = p.popen(p.a, [sys.executable, "-c", _SNIPPET, p.ip4_b, p.ip6_b])
        assert prog.stdout is not None and b"ready" in prog.stdout.readline()
        cli = p.popen(p.b, [sys.executable, "-c", _CLIENTS_B, p.ip4_a, p.ip6_a])
        assert cli.stdout is not None and b"ready" in cli.stdout.readline()
        line = prog.stdout.readline()
        assert line, prog.stderr.read() if prog.stderr else ""
        report = json.loads(line)
    o4, o6, l4, l6, half = report["out"]
    got = {tuple(f) for f in report["flows"]}
    lo4, lo6 = _hex("127.0.0.1"), _hex("::1")
    expected_out = {
        (6, _hex(p.ip4_a), o4, _hex(p.ip4_b), 7200, "OUTBOUND"),
        (6, _hex(p.ip6_a), o6, _hex(p.ip6_b), 7200, "OUTBOUND"),
        # Loopback: both ends are here, reported once, as the client's (outbound) end.
        (6, lo4, l4, lo4, 7100, "OUTBOUND"),
        (6, lo6, l6, lo6, 7100, "OUTBOUND"),
        (6, _hex(p.ip4_a), half, _hex(p.ip4_b), 7200, "OUTBOUND"),
    }
    assert expected_out <= got, got
    inbound = {f for f in got if f[5] == "INBOUND"}
    # From b: the dual-stack listener's v4 peer is plain v4, as its packets are.
    assert {(f[1], f[2], f[3]) for f in inbound} == {
        (_hex(p.ip4_a), 7100, _hex(p.ip4_b)),
        (_hex(p.ip6_a), 7100, _hex(p.ip6_b)),
    }, got
    assert len(got) == 7, got  # no listener, no loopback server end, no duplicate
