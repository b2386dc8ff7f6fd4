"""kextless_pre's `owners` map (flowcache.bpf.c, base/kernel_maps.OwnerMap): the pid that sent
a flow's egress opener, checked against real processes in namespaces; the layout without root."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kextless.actors.capture import kernel_cache as kcm
from kextless.actors.capture.kernel_cache import KernelCache, PreStat
from kextless.base import kernel_maps as km
from kextless.base.kernel_maps import FlowKey, Owner, OwnerMap
from tests.netns import NetnsPair

BPF = Path(kcm.__file__).with_name("bpf")
LO = 1


def test_owner_value_unpacks_struct_owner_val() -> None:
    raw = (4242).to_bytes(4, "little") + bytes(4)
    raw += (0xDEADBEEF01).to_bytes(8, "little") + (99).to_bytes(8, "little")
    assert km.OWNER_VAL.size == 24
    assert Owner.unpack(raw) == Owner(pid=4242, cookie=0xDEADBEEF01, ktime_ns=99)
    src = (BPF / "flowcache.bpf.c").read_text()
    body = re.search(r"struct owner_val \{(.*?)\};", src, re.S)
    assert body is not None
    fields = re.findall(r"__u(\d+) (\w+);", body.group(1))
    assert fields == [("32", "tgid"), ("32", "pad"), ("64", "cookie"), ("64", "ktime")]
    assert "REINJECT_MARK_HI 0x4D49" in src


# ---- real packets ----------------------------------------------------------------------------

# A TCP listener and a UDP socket on (host, port) that answers every datagram.
_SERVER = r"""
import os, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
t = socket.socket(fam, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((host, port))
t.listen(64)
u = socket.socket(fam, socket.SOCK_DGRAM)
u.bind((host, port))
def accept():
    conns = []
    while True:
        conns.append(t.accept()[0])
threading.Thread(target=accept, daemon=True).start()
print("ready", os.getpid(), flush=True)
while True:
    d, a = u.recvfrom(2048)
    u.sendto(d, a)
"""

# One opener of `kind` to (host, port); prints "pid local_port ok", then waits for stdin EOF.
_CLIENT = r"""
import os, socket, sys
kind, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.settimeout(timeout)
ok = 1
try:
    if kind == "tcp":
        s.connect((host, port))
    elif kind == "udpc":
        s.connect((host, port))
        s.send(b"x" * 16)
    else:
        s.sendto(b"x" * 16, (host, port))
except OSError:
    ok = 0
print(os.getpid(), s.getsockname()[1], ok, flush=True)
sys.stdin.read()
"""


class _Client:
    def __init__(self, p: NetnsPair, ns: str, kind: str, host: str, port: int, t: float) -> None:
        self.proc = p.popen(
            ns, [sys.executable, "-c", _CLIENT, kind, host, port, t], stdin=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert len(line) == 3, self.proc.stderr.read() if self.proc.stderr else line
        self.pid, self.lport, self.ok = int(line[0]), int(line[1]), line[2] == b"1"

    def done(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=5)


def _server(p: NetnsPair, ns: str, host: str, port: int) -> int:
    """Start the server; its pid."""
    srv = p.popen(ns, [sys.executable, "-c", _SERVER, host, port])
    assert srv.stdout is not None
    ready, pid = srv.stdout.readline().split()
    assert ready == b"ready"
    return int(pid)


@contextlib.contextmanager
def _cache(p: NetnsPair, links: tuple[str, ...], guard: bool) -> Iterator[KernelCache]:
    """kextless_pre on `links` of namespace a; without the guard a miss just goes on (no
    divert here), so connections complete."""
    from pyroute2 import NetNS

    ipr = NetNS(p.a)
    kc = KernelCache.load(flows_max=1024, guard=guard)
    indexes = [ipr.link_lookup(ifname=n)[0] for n in links]
    try:
        for i, n in zip(indexes, links, strict=True):
            kc.attach(ipr, i, n, guard=guard)
        yield kc
    finally:
        for i in indexes:
            kc.detach(ipr, i)
        kc.close()
        ipr.close()


def _owners(kc: KernelCache) -> OwnerMap:
    assert kc.owners is not None
    return kc.owners


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("where", ["veth", "lo"])
def test_owner_is_the_process_that_connected_or_sent(v6: bool, where: str) -> None:
    with NetnsPair("ko") as p, _cache(p, ("va", "lo"), guard=False) as kc:
        if where == "lo":
            srv_ns, host = p.a, "::1" if v6 else "127.0.0.1"
            local = host
        else:
            srv_ns, host = p.b, p.ip6_b if v6 else p.ip4_b
            local = p.ip6_a if v6 else p.ip4_a
        port = 7400
        srv_pid = _server(p, srv_ns, host, port)
        t0 = time.monotonic_ns()
        clients = [
            (kind, _Client(p, p.a, kind, host, port, 3.0))
            for kind in ("tcp", "udp", "udpc", "tcp", "udp", "udpc")
        ]
        time.sleep(0.2)  # the echo replies have come back (they must not change owners)
        owners = _owners(kc)
        pids = {c.pid for _k, c in clients}
        assert len(pids) == len(clients) and os.getpid() not in pids
        for kind, c in clients:
            assert c.ok, kind
            proto = 6 if kind == "tcp" else 17
            key = FlowKey.of(proto, local, c.lport, host, port)
            got = owners.get(key)
            assert got is not None, (kind, str(key))
            assert got.pid == c.pid, (kind, got, c.pid)
            assert got.cookie != 0 and t0 <= got.ktime_ns <= time.monotonic_ns()
            # The other orientation: the SYN-ACK (egress on lo, sent in softirq) and every
            # ingress packet record no one; a UDP reply the server sent out of lo is the
            # server's (on the veth it arrives: ingress, nothing).
            back = owners.get(key.reversed())
            if kind == "tcp" or where == "veth":
                assert back is None, (kind, back)
            else:
                assert back is not None and back.pid == srv_pid and back.cookie != got.cookie
        # Every client socket has its own cookie (the server's one socket answers them all).
        mine = [o for _k, o in owners.entries() if o.pid in pids]
        assert len(mine) == len(clients) and len({o.cookie for o in mine}) == len(clients)
        for _kind, c in clients:
            c.done()


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_inbound_connection_records_nothing_on_the_accepting_side(v6: bool) -> None:
    with NetnsPair("ki") as p, _cache(p, ("va",), guard=False) as kc:
        host, peer = (p.ip6_a, p.ip6_b) if v6 else (p.ip4_a, p.ip4_b)
        _server(p, p.a, host, 7500)
        before = kc.stats()
        c = _Client(p, p.b, "tcp", host, 7500, 3.0)
        assert c.ok
        after = kc.stats()
        assert after[PreStat.TCP_CONTROL] - before[PreStat.TCP_CONTROL] >= 1  # the SYN in
        assert after[PreStat.MISSED] - before[PreStat.MISSED] >= 1  # the SYN-ACK out: no entry
        key = FlowKey.of(6, peer, c.lport, host, 7500)
        assert _owners(kc).get(key) is None  # ingress SYN
        assert _owners(kc).get(key.reversed()) is None  # egress SYN-ACK (softirq)
        c.done()


@pytest.mark.root
def test_retransmitted_syn_keeps_the_owner_of_the_connect() -> None:
    # The guard drops the SYNs (no divert re-injects them): the kernel retransmits the SYN
    # from its timer after 1 s and 3 s, in whatever task the timer interrupted.
    with NetnsPair("kr") as p, _cache(p, ("va",), guard=True) as kc:
        g0 = kc.guard_stats()
        assert g0 is not None
        c = _Client(p, p.a, "tcp", p.ip4_b, 7600, 3.5)
        assert not c.ok  # timed out
        g1 = kc.guard_stats()
        assert g1 is not None and g1.dropped - g0.dropped >= 3  # the SYN and 2 retransmissions
        got = _owners(kc).get(FlowKey.of(6, p.ip4_a, c.lport, p.ip4_b, 7600))
        assert got is not None and got.pid == c.pid
        # Recorded once, by the connect() (the first SYN), never by a retransmission.
        assert got.ktime_ns < g1.last_drop_ns - 2_000_000_000
        c.done()


@pytest.mark.root
def test_owner_map_opens_by_id_read_only_from_the_attached_program() -> None:
    from pyroute2 import NetNS

    with NetnsPair("km") as p, _cache(p, ("lo",), guard=False) as kc:
        _server(p, p.a, "127.0.0.1", 7700)
        c = _Client(p, p.a, "udp", "127.0.0.1", 7700, 3.0)
        key = FlowKey.of(17, "127.0.0.1", c.lport, "127.0.0.1", 7700)
        ipr: Any = NetNS(p.a)
        try:
            ro = OwnerMap.open(ipr)
        finally:
            ipr.close()
        assert ro is not None
        try:
            assert ro.map.map_id == _owners(kc).map.map_id
            got = ro.get(key)
            assert got is not None and got.pid == c.pid
            with pytest.raises(km.KernelCacheError):
                ro.delete(key)  # a read-only fd cannot write
            assert _owners(kc).delete(key) and ro.get(key) is None
        finally:
            ro.close()
        c.done()
