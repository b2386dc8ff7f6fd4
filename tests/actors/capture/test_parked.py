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
    Parked,
    decode,
    fresh,
)
from tests.actors.capture.test_kernel_cache import _cache_on_va, _deltas, _Echo
from tests.netns import NetnsPair

IP = bytes([0x45]) + bytes(27)


def rec(ktime: int, ifindex: int, ingress: int, raw: bytes, n: int | None = None) -> bytes:
    return PARK_HDR.pack(ktime, ifindex, ingress, len(raw) if n is None else n, 0) + raw


def test_a_record_decodes_to_its_packet_and_where_it_was_met() -> None:
    p = decode(rec(5, 3, 3, IP))
    assert p == Parked(5, 3, 3, IP) and p.inbound and not p.ipv6
    out = decode(rec(5, 3, 0, bytes([0x60]) + bytes(47)))
    assert out is not None and not out.inbound and out.ipv6  # a local packet's egress
    assert decode(rec(5, 3, 2, IP)) is not None and not decode(rec(5, 3, 2, IP)).inbound  # type: ignore[union-attr]


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


def test_the_c_source_has_the_same_layout() -> None:
    from tests.actors.capture.test_kernel_cache import BPF

    src = (BPF / "flowcache.bpf.c").read_text()
    assert f"#define PARK_MAX {PARK_MAX}" in src
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
