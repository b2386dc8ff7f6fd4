"""The session/command core driven directly: no sockets, time passed in.

The harness keeps the effects every input returns, split the way the shell carries them out:
client replies, actor messages and log events.
"""

from __future__ import annotations

import json

import pytest

import kextless.broker.core as core_mod
from kextless.base.linebudget import PER_WINDOW
from kextless.broker import wire
from kextless.broker.core import (
    BrokerCore,
    Effect,
    Event,
    Memory,
    NoClient,
    SessionState,
    ToActor,
    ToClient,
)
from kextless.broker.logring import RING_SLOTS, LogRing, clean_line
from kextless.protocol.commands import ClearCacheCommand, decode_command, encode_command
from kextless.protocol.enums import CommandType, InfoType, Severity, Verdict
from kextless.protocol.infos import Info, LogLine
from kextless.protocol.messages import (
    CONTRACT_VERSION,
    Command,
    Emit,
    EmitRefused,
    Emits,
    Health,
    Hello,
    Log,
    Resolved,
    decode,
    encode,
)
from kextless.protocol.stream import InfoStreamDecoder
from tests.broker.broker_testlib import BAD_FRAMES, MALFORMED, bandwidth, conn, log

OWNER = b"\x00owner"
OTHER = b"\x00other"
ALE = b"ale"
ALE_OWNS = (CommandType.VERDICT, CommandType.SHUTDOWN, CommandType.CLEAN_ENDED_CONNECTIONS)


def verdict(id_: int, v: int = 2) -> bytes:
    return b"\x01" + id_.to_bytes(8, "little") + bytes([v])


class Harness:
    def __init__(self, queue_bytes: int = 1 << 20) -> None:
        self.core = BrokerCore(queue_bytes, pid=4242)
        self.now = 1_000_000_000
        self.to_clients: list[list[bytes]] = []
        self.to_actors: list[ToActor] = []
        self.events: list[str] = []

    def run(self, effects: list[Effect]) -> None:
        """Keep what an input returned, as the shell would carry it out."""
        assert isinstance(effects, list)
        for e in effects:
            if isinstance(e, ToClient):
                self.to_clients.append([e.peer, *e.frames])
            elif isinstance(e, ToActor):
                self.to_actors.append(e)
            else:
                assert isinstance(e, Event)
                self.events.append(e.text)

    def client(
        self, peer: bytes, *frames: bytes, memory: Memory | None = None
    ) -> list[list[bytes]]:
        self.run(self.core.client_message(peer, list(frames), self.now, memory))
        return self.take()

    def take(self) -> list[list[bytes]]:
        out, self.to_clients = self.to_clients, []
        return out

    def actor_out(self) -> list[tuple[bytes, object]]:
        out, self.to_actors = self.to_actors, []
        assert all(len(m.frames) == 1 for m in out)
        return [(m.actor, decode(m.frames[0])) for m in out]

    def hello(self, actor: bytes, owns: tuple[CommandType, ...]) -> None:
        self.actor(actor, Hello(actor.decode(), 1, CONTRACT_VERSION, owns))

    def actor(self, actor: bytes, *msgs: object) -> None:
        self.run(self.core.actor_message(actor, [encode(m) for m in msgs], self.now))

    def emit(self, *infos: Info, actor: bytes = ALE) -> None:
        self.actor(actor, *(Emit(i.TYPE, i.encode(), getattr(i, "id", 0)) for i in infos))

    def write(self, peer: bytes, raw: bytes) -> bytes:
        (reply,) = self.client(peer, wire.WRITE, raw)
        assert reply[:2] == [peer, wire.WRITE]
        return reply[2]

    def read_all(self, peer: bytes, size: int = 65536) -> list[Info]:
        dec = InfoStreamDecoder()
        out: list[Info] = []
        while True:
            reply = self.client(peer, wire.READ, wire.U32.pack(size), wire.U32.pack(10))
            if not reply:  # parked
                self.now += 20_000_000
                self.run(self.core.on_deadline(self.now))
                (reply,) = self.take()
                assert reply == [peer, wire.TIMEOUT]
                return out
            assert reply[0][1] == wire.READ, reply
            out.extend(dec.feed(reply[0][2]))

    def logs(self, peer: bytes = OWNER) -> list[LogLine]:
        assert self.write(peer, b"\x05") == b"\x00"
        return [i for i in self.read_all(peer) if isinstance(i, LogLine)]


