"""The info queue and the kext read algorithm (kext-contract C3), checked by reassembling every byte
with the protocol's stream decoder."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kextless.broker.ioqueue import PACK_MIN_FREE, IOQueue, PushResult
from kextless.protocol.enums import InfoType
from kextless.protocol.infos import Info
from kextless.protocol.stream import InfoStreamDecoder
from tests.broker.broker_testlib import bandwidth, conn, end, log

BIG = 1 << 30


def push(q: IOQueue, info: Info) -> PushResult:
    return q.push(info.TYPE, info.encode(), getattr(info, "id", 0))


def drain(q: IOQueue, size: int | list[int]) -> tuple[list[Info], list[bytes]]:
    """Read until the queue is empty; returns the decoded infos and the raw reads."""
    dec = InfoStreamDecoder()
    out: list[Info] = []
    reads: list[bytes] = []
    sizes = iter(size) if isinstance(size, list) else None
    while True:
        n = next(sizes, 65536) if sizes is not None else size
        data = q.read(n)
        if data is None:
            break
        reads.append(data)
        assert 1 <= len(data) <= n
        decoded = dec.feed(data)
        assert all(isinstance(i, Info) for i in decoded), decoded
        out.extend(decoded)
    assert dec.close() == []
    return out, reads


def test_empty_queue_means_wait() -> None:
    q = IOQueue(BIG)
    assert q.read(1024) is None
    assert not q.readable()


def test_packs_whole_infos_back_to_back() -> None:
    q = IOQueue(BIG)
    infos = [conn(1), log("src/a.rs:1 x"), conn(2, payload=30)]
    for i in infos:
        push(q, i)
    data = q.read(65536)
    assert data == b"".join(i.encode() for i in infos[:1] + infos[2:] + infos[1:2])
    assert q.read(65536) is None


def test_stops_packing_when_exactly_five_bytes_are_free() -> None:
    a, b = conn(1), conn(2)
    size = len(a.encode())
    q = IOQueue(BIG)
    push(q, a)
    push(q, b)
    data = q.read(size + PACK_MIN_FREE)  # 5 free after the first: must stop
    assert data == a.encode()
    assert not q.partial
    assert q.read(size) == b.encode()


def test_six_free_bytes_take_a_partial_info() -> None:
    a, b = conn(1), conn(2)
    size = len(a.encode())
    q = IOQueue(BIG)
    push(q, a)
    push(q, b)
    data = q.read(size + PACK_MIN_FREE + 1)
    assert data == a.encode() + b.encode()[:6]
    assert q.partial and q.leftover_bytes == size - 6


def test_zero_bytes_free_edge_next_read_starts_on_a_boundary() -> None:
    infos = [conn(i) for i in range(1, 5)]
    size = len(infos[0].encode())
    q = IOQueue(BIG)
    for i in infos:
        push(q, i)
    assert q.read(2 * size) == infos[0].encode() + infos[1].encode()
    assert not q.partial and q.leftover_bytes == 0
    assert q.read(2 * size) == infos[2].encode() + infos[3].encode()


def test_leftover_is_returned_without_waiting_and_packing_continues() -> None:
    big, small = conn(1, payload=200), conn(2)
    q = IOQueue(BIG)
    push(q, big)
    first = q.read(100)
    assert first == big.encode()[:100]
    # Nothing else queued: the tail still comes back at once.
    rest = q.read(100)
    assert rest == big.encode()[100:200]
    push(q, small)
    tail = q.read(4096)
    assert tail == big.encode()[200:] + small.encode()


def test_leftover_that_fits_exactly_stops_the_read() -> None:
    big, small = conn(1, payload=200), conn(2)
    q = IOQueue(BIG)
    push(q, big)
    push(q, small)
    q.read(100)
    rest = len(big.encode()) - 100
    assert q.read(rest + 3) == big.encode()[100:]  # 3 free: no packing
    assert q.read(4096) == small.encode()


def test_one_byte_buffers_deliver_everything_byte_by_byte() -> None:
    q = IOQueue(BIG)
    infos = [conn(1), log("file.rs:3 hello")]
    for i in infos:
        push(q, i)
    out, reads = drain(q, 1)
    assert out == infos
    assert all(len(r) == 1 for r in reads)


def test_info_larger_than_the_buffer_spans_many_reads() -> None:
    table = bandwidth(3000)  # 84 KB
    q = IOQueue(BIG)
    push(q, table)
    push(q, log("x.rs:1 after"))
    out, reads = drain(q, 1024)
    assert out == [table, log("x.rs:1 after")]
    assert len(reads) == -(-(len(table.encode()) + len(log("x.rs:1 after").encode())) // 1024)
    assert all(len(r) == 1024 for r in reads[:-1])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(conn, st.integers(1, 2**40), st.integers(0, 3000)),
            st.builds(log, st.text(min_size=1, max_size=300).filter(lambda s: s.strip())),
            st.builds(bandwidth, st.integers(0, 400)),
            st.builds(end, st.integers(0, 2**32)),
        ),
        min_size=1,
        max_size=40,
    ),
    st.lists(st.integers(1, 65536), min_size=1, max_size=50),
)
def test_any_buffer_sizes_reassemble_to_the_queued_infos(
    infos: list[Info], sizes: list[int]
) -> None:
    q = IOQueue(BIG)
    for i in infos:
        assert push(q, i) is PushResult.QUEUED
    total = sum(len(i.encode()) for i in infos)
    plan = itertools.islice(itertools.cycle(sizes), total + 1)  # every read takes >= 1 byte
    dec = InfoStreamDecoder()
    got: list[Info] = []
    for n in plan:
        had_leftover = q.leftover_bytes > 0
        data = q.read(n)
        if data is None:
            break
        assert 1 <= len(data) <= n
        if len(data) < n and q.readable():
            # Stopped early with data left: only because <= 5 bytes were free, or because
            # a leftover was finished first and left <= 5 bytes.
            assert n - len(data) <= PACK_MIN_FREE
        if had_leftover and q.partial:
            assert len(data) == n
        got.extend(dec.feed(data))
    else:
        pytest.fail("queue not drained")
    assert dec.close() == []
    # Connection infos overtake bulk ones; within each class the order is FIFO.
    prio = [
        i for i in infos if i.TYPE in (InfoType.CONNECTION_IPV4, InfoType.CONNECTION_END_EVENT_V4)
    ]
    bulk = [i for i in infos if i not in prio]
    assert got == prio + bulk
    assert sum(q.delivered) == len(infos)


def test_connection_infos_overtake_a_bulk_backlog() -> None:
    q = IOQueue(BIG)
    for n in range(50):
        push(q, bandwidth(20))
        push(q, log(f"l.rs:{n} line"))
    push(q, conn(7))
    first = q.read(1024)
    assert first is not None and first.startswith(conn(7).encode())


# ---- policy -------------------------------------------------------------------------------------


def test_bulk_infos_are_dropped_oldest_first_with_one_episode() -> None:
    lines = [log(f"f.rs:{n} {'x' * 50}") for n in range(10)]
    size = len(lines[0].encode())
    q = IOQueue(size * 4)
    results = [push(q, i) for i in lines]
    assert results[:4] == [PushResult.QUEUED] * 4
    assert results[4:] == [PushResult.QUEUED_AFTER_DROP] * 6
    assert q.dropped[InfoType.LOG_LINE] == 6
    assert q.overflow_episodes == 1 and q.overflowing
    out, _ = drain(q, 65536)
    assert out == lines[6:]
    assert not q.overflowing  # drained below half: the episode is over
    for i in lines[:5]:
        push(q, i)
    assert q.overflow_episodes == 2


def test_connection_info_evicts_bulk_and_is_refused_only_when_connections_fill_it() -> None:
    c = conn(1)
    size = len(c.encode())
    q = IOQueue(size * 3)
    push(q, log("a.rs:1 " + "y" * (size - 13)))  # exactly `size` bytes
    push(q, bandwidth(1))
    assert push(q, conn(1)) is PushResult.QUEUED
    assert push(q, conn(2)) is PushResult.QUEUED_AFTER_DROP  # the log line goes
    assert q.dropped[InfoType.LOG_LINE] == 1
    assert push(q, conn(3)) is PushResult.QUEUED_AFTER_DROP  # the bandwidth info goes
    assert push(q, conn(4)) is PushResult.REFUSED
    assert q.refused[InfoType.CONNECTION_IPV4] == 1
    assert q.dropped[InfoType.CONNECTION_IPV4] == 0
    assert push(q, end(9)) is PushResult.DROPPED  # end events are not refused, just counted
    assert q.dropped[InfoType.CONNECTION_END_EVENT_V4] == 1
    out, _ = drain(q, 65536)
    assert [i.id for i in out] == [1, 2, 3]


def test_bulk_info_larger_than_the_queue_is_dropped_without_evicting() -> None:
    q = IOQueue(1000)
    push(q, log("k.rs:1 keep"))
    assert push(q, bandwidth(100)) is PushResult.DROPPED
    assert q.dropped[InfoType.BANDWIDTH_STATS_V4] == 1
    assert drain(q, 4096)[0] == [log("k.rs:1 keep")]


def test_rewind_partial_redelivers_the_info_whole() -> None:
    big = conn(1, payload=500)
    q = IOQueue(BIG)
    push(q, big)
    push(q, conn(2))
    assert q.read(100) == big.encode()[:100]
    q.rewind_partial()
    assert drain(q, 4096)[0] == [big, conn(2)]


def test_undo_read_puts_everything_back() -> None:
    infos = [conn(1, payload=100), conn(2), log("u.rs:1 undo"), conn(3, payload=900)]
    q = IOQueue(BIG)
    for i in infos:
        push(q, i)
    first = q.read(50)
    before = (q.bytes, q.leftover_bytes, list(q.delivered))
    assert q.read(300) is not None
    q.undo_read()
    assert (q.bytes, q.leftover_bytes, list(q.delivered)) == before
    dec = InfoStreamDecoder()
    got = dec.feed(first)
    while (data := q.read(333)) is not None:
        got.extend(dec.feed(data))
    assert got == [infos[0], infos[1], infos[3], infos[2]]


def test_discard_drops_queue_and_leftover() -> None:
    q = IOQueue(BIG)
    push(q, conn(1, payload=300))
    push(q, log("d.rs:1 gone"))
    q.read(10)
    assert q.discard() == 2
    assert q.read(1024) is None and q.bytes == 0 and q.leftover_bytes == 0
    assert q.discarded[InfoType.CONNECTION_IPV4] == 1


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        IOQueue(0)
    with pytest.raises(ValueError):
        IOQueue(10).read(0)


# ---- withdrawing connection infos decided without a reader -------------------------------------


def test_withdraw_takes_only_the_named_connection_infos() -> None:
    q = IOQueue(BIG)
    for info in (conn(1), end(5), conn(2), bandwidth(1), log("x"), conn(3)):
        push(q, info)
    before = q.bytes
    assert q.withdraw([3, 1, 42, 0]) == 2
    assert q.bytes == before - 2 * len(conn(1).encode())
    assert q.withdrawn[InfoType.CONNECTION_IPV4] == 2
    infos, _ = drain(q, 65536)
    assert infos == [end(5), conn(2), bandwidth(1), log("x")]


def test_withdraw_leaves_a_begun_info_and_takes_a_rewound_one() -> None:
    q = IOQueue(BIG)
    push(q, conn(1, payload=50))
    head = q.read(8)
    assert head is not None and q.partial
    assert q.withdraw([1]) == 0  # its head is out: the tail must follow
    q.rewind_partial()  # a new reader starts it from the beginning: now it can go
    assert q.withdraw([1]) == 1 and not q.readable() and q.read(100) is None


def test_withdraw_connections_returns_every_unbegun_connection_id() -> None:
    q = IOQueue(BIG)
    for info in (conn(4), log("stays"), conn(5), end(1)):
        push(q, info)
    assert q.withdraw_connections() == [4, 5]
    infos, _ = drain(q, 65536)
    assert infos == [end(1), log("stays")]  # connection ends first, as ever
