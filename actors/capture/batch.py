"""Batch receive and re-inject on a pydivert EBPFDivert handle, one C call per batch.

pydivert's recv()/send() cost one ctypes call, one Packet and one WinDivertAddress per packet,
and its recv_batch/send_batch are Python loops over them. libebpfdivert's own batch calls,
bound in pydivert.bpf but unused by pydivert, move up to N packets per call
(docs: ../shared/reference/pydivert-linux.md §3; 4-6x the packets per CPU-second).

Semantics read from libebpfdivert 0.0.5 (src/handle.c, ffalcinelli/ebpfdivert):

* ``recv_ex(h, buf, len, &used, addrs, &count, timeout_ms)``: ``count`` is a number of
  addresses in and out; the packets come back back-to-back in ``buf``. Only the first packet
  waits (timeout_ms: -1 forever, 0 never, >0 at most that long); the others are those already
  queued that still fit, so a packet never overflows the buffer after the first. A first
  packet larger than the buffer is freed with -ENOBUFS (lost): the buffer holds the largest.
  -EAGAIN: nothing before the timeout; -ESHUTDOWN: shut down and empty; -EBADF: closing.
* ``send_ex(h, buf, len, &sent, addrs, count)``: walks the buffer by each packet's IP total
  length, sends one at a time and stops at the first failure. It returns that error only when
  nothing was sent; otherwise 0 with ``sent`` = bytes of the packets sent before it (the error
  itself is lost). A packet it cannot parse after the first returns 0 *without* writing
  ``sent``. Every send recomputes the checksums whose address flag is clear, as send() does.

So flush() checks each packet's length field before it goes into the batch (a mismatch goes
alone through ebpfdivert_send), detects the unwritten ``sent`` with a sentinel, maps sent bytes
back to packets, retries the failed packet once alone (which also yields its errno), and goes
on with the rest: one bad packet is logged and counted, never takes the others with it.

Packet boundaries: recv_ex returns no per-packet lengths, so a batch is split by each
packet's own IP length field. A packet whose field is shorter than what it carries (trailing
bytes: a forged length, padding the kernel did not trim) makes that impossible: the batch is
lost (``split_failed``, counted and raised as EPROTO, so its packets are dropped: fail closed)
and the next `SINGLE_AFTER_SPLIT` receives take one packet each, whose length the library
gives exactly; each such packet whose field lies again re-arms it. One lying packet then costs
one batch, not every batch it lands in.

Lifetimes: a Captured's ``raw`` is a memoryview into the batch buffer, valid until the next
recv(). recv() first flushes what is queued (it points into that buffer), then copies
(``detach``) every token of the previous batch that was neither queued nor dropped: those are
the packets the core holds. A token queued on another Batch (a handle swap) is detached at
once. Nothing else is allocated per packet but the Captured itself.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct
from collections.abc import Iterable
from ctypes import POINTER, byref, c_int, c_uint32, c_void_p
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from pydivert.ebpf import _lib

log = logging.getLogger("capture.batch")

ADDR_SIZE = 80  # sizeof(WINDIVERT_ADDRESS) == sizeof(struct ebpfdivert_address)
#: libebpfdivert's largest packet (pydivert's DEFAULT_PACKET_BUFFER_SIZE): one always fits.
MAX_PACKET = 65575
#: Receives taken one packet at a time after a batch could not be split (see the docstring):
#: a few seconds of traffic at the rates where batching matters, then batches again.
SINGLE_AFTER_SPLIT = 4096
_SENTINEL = 0xFFFFFFFF
# Timestamp (int64), the flags word (uint32), Reserved2, then Network.IfIdx.
_HDR = struct.Struct("<qI4xI")
_FLAGS = struct.Struct("<I")
_IFIDX_OFF = 16
_FLAGS_OFF = 8

Buf = bytes | bytearray | memoryview
#: A queued re-injection: raw, 80-byte address, (flags, ifindex) to patch in or None.
_Item = tuple[Buf, Buf, tuple[int, int] | None]


class AddrFlag(IntFlag):
    """Bits of WINDIVERT_ADDRESS's flags word (after Layer:8 and Event:8)."""

    SNIFFED = 1 << 16
    OUTBOUND = 1 << 17
    LOOPBACK = 1 << 18
    IMPOSTOR = 1 << 19
    IPV6 = 1 << 20
    IP_CHECKSUM = 1 << 21
    TCP_CHECKSUM = 1 << 22
    UDP_CHECKSUM = 1 << 23