@pytest.fixture
def h() -> Harness:
    h = Harness()
    h.hello(ALE, ALE_OWNS)
    assert h.client(OWNER, wire.OPEN) == [[OWNER, wire.OPEN]]
    return h


# ---- log ring ----------------------------------------------------------------------------------


def test_log_ring_keeps_the_newest_1024_and_marks_the_overflow() -> None:
    ring = LogRing()
    for n in range(RING_SLOTS + 6):
        ring.add(Severity.ERROR, f"f.rs:{n} line {n}")
    records = ring.flush()
    assert len(records) == RING_SLOTS + 1
    dec = InfoStreamDecoder()
    lines = dec.feed(b"".join(records))
    assert lines[0].severity == Severity.WARNING
    assert "log ring overflowed: 6 older lines were lost" in lines[0].line
    assert [ln.line for ln in lines[1:]] == [f"f.rs:{n} line {n}" for n in range(6, 1030)]
    assert ring.flush() == []  # flushed lines are gone, the marker too
    ring.add(Severity.INFO, "x.rs:1 again")
    assert len(ring.flush()) == 1


def test_log_lines_are_single_nonempty_lines() -> None:
    assert clean_line("a\nb\r\nc") == "a b  c"
    assert clean_line("   ") == "(empty log line)"
    assert len(clean_line("x" * 5000)) == 1000


def test_actor_log_lines_reach_getlogs(h: Harness) -> None:
    h.actor(ALE, Log(Severity.WARNING, "ale.py:10 slow decision"))
    assert h.logs() == [LogLine(Severity.WARNING, "ale.py:10 slow decision")]


def test_print_memory_stats_logs_an_info_line(h: Harness) -> None:
    h.emit(conn(1))
    (reply,) = h.client(OWNER, wire.WRITE, b"\x07", memory=Memory(rss_kib=5120, peak_kib=6144))
    assert reply == [OWNER, wire.WRITE, b"\x00"]
    h.read_all(OWNER)
    (line,) = h.logs()
    assert line.severity == Severity.INFO
    assert line.line.startswith("broker/core.py:")
    assert "memory: rss 5120 KiB (peak 6144 KiB); " in line.line
    assert "queue 1 infos / 40 of 1048576 bytes (priority 1, bulk 0" in line.line


def test_stats_report_the_process_facts_the_shell_passes_in(h: Harness) -> None:
    (reply,) = h.client(OTHER, wire.STATS, memory=Memory(rss_kib=777, peak_kib=900))
    s = json.loads(reply[2])
    assert s["pid"] == 4242 and s["rss_kib"] == 777
    (reply,) = h.client(OTHER, wire.STATS)  # nothing read: unknown, not made up
    assert json.loads(reply[2])["rss_kib"] is None
    assert json.loads(reply[2])["pid"] == 4242


# ---- sessions ----------------------------------------------------------------------------------


def test_busy_and_owner_rules(h: Harness) -> None:
    assert h.client(OTHER, wire.OPEN)[0][1] == wire.ERROR
    assert h.client(OTHER, wire.CLOSE)[0][2].startswith(b"not the session owner")
    # Other sockets of the client read and write like threads sharing the handle.
    assert h.write(OTHER, b"\x05") == b"\x00"
    assert h.client(OWNER, wire.CLOSE) == [[OWNER, wire.CLOSE]]
    assert h.core.state is SessionState.NONE
    assert h.client(OTHER, wire.OPEN) == [[OTHER, wire.OPEN]]


def test_parked_read_times_out_without_consuming(h: Harness) -> None:
    assert h.client(OWNER, wire.READ, wire.U32.pack(100), wire.U32.pack(50)) == []
    assert h.core.next_deadline_ns() == h.now + 50_000_000
    h.run(h.core.on_deadline(h.now + 49_999_999))
    assert h.take() == []
    h.run(h.core.on_deadline(h.now + 50_000_000))
    assert h.take() == [[OWNER, wire.TIMEOUT]]
    assert h.core.parked is None
    assert h.core.reads["timeouts"] == 1


