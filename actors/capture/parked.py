"""Packets parked by kextless_pre while no capture read the divert ring, and their replay.

A killed capture's orphaned divert program keeps taking packets into a ring nobody reads, and
with no divert program the guard drops them: a SYN sent during a restart came back only with
TCP's resend, 1 s later (then 3 s). kextless_pre (bpf/flowcache.bpf.c, "Parking") instead
copies every packet bound for the divert program into its `parked` ring buffer, and drops it,
while no capture is the reader: its `reader` SOCKMAP holds no socket (the kernel empties it
when the socket's last fd closes), or the pid in `park_ctl` is exiting (a SIGKILL sets that
at once; the fds close tens of ms later), stopped, traced or gone. No timer, no heartbeat.

This capture, once its handle is open: `ParkControl.register` puts one of its sockets in
`reader` and its pid in `park_ctl` (parking stops), then `ParkRing.take` returns what was
parked and the shell hands each packet to the core as if it had just been diverted (asked,
held, re-injected or dropped like any other). Before it exits it `unregister`s, so what
arrives while it stops is parked for the next capture too. `enable(False)` (--fail-open)
never parks: with no capture, packets pass.

    ring, ctl = open_parking(map_fds)  # KernelCache.park_ring / park_ctl hold them
    ctl.enable(True); ctl.register(sock.fileno(), os.getpid())
    ring.fileno()  # an epoll fd, readable when a record is there
    ring.take() -> (parked, bad)

Shadow SYNs: kextless_pre also keeps, per CPU, a circle of the last SYN_SLOTS TCP openers it
sent on to the divert program while a capture read (`syn_shadow`). A SYN that reached the
divert program just before the capture was killed died in its ring, its queue or the capture
itself; `recent_syns` picks the shadow copies from just before the predecessor's last
heartbeat on, and the shell replays those whose flow has no verdict in the kernel map yet (a
decided one is not asked again; a SYN twice is harmless to TCP).

Decoding and the age rules are pure (`decode`, `fresh`, `recent_syns`, `syn_key`); the ring
itself is libbpf's ring_buffer (its consumer protocol, not ours).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

from kextless.actors.capture import packets as pk
from kextless.base.kernel_maps import BpfMap, FlowKey, KernelCacheError, libbpf

#: Map names in flowcache.bpf.c.
PARKED_MAP = "parked"
PARK_CTL_MAP = "park_ctl"
READER_MAP = "reader"
#: The largest packet a record holds (PARK_MAX in flowcache.bpf.c).
PARK_MAX = 2048
#: struct park_hdr, the head of a park record and of a shadow SYN slot: ktime, ifindex,
#: ingress_ifindex, len, pad.
PARK_HDR = struct.Struct("=QIIII")
#: struct park_ctl: enabled, pid.
_CTL = struct.Struct("=II")
_KEY0 = struct.pack("=I", 0)
#: A parked packet older than this is not replayed: TCP has resent a SYN by 3 s (1 s, then
#: 2 s more), and a datagram that old is one its sender has given up on or sent again.
MAX_AGE_NS = 3_000_000_000
#: Records taken per `take` (the rest stay in the ring for the next call).
TAKE_MAX = 4096
#: The shadow SYN circle (SYN_SLOTS, SYN_MAX in flowcache.bpf.c): slots per CPU, bytes each.
SYN_SHADOW_MAP = "syn_shadow"
SYN_SLOTS = 64
SYN_MAX = 128
#: struct syn_slot: the park header, then SYN_MAX bytes.
SYN_SLOT_SIZE = PARK_HDR.size + SYN_MAX
#: Shadow SYNs from this long before the predecessor's last heartbeat on are replayed: its
#: loop beats at most every base/heartbeat.EVERY_NS (0.1 s) while it turns, so a SYN it may
#: not have asked about yet is younger than that stamp minus this.
SYN_BEFORE_BEAT_NS = 200_000_000


@dataclass(frozen=True, slots=True)
class Parked:
    """One parked packet: the IP packet and where it was met."""

    ktime_ns: int  # CLOCK_MONOTONIC when parked (bpf_ktime_get_ns)
    ifindex: int
    ingress_ifindex: int
    raw: bytes  # from the IP header on

    @property
    def inbound(self) -> bool:
        """Met on a link's ingress: there skb->ingress_ifindex is the link itself (on egress
        it is 0 for a local packet, the incoming link for a forwarded one). A forwarded packet
        that leaves by the link it came in on (hairpin) looks inbound: a known limit."""
        return self.ingress_ifindex == self.ifindex and self.ifindex != 0


def decode(record: bytes) -> Parked | None:
    """A ring record -> Parked; None if it is not one (short, a length that does not fit)."""
    if len(record) < PARK_HDR.size:
        return None
    ktime, ifindex, ingress, n, _pad = PARK_HDR.unpack_from(record)
    if n < 1 or n > PARK_MAX or PARK_HDR.size + n > len(record):
        return None
    return Parked(ktime, ifindex, ingress, bytes(record[PARK_HDR.size : PARK_HDR.size + n]))


def fresh(p: Parked, now_ns: int, max_age_ns: int = MAX_AGE_NS) -> bool:
    """Whether `p` is still worth replaying at `now_ns` (same clock)."""
    return now_ns - p.ktime_ns <= max_age_ns


def recent_syns(
    shadow: list[Parked], last_beat_ns: int, now_ns: int
) -> list[tuple[FlowKey, Parked]]:
    """The shadow SYNs a killed capture may not have asked about, oldest first, with the
    5-tuple each carries: from SYN_BEFORE_BEAT_NS before its last heartbeat (0: none known)
    on, and never older than MAX_AGE_NS; each 5-tuple once (its latest copy)."""
    since = max(last_beat_ns - SYN_BEFORE_BEAT_NS, now_ns - MAX_AGE_NS)
    latest: dict[FlowKey, Parked] = {}
    for p in sorted(shadow, key=lambda p: p.ktime_ns):
        k = syn_key(p.raw)
        if p.ktime_ns >= since and k is not None:
            latest.pop(k, None)  # re-inserted: the order is that of the latest copies
            latest[k] = p
    return list(latest.items())


def syn_key(raw: bytes) -> FlowKey | None:
    """The 5-tuple of a TCP packet as it carries it (packets.parse); None if it is not one."""
    p = pk.parse(raw)
    if p is None or p.protocol != pk.TCP or p.fragment:
        return None
    return FlowKey(pk.TCP, p.src, p.sport, p.dst, p.dport)


def read_shadow(map_fd: int, ncpus: int) -> list[Parked]:
    """Every filled slot of `syn_shadow`, all CPUs."""
    m = BpfMap(map_fd, SYN_SHADOW_MAP, 4, SYN_SLOT_SIZE)
    out = []
    for slot in range(SYN_SLOTS):
        raw = m.lookup(struct.pack("=I", slot), SYN_SLOT_SIZE * ncpus) or b""
        for cpu in range(len(raw) // SYN_SLOT_SIZE):
            p = decode(raw[cpu * SYN_SLOT_SIZE : (cpu + 1) * SYN_SLOT_SIZE])
            if p is not None:
                out.append(p)
    return out


# ---- the maps ----------------------------------------------------------------------------

_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _bind(lib: Any) -> None:
    vp, i = ctypes.c_void_p, ctypes.c_int
    for name, res, args in (
        ("ring_buffer__new", vp, [i, _SAMPLE_FN, vp, vp]),
        ("ring_buffer__consume", i, [vp]),
        ("ring_buffer__epoll_fd", i, [vp]),
        ("ring_buffer__free", None, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


class ParkRing:
    """The `parked` ring buffer, consumed through libbpf's ring_buffer."""

    def __init__(self, map_fd: int) -> None:
        self._lib = libbpf().lib
        _bind(self._lib)
        self._fd = map_fd
        self._out: list[bytes] = []
        self._limit = TAKE_MAX
        self._cb = _SAMPLE_FN(self._sample)  # kept: libbpf holds the pointer
        rb = self._lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not rb:
            err = ctypes.get_errno() or errno.EINVAL
            raise KernelCacheError(err, f"parked ring: {os.strerror(err)}")
        self._rb = rb

    def _sample(self, _ctx: Any, data: int, size: int) -> int:
        if len(self._out) >= self._limit:
            return -1  # libbpf leaves this record in the ring: the next take gets it
        self._out.append(ctypes.string_at(data, size))
        return 0

    def fileno(self) -> int:
        """An epoll fd, readable when the ring holds a record."""
        return int(self._lib.ring_buffer__epoll_fd(self._rb))

    def take(self, limit: int = TAKE_MAX) -> tuple[list[Parked], int]:
        """Up to `limit` parked packets, oldest first, and how many records were not packets."""
        self._out, self._limit = [], limit
        self._lib.ring_buffer__consume(self._rb)  # < 0 only when we stopped it at the limit
        out, bad = [], 0
        for rec in self._out:
            p = decode(rec)
            if p is None:
                bad += 1
            else:
                out.append(p)
        self._out = []
        return out, bad

    def close(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
        os.close(self._fd)


class ParkControl:
    """`park_ctl` (parking on or off, the reader's pid) and `reader` (its socket)."""

    def __init__(self, ctl_fd: int, reader_fd: int) -> None:
        self.ctl = BpfMap(ctl_fd, PARK_CTL_MAP, 4, _CTL.size)
        self.reader = BpfMap(reader_fd, READER_MAP, 4, 8)

    def read(self) -> tuple[bool, int]:
        """(enabled, reader pid) as the map holds them."""
        raw = self.ctl.lookup(_KEY0)
        on, pid = _CTL.unpack(raw) if raw is not None else (0, 0)
        return on == 1, pid

    def enable(self, on: bool) -> None:
        """Park while no capture reads (True), or never (False: fail open)."""
        self.ctl.update(_KEY0, _CTL.pack(int(on), self.read()[1]))

    def register(self, sock_fd: int, pid: int) -> None:
        """Process `pid`, holding `sock_fd`'s socket, is the reader: nothing is parked while
        it runs and the socket is open."""
        self.reader.update(_KEY0, struct.pack("=Q", sock_fd))
        self.ctl.update(_KEY0, _CTL.pack(int(self.read()[0]), pid))

    def unregister(self) -> bool:
        """Parking resumes (this capture stops reading); False if no reader was set."""
        self.ctl.update(_KEY0, _CTL.pack(int(self.read()[0]), 0))
        try:
            return self.reader.delete(_KEY0)
        except KernelCacheError as e:
            if e.errno == errno.EINVAL:  # a SOCKMAP says so of an empty slot
                return False
            raise

    def close(self) -> None:
        os.close(self.ctl.fd)
        os.close(self.reader.fd)


def open_parking(maps: dict[str, int]) -> tuple[ParkRing, ParkControl] | None:
    """The ring and controls among a program's map fds (name -> fd; the ones used are taken
    from `maps`); None for a kextless_pre older than parking."""
    if not {PARKED_MAP, PARK_CTL_MAP, READER_MAP} <= maps.keys():
        return None
    ring_fd, ctl_fd, reader_fd = (maps.pop(n) for n in (PARKED_MAP, PARK_CTL_MAP, READER_MAP))
    try:
        ctl = ParkControl(ctl_fd, reader_fd)
    except BaseException:
        for fd in (ring_fd, ctl_fd, reader_fd):
            os.close(fd)
        raise
    try:
        return ParkRing(ring_fd), ctl
    except BaseException:
        ctl.close()
        os.close(ring_fd)
        raise
