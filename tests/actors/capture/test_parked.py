"""Parking (actors/capture/parked.py, flowcache.bpf.c "Parking"): the record layout, the age
rule, and kextless_pre's reader rule on real packets: a packet bound for the divert program
is parked only while parking is on and no live, running capture is the reader."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kextless.actors.capture.kernel_cache import PreStat
from kextless.actors.capture.parked import (
    MAX_AGE_NS,
    PARK_HDR,
    PARK_MAX,
    SYN_BEFORE_BEAT_NS,
    SYN_MAX,
    SYN_SLOTS,
    Parked,
    decode,
    fresh,
    read_shadow,
    recent_syns,
    syn_key,
)
from kextless.base.kernel_maps import FlowKey
from tests.actors.capture.test_kernel_cache import _cache_on_va, _deltas, _Echo
from tests.netns import NetnsPair

IP = bytes([0x45]) + bytes(27)


def rec(ktime: int, ifindex: int, ingress: int, raw: bytes, n: int | None = None) -> bytes:
    return PARK_HDR.pack(ktime, ifindex, ingress, len(raw) if n is None else n, 0) + raw


def test_a_record_decodes_to_its_packet_and_where_it_was_met() -> None:
    p = decode(rec(5, 3, 3, IP))
    assert p == Parked(5, 3, 3, IP) and p.inbound
    local = decode(rec(5, 3, 0, IP))
    assert local is not None and not local.inbound  # a local packet's egress
    forwarded = decode(rec(5, 3, 2, IP))
    assert forwarded is not None and not forwarded.inbound  # in by link 2, out by link 3


@pytest.mark.parametrize(
    "bad",
    [b"", PARK_HDR.pack(1, 1, 1, 4, 0)[:-1], rec(1, 1, 1, IP, n=len(IP) + 1), rec(1, 1, 1, b"", 0)],
    ids=["empty", "short-header", "length-beyond-record", "zero-length"],
)
def test_a_record_that_is_not_a_packet_decodes_to_none(bad: bytes) -> None:
    assert decode(bad) is None
    assert decode(rec(1, 1, 1, bytes(PARK_MAX + 1))) is None


def test_a_parked_packet_is_replayed_up_to_its_max_age() -> None:
    p = Parked(1_000, 3, 3, IP)
    assert fresh(p, 1_000 + MAX_AGE_NS) and not fresh(p, 1_001 + MAX_AGE_NS)


def _syn4(sport: int, dport: int = 80) -> bytes:
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return ip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + _SYN_REST


#: A TCP header's bytes after the ports: seq, ack, data offset 5, SYN, window, sum, urgent.
_SYN_REST = bytes(8) + bytes([0x50, 0x02]) + bytes([0xFF, 0xFF]) + bytes(4)


def test_syn_key_reads_the_5_tuple_a_packet_carries() -> None:
    assert syn_key(_syn4(4000)) == FlowKey.of(6, "10.0.0.1", 4000, "10.0.0.2", 80)
    v6 = bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + bytes(range(32)) + bytes([0, 7, 1, 187]) + _SYN_REST
    k = syn_key(v6)
    assert k is not None and (k.sport, k.dport, k.src, k.dst) == (
        7,
        443,
        bytes(range(16)),
        bytes(range(16, 32)),
    )
    udp = bytearray(_syn4(4000))
    udp[9] = 17
    assert syn_key(bytes(udp)) is None and syn_key(IP) is None


def test_recent_syns_are_the_ones_from_before_the_last_beat_on_each_flow_once() -> None:
    beat, now = 10 * 10**9, 11 * 10**9
    old = Parked(beat - SYN_BEFORE_BEAT_NS - 1, 3, 0, _syn4(1))  # asked about before the beat
    a1 = Parked(beat - SYN_BEFORE_BEAT_NS, 3, 0, _syn4(2))
    b = Parked(beat + 5, 3, 0, _syn4(3))
    a2 = Parked(beat + 9, 3, 0, _syn4(2))  # a resend of a1's flow: the latest copy only

    def picked(*args: object) -> list[Parked]:
        return [p for _k, p in recent_syns(*args)]  # type: ignore[arg-type]

    assert picked([b, a2, old, a1], beat, now) == [b, a2]
    assert picked([b, a1], beat, now)[0] == a1  # oldest first
    assert recent_syns([b], beat, now) == [(syn_key(b.raw), b)]
    # No predecessor's beat known: what is younger than MAX_AGE_NS.
    assert picked([old, b], 0, old.ktime_ns + MAX_AGE_NS) == [old, b]
    assert picked([old, b], 0, old.ktime_ns + MAX_AGE_NS + 1) == [b]


def test_the_c_source_has_the_same_layout() -> None:
    from tests.actors.capture.test_kernel_cache import BPF

    src = (BPF / "flowcache.bpf.c").read_text()
    assert f"#define PARK_MAX {PARK_MAX}" in src
    assert f"#define SYN_SLOTS {SYN_SLOTS}" in src and f"#define SYN_MAX {SYN_MAX}" in src
    assert PARK_HDR.size == 24 and "__u8 data[PARK_MAX];" in src


# ---- real packets --------------------------------------------------------------------------


@pytest.mark.root
def test_packets_are_parked_only_while_no_running_capture_reads() -> None:
    with NetnsPair("pk") as p, _cache_on_va(p, flows_max=1024) as (kc, _ipr, index):
        ctl, ring = kc.park_ctl, kc.park_ring
        assert ctl is not None and ring is not None
        echo = _Echo(p, v6=False, port=7017, sport=41017)

        def parked(n: int) -> int:
            before = kc.stats()
            assert echo.send(n) == 0  # no divert program here: parked or guard-dropped
            return _deltas(kc, before)[PreStat.PARKED]

        assert ctl.read() == (False, 0)
        assert parked(2) == 0  # a fresh load does not park until a capture enables it
        ctl.enable(True)
        t0 = time.monotonic_ns()
        assert parked(3) == 3  # on, and no reader at all
        got, bad = ring.take()
        assert bad == 0 and len(got) == 3
        assert all(g.ifindex == index and g.inbound and t0 <= g.ktime_ns for g in got)
        assert got[0].raw[9] == 17 and got[0].raw[-32:] == b"k" * 32  # the IP packet, whole
        assert ring.take() == ([], 0)

        # A reader: a live process (a child, so it can be stopped) and an open socket.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        a, b = socket.socketpair()
        try:
            ctl.register(a.fileno(), child.pid)
            assert ctl.read() == (True, child.pid)
            assert parked(2) == 0
            os.kill(child.pid, signal.SIGSTOP)
            time.sleep(0.1)
            assert parked(2) == 2  # stopped: not reading
            os.kill(child.pid, signal.SIGCONT)
            time.sleep(0.1)
            assert parked(2) == 0
            child.kill()
            child.wait(5)
            assert parked(1) == 1  # gone
            ctl.register(a.fileno(), os.getpid())
            assert parked(1) == 0
            a.close()  # its socket gone (what a killed reader's exit ends with)
            assert parked(1) == 1
            ctl.register(b.fileno(), os.getpid())
            assert parked(1) == 0
            assert ctl.unregister() and ctl.read() == (True, 0)
            assert not ctl.unregister()  # twice: nothing to remove
            assert parked(1) == 1  # a capture that stops reading parks what follows
            ctl.enable(False)
            assert parked(2) == 0  # off (fail open): never parked
        finally:
            child.kill()
            b.close()
            a.close()
        assert len(ring.take()[0]) == 2 + 1 + 1 + 1  # stopped, gone, closed, unregistered


#: Connects to a port nobody answers (the SYN is what matters), from a fixed source port.
_SYN_ONCE = r"""
import socket, sys
s = socket.socket(); s.bind(("0.0.0.0", int(sys.argv[3]))); s.settimeout(0.2)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError:
    pass