def test_a_parked_read_has_a_deadline_only_while_it_waits(h: Harness) -> None:
    assert h.core.next_deadline_ns() is None and h.core.on_deadline(h.now) == []
    h.client(OWNER, wire.READ, wire.U32.pack(100), wire.U32.pack(1000))
    assert h.core.next_deadline_ns() == h.now + 1_000_000_000
    h.emit(conn(1))  # answered by the info, long before its timeout
    assert h.take() == [[OWNER, wire.READ, conn(1).encode()]]
    assert h.core.next_deadline_ns() is None
    assert h.core.on_deadline(h.now + 2_000_000_000) == []  # no late T after the data
    h.client(OWNER, wire.READ, wire.U32.pack(100), wire.U32.pack(5))
    h.run(h.core.peer_gone(OWNER))  # the reader went away: nothing left to time out
    assert h.core.next_deadline_ns() is None


def test_a_second_read_while_one_waits_is_refused(h: Harness) -> None:
    assert h.client(OWNER, wire.READ, wire.U32.pack(100)) == []
    reply = h.client(OTHER, wire.READ, wire.U32.pack(100))
    assert reply[0][1] == wire.ERROR and b"already waiting" in reply[0][2]


def test_emit_answers_the_parked_read(h: Harness) -> None:
    assert h.client(OWNER, wire.READ, wire.U32.pack(1000)) == []
    assert h.core.next_deadline_ns() is None  # waits forever
    h.emit(conn(1), conn(2))
    assert h.take() == [[OWNER, wire.READ, conn(1).encode() + conn(2).encode()]]


def test_shutdown_discards_and_ends_the_session(h: Harness) -> None:
    h.emit(conn(1), log("q.rs:1 queued"))
    h.emit(bandwidth(3), actor=b"bandwidth")
    assert len(h.client(OWNER, wire.READ, wire.U32.pack(10))[0][2]) == 10  # a partial info
    assert h.write(OWNER, b"\x00") == b"\x00"
    assert h.core.state is SessionState.SHUT
    assert h.actor_out() == [(ALE, Command(CommandType.SHUTDOWN, b"\x00", h.now))]
    q = h.core.queue
    assert q.bytes == 0 and q.leftover_bytes == 0
    assert [
        q.discarded[t]
        for t in (InfoType.CONNECTION_IPV4, InfoType.LOG_LINE, InfoType.BANDWIDTH_STATS_V4)
    ] == [1, 1, 1]
    assert h.client(OWNER, wire.READ, wire.U32.pack(10)) == [[OWNER, wire.EOF]]
    assert h.write(OWNER, verdict(1)) == b"\x00"  # tolerated, still routed
    h.emit(conn(2))  # held for the next session
    assert h.client(OTHER, wire.OPEN)[0][1] == wire.ERROR  # still the owner's until C
    assert h.client(OWNER, wire.CLOSE) == [[OWNER, wire.CLOSE]]
    assert h.client(OTHER, wire.OPEN) == [[OTHER, wire.OPEN]]
    assert h.read_all(OTHER) == [conn(2)]


def test_shutdown_eof_reaches_the_parked_reader(h: Harness) -> None:
    h.client(OTHER, wire.READ, wire.U32.pack(1000))
    h.run(h.core.client_message(OWNER, [wire.WRITE, b"\x00"], h.now))
    assert h.take() == [[OTHER, wire.EOF], [OWNER, wire.WRITE, b"\x00"]]


def test_owner_reopen_after_shutdown_starts_fresh(h: Harness) -> None:
    h.write(OWNER, b"\x00")
    assert h.client(OWNER, wire.OPEN) == [[OWNER, wire.OPEN]]
    assert h.core.state is SessionState.OPEN
    assert h.core.sessions["opened"] == 2


def test_close_rewinds_a_partial_info(h: Harness) -> None:
    big = conn(1, payload=300)
    h.emit(big)
    assert h.client(OWNER, wire.READ, wire.U32.pack(50))[0][2] == big.encode()[:50]
    h.client(OWNER, wire.CLOSE)
    h.client(OTHER, wire.OPEN)
    assert h.read_all(OTHER, 64) == [big]


def test_vanished_owner_and_reader(h: Harness) -> None:
    h.client(OWNER, wire.READ, wire.U32.pack(100))
    h.run(h.core.peer_gone(OWNER))
    assert h.take() == []  # nobody to answer
    assert h.core.parked is None and h.core.state is SessionState.NONE
    assert h.core.sessions["owner_disconnects"] == 1
    assert h.client(OTHER, wire.OPEN) == [[OTHER, wire.OPEN]]


