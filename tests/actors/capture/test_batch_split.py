"""A batch that cannot be split by its packets' IP length fields (a forged length, trailing
bytes): lost once, then one packet per receive until no liar has been seen for a while.

Drives Batch.recv with a stand-in for libebpfdivert's recv_ex (the buffer and count it fills),
so no handle or root is needed; the real library packs packets back to back like this."""

from __future__ import annotations

import ctypes
import errno
from typing import Any

import pytest

from kextless.actors.capture.batch import SINGLE_AFTER_SPLIT, Batch
from tests.actors.capture import crafted as c


class _Handle:
    _handle = 1


class _Library:
    """recv_ex: hands out queued packets, as many as `count` asks for."""

    def __init__(self, packets: list[bytes]) -> None:
        self.queue = list(packets)
        self.asked: list[int] = []

    def __call__(
        self, _h: int, buf: int, size: int, used: Any, _a: int, count: Any, _t: int
    ) -> int:
        want = count._obj.value
        self.asked.append(want)
        if not self.queue:
            return -errno.EAGAIN
        take, self.queue = self.queue[:want], self.queue[want:]
        data = b"".join(take)
        assert len(data) <= size
        ctypes.memmove(buf, data, len(data))
        used._obj.value, count._obj.value = len(data), len(take)
        return 0


def _good(i: int) -> bytes:
    return c.v4("10.0.0.2", "10.0.0.1", c.udp(999, 53, b"good-%d" % i))


def _liar() -> bytes:
    raw = bytearray(c.v4("10.0.0.2", "10.0.0.1", c.udp(999, 53, b"x" * 40)))
    raw[2:4] = (28).to_bytes(2, "big")  # says 28 bytes, carries 76
    return bytes(raw)


def _batch(packets: list[bytes]) -> tuple[Batch, _Library]:
    b = Batch(_Handle(), size=8)
    lib = _Library(packets)
    b._recv_ex = lib
    return b, lib


def test_a_liar_loses_its_batch_then_every_packet_comes_alone_with_its_true_length() -> None:
    b, lib = _batch([_good(0), _liar(), _good(1), _liar(), _good(2), _good(3)])
    with pytest.raises(OSError) as exc:
        b.recv()
    assert exc.value.errno == errno.EPROTO
    assert (b.counters.split_failed, b.counters.split_lost) == (1, 6)
    lib.queue = [_good(4), _liar(), _good(5)]
    got = [t.raw.tobytes() for _ in range(3) for t in b.recv()]
    assert got == [_good(4), _liar(), _good(5)]  # each whole, the liar with all it carries
    assert lib.asked[1:] == [1, 1, 1]
    assert b.counters.single_recvs == 3 and b.counters.received == 3


def test_batches_come_back_once_no_liar_was_seen_for_a_while() -> None:
    b, lib = _batch([_good(0), _liar()])
    with pytest.raises(OSError):
        b.recv()
    lib.queue = [_good(i) for i in range(SINGLE_AFTER_SPLIT)]
    for _ in range(SINGLE_AFTER_SPLIT):
        assert len(b.recv()) == 1
    lib.queue = [_good(i) for i in range(8)]
    assert len(b.recv()) == 8  # one call, the whole batch again
    assert lib.asked[-1] == 8


def test_a_liar_while_careful_keeps_it_careful() -> None:
    b, lib = _batch([_good(0), _liar()])
    with pytest.raises(OSError):
        b.recv()
    lib.queue = [_good(i) for i in range(SINGLE_AFTER_SPLIT - 1)] + [_liar()]
    for _ in range(SINGLE_AFTER_SPLIT):
        assert len(b.recv()) == 1
    lib.queue = [_good(1), _good(2)]
    assert len(b.recv()) == 1 and lib.asked[-1] == 1  # re-armed by the last liar


def test_well_formed_batches_are_split_exactly() -> None:
    packets = [_good(i) for i in range(5)]
    b, lib = _batch(packets)
    assert [t.raw.tobytes() for t in b.recv()] == packets
    assert lib.asked == [8] and b.counters.split_failed == 0