"""


@pytest.mark.root
def test_a_syn_sent_on_while_a_capture_reads_is_kept_in_the_shadow_circle() -> None:
    with NetnsPair("pk") as p, _cache_on_va(p, flows_max=1024) as (kc, _ipr, index):
        ctl = kc.park_ctl
        assert ctl is not None and kc.syn_shadow_fd is not None
        a, _b = socket.socketpair()
        ctl.enable(True)
        ctl.register(a.fileno(), os.getpid())
        before = {x.ktime_ns for x in read_shadow(kc.syn_shadow_fd, kc.ncpus)}
        t0 = time.monotonic_ns()
        p.run(p.b, [sys.executable, "-c", _SYN_ONCE, p.ip4_a, 7019, 41019])
        new = [x for x in read_shadow(kc.syn_shadow_fd, kc.ncpus) if x.ktime_ns not in before]
        want = FlowKey.of(6, p.ip4_b, 41019, p.ip4_a, 7019)
        mine = [x for x in new if syn_key(x.raw) == want]
        assert mine and all(x.ifindex == index and x.inbound and x.ktime_ns >= t0 for x in mine)
        assert mine[0].raw[33] & 0x12 == 0x02  # the SYN itself (20-byte IP header, flags)
        # With no reader it is parked instead, and not kept in the circle.
        ctl.unregister()
        seen = {x.ktime_ns for x in read_shadow(kc.syn_shadow_fd, kc.ncpus)}
        p.run(p.b, [sys.executable, "-c", _SYN_ONCE, p.ip4_a, 7019, 41020])
        assert {x.ktime_ns for x in read_shadow(kc.syn_shadow_fd, kc.ncpus)} == seen
        assert kc.park_ring is not None and kc.park_ring.take()[0]
        a.close()