def test_undeliverable_read_reply_is_put_back(h: Harness) -> None:
    h.emit(conn(1, payload=100), conn(2))
    first = h.client(OWNER, wire.READ, wire.U32.pack(60))[0][2]
    second = h.client(OWNER, wire.READ, wire.U32.pack(4096))[0][2]
    h.run(h.core.read_undeliverable(OWNER))
    again = h.client(OWNER, wire.READ, wire.U32.pack(4096))[0][2]
    assert again == second
    assert InfoStreamDecoder().feed(first + again) == [conn(1, payload=100), conn(2)]


def test_stop_answers_a_parked_read_with_eof(h: Harness) -> None:
    h.client(OWNER, wire.READ, wire.U32.pack(100))
    h.run(h.core.stop())
    assert h.take() == [[OWNER, wire.EOF]]


# ---- commands ----------------------------------------------------------------------------------


def test_routing_by_ownership_and_unowned_commands(h: Harness) -> None:
    h.hello(b"lifecycle", (CommandType.CLEAN_ENDED_CONNECTIONS,))
    assert h.write(OWNER, verdict(9, Verdict.PERMANENT_ACCEPT)) == b"\x00"
    assert h.write(OWNER, b"\x08") == b"\x00"
    out = h.actor_out()
    assert [(a, m.type) for a, m in out] == [
        (ALE, CommandType.VERDICT),
        (ALE, CommandType.CLEAN_ENDED_CONNECTIONS),
        (b"lifecycle", CommandType.CLEAN_ENDED_CONNECTIONS),
    ]
    assert decode_command(out[0][1].raw).verdict == Verdict.PERMANENT_ACCEPT
    status = h.write(OWNER, b"\x02\x06" + bytes(12) + b"\x02")
    assert status == b"\x02no actor handles UpdateV4"
    assert h.write(OWNER, b"\x06") == b"\x00"  # GetBandwidthStats with no bandwidth actor
    assert h.actor_out() == []
    counts = h.core.commands
    assert counts["UpdateV4"] == {"ok": 0, "malformed": 0, "unhandled": 1}
    assert counts["Verdict"]["ok"] == 1


def test_a_verdict_reply_leaves_before_its_command_goes_to_the_actor(h: Harness) -> None:
    out = h.core.client_message(OWNER, [wire.WRITE, verdict(5)], h.now)
    assert out == [
        ToClient(OWNER, (wire.WRITE, b"\x00")),
        ToActor(ALE, (encode(Command(CommandType.VERDICT, verdict(5), h.now)),)),
    ]


def test_actor_gone_drops_its_ownership(h: Harness) -> None:
    h.run(h.core.actor_gone(ALE))
    assert h.write(OWNER, verdict(1))[0] == wire.Status.UNHANDLED
    assert h.write(OWNER, b"\x00") == b"\x00"  # Shutdown always works


def test_hello_with_another_contract_or_broker_commands_claims_nothing() -> None:
    h = Harness()
    h.actor(ALE, Hello("ale", 1, CONTRACT_VERSION + 1, (CommandType.VERDICT,)))
    assert h.core.owners == {}
    h.hello(
        b"greedy", (CommandType.GET_LOGS, CommandType.PRINT_MEMORY_STATS, CommandType.CLEAR_CACHE)
    )
    assert h.core.owners == {CommandType.CLEAR_CACHE: (b"greedy",)}
    assert h.core.actor_garbage == 1


@pytest.mark.parametrize(("raw", "why"), MALFORMED)
def test_malformed_commands_change_nothing_and_log_an_error(
    h: Harness, raw: bytes, why: str
) -> None:
    status = h.write(OWNER, raw)
    assert status[0] == wire.Status.MALFORMED and why in status[1:].decode()
    assert h.actor_out() == []
    assert h.core.state is SessionState.OPEN
    (line,) = h.logs()
    assert line.severity == Severity.ERROR
    assert line.line.startswith("broker/core.py:")
    assert line.line.endswith(f"Malformed command rejected: {status[1:].decode()}")
    assert h.write(OWNER, verdict(3)) == b"\x00"  # and the broker carries on
    assert [m.type for _, m in h.actor_out()] == [CommandType.VERDICT]


