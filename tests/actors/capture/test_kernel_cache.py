"""The kernel flow cache and the fail-closed guard (actors/capture/kernel_cache.py and bpf/):
key packing and the committed objects without root, then real packets in namespaces."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kextless.actors.capture import kernel_cache as kcm
from kextless.actors.capture.kernel_cache import (
    Action,
    GuardStats,
    KernelCache,
    PreStat,
)
from kextless.base import kernel_maps as km
from kextless.base.kernel_maps import FlowEntry, FlowKey, ReinjectedEntry
from kextless.protocol.messages import Flow
from tests.netns import NetnsPair

BPF = Path(kcm.__file__).with_name("bpf")

# ---- without root --------------------------------------------------------------------------


def test_v4_key_layout_matches_struct_flow_key() -> None:
    k = FlowKey.of(17, "10.1.2.3", 5353, "10.9.8.7", 53)
    raw = k.pack()
    assert len(raw) == 40
    assert raw[0] == 4 and raw[1] == 17
    assert raw[2:4] == (5353).to_bytes(2, "big") and raw[4:6] == (53).to_bytes(2, "big")
    assert raw[6:8] == b"\0\0"
    assert raw[8:24] == bytes([10, 1, 2, 3]) + bytes(12)
    assert raw[24:40] == bytes([10, 9, 8, 7]) + bytes(12)
    assert FlowKey.unpack(raw) == k


def test_v6_key_round_trips_and_reverses() -> None:
    k = FlowKey.of(6, "fd31::1", 40000, "fd31::2", 443)
    raw = k.pack()
    assert raw[0] == 6 and raw[8:24] == k.src and len(k.src) == 16
    assert FlowKey.unpack(raw) == k
    r = k.reversed()
    assert (r.src, r.sport, r.dst, r.dport) == (k.dst, 443, k.src, 40000)
    assert r.reversed() == k
    assert r.pack() != raw
    assert str(k) == "proto 6 fd31::1:40000 -> fd31::2:443"


def test_key_from_the_capture_flow_is_its_outbound_packet() -> None:
    flow = Flow(17, bytes([10, 0, 0, 1]), 1234, bytes([10, 0, 0, 2]), 53)
    assert FlowKey.from_flow(flow) == FlowKey.of(17, "10.0.0.1", 1234, "10.0.0.2", 53)
    with pytest.raises(ValueError):
        FlowKey.of(6, "10.0.0.1", 1, "fd31::1", 2)


def test_entry_unpacks_struct_flow_val() -> None:
    raw = b"".join(n.to_bytes(8, "little") for n in (7, 3, 300, 180))
    raw += bytes([2, 9, 1, 0]) + bytes(12)  # then the program's own TCP span (ignored)
    assert len(raw) == 48
    assert FlowEntry.unpack(raw) == FlowEntry(Action.DROP, 9, 3, 300, 7, payload=180)


def test_reinjected_entry_unpacks_struct_reinj_val() -> None:
    raw = b"".join(n.to_bytes(8, "little") for n in (11, 4, 1460)) + bytes(8)
    assert ReinjectedEntry.unpack(raw) == ReinjectedEntry(packets=4, payload=1460, last_seen_ns=11)
    src = (BPF / "guard.bpf.c").read_text()
    body = re.search(r"struct reinj_val \{(.*?)\};", src, re.S)
    assert body is not None
    assert re.findall(r"__u64 (\w+);", body.group(1)) == ["last_seen_ns", "packets", "payload"]
    assert re.findall(r"__u32 (\w+);", body.group(1)) == ["seq_end", "seq_valid"]


def test_python_enums_mirror_the_c_source() -> None:
    src = (BPF / "flowcache.bpf.c").read_text()
    body = re.search(r"enum stat \{(.*?)\};", src, re.S)
    assert body is not None
    names = re.findall(r"^\s*ST_(\w+)", body.group(1), re.M)
    assert names[:-1] == [s.name for s in PreStat] and names[-1] == "COUNT"
    assert "ACTION_PASS = 1" in src and "ACTION_DROP = 2" in src
    assert "REINJECT_MARK_HI 0x4D49" in (BPF / "guard.bpf.c").read_text()
    for obj in ("flowcache.bpf.c", "guard.bpf.c"):
        assert "LO_REDIRECT_MARK_HI 0x4D4A" in (BPF / obj).read_text()


@pytest.mark.skipif(
    shutil.which("clang-14") is None or shutil.which("make") is None,
    reason="clang-14 (Debian's clang) and make are needed to rebuild the BPF objects",
)
def test_committed_objects_are_a_fresh_build_of_their_sources() -> None:
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        pytest.skip("libbpf-dev (the bpf headers) is not installed")
    r = subprocess.run(
        ["make", "-s", "-C", str(BPF), "check"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_objects_carry_no_build_path() -> None:
    for obj in ("flowcache.bpf.o", "guard.bpf.o"):
        data = (BPF / obj).read_bytes()
        assert str(BPF).encode() not in data
        assert b".BTF" in data  # the loader needs the BTF the strip keeps


# ---- real packets ----------------------------------------------------------------------------

_ECHO = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""

# Reads a count per line from stdin, sends that many datagrams from a fixed port, prints
# how many replies came back (waiting at most 0.3 s for each).
_CLIENT = r"""
import socket, sys
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if v6 else "0.0.0.0", sport))
s.settimeout(0.3)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    for i in range(n):
        s.sendto(b"k" * 32, (host, port))
    got = 0
    try:
        while got < n:
            s.recv(2048)
            got += 1
    except TimeoutError:
        pass
    print(got, flush=True)
