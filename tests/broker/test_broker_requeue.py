"""Issue 12 fault 1 (a client killed mid-decision): connection infos a session read but never
answered go back to the front of the queue when that session ends without Shutdown, so the
next session is asked about them at once instead of each waiting the ALE's verdict timeout."""

from __future__ import annotations

import json

from kextless.broker import wire
from kextless.protocol.infos import ConnectionIpv4
from kextless.protocol.messages import Resolved
from tests.broker.broker_testlib import conn, log
from tests.broker.test_broker_core import ALE, OTHER, OWNER, Harness, h, verdict

__all__ = ["h"]  # the fixture


def ids(h: Harness, peer: bytes = OWNER) -> list[int]:
    return [i.id for i in h.read_all(peer) if isinstance(i, ConnectionIpv4)]


def test_a_killed_sessions_unanswered_infos_are_asked_first_of_the_next(h: Harness) -> None:
    h.emit(conn(1), conn(2), conn(3))
    assert ids(h) == [1, 2, 3]
    assert h.write(OWNER, verdict(2)) == b"\x00"  # 1 and 3 stay unanswered
    h.emit(conn(4))
    h.run(h.core.peer_gone(OWNER))  # the client was SIGKILLed
    assert any("2 connection info(s) read but not answered queued again" in e for e in h.events)
    assert h.client(OTHER, wire.OPEN) == [[OTHER, wire.OPEN]]
    assert ids(h, OTHER) == [1, 3, 4]  # in the order first read, ahead of what waited
    (reply,) = h.client(OTHER, wire.STATS)
    assert json.loads(reply[2])["infos"]["requeued"]["ConnectionIpv4"] == 2


def test_a_close_without_shutdown_requeues_too_and_answers_are_never_requeued(
    h: Harness,
) -> None:
    h.emit(conn(1), conn(2))
    assert ids(h) == [1, 2]
    h.write(OWNER, verdict(1))
    h.write(OWNER, verdict(2))
    h.client(OWNER, wire.CLOSE)
    h.client(OWNER, wire.OPEN)
    assert ids(h) == []


def test_one_decided_by_the_verdict_timeout_meanwhile_is_not_asked_again(h: Harness) -> None:
    h.emit(conn(1), conn(2))
    assert ids(h) == [1, 2]
    h.actor(ALE, Resolved((1,)))  # the ALE's verdict timeout decided it
    h.run(h.core.peer_gone(OWNER))
    h.client(OTHER, wire.OPEN)
    assert ids(h, OTHER) == [2]


def test_shutdown_requeues_nothing(h: Harness) -> None:
    h.emit(conn(1))
    assert ids(h) == [1]
    h.write(OWNER, b"\x00")  # Shutdown: the ALE blocks every pending id itself
    h.client(OWNER, wire.CLOSE)
    h.client(OWNER, wire.OPEN)
    assert ids(h) == []


def test_requeued_infos_go_ahead_of_a_rewound_partial_info(h: Harness) -> None:
    one, two = conn(1).encode(), conn(2).encode()
    h.emit(conn(1), conn(2))
    (reply,) = h.client(OWNER, wire.READ, wire.U32.pack(len(one) + 10))
    assert reply[2] == one + two[:10]  # 1 whole, 2 begun
    h.run(h.core.peer_gone(OWNER))
    h.client(OTHER, wire.OPEN)
    assert ids(h, OTHER) == [1, 2]  # 1 again, then 2 whole from its start


def test_an_undeliverable_read_is_not_requeued_twice(h: Harness) -> None:
    h.emit(conn(1))
    (_reply,) = h.client(OWNER, wire.READ, wire.U32.pack(4096))
    h.run(h.core.read_undeliverable(OWNER))  # the reply never left: 1 is back in the queue
    h.run(h.core.peer_gone(OWNER))
    h.client(OTHER, wire.OPEN)
    assert ids(h, OTHER) == [1]


def test_log_infos_are_not_requeued(h: Harness) -> None:
    h.emit(log("a line"), conn(1))
    assert len(h.read_all(OWNER)) == 2
    h.run(h.core.peer_gone(OWNER))
    h.client(OTHER, wire.OPEN)
    assert [type(i).__name__ for i in h.read_all(OTHER)] == ["ConnectionIpv4"]