def test_malformed_commands_are_counted_by_type() -> None:
    h = Harness()
    h.client(OWNER, wire.OPEN)
    for raw, _ in MALFORMED:
        h.write(OWNER, raw)
    counts = h.core.commands
    assert counts["Verdict"]["malformed"] == 4
    assert counts["UpdateV4"]["malformed"] == 3 and counts["UpdateV6"]["malformed"] == 2
    assert counts["Shutdown"]["malformed"] == 1 and counts["GetLogs"]["malformed"] == 1
    assert h.core.malformed_unknown == 3  # empty, 9, 255


@pytest.mark.parametrize(("frames", "why"), BAD_FRAMES)
def test_bad_frames_get_x_and_change_nothing(h: Harness, frames: list[bytes], why: bytes) -> None:
    h.emit(conn(1))
    (reply,) = h.client(OWNER, *frames)
    assert reply[:2] == [OWNER, wire.ERROR] and why in reply[2] and len(reply) == 3
    assert h.core.frame_errors == 1
    assert h.core.state is SessionState.OPEN and h.core.parked is None
    assert h.core.queue.depth_priority == 1  # nothing was read
    assert h.actor_out() == []
    assert h.client(OWNER, wire.VERSION) == [[OWNER, wire.VERSION, bytes([2, 1, 0, 0])]]


def test_an_empty_request_gets_x() -> None:
    """Only the core can see this one: no DEALER sends a message without frames."""
    h = Harness()
    assert h.client(OWNER) == [
        [OWNER, wire.ERROR, b"empty message: the first frame must be an op byte"]
    ]


# ---- queue policy and counters -------------------------------------------------------------------


def test_refused_connection_info_goes_back_to_its_emitter() -> None:
    h = Harness(queue_bytes=100)
    h.emit(conn(1), conn(2), conn(3))  # 40 bytes each
    out = h.actor_out()
    assert [(a, type(m), m.id) for a, m in out] == [(ALE, EmitRefused, 3)]


def test_one_warning_per_overflow_episode(h: Harness) -> None:
    h.core.queue.max_bytes = 2000
    for _ in range(3):
        h.emit(*(bandwidth(10) for _ in range(20)), actor=b"bandwidth")  # 290 B each
    assert h.core.queue.overflow_episodes == 1
    infos = h.read_all(OWNER)
    assert sum(isinstance(i, type(bandwidth(1))) for i in infos) == 6
    h.emit(*(bandwidth(10) for _ in range(20)), actor=b"bandwidth")
    h.read_all(OWNER)
    warnings = [ln for ln in h.logs() if ln.severity == Severity.WARNING]
    assert len(warnings) == 2 and all("info queue full" in w.line for w in warnings)
    assert h.core.queue.dropped[InfoType.BANDWIDTH_STATS_V4] == (60 - 6) + (20 - 6)


def test_bad_emits_and_foreign_messages_are_dropped(h: Harness) -> None:
    good = conn(1).encode()
    h.run(
        h.core.actor_message(
            ALE,
            [
                b"\x94\xa4Emit\x01",  # truncated
                encode(Emit(InfoType.LOG_LINE, good, 1)),  # kind does not match the record
                encode(Emit(InfoType.CONNECTION_IPV4, good[:-1], 1)),  # length does not match
                encode(Emit(InfoType.CONNECTION_IPV4, b"\x01\x00", 1)),  # shorter than a header
                encode(EmitRefused(1, "x")),
                b"",
                encode(Emit(InfoType.CONNECTION_IPV4, good, 1)),
            ],
            h.now,
        )
    )
    assert h.core.actor_garbage == 6
    assert h.read_all(OWNER) == [conn(1)]
    assert any("does not match" in e for e in h.events)