"""


class _Echo:
    """A UDP echo server in `a` and a client in `b` that sends on request."""

    def __init__(self, p: NetnsPair, v6: bool, port: int = 7007, sport: int = 41000) -> None:
        self.a_ip, self.b_ip = (p.ip6_a, p.ip6_b) if v6 else (p.ip4_a, p.ip4_b)
        self.port, self.sport = port, sport
        srv = p.popen(p.a, [sys.executable, "-c", _ECHO, self.a_ip, port])
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        self.cli = p.popen(
            p.b, [sys.executable, "-c", _CLIENT, self.a_ip, port, sport], stdin=subprocess.PIPE
        )
        assert self.cli.stdout is not None and self.cli.stdout.readline().strip() == b"ready"

    @property
    def key(self) -> FlowKey:
        """The request as it arrives on `va` (ingress); its reverse is the reply (egress)."""
        return FlowKey.of(17, self.b_ip, self.sport, self.a_ip, self.port)

    def send(self, n: int) -> int:
        assert self.cli.stdin is not None and self.cli.stdout is not None
        self.cli.stdin.write(f"{n}\n".encode())
        self.cli.stdin.flush()
        return int(self.cli.stdout.readline())


def _ns_ipr(ns: str) -> Any:
    from pyroute2 import NetNS

    return NetNS(ns)


@contextlib.contextmanager
def _cache_on_va(p: NetnsPair, **load: Any) -> Iterator[tuple[KernelCache, Any, int]]:
    ipr = _ns_ipr(p.a)
    kc = KernelCache.load(**load)
    index = ipr.link_lookup(ifname="va")[0]
    try:
        kc.attach(ipr, index, "va")
        yield kc, ipr, index
    finally:
        kc.detach(ipr, index)
        kc.close()
        ipr.close()


def _deltas(kc: KernelCache, before: dict[PreStat, int]) -> dict[PreStat, int]:
    now = kc.stats()
    return {s: now[s] - before[s] for s in PreStat}


def _dropped(kc: KernelCache) -> int:
    g = kc.guard_stats()
    assert g is not None
    return g.dropped


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_pass_skips_the_chain_drop_drops_miss_goes_on_to_the_guard(v6: bool) -> None:
    with NetnsPair("kc") as p, _cache_on_va(p, flows_max=1024) as (kc, _ipr, _index):
        echo = _Echo(p, v6)
        # Neighbours resolved afresh: ARP / ND must pass with only our two programs there
        # (the guard would drop ND: only kextless_pre's early pass lets it by).
        p.run(p.a, ["ip", "neigh", "flush", "dev", "va"], check=True)
        p.run(p.b, ["ip", "neigh", "flush", "dev", "vb"], check=True)
        kc.put(echo.key, Action.PASS, verdict=7)
        before, g0 = kc.stats(), _dropped(kc)
        t0 = time.monotonic_ns()
        assert echo.send(10) == 10
        d = _deltas(kc, before)
        assert d[PreStat.PASSED] == 20  # 10 requests in, 10 replies out
        assert _dropped(kc) == g0  # the guard never saw them
        assert d[PreStat.NEIGHBOUR if v6 else PreStat.NON_IP] >= 2  # NS/NA or ARP
        req, rep = kc.get(echo.key), kc.get(echo.key.reversed())
        assert req is not None and rep is not None
        assert (req.action, req.verdict, req.packets) == (Action.PASS, 7, 10)
        assert rep.packets == 10 and rep.nbytes >= 10 * (32 + 8 + (40 if v6 else 20))
        # Application payload only: the 32-byte datagrams, no IP / UDP / L2 header.
        assert (req.payload, rep.payload) == (320, 320)
        assert t0 <= req.last_seen_ns <= time.monotonic_ns()

        # PASS -> DROP: dropped by kextless_pre from the next packet on; what the PASS entry
        # counted stays (the bandwidth actor may not have read it yet).
        kc.put(echo.key, Action.DROP)
        before, g0 = kc.stats(), _dropped(kc)
        assert echo.send(5) == 0
        assert _deltas(kc, before)[PreStat.DROPPED] == 5
        assert _dropped(kc) == g0
        got = kc.get(echo.key)
        assert got is not None and (got.action, got.packets, got.payload) == (Action.DROP, 15, 320)

        # Retired (an Update to a verdict Python enforces): a miss, counters kept.
        assert kc.retire(echo.key)
        before, g0 = kc.stats(), _dropped(kc)
        assert echo.send(3) == 0
        assert _deltas(kc, before)[PreStat.MISSED] == 3
        assert _dropped(kc) == g0 + 3  # no divert here: the guard drops the misses
        got, back = kc.get(echo.key), kc.get(echo.key.reversed())
        assert got is not None and (got.packets, got.payload) == (15, 320)
        assert back is not None and back.payload == 320
        # Put again: counting goes on from there.
        kc.put(echo.key, Action.PASS)
        assert echo.send(2) == 2
        got = kc.get(echo.key)
        assert got is not None and (got.packets, got.payload) == (17, 384)

        # Deleted: a miss goes on down the chain, to the guard (no divert here): dropped.
        assert kc.delete(echo.key) and kc.get(echo.key.reversed()) is None
        before, g0 = kc.stats(), _dropped(kc)
        t1 = time.monotonic_ns()
        assert echo.send(5) == 0
        assert _deltas(kc, before)[PreStat.MISSED] == 5
        assert _dropped(kc) == g0 + 5
        g = kc.guard_stats()
        assert g is not None and t1 <= g.last_drop_ns <= time.monotonic_ns()

        # Flipping the verdict before each packet: each packet sees the entry of its time.
        seen = []
        for i in range(6):
            kc.put(echo.key, Action.PASS if i % 2 == 0 else Action.DROP)
            seen.append(echo.send(1))
        assert seen == [1, 0, 1, 0, 1, 0]
        assert kc.delete(echo.key) and not kc.delete(echo.key)


@pytest.mark.root
def test_pass_ports_skip_everything_and_entries_list_both_orientations() -> None:
    with NetnsPair("kp") as p, _cache_on_va(p, flows_max=4096) as (kc, _ipr, _index):
        echo = _Echo(p, False, port=7100)
        assert echo.send(2) == 0  # miss: the guard drops
        kc.set_pass_port(17, 7100)
        assert kc.pass_port_list() == [(17, 7100)]
        before = kc.stats()
        assert echo.send(3) == 3
        assert _deltas(kc, before)[PreStat.PASS_PORT] == 6
        assert kc.clear_pass_port(17, 7100) and kc.pass_port_list() == []
        assert echo.send(1) == 0
        keys = [FlowKey.of(17, "10.0.0.1", 1000 + i, "10.0.0.2", 53) for i in range(300)]
        for k in keys:
            kc.put(k, Action.PASS, verdict=i % 256 if (i := k.sport - 1000) else 0)
        listed = dict(kc.entries())
        assert set(listed) == set(keys) | {k.reversed() for k in keys}  # > one batch of 256
        assert listed[keys[5]].verdict == 5
        assert kc.clear() == 600 and list(kc.entries()) == []


@pytest.mark.root
def test_lru_eviction_only_ever_causes_a_re_ask() -> None:
    with NetnsPair("ke") as p, _cache_on_va(p, flows_max=16) as (kc, _ipr, _index):
        echo = _Echo(p, False, port=7200)
        kc.put(echo.key, Action.PASS)
        for i in range(200):  # push the flow out of a 16-entry LRU
            kc.put(FlowKey.of(17, "10.0.0.1", 2000 + i, "10.0.0.2", 53), Action.PASS)
        assert kc.flows.max_entries == 16
        assert kc.get(echo.key) is None
        g0 = _dropped(kc)
        assert echo.send(3) == 0  # gone: it goes on, and the guard drops it; never a pass
        assert _dropped(kc) == g0 + 3


# Counts the datagrams (and their bytes) that reach it until it has been idle for 1 s.
_COUNTING_RECEIVER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
s.settimeout(1.0)
print("ready", flush=True)
got = size = 0
try:
    while True:
        size += len(s.recv(1 << 16))
        got += 1
except TimeoutError:
    pass
print(got, size, flush=True)
"""