_OUT = int(AddrFlag.OUTBOUND)
_LOOP = int(AddrFlag.LOOPBACK)

# Own prototypes over the same symbols (addresses as plain pointers, so no per-call casts;
# pydivert's shared function objects keep their argtypes).
_RECV_EX = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_void_p, c_uint32, POINTER(c_uint32), c_void_p, POINTER(c_uint32), c_int
)
_SEND_EX = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_void_p, c_uint32, POINTER(c_uint32), c_void_p, c_uint32
)
_SEND = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_uint32, POINTER(c_uint32), c_void_p)


def _bind() -> tuple[Any, Any, Any]:
    lib = _lib()
    return (
        _RECV_EX(("ebpfdivert_recv_ex", lib)),
        _SEND_EX(("ebpfdivert_send_ex", lib)),
        _SEND(("ebpfdivert_send", lib)),
    )


class Captured:
    """One received packet: what the core reads, and what re-injects it where it came from.

    ``raw`` is valid until the batch's next recv() unless the token was detached (held)."""

    __slots__ = ("_addr", "_owner", "flags", "ifindex", "loopback", "outbound", "raw", "timestamp")

    def __init__(
        self,
        raw: memoryview | bytes,
        addr: memoryview | bytes,
        flags: int,
        ifindex: int,
        timestamp: int,
        owner: Batch | None,
    ) -> None:
        self.raw = raw
        self._addr = addr
        self.flags = flags
        self.outbound = bool(flags & _OUT)
        self.loopback = bool(flags & _LOOP)
        self.ifindex = ifindex
        self.timestamp = timestamp
        #: The batch whose buffer `raw` points into; None once detached (owns its bytes).
        self._owner = owner

    @property
    def ipv6(self) -> bool:
        return bool(self.flags & AddrFlag.IPV6)

    @property
    def impostor(self) -> bool:
        return bool(self.flags & AddrFlag.IMPOSTOR)

    @property
    def address(self) -> bytes:
        """The 80-byte WINDIVERT_ADDRESS as received (with the library's L2 stash)."""
        return bytes(self._addr)

    def detach(self) -> None:
        """Copy the packet out of the batch buffer, so it outlives the next recv()."""
        if self._owner is not None:
            self.raw = bytes(self.raw)
            self._addr = bytes(self._addr)
            self._owner = None


def fresh_address(ifindex: int, outbound: bool, loopback: bool) -> bytes:
    """A new address for a crafted packet: direction, interface, nothing else (no L2 stash:
    re-using a captured packet's address re-injects towards where that packet came from)."""
    a = bytearray(ADDR_SIZE)
    _FLAGS.pack_into(
        a, _FLAGS_OFF, (_OUT if outbound or loopback else 0) | (_LOOP if loopback else 0)
    )
    struct.pack_into("<I", a, _IFIDX_OFF, ifindex)
    return bytes(a)


def length_ok(raw: bytes | bytearray | memoryview) -> bool:
    """True when the IP header's length is the packet's: send_ex walks the buffer by it."""
    n = len(raw)
    if n < 20 or n > MAX_PACKET:
        return False
    v = raw[0] >> 4
    if v == 4:
        return (raw[0] & 0xF) >= 5 and ((raw[2] << 8) | raw[3]) == n
    if v == 6:
        return n >= 40 and 40 + ((raw[4] << 8) | raw[5]) == n
    return False