def test_stats_counters_and_latency(h: Harness) -> None:
    h.actor(ALE, Health("ale", 77, {"pending": 3, "connections": 41}))
    h.emit(*(conn(i) for i in range(1, 5)))
    delivered_at = h.now
    h.read_all(OWNER)  # delivers all four at once, then waits 20 ms for more
    for i in range(1, 5):
        h.now += i * 10_000  # verdicts 10, 30, 60, 100 us after that wait
        h.write(OWNER, verdict(i))
    h.write(OWNER, verdict(99))  # never delivered: no sample
    (reply,) = h.client(OTHER, wire.STATS)
    s = json.loads(reply[2])
    assert s["pending_verdicts"] == 3 and s["connections_tracked"] == 41
    waited_us = (h.now - 100_000 - delivered_at) / 1000
    assert s["verdict_rtt_us"] == {
        "samples": 4,
        "p50": waited_us + 60,
        "p90": waited_us + 100,
        "p99": waited_us + 100,
        "max": waited_us + 100,
    }
    assert s["infos"]["delivered"]["ConnectionIpv4"] == 4
    assert s["commands"]["Verdict"]["ok"] == 5
    assert s["session"]["state"] == "open"
    assert s["actors"]["ale"]["owns"] == ["Verdict", "Shutdown", "CleanEndedConnections"]


def test_latency_tracking_is_bounded(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_mod, "LATENCY_TRACKED_IDS", 100)
    for i in range(1, 251):
        h.emit(conn(i))
        h.read_all(OWNER)
    assert len(h.core._delivered_at) <= 100
    h.write(OWNER, verdict(250))
    assert h.core.latency_quantiles_us()["samples"] == 1


def test_actor_table_is_bounded_and_keeps_owners(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_mod, "MAX_ACTORS", 4)
    for n in range(10):
        h.now += 1
        h.actor(f"anon{n}".encode(), Log(Severity.INFO, "x.py:1 hi"))
    assert len(h.core.actors) == 4
    assert ALE in h.core.actors  # owns commands: kept while anonymous peers come and go
    assert h.write(OWNER, verdict(1)) == b"\x00"


def test_garbage_logging_is_thinned_out(h: Harness) -> None:
    h.events.clear()
    for _ in range(2000):
        h.run(h.core.actor_message(b"babbler", [b"\xc1"], h.now))
    assert h.core.actor_garbage == 2000
    lines = [e for e in h.events if "babbler" in e]
    assert len(lines) == core_mod.GARBAGE_LOGGED + 2  # the first 20, then #1000 and #2000
    assert lines[-1].endswith("(2000 dropped so far)")


def test_emits_batches_queue_in_order_and_skip_bad_items(h: Harness) -> None:
    good = [conn(i) for i in range(1, 4)]
    bad = Emit(InfoType.LOG_LINE, conn(9).encode(), 9)  # kind does not match its record
    batch = Emits(
        (
            Emit(InfoType.CONNECTION_IPV4, good[0].encode(), 1),
            bad,
            *(Emit(InfoType.CONNECTION_IPV4, g.encode(), g.id) for g in good[1:]),
        )
    )
    h.run(h.core.actor_message(ALE, [encode(batch), b"\x92\xa5Emits\x01"], h.now))
    assert h.core.actor_garbage == 2  # the mismatched item and the truncated batch
    assert h.read_all(OWNER) == good


def test_repeated_hello_keepalive_logs_only_changes(h) -> None:  # type: ignore[no-untyped-def]
    h.events.clear()  # the fixture's first Hello was logged
    for _ in range(3):
        h.hello(ALE, ALE_OWNS)
    assert [e for e in h.events if "connected" in e] == []
    h.hello(ALE, (CommandType.VERDICT,))  # a change of ownership is logged again
    assert len([e for e in h.events if "connected" in e]) == 1


# ---- connections decided without a reader ------------------------------------------------------


def test_resolved_ids_leave_the_queue_and_no_later_reader_gets_them() -> None:
    """issue 11: a connection the ALE's verdict timeout decided was handed to the next client
    as its first info."""
    h = Harness()
    h.hello(ALE, ALE_OWNS)
    h.emit(conn(1), conn(2), log("kept"), conn(3))
    h.actor(ALE, Resolved((1, 3, 99)))  # 99: never queued (or read already): ignored
    assert h.core.queue.withdrawn[InfoType.CONNECTION_IPV4] == 2
    h.client(OWNER, wire.OPEN)
    assert h.read_all(OWNER) == [conn(2), log("kept")]
    (reply,) = h.client(OTHER, wire.STATS)
    assert json.loads(reply[2])["infos"]["withdrawn"]["ConnectionIpv4"] == 2