# Sends datagrams from a fixed port with skb->mark set as the divert library sets it.
_MARKED_SENDER = r"""
import socket, sys
me, host, port, sport, mark, n, size = sys.argv[1:8]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mark))
s.bind((me, int(sport)))
for _ in range(int(n)):
    s.sendto(b"m" * int(size), (host, int(port)))
"""


def _send_marked(p: NetnsPair, v6: bool, sport: int, mark: int, n: int, size: int) -> int:
    """Send `n` datagrams of `size` bytes a -> b (out of va) marked `mark`; how many arrived."""
    a_ip, b_ip = (p.ip6_a, p.ip6_b) if v6 else (p.ip4_a, p.ip4_b)
    rx = p.popen(p.b, [sys.executable, "-c", _COUNTING_RECEIVER, b_ip, 7300])
    assert rx.stdout is not None and rx.stdout.readline().strip() == b"ready"
    argv = [a_ip, b_ip, 7300, sport, mark, n, size]
    r = p.run(p.a, [sys.executable, "-c", _MARKED_SENDER, *argv], timeout=20)
    assert r.returncode == 0, r.stderr
    out, err = rx.communicate(timeout=20)
    assert rx.returncode == 0, err.decode()[-2000:]
    got, nbytes = map(int, out.split())
    assert nbytes == got * size
    return got


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_the_guard_counts_reinjected_payload_and_both_pass_lo_redirects_untouched(
    v6: bool,
) -> None:
    with NetnsPair("kr") as p, _cache_on_va(p, flows_max=1024) as (kc, _ipr, _index):
        a_ip, b_ip = (p.ip6_a, p.ip6_b) if v6 else (p.ip4_a, p.ip4_b)
        reinjected = dict(kc.reinjected_entries())
        assert reinjected == {}
        g0 = _dropped(kc)

        # Re-injected (0x4D49) and uncached: passed, its payload counted by the guard.
        assert _send_marked(p, v6, 41001, 0x4D490000, 20, 100) == 20
        key = FlowKey.of(17, a_ip, 41001, b_ip, 7300)
        got = dict(kc.reinjected_entries())
        assert got[key].packets == 20 and got[key].payload == 2000
        assert _dropped(kc) == g0

        # Re-injected and cached: kextless_pre counts it and ends the chain (counted once).
        key2 = FlowKey.of(17, a_ip, 41002, b_ip, 7300)
        kc.put(key2, Action.PASS)
        assert _send_marked(p, v6, 41002, 0x4D490007, 5, 333) == 5
        e = kc.get(key2)
        assert e is not None and (e.packets, e.payload) == (5, 5 * 333)
        assert key2 not in dict(kc.reinjected_entries())

        # The library's lo re-injection mark (0x4D4A): on, untouched, by both programs, even
        # for a cached flow (kextless_pre would otherwise pass it into the wrong stack).
        key3 = FlowKey.of(17, a_ip, 41003, b_ip, 7300)
        kc.put(key3, Action.PASS)
        before = kc.stats()
        assert _send_marked(p, v6, 41003, 0x4D4A0002, 7, 50) == 7
        assert _deltas(kc, before)[PreStat.LO_REDIRECT] == 7
        e3 = kc.get(key3)
        assert e3 is not None and e3.packets == 0
        assert key3 not in dict(kc.reinjected_entries())
        assert _dropped(kc) == g0

        # Unmarked and uncached: the guard drops it, counts nothing.
        assert _send_marked(p, v6, 41004, 0, 3, 10) == 0
        assert _dropped(kc) == g0 + 3
        assert FlowKey.of(17, a_ip, 41004, b_ip, 7300) not in dict(kc.reinjected_entries())

        if not v6:
            # A datagram the IP layer fragmented: counted whole, from its first fragment.
            assert _send_marked(p, v6, 41005, 0x4D490000, 4, 3000) == 4
            got = dict(kc.reinjected_entries())
            k5 = FlowKey.of(17, a_ip, 41005, b_ip, 7300)
            assert got[k5].packets == 4 and got[k5].payload == 12000


