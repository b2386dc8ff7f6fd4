"""The bandwidth core: kernel counter readings in, GetBandwidthStats infos out (no kernel)."""

from __future__ import annotations

import ipaddress

from kextless.actors.bandwidth.core import (
    MAX_ENTRIES_PER_INFO,
    BandwidthConfig,
    BandwidthCore,
    Effect,
    ReadCounters,
    Reading,
    Source,
    decode_key,
)
from kextless.base import kernel_maps as km
from kextless.base.kernel_maps import FlowEntry, FlowKey, ReinjectedEntry
from kextless.protocol import messages as m
from kextless.protocol.enums import InfoType, Severity
from kextless.protocol.infos import BandwidthStatsV4, BandwidthStatsV6, decode_info

TCP, UDP = 6, 17
A4, B4 = ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed
A6, B6 = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed
LOCAL = frozenset({A4, A6})
GEN = (11, 12)
S = 1_000_000_000


def rd(
    src: bytes,
    sport: int,
    dst: bytes,
    dport: int,
    n: int,
    proto: int = TCP,
    source: Source = Source.CACHE,
) -> Reading:
    """A reading as the shell makes it: the raw map key the capture's loader writes."""
    return (source, FlowKey(proto, src, sport, dst, dport).pack(), n)


def answer(core: BandwidthCore, now: int = 0) -> list[BandwidthStatsV4 | BandwidthStatsV6]:
    """The request's infos, decoded from the bytes the broker would queue."""
    out: list[BandwidthStatsV4 | BandwidthStatsV6] = []
    for eff in core.request(now):
        assert isinstance(eff, m.Emits)
        for e in eff.emits:
            info = decode_info(e.info)
            assert isinstance(info, (BandwidthStatsV4, BandwidthStatsV6))
            assert e.kind == info.TYPE
            out.append(info)
    return out


def table(
    info: BandwidthStatsV4 | BandwidthStatsV6,
) -> dict[tuple[bytes, int, bytes, int], tuple[int, int]]:
    return {
        (v.local_ip, v.local_port, v.remote_ip, v.remote_port): (
            v.transmitted_bytes,
            v.received_bytes,
        )
        for v in info.values
    }


def fresh_core() -> BandwidthCore:
    core = BandwidthCore()
    assert core.start(0) == [ReadCounters()]
    return core


def test_fresh_programs_count_everything_and_orient_by_the_local_address() -> None:
    core = fresh_core()
    out = core.poll(
        [rd(A4, 40000, B4, 80, 1000), rd(B4, 80, A4, 40000, 50, source=Source.REINJECTED)],
        GEN,
        True,
        LOCAL,
        1,
    )
    assert out == []
    (info,) = answer(core)
    assert isinstance(info, BandwidthStatsV4) and info.protocol == TCP
    assert table(info) == {(A4, 40000, B4, 80): (1000, 50)}


def test_a_restarted_actor_takes_what_running_programs_hold_as_its_baseline() -> None:
    core = fresh_core()
    core.poll([rd(A4, 40000, B4, 80, 10_000)], GEN, False, LOCAL, 1)
    assert answer(core) == []  # counted before our time (a previous actor reported it)
    core.poll([rd(A4, 40000, B4, 80, 10_400), rd(A4, 40001, B4, 80, 7)], GEN, False, LOCAL, 2)
    (info,) = answer(core)
    assert table(info) == {(A4, 40000, B4, 80): (400, 0), (A4, 40001, B4, 80): (7, 0)}


def test_delta_semantics_across_requests_and_both_sources_add_up() -> None:
    core = fresh_core()
    key = (A4, 5000, B4, 53)
    core.poll([rd(A4, 5000, B4, 53, 100, UDP, Source.REINJECTED)], GEN, True, LOCAL, 1)
    core.poll(
        [
            rd(A4, 5000, B4, 53, 100, UDP, Source.REINJECTED),
            rd(A4, 5000, B4, 53, 300, UDP),
            rd(B4, 53, A4, 5000, 900, UDP),
        ],
        GEN,
        True,
        LOCAL,
        2,
    )
    (info,) = answer(core)
    assert info.protocol == UDP and table(info) == {key: (400, 900)}
    assert answer(core) == []  # nothing new: no infos at all
    core.poll(
        [
            rd(A4, 5000, B4, 53, 100, UDP, Source.REINJECTED),
            rd(A4, 5000, B4, 53, 350, UDP),
            rd(B4, 53, A4, 5000, 900, UDP),
        ],
        GEN,
        True,
        LOCAL,
        3,
    )
    (info,) = answer(core)
    assert table(info) == {key: (50, 0)}


def test_a_connection_that_ended_between_requests_reports_its_last_bytes_once() -> None:
    core = fresh_core()
    core.poll([rd(A4, 1, B4, 2, 10)], GEN, True, LOCAL, 1)
    assert table(answer(core)[0]) == {(A4, 1, B4, 2): (10, 0)}
    core.poll([rd(A4, 1, B4, 2, 25)], GEN, True, LOCAL, 2)
    core.poll([], GEN, True, LOCAL, 3)  # the capture deleted its entry
    assert table(answer(core)[0]) == {(A4, 1, B4, 2): (15, 0)}
    assert answer(core) == []
    # The same 5-tuple used again later counts from its new entry's zero.
    core.poll([rd(A4, 1, B4, 2, 4)], GEN, True, LOCAL, 4)
    assert table(answer(core)[0]) == {(A4, 1, B4, 2): (4, 0)}