def test_a_resolved_info_a_reader_has_begun_is_finished_not_cut(h: Harness) -> None:
    h.emit(conn(1, payload=100))
    (reply,) = h.client(OWNER, wire.READ, wire.U32.pack(10))
    assert len(reply[2]) == 10
    h.actor(ALE, Resolved((1,)))
    (rest,) = h.client(OWNER, wire.READ, wire.U32.pack(65536))  # the tail still comes
    assert InfoStreamDecoder().feed(reply[2] + rest[2]) == [conn(1, payload=100)]
    assert h.core.queue.withdrawn[InfoType.CONNECTION_IPV4] == 0


def test_no_client_default_refuses_connection_infos_while_no_session_is_open() -> None:
    h = Harness()
    h.core.no_client = NoClient.DEFAULT
    h.hello(ALE, ALE_OWNS)
    h.emit(conn(1), log("a log line waits as ever"))
    assert [(a, type(m), m.id) for a, m in h.actor_out()] == [(ALE, EmitRefused, 1)]
    assert h.events[-1] == "no client session open: connection info 1 refused at once"
    h.client(OWNER, wire.OPEN)
    h.emit(conn(2), conn(3))
    assert h.actor_out() == []  # a session is open: they wait for its reader
    h.client(OWNER, wire.READ, wire.U32.pack(len(conn(2).encode())))
    h.client(OWNER, wire.CLOSE)  # 2 read but unanswered, 3 never read: nobody answers now
    out = h.to_actors
    h.to_actors = []
    assert [(o.actor, [decode(f).id for f in o.frames]) for o in out] == [(ALE, [2, 3])]
    (reply,) = h.client(OTHER, wire.STATS)
    assert json.loads(reply[2])["no_client"] == {"mode": "default", "refused": 3}
    h.client(OWNER, wire.OPEN)
    assert h.read_all(OWNER) == [log("a log line waits as ever")]


def test_no_client_default_after_shutdown_refuses_too(h: Harness) -> None:
    h.core.no_client = NoClient.DEFAULT
    h.write(OWNER, b"\x00")
    h.actor_out()
    h.emit(conn(7))
    assert [(type(m), m.id) for _, m in h.actor_out()] == [(EmitRefused, 7)]


def test_no_client_refusals_are_logged_up_to_a_rate_then_summed_up() -> None:
    h = Harness()
    h.core.no_client = NoClient.DEFAULT
    h.emit(*(conn(i) for i in range(1, 31)))
    assert len(h.actor_out()) == 30
    lines = [e for e in h.events if e.startswith("no client session open")]
    assert len(lines) == PER_WINDOW
    assert h.core.next_deadline_ns() == h.now + 1_000_000_000
    h.run(h.core.on_deadline(h.now + 1_000_000_000))
    assert h.events[-1].startswith(f"no client session open: {30 - PER_WINDOW} more")


def test_no_client_wait_keeps_infos_for_the_next_reader() -> None:
    h = Harness()
    h.emit(conn(1))
    assert h.actor_out() == []
    h.client(OWNER, wire.OPEN)
    assert h.read_all(OWNER) == [conn(1)]


# ---- refused requests reach the broker's log --------------------------------------------------


def test_every_refused_request_gets_a_log_line(h: Harness) -> None:
    h.write(OWNER, b"\x01\x00")
    h.write(OWNER, encode_command(ClearCacheCommand()))  # no actor owns it here
    h.client(OTHER, wire.OPEN)
    h.client(OWNER, b"Z")
    refused = [e for e in h.events if e.startswith("refused:")]
    assert len(refused) == 4, h.events
    assert refused[0].startswith("refused: command Verdict (2 bytes) from client ")
    assert "MALFORMED" in refused[0]
    assert "UNHANDLED no actor handles" in refused[1]
    assert "device busy" in refused[2] and "unknown op" in refused[3]
    h.write(OWNER, verdict(1))
    assert len([e for e in h.events if e.startswith("refused:")]) == 4  # an OK is no news


def test_a_storm_of_bad_writes_is_logged_up_to_a_rate_then_summed_up(h: Harness) -> None:
    for _ in range(100):
        h.write(OWNER, b"\xff")
    assert len([e for e in h.events if e.startswith("refused: command")]) == PER_WINDOW
    h.now += 1_000_000_000
    h.run(h.core.on_deadline(h.now))
    assert h.events[-1].startswith(f"refused: {100 - PER_WINDOW} more request(s) refused")
    assert h.core.next_deadline_ns() is None