# Sends hand-made TCP segments (ACK only, `seq:len` each) a -> b out of va, marked as given.
_SEGMENTS = r"""
import socket, struct, sys
src, dst, mark = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
for spec in sys.argv[4:]:
    seq, n = map(int, spec.split(":"))
    tcp = struct.pack("!HHIIBBHHH", 1234, 5678, seq, 1, 5 << 4, 0x10, 65535, 0, 0) + b"s" * n
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + tcp, (dst, 0))
"""


@pytest.mark.root
def test_tcp_payload_counts_stream_bytes_once_whatever_the_order() -> None:
    # 1000:100, its retransmission, 1200:100 (a gap), 1100:100 (fills it), 900:100 (below):
    # the stream seen is [900, 1300): 400 bytes, the wire carried 500.
    segs = ["1000:100", "1000:100", "1200:100", "1100:100", "900:100"]
    with NetnsPair("kq") as p, _cache_on_va(p, flows_max=1024) as (kc, _ipr, _index):
        key = FlowKey.of(6, p.ip4_a, 1234, p.ip4_b, 5678)
        kc.put(key, Action.PASS)
        r = p.run(p.a, [sys.executable, "-c", _SEGMENTS, p.ip4_a, p.ip4_b, 0, *segs])
        assert r.returncode == 0, r.stderr
        e = kc.get(key)
        assert e is not None and e.packets == 5 and e.payload == 400
        # The guard (re-injected, no entry) counts only what is beyond the highest end seen:
        # retransmissions add nothing; a late segment below it is not counted there.
        assert kc.delete(key)
        r = p.run(p.a, [sys.executable, "-c", _SEGMENTS, p.ip4_a, p.ip4_b, 0x4D490000, *segs])
        assert r.returncode == 0, r.stderr
        got = dict(kc.reinjected_entries())[key]
        assert got.packets == 5 and got.payload == 200
        # A put starts the entry's stream afresh.
        kc.put(key, Action.PASS)
        r = p.run(p.a, [sys.executable, "-c", _SEGMENTS, p.ip4_a, p.ip4_b, 0, "5000:10"])
        e = kc.get(key)
        assert e is not None and e.payload == 10