def test_a_reset_counter_counts_from_zero() -> None:
    core = fresh_core()
    core.poll([rd(A4, 1, B4, 2, 1000)], GEN, True, LOCAL, 1)
    core.poll([rd(A4, 1, B4, 2, 30)], GEN, True, LOCAL, 2)  # re-put between polls
    assert table(answer(core)[0]) == {(A4, 1, B4, 2): (1030, 0)}
    assert core.counters["resets"] == 1


def test_infos_come_in_the_kexts_table_order_with_entries_in_key_order() -> None:
    core = fresh_core()
    readings = [
        rd(A6, 9, B6, 53, 3, UDP),
        rd(A4, 9, B4, 53, 3, UDP),
        rd(A6, 9, B6, 443, 2),
        rd(A4, 700, B4, 80, 1),
        rd(A4, 600, B4, 80, 1),
    ]
    core.poll(readings, GEN, True, LOCAL, 1)
    infos = answer(core)
    assert [(i.TYPE, i.protocol) for i in infos] == [
        (InfoType.BANDWIDTH_STATS_V4, TCP),
        (InfoType.BANDWIDTH_STATS_V6, TCP),
        (InfoType.BANDWIDTH_STATS_V4, UDP),
        (InfoType.BANDWIDTH_STATS_V6, UDP),
    ]
    assert [v.local_port for v in infos[0].values] == [600, 700]


def test_loopback_counts_for_both_ends_and_forwarded_traffic_for_none() -> None:
    core = fresh_core()
    lo = bytes([127, 0, 0, 1])
    c = ipaddress.ip_address("10.9.9.9").packed
    core.poll([rd(lo, 50000, lo, 8080, 77), rd(B4, 1, c, 2, 500)], GEN, True, LOCAL, 1)
    (info,) = answer(core)
    assert table(info) == {(lo, 50000, lo, 8080): (77, 0), (lo, 8080, lo, 50000): (0, 77)}
    assert core.counters["foreign_bytes"] == 500


def test_replaced_programs_start_afresh_and_say_so() -> None:
    core = fresh_core()
    core.poll([rd(A4, 1, B4, 2, 100)], GEN, True, LOCAL, 1)
    out = core.poll([rd(A4, 1, B4, 2, 100)], (21, 22), True, LOCAL, 2)
    assert [type(e) for e in out] == [m.Log]
    log = out[0]
    assert isinstance(log, m.Log) and log.severity == Severity.WARNING
    assert log.line.startswith("actors/bandwidth/core.py:")
    # The new programs were loaded after we started: their 100 bytes are new.
    assert table(answer(core)[0]) == {(A4, 1, B4, 2): (200, 0)}
    # No programs at first, then a capture attaches fresh ones: counted from their zero.
    late = fresh_core()
    assert late.poll([], (), False, LOCAL, 1) == []
    late.poll([rd(A4, 1, B4, 2, 5)], GEN, True, LOCAL, 2)
    assert table(answer(late)[0]) == {(A4, 1, B4, 2): (5, 0)}


def test_pending_connections_are_bounded_and_the_overflow_is_logged_once() -> None:
    core = BandwidthCore(BandwidthConfig(max_pending=3))
    core.start(0)
    out: list[Effect] = core.poll([rd(A4, p, B4, 80, 10) for p in range(1, 7)], GEN, True, LOCAL, 1)
    assert len(out) == 1 and isinstance(out[0], m.Log)
    assert core.counters["dropped_bytes"] == 30
    assert len(answer(core)[0].values) == 3
    # After a request there is room again.
    out = core.poll([rd(A4, p, B4, 80, 20) for p in range(1, 7)], GEN, True, LOCAL, 2)
    assert len(out) == 1  # 3 new ones fit, the other 3 overflow (logged once more)


def test_a_huge_table_is_split_into_bounded_infos() -> None:
    core = fresh_core()
    n = MAX_ENTRIES_PER_INFO + 5
    core.poll([rd(A4, 1 + i % 60000, B4, 1 + i // 60000, 1) for i in range(n)], GEN, True, LOCAL, 1)
    infos = answer(core)
    assert [len(i.values) for i in infos] == [MAX_ENTRIES_PER_INFO, 5]
    keys = [(v.local_ip, v.local_port, v.remote_ip, v.remote_port) for i in infos for v in i.values]
    assert keys == sorted(keys)


def test_polls_are_due_every_interval() -> None:
    core = BandwidthCore(BandwidthConfig(poll_ns=S))
    core.start(0)
    assert core.next_deadline_ns() == S
    assert core.on_deadline(S - 1) == []
    assert core.on_deadline(S) == [ReadCounters()]
    assert core.next_deadline_ns() == 2 * S
    core.poll([], GEN, True, LOCAL, int(1.5 * S))  # a request's read moves the next one
    assert core.next_deadline_ns() == int(2.5 * S)


def test_the_core_reads_the_key_and_payload_where_the_capture_writes_them() -> None:
    for k in (FlowKey(TCP, A4, 40000, B4, 80), FlowKey(UDP, A6, 5353, B6, 53)):
        assert decode_key(k.pack()) == (k.proto, k.src, k.sport, k.dst, k.dport)
    raw = bytearray(48)
    raw[km.PAYLOAD_OFFSET : km.PAYLOAD_OFFSET + 8] = (123456).to_bytes(8, "little")
    assert FlowEntry.unpack(bytes(raw)).payload == 123456
    raw = bytearray(32)
    raw[km.REINJECTED_PAYLOAD_OFFSET : km.REINJECTED_PAYLOAD_OFFSET + 8] = (77).to_bytes(
        8, "little"
    )
    assert ReinjectedEntry.unpack(bytes(raw)).payload == 77
