"""Issue 12 fault 1: nothing the ALE decided or issued is lost when it or the broker restarts.

* a restarted broker: the core emits again, same ids and in order, the pending infos that may
  have died in the old broker's queue, and nothing else;
* a restarted ALE: its decided connections come back from the journal (journal.py), so an
  Update or an end for a connection decided before the kill still works;
* answers to unknown ids (never issued, answered twice, timed out) reach ale.log, rate-limited.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kextless.actors.ale import journal as jmod
from kextless.actors.ale.core import AleCore, Connection
from kextless.actors.ale.journal import Journal, encode_changes, encode_header, replay
from kextless.base.linebudget import PER_WINDOW
from kextless.protocol import messages as m
from kextless.protocol.commands import (
    CleanEndedConnectionsCommand,
    ClearCacheCommand,
    UpdateV4Command,
    VerdictCommand,
)
from kextless.protocol.enums import Direction, Verdict
from tests.actors.ale.test_core import L4, R4, TCP4, UDP6, capture, held, notes

S = 1_000_000_000
OWNER = "boot/1/100"


def flow(port: int) -> m.Flow:
    return m.Flow(6, L4, port, R4, 443)


def emit_ids(out: list[object]) -> list[int]:
    return [x.id for x in out if isinstance(x, m.Emit)]


# ---- a restarted broker ------------------------------------------------------------------


def test_broker_back_emits_again_only_what_was_pending_when_it_was_lost() -> None:
    core = AleCore()
    first = [core.packet_held(held(i, flow(1000 + i)), 0)[0] for i in range(4)]
    core.command(VerdictCommand(2, Verdict.PERMANENT_ACCEPT), 0)  # answered: not again
    assert core.broker_back(0) == []  # never lost: nothing to emit again
    core.broker_lost(1)
    later = core.packet_held(held(9, flow(2000)), 2)  # waits in the socket for the new broker
    out = core.broker_back(3)
    assert emit_ids(out) == [1, 3, 4]  # same ids, in order
    assert [x for x in out if isinstance(x, m.Emit)] == [first[0], first[2], first[3]]
    assert emit_ids(later) == [5] and 5 not in emit_ids(out)
    assert notes(out) == ["broker back: emitted 3 pending connection info(s) again (ids 1..4)"]
    assert core.broker_back(4) == []  # once per loss
    core.broker_lost(5)
    assert emit_ids(core.broker_back(6)) == [1, 3, 4, 5]
    assert core.health()["reemitted"] == 7


def test_an_id_timed_out_while_the_broker_was_gone_is_not_emitted_again() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.broker_lost(1)
    core.on_deadline(core.config.verdict_timeout_ns + 1)
    assert core.broker_back(core.config.verdict_timeout_ns + 2) == []


# ---- the journal -------------------------------------------------------------------------


def journal_bytes(core: AleCore) -> bytes:
    cleared, changes = core.take_journal()
    return encode_changes(cleared, changes)


def test_decided_connections_round_trip_through_the_journal() -> None:
    core = AleCore()
    data = encode_header(OWNER)
    core.packet_held(held(1, TCP4, pid=77), 0)
    core.packet_held(held(2, UDP6, Direction.INBOUND), 0)
    core.packet_held(held(3, flow(3000)), 0)
    assert journal_bytes(core) == b""  # undecided connections are never journaled
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    core.command(VerdictCommand(2, Verdict.BLOCK), 0)
    data += journal_bytes(core)
    assert journal_bytes(core) == b""  # taken once
    core.connection_ended(m.ConnectionEnded(UDP6, Direction.INBOUND, 0, 0), 5 * S)
    data += journal_bytes(core)
    restored = replay(data, OWNER)
    assert restored.skipped == 0 and restored.dropped == ""
    assert restored.connections == {
        TCP4: Connection(Verdict.PERMANENT_ACCEPT, 77, Direction.OUTBOUND, 0),
        UDP6: Connection(Verdict.BLOCK, 0, Direction.INBOUND, 0, 5 * S),
    }
    # A new process: an Update for a connection decided before the restart takes effect.
    new = AleCore(first_id=4097)
    new.restore(restored.connections, 9 * S)
    update = UpdateV4Command(6, L4, 40000, R4, 443, Verdict.PERMANENT_BLOCK)
    assert new.command(update, 9 * S) == [m.CacheSet(TCP4, Verdict.PERMANENT_BLOCK)]
    assert new.counters["updates_unknown"] == 0 and new.health()["restored"] == 2
    # ... and the change is journaled in turn.
    again = replay(encode_header(OWNER) + journal_bytes(new), OWNER).connections
    assert again[TCP4].verdict == Verdict.PERMANENT_BLOCK and again[TCP4].process_id == 77


def test_forgotten_and_cleared_connections_leave_the_journal() -> None:
    core = AleCore()
    core.packet_held(held(1, TCP4), 0)
    core.packet_held(held(2, flow(5000)), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    core.command(VerdictCommand(2, Verdict.PERMANENT_DROP), 0)
    data = encode_header(OWNER) + journal_bytes(core)
    core.connection_ended(m.ConnectionEnded(TCP4, Direction.OUTBOUND, 0, 0), 1)
    core.command(CleanEndedConnectionsCommand(), core.config.ended_grace_ns + 2)
    data += journal_bytes(core)
    assert set(replay(data, OWNER).connections) == {flow(5000)}
    core.command(ClearCacheCommand(), 0)
    core.packet_held(held(3, flow(6000)), 0)
    core.command(VerdictCommand(3, Verdict.PERMANENT_ACCEPT), 0)
    data += journal_bytes(core)
    assert set(replay(data, OWNER).connections) == {flow(6000)}


def test_a_journal_of_another_instance_or_damaged_lines_are_not_trusted() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    body = journal_bytes(core)
    other = replay(encode_header("boot/2/200") + body, OWNER)
    assert other.connections == {} and "another instance" in other.dropped
    assert replay(body, OWNER).dropped == "no journal header"
    torn = encode_header(OWNER) + body + body[:20]  # killed mid-write
    assert replay(torn, OWNER).connections.keys() == {TCP4}
    bad = encode_header(OWNER) + b"nonsense\n" + b'["set",[6,"AAA=",1,"AAA=",2],3,0,0,0]\n' + body
    got = replay(bad, OWNER)
    assert got.skipped == 2 and got.connections.keys() == {TCP4}
    assert replay(b"", OWNER).connections == {}


def test_the_journal_file_is_compacted_on_load_and_when_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / jmod.FILE_NAME
    core = AleCore()
    j = Journal(path, OWNER)
    assert j.load() == {}
    monkeypatch.setattr(jmod, "COMPACT_SLACK", 10)
    for i in range(30):  # one connection whose verdict flips 30 times: 30 records, 1 live
        core.packet_held(held(i, TCP4), 0)
        verdict = Verdict.BLOCK if i % 2 else Verdict.ACCEPT
        core.command(VerdictCommand(i + 1, verdict), 0)
        cleared, changes = core.take_journal()
        j.append(cleared, changes, core.connection_cache)
    lines = path.read_bytes().splitlines()
    assert len(lines) < 1 + 2 + 10 + 2  # compacted while running
    j.close()
    j2 = Journal(path, OWNER)
    assert j2.load() == {TCP4: Connection(Verdict.BLOCK, 0, Direction.OUTBOUND, 0)}
    assert len(path.read_bytes().splitlines()) == 2  # header + the one live entry
    j2.close()


# ---- answers to unknown ids --------------------------------------------------------------


def test_answers_to_unknown_ids_reach_the_log_file_up_to_a_rate() -> None:
    core = AleCore()
    core.packet_held(held(1), 0)
    core.command(VerdictCommand(1, Verdict.PERMANENT_ACCEPT), 0)
    out = core.command(VerdictCommand(1, Verdict.PERMANENT_BLOCK), 0)  # answered twice
    assert capture(out) == []  # the first answer holds
    assert notes(out) == [
        "verdict PermanentBlock for invalid id 1 ignored (never issued, already answered or "
        "timed out)"
    ]
    for i in range(30):
        core.command(VerdictCommand(1000 + i, Verdict.ACCEPT), 0)
    assert core.next_deadline_ns() == S
    out = core.on_deadline(S)
    assert notes(out) == [
        f"invalid id: {30 - PER_WINDOW + 1} more verdict(s) for invalid ids within a second "
        "ignored (not logged one by one; counter verdicts_unknown_id)"
    ]
    assert core.counters["verdicts_unknown_id"] == 31