# A TCP client in `a` behind a re-injecting divert handle (priority 0) between our programs:
# a cached connection's data never reaches Python, an uncached one's does; the guard passes
# the handle's re-injected (marked) packets and drops what nobody re-injects.
_TCP_PROBE = r"""
import json, socket, sys, threading, time, collections
from pyroute2 import IPRoute
from pydivert import EBPFDivert
from kextless.actors.capture.kernel_cache import Action, KernelCache
from kextless.base.kernel_maps import FlowKey
host, port, v6 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
fam = socket.AF_INET6 if v6 else socket.AF_INET
me = sys.argv[4]
ipr = IPRoute()
index = ipr.link_lookup(ifname="va")[0]
kc = KernelCache.load(flows_max=1024)
kc.attach(ipr, index, "va")
seen = collections.Counter()
h = EBPFDivert("tcp", priority=0).open()
stop = False
def loop():
    while not stop:
        try:
            pkt = h.recv(timeout=0.1)
        except TimeoutError:
            continue
        except Exception:
            return
        seen[pkt.src_port] += 1
        seen[pkt.dst_port] += 1
        h.send(pkt)
t = threading.Thread(target=loop, daemon=True)
t.start()
def transfer(sport):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    s.bind((me, sport))
    s.connect((host, port))
    s.sendall(b"x" * 2_000_000)
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
    time.sleep(0.3)
out = {}
kc.put(FlowKey.of(6, me, 42001, host, port), Action.PASS)
transfer(42001)
transfer(42002)
out["cached"], out["uncached"] = seen[42001], seen[42002]
e = kc.get(FlowKey.of(6, me, 42001, host, port))
out["cached_out_packets"] = e.packets if e else -1
out["cached_out_payload"] = e.payload if e else -1
r = dict(kc.reinjected_entries())
def reinj(key):
    return r[key].payload if key in r else 0
out["cached_out_reinjected"] = reinj(FlowKey.of(6, me, 42001, host, port))
out["uncached_out_reinjected"] = reinj(FlowKey.of(6, me, 42002, host, port))
out["uncached_in_reinjected"] = reinj(FlowKey.of(6, host, port, me, 42002))
e = kc.get(FlowKey.of(6, host, port, me, 42001))
out["cached_in"] = (e.payload if e else 0) + reinj(FlowKey.of(6, host, port, me, 42001))
stop = True
t.join()
h.close()
g0 = kc.guard_stats().dropped
try:
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(0.5)
    s.connect((host, port))
    out["without_handle"] = "connected"
except OSError as e:
    out["without_handle"] = type(e).__name__
out["guard_drops"] = kc.guard_stats().dropped - g0
kc.detach(ipr, index)
kc.close()
print(json.dumps(out))
"""