@dataclass
class BatchCounters:
    """What the batch path did (monotonic): for the capture's stats and the tests."""

    recv_calls: int = 0
    received: int = 0
    detached: int = 0
    send_calls: int = 0
    sent: int = 0
    #: Packets the library refused (logged one line each with the errno).
    send_failed: int = 0
    #: Packets sent alone because their length field did not match (never batched).
    sent_alone: int = 0
    #: Packets send_ex may or may not have sent (it stopped without saying where).
    send_unconfirmed: int = 0
    #: Batches that could not be split by their packets' length fields (lost: dropped).
    split_failed: int = 0
    #: Packets lost with them.
    split_lost: int = 0
    #: Receives taken one packet at a time after a split failure.
    single_recvs: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Batch:
    """Batch receive and queued re-injection over one open EBPFDivert NETWORK handle."""

    def __init__(self, handle: Any, size: int = 64, lo_ifindex: int = 1) -> None:
        if not 1 <= size <= 4096:
            raise ValueError(f"batch size {size} not in 1..4096")
        self.handle = handle
        self.size = size
        self.lo_ifindex = lo_ifindex
        self.counters = BatchCounters()
        self._recv_ex, self._send_ex, self._send = _bind()
        # Receive side: one buffer (always room for the largest packet) and N addresses.
        self._rbuf = bytearray(MAX_PACKET + size * 1514)
        self._rbuf_c = (ctypes.c_char * len(self._rbuf)).from_buffer(self._rbuf)
        self._rbuf_p = ctypes.addressof(self._rbuf_c)
        self._raddr = bytearray(size * ADDR_SIZE)
        self._raddr_c = (ctypes.c_char * len(self._raddr)).from_buffer(self._raddr)
        self._raddr_p = ctypes.addressof(self._raddr_c)
        self._rmv = memoryview(self._rbuf)
        self._amv = memoryview(self._raddr)
        self._used = c_uint32(0)
        self._count = c_uint32(0)
        self._last: list[Captured] = []
        #: Receives left to take one packet at a time (after a batch that could not be split).
        self._single = 0
        # Send side: a reusable buffer and address array the queue is copied into.
        self._sbuf = bytearray(MAX_PACKET + size * 1514)
        self._sbuf_c = (ctypes.c_char * len(self._sbuf)).from_buffer(self._sbuf)
        self._sbuf_p = ctypes.addressof(self._sbuf_c)
        self._saddr = bytearray(size * ADDR_SIZE)
        self._saddr_c = (ctypes.c_char * len(self._saddr)).from_buffer(self._saddr)
        self._saddr_p = ctypes.addressof(self._saddr_c)
        self._sent = c_uint32(0)
        # Queue: (raw, address bytes or view, patch or None); patch = (flags, ifindex).
        self._q: list[_Item] = []
        # Queued tokens of our own current batch, in order, for the zero-copy case.
        self._q_tokens: list[Captured | None] = []
        self._queued: set[int] = set()  # id() of last-batch tokens queued or dropped

    def _h(self) -> int:
        h = self.handle._handle
        if not h:
            raise OSError(errno.EBADF, "divert handle is closed")
        return int(h)

    # ---- receive ------------------------------------------------------------------------

    def recv(self, timeout_ms: int = 0) -> list[Captured]:
        """Up to `size` packets in one call ([] if none within `timeout_ms`; -1 waits).

        Flushes the queue and detaches the previous batch's held tokens first. Raises
        OSError(EBADF) once the handle is shut down and empty or closed."""
        self.flush()
        self._release_last()
        single = self._single > 0
        self._count.value = 1 if single else self.size
        self.counters.recv_calls += 1
        ret = self._recv_ex(
            self._h(),
            self._rbuf_p,
            len(self._rbuf),
            byref(self._used),
            self._raddr_p,
            byref(self._count),
            timeout_ms,
        )
        if ret < 0:
            err = -ret
            if err == errno.EAGAIN:
                return []
            if err in (errno.ESHUTDOWN, errno.EBADF):
                raise OSError(errno.EBADF, "divert handle shut down")
            raise OSError(err, f"ebpfdivert_recv_ex: {errno.errorcode.get(err, err)}")
        n = self._count.value
        rbuf, rmv, amv, unpack = self._rbuf, self._rmv, self._amv, _HDR.unpack_from
        out: list[Captured] = []
        off = 0
        for i in range(n):
            a = i * ADDR_SIZE
            ts, flags, ifidx = unpack(self._raddr, a)
            # The packet's own length is in its IP header; the library packs them back to back.
            if rbuf[off] >> 4 == 6:
                plen = 40 + ((rbuf[off + 4] << 8) | rbuf[off + 5])
            else:
                plen = (rbuf[off + 2] << 8) | rbuf[off + 3]
            if n == 1:
                if single:
                    self.counters.single_recvs += 1
                    self._single -= 1
                    if plen != self._used.value:
                        self._single = SINGLE_AFTER_SPLIT  # another liar: stay careful
                plen = self._used.value
            elif plen <= 0 or off + plen > self._used.value:  # a GSO/jumbo length: unreliable
                self._split_failed(n)
                raise OSError(errno.EPROTO, f"packet {i} of {n}: length {plen} at {off}")
            out.append(
                Captured(rmv[off : off + plen], amv[a : a + ADDR_SIZE], flags, ifidx, ts, self)
            )
            off += plen
        if n > 1 and off != self._used.value:
            self._split_failed(n)
            raise OSError(errno.EPROTO, f"batch of {n}: {off} of {self._used.value} bytes parsed")
        self.counters.received += n
        self._last = out
        return out

    def _split_failed(self, n: int) -> None:
        """A batch whose boundaries cannot be trusted: lost; receive one at a time a while."""
        self.counters.split_failed += 1
        self.counters.split_lost += n
        self._single = SINGLE_AFTER_SPLIT

    def _release_last(self) -> None:
        """Detach every token of the previous batch that is neither queued nor dropped."""
        if self._last:
            q = self._queued
            for t in self._last:
                if id(t) not in q and t._owner is self:
                    t.detach()
                    self.counters.detached += 1
            self._last = []
        self._queued.clear()

    # ---- re-injection -------------------------------------------------------------------

    def reinject(self, tok: Captured) -> None:
        """Queue a captured packet, unchanged, for re-injection where it was captured."""
        self._enqueue(tok, tok.raw, None)

    def reroute(self, tok: Captured, raw: bytes | bytearray | memoryview, loopback: bool) -> None:
        """Queue a rewritten packet with the captured address; `loopback` moves it to lo (a
        redirect to 127.0.0.1/::1 is only delivered from lo: pydivert-linux.md §2.3)."""
        patch = None
        if loopback:
            patch = ((tok.flags | _LOOP), self.lo_ifindex)
        self._enqueue(tok, raw, patch)

    def inject(
        self, raw: bytes | bytearray | memoryview, ifindex: int, outbound: bool, loopback: bool
    ) -> None:
        """Queue a crafted packet (RST, ICMP unreachable) with a fresh address."""
        self._q.append((raw, fresh_address(ifindex, outbound, loopback), None))
        self._q_tokens.append(None)

    def inject_like(
        self, like: Captured, raw: bytes | bytearray | memoryview, inbound: bool
    ) -> None:
        """A crafted answer to `like`: on its interface, inbound or outbound (loopback
        packets are always re-sent as outbound on lo), as the shell's Inject does."""
        if like.loopback:
            self.inject(raw, like.ifindex, True, True)
        else:
            self.inject(raw, like.ifindex, not inbound, False)

    def drop(self, tok: Captured) -> None:
        """The packet is finished with (not re-injected): no copy at the next recv()."""
        if tok._owner is self:
            self._queued.add(id(tok))

    def send(self, items: Iterable[tuple[bytes | bytearray | memoryview, bytes]]) -> int:
        """Inject (raw, 80-byte address) pairs in one batch; returns how many were sent."""
        for raw, addr in items:
            self._q.append((raw, addr, None))
            self._q_tokens.append(None)
        return self.flush()

    def pending(self) -> int:
        return len(self._q)

    def _enqueue(
        self,
        tok: Captured,
        raw: bytes | bytearray | memoryview,
        patch: tuple[int, int] | None,
    ) -> None:
        if tok._owner is not None and tok._owner is not self:
            tok.detach()  # another batch's buffer (a handle swap): it may be overwritten
        if tok._owner is self:
            self._queued.add(id(tok))
        self._q.append((raw, tok._addr, patch))
        self._q_tokens.append(tok if (patch is None and raw is tok.raw) else None)

    def flush(self) -> int:
        """Send everything queued, in order, in as few send_ex calls as fit; the number sent.

        A packet the library refuses is logged and counted (send_failed); the rest go on."""
        q = self._q
        if not q:
            return 0
        toks = self._q_tokens
        self._q, self._q_tokens = [], []
        sent_before = self.counters.sent
        h = self._h()
        start = self._zero_copy(toks)
        if start >= 0:
            last = self._last
            off = sum(len(t.raw) for t in last[:start])
            self._send_chunk(
                h,
                self._rbuf_p + off,
                self._raddr_p + start * ADDR_SIZE,
                [len(t.raw) for t in last[start : start + len(toks)]],
                q,
                0,
            )
            return self.counters.sent - sent_before
        sbuf, saddr = self._sbuf, self._saddr
        lens: list[int] = []
        base = 0  # index into q of lens[0]
        off = 0
        for idx, (raw, addr, patch) in enumerate(q):
            n = len(raw)
            if not length_ok(raw):
                if lens:  # keep the order: send what is batched so far first
                    self._send_chunk(h, self._sbuf_p, self._saddr_p, lens, q, base)
                    lens, off = [], 0
                self._send_alone(h, raw, addr, patch)
                base = idx + 1
                continue
            if len(lens) == self.size or off + n > len(sbuf):
                self._send_chunk(h, self._sbuf_p, self._saddr_p, lens, q, base)
                lens, off, base = [], 0, idx
            sbuf[off : off + n] = raw
            a = len(lens) * ADDR_SIZE
            saddr[a : a + ADDR_SIZE] = addr
            if patch is not None:
                _FLAGS.pack_into(saddr, a + _FLAGS_OFF, patch[0])
                struct.pack_into("<I", saddr, a + _IFIDX_OFF, patch[1])
            lens.append(n)
            off += n
        if lens:
            self._send_chunk(h, self._sbuf_p, self._saddr_p, lens, q, base)
        return self.counters.sent - sent_before

    def _zero_copy(self, toks: list[Captured | None]) -> int:
        """Where in the current batch the queue starts, if it is a run of consecutive,
        unchanged packets of it (they already lie back to back in the receive buffer with
        their addresses); else -1."""
        last = self._last
        first = toks[0]
        if not last or first is None or first._owner is not self or len(toks) > len(last):
            return -1
        try:
            start = last.index(first)
        except ValueError:
            return -1
        if start + len(toks) > len(last):
            return -1
        for i, t in enumerate(toks):
            if t is not last[start + i] or t._owner is not self:
                return -1
        return start

    def _send_chunk(
        self,
        h: int,
        buf_p: int,
        addr_p: int,
        lens: list[int],
        q: list[_Item],
        base: int,
    ) -> None:
        """send_ex over packets lens[0..] at buf_p/addr_p; failures logged, the rest sent."""
        k = len(lens)
        start = 0
        boff = 0  # byte offset of lens[start]
        total = sum(lens)
        c = self.counters
        while start < k:
            self._sent.value = _SENTINEL
            c.send_calls += 1
            ret = self._send_ex(
                h,
                buf_p + boff,
                total - boff,
                byref(self._sent),
                addr_p + start * ADDR_SIZE,
                k - start,
            )
            if ret < 0:  # nothing sent: the first packet failed
                self._failed(base + start, lens[start], -ret, q)
                boff += lens[start]
                start += 1
                continue
            sent = self._sent.value
            if sent == _SENTINEL:
                # It stopped at a packet it could not parse, after sending some: which, it
                # does not say. Never resend (duplicates); count them as unconfirmed.
                c.send_unconfirmed += k - start
                log.error("send_ex stopped without a count: %d packet(s) unconfirmed", k - start)
                return
            j, acc = start, 0
            while j < k and acc + lens[j] <= sent:
                acc += lens[j]
                j += 1
            c.sent += j - start
            boff += acc
            if j == k:
                return
            # Packet j failed (send_ex hides the error): once more alone, which reports it.
            self._sent.value = 0
            r = self._send(h, buf_p + boff, lens[j], byref(self._sent), addr_p + j * ADDR_SIZE)
            if r < 0:
                self._failed(base + j, lens[j], -r, q)
            else:
                c.sent += 1
            boff += lens[j]
            start = j + 1

    def _send_alone(
        self,
        h: int,
        raw: bytes | bytearray | memoryview,
        addr: Buf,
        patch: tuple[int, int] | None,
    ) -> None:
        n = len(raw)
        buf = (ctypes.c_char * max(n, 1)).from_buffer(bytearray(raw) if n else bytearray(1))
        a = bytearray(addr)
        if patch is not None:
            _FLAGS.pack_into(a, _FLAGS_OFF, patch[0])
            struct.pack_into("<I", a, _IFIDX_OFF, patch[1])
        a_c = (ctypes.c_char * ADDR_SIZE).from_buffer(a)
        self.counters.sent_alone += 1
        self._sent.value = 0
        r = self._send(h, ctypes.addressof(buf), n, byref(self._sent), ctypes.addressof(a_c))
        if r < 0:
            self.counters.send_failed += 1
            name = errno.errorcode.get(-r, str(-r))
            self.counters.errors[name] = self.counters.errors.get(name, 0) + 1
            log.warning("re-inject of a %d-byte packet failed: %s", n, name)
        else:
            self.counters.sent += 1

    def _failed(
        self,
        idx: int,
        n: int,
        err: int,
        q: list[_Item],
    ) -> None:
        c = self.counters
        c.send_failed += 1
        name = errno.errorcode.get(err, str(err))
        c.errors[name] = c.errors.get(name, 0) + 1
        log.warning("re-inject of packet %d (%d bytes) failed: %s", idx, n, name)