_SINK = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 16):
        pass
    c.sendall(b"done")
    c.close()
"""


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_cached_tcp_connection_skips_python_and_the_guard_passes_reinjected(v6: bool) -> None:
    with NetnsPair("kt") as p:
        a_ip, b_ip = (p.ip6_a, p.ip6_b) if v6 else (p.ip4_a, p.ip4_b)
        sink = p.popen(p.b, [sys.executable, "-c", _SINK, b_ip, 8080])
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
        code = _TCP_PROBE.replace("sys.argv[1]", repr(b_ip)).replace("sys.argv[2]", "8080")
        code = code.replace("sys.argv[3]", repr("1" if v6 else "0"))
        code = code.replace("sys.argv[4]", repr(a_ip))
        r = p.run_py(p.a, code, timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        print(out, file=sys.stderr)
        # 2 MB is > 30 segments (GSO-sized); Python saw only SYN / SYN-ACK / FINs of the
        # cached one, every segment of the uncached one.
        assert out["uncached"] > 30
        assert 2 <= out["cached"] <= 8
        assert out["cached_out_packets"] > 10
        # Every payload byte counted once: the cache's entry plus what Python re-injected
        # (the kernel's GSO segments count one header each).
        assert out["cached_out_payload"] + out["cached_out_reinjected"] == 2_000_000
        assert out["cached_out_payload"] > 1_900_000
        assert out["uncached_out_reinjected"] == 2_000_000
        assert out["uncached_in_reinjected"] == 4 and out["cached_in"] == 4  # b"done"
        assert out["without_handle"] in ("TimeoutError", "timeout")
        assert out["guard_drops"] >= 1


# Loads, attaches, decides a flow, then dies by SIGKILL without closing anything.
_LOADER = r"""
import json, os, signal, sys
from pyroute2 import NetNS
from kextless.actors.capture.kernel_cache import Action, KernelCache
from kextless.base.kernel_maps import FlowKey
ipr = NetNS(sys.argv[1])
kc = KernelCache.load(flows_max=2048)
kc.attach(ipr, ipr.link_lookup(ifname="va")[0], "va")
kc.put(FlowKey.of(17, sys.argv[2], 41000, sys.argv[3], 7007), Action.PASS, verdict=3)
kc.set_pass_port(6, 9999)
print(json.dumps({"flows": kc.flows.map_id, "stats": kc.stats_map.map_id}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.root
def test_a_restarted_capture_adopts_the_maps_and_detach_removes_everything() -> None:
    with NetnsPair("ka") as p:
        code = _LOADER.replace("sys.argv[1]", repr(p.a))
        code = code.replace("sys.argv[2]", repr(p.ip4_b)).replace("sys.argv[3]", repr(p.ip4_a))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert r.returncode == -9, r.stderr[-3000:]
        ids = json.loads(r.stdout.strip().splitlines()[-1])
        echo = _Echo(p, False)
        assert echo.send(4) == 4  # the dead loader's entry still passes

        ipr = _ns_ipr(p.a)
        try:
            with contextlib.closing(_ns_ipr(p.b)) as ipr_b:
                assert KernelCache.adopt(ipr_b) is None  # nothing of ours in b
            kc = KernelCache.adopt(ipr)
            assert kc is not None
            index = ipr.link_lookup(ifname="va")[0]
            assert kc.attached == {index: "va"}
            assert (kc.flows.map_id, kc.stats_map.map_id) == (ids["flows"], ids["stats"])
            assert kc.flows.max_entries == 2048
            assert kc.pass_port_list() == [(6, 9999)]
            entries = dict(kc.entries())
            assert entries[echo.key].verdict == 3 and entries[echo.key].packets == 4
            assert kc.stats()[PreStat.PASSED] == 8
            assert isinstance(kc.guard_stats(), GuardStats)
            # The adopted maps drive the attached program: a DROP written now applies.
            kc.put(echo.key, Action.DROP)
            assert echo.send(2) == 0
            prog_ids = {f.prog_id for f in km.filters(ipr, index)}
            assert len(prog_ids) == 2
            assert kc.detach(ipr, index)
            assert km.filters(ipr, index) == []
            kc.close()
            assert echo.send(2) == 2  # no programs left: nothing holds or drops
            # Nothing kept them: the programs and maps leave the kernel (freed after an RCU
            # grace period, so give it a moment).
            assert _gone(prog_ids, ids["flows"])
            assert KernelCache.adopt(ipr) is None
        finally:
            ipr.close()


def _gone(prog_ids: set[int], map_id: int, within_s: float = 5.0) -> bool:
    lib = km.libbpf().lib
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        fds = [lib.bpf_prog_get_fd_by_id(pid) for pid in prog_ids]
        fds.append(lib.bpf_map_get_fd_by_id(map_id))
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if all(fd == -errno.ENOENT for fd in fds):
            return True
        time.sleep(0.05)
    return False


def _rtattr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + bytes(-n % 4)


class _FakeFilterMsg:
    """What pyroute2's get_filters yields, as far as `filters` reads it."""

    def __init__(self, raw: bytes, info: int) -> None:
        self.data, self.offset, self.length, self.info = raw, 0, len(raw), info

    def __getitem__(self, key: str) -> int:
        assert key == "info"
        return self.info


class _FakeIpr:
    def __init__(self, by_hook: dict[int, list[_FakeFilterMsg]]) -> None:
        self.by_hook = by_hook

    def get_filters(self, index: int, parent: int) -> list[_FakeFilterMsg]:
        return self.by_hook.get(parent, [])


def test_filter_dump_reads_each_bpf_filters_name_pref_and_program_id() -> None:
    head = bytes(16 + 20)  # nlmsghdr + tcmsg
    opts = _rtattr(7, b"kextless_pre\0") + _rtattr(11, struct.pack("=I", 4242))
    ours = head + _rtattr(1, b"bpf\0") + _rtattr(2 | 0x8000, opts)  # TCA_OPTIONS, nested
    no_id = head + _rtattr(1, b"bpf\0") + _rtattr(2, _rtattr(7, b"x\0"))
    other = head + _rtattr(1, b"u32\0") + _rtattr(2, opts)
    ipr = _FakeIpr(
        {
            km.INGRESS: [_FakeFilterMsg(ours, 10 << 16), _FakeFilterMsg(other, 5 << 16)],
            km.EGRESS: [_FakeFilterMsg(no_id, 7 << 16)],
        }
    )
    assert km.filters(ipr, 3) == [km.TcProgram(3, km.INGRESS, 10, "kextless_pre", 4242)]


def test_prog_info_struct_matches_the_uapi_offsets() -> None:
    # struct bpf_prog_info: nr_map_ids at 52, map_ids at 56, name at 64 (uapi/linux/bpf.h).
    assert km.ProgInfo.nr_map_ids.offset == 52
    assert km.ProgInfo.map_ids.offset == 56
    assert km.ProgInfo.name.offset == 64
    assert km.MapInfo.name.offset == 24
    assert ctypes.sizeof(km.MapInfo) == 40


# ---- measurements ----------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_measure_map_update_latency() -> None:
    """kc.put (two map updates, both orientations) and one raw update, from Python: median
    of 5 rounds of 5,000, with the spread; printed as JSON for docs/measurements.md."""
    kc = KernelCache.load(flows_max=65536, guard=False)
    try:
        keys = [FlowKey.of(17, "10.0.0.1", 1024 + i, "10.0.0.2", 53) for i in range(5000)]
        put_us, upd_us = [], []
        for _ in range(5):
            t = time.perf_counter()
            for k in keys:
                kc.put(k, Action.PASS, 1)
            put_us.append((time.perf_counter() - t) / len(keys) * 1e6)
            raw = [k.pack() for k in keys]
            value = bytes(32)
            t = time.perf_counter()
            for r in raw:
                kc.flows.update(r, value)
            upd_us.append((time.perf_counter() - t) / len(keys) * 1e6)
        assert len(list(kc.entries())) == 10000
    finally:
        kc.close()
    fig = {
        "put_both_orientations_us": _median_spread(put_us),
        "single_update_us": _median_spread(upd_us),
    }
    print("MEASURE map_update", json.dumps(fig), file=sys.stderr)
    assert fig["put_both_orientations_us"]["median"] < 1000  # sanity: a syscall, not a sleep


def _median_spread(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": round(s[len(s) // 2], 2), "min": round(s[0], 2), "max": round(s[-1], 2)}


_RECEIVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], int(sys.argv[2])))
n = 0
def rx():
    global n
    while True:
        s.recv(2048)
        n += 1
threading.Thread(target=rx, daemon=True).start()
print("ready", flush=True)
for _ in sys.stdin:
    print(n, flush=True)
"""

_BLASTER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
dst, data, n = (sys.argv[1], int(sys.argv[2])), b"b" * 64, 0
end = time.perf_counter() + float(sys.argv[4])
while time.perf_counter() < end:
    for _ in range(64):
        s.sendto(data, dst)
    n += 64
print(n)
"""

# In `a`: our programs on va and a re-injecting divert handle for UDP between them (the
# capture's shape), driven from stdin: on / off / put / del / seen.
_DIVERTER = r"""
import json, sys, threading, time
from pyroute2 import IPRoute
from pydivert import EBPFDivert
from kextless.actors.capture.kernel_cache import Action, KernelCache
from kextless.base.kernel_maps import FlowKey
key = FlowKey.of(17, sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
ipr = IPRoute()
index = ipr.link_lookup(ifname="va")[0]
kc = KernelCache.load()
state = {"h": None, "seen": 0}
def loop(h):
    while True:
        try:
            pkt = h.recv(timeout=0.1)
        except TimeoutError:
            continue
        except Exception:
            return
        state["seen"] += 1
        try:
            h.send(pkt)
        except Exception:
            return
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "on":
        kc.attach(ipr, index, "va")
        state["h"] = EBPFDivert("udp", priority=0).open()
        threading.Thread(target=loop, args=(state["h"],), daemon=True).start()
        out = "ok"
    elif cmd == "off":
        state["h"].close()
        kc.detach(ipr, index)
        out = "ok"
    elif cmd == "put":
        kc.put(key, Action.PASS)
        out = "ok"
    elif cmd == "del":
        kc.delete(key)
        out = "ok"
    elif cmd == "seen":
        # Let the handle drain what the ring still holds, then report and reset.
        last = -1
        while last != state["seen"]:
            last = state["seen"]
            time.sleep(0.3)
        g = kc.guard_stats().dropped
        out = json.dumps({"seen": state["seen"], "guard": g - state.get("g0", 0)})
        state["seen"], state["g0"] = 0, g
    print(out, flush=True)
"""


@pytest.mark.root
@pytest.mark.slow
def test_measure_udp_blast_with_and_without_the_cache() -> None:
    """64-byte UDP from b to a for 1 s per round, five alternating rounds: no programs
    (baseline), diverted (our programs + a re-injecting recv/send handle, no entry), and
    cached (the same with a PASS entry). Received datagrams/s and how many Python saw."""
    with NetnsPair("kb") as p:
        rcv = p.popen(p.a, [sys.executable, "-c", _RECEIVER, p.ip4_a, 7300], stdin=subprocess.PIPE)
        args = [p.ip4_b, 41300, p.ip4_a, 7300]
        div = p.popen(p.a, [sys.executable, "-c", _DIVERTER, *args], stdin=subprocess.PIPE)
        for proc in (rcv, div):
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"

        def ask(proc: subprocess.Popen[bytes], line: str) -> str:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            return proc.stdout.readline().decode().strip()

        def blast() -> tuple[float, int]:
            before = int(ask(rcv, "n"))
            r = p.run(p.b, [sys.executable, "-c", _BLASTER, p.ip4_a, 7300, 41300, 1.0])
            assert r.returncode == 0, r.stderr
            time.sleep(0.3)  # let the receiver drain
            return (int(ask(rcv, "n")) - before) / 1.0, int(r.stdout)

        results: dict[str, list[dict[str, float]]] = {"baseline": [], "divert": [], "cache": []}
        p.run(p.b, ["ping", "-c", "1", "-W", "1", p.ip4_a])  # ARP before anything is timed
        for _ in range(5):
            rx, sent = blast()
            results["baseline"].append({"rx_pps": rx, "sent": sent, "seen": 0, "guard": 0})
            assert ask(div, "on") == "ok"
            ask(div, "seen")
            for mode in ("divert", "cache"):
                if mode == "cache":
                    assert ask(div, "put") == "ok"
                rx, sent = blast()
                s = json.loads(ask(div, "seen"))
                results[mode].append({"rx_pps": rx, "sent": sent, **s})
                if mode == "cache":
                    assert ask(div, "del") == "ok"
            assert ask(div, "off") == "ok"
    fig = {
        mode: {
            k: _median_spread([r[k] for r in rounds]) for k in ("rx_pps", "sent", "seen", "guard")
        }
        for mode, rounds in results.items()
    }
    print("MEASURE udp_blast", json.dumps(fig), file=sys.stderr)
    # Fail closed: every datagram received while diverted went through Python (the rest
    # were dropped by the guard, none passed unexamined).
    assert all(r["rx_pps"] <= r["seen"] for r in results["divert"]), results["divert"]
    # The cached flow never reaches Python; the diverted one does.
    assert fig["cache"]["seen"]["max"] <= 0.001 * fig["cache"]["sent"]["median"]
    assert fig["divert"]["seen"]["median"] > 1000
