"""A real `kextless run ale` between a fake broker and a fake capture: the shell's wiring of
the core's deadline (no fixed tick), its Emits and Bundle batching and its keepalive.

The core tests cover what is decided; these cover what only the shell does: sleeping until the
held packet's verdict timeout, routing messages by type to the right socket, and stopping at
once on SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from kextless.protocol import messages as m
from kextless.protocol.enums import CommandType, Direction, Verdict
from tests.entry import KEXTLESS

REPO = Path(__file__).resolve().parents[3]
TIMEOUT_S = 0.5
FLOW = m.Flow(6, bytes([10, 0, 0, 1]), 40000, bytes([10, 0, 0, 2]), 443)
PKT = b"\x45" + bytes(39)


@dataclass
class Ale:
    proc: subprocess.Popen[bytes]
    broker: zmq.Socket[bytes]  # ROUTER standing in for the broker's actors socket
    capture: zmq.Socket[bytes]  # DEALER standing in for the capture actor
    log: Path
    #: Messages of a capture-bound frame not yet looked at (a Bundle carries several).
    pending: deque[m.Message] = field(default_factory=deque)
    #: Capture-bound frames received, and how many of them were Bundles.
    capture_frames: int = 0
    capture_bundles: int = 0

    def from_broker_side(self, timeout: float = 5.0) -> list[m.Message]:
        """The next multipart message the ALE sent the broker, decoded (identity dropped)."""
        assert self.broker.poll(int(timeout * 1000)), "the ALE sent the broker nothing"
        ident, *frames = self.broker.recv_multipart()
        assert ident == b"ale"
        return [m.decode(f) for f in frames]

    def broker_messages_until(self, kind: type, timeout: float = 5.0) -> list[m.Message]:
        out: list[m.Message] = []
        deadline = time.monotonic() + timeout
        while not any(isinstance(msg, kind) for msg in out):
            out += self.from_broker_side(max(0.0, deadline - time.monotonic()))
        return out

    def hold(self, hold_id: int, port: int = 40000) -> None:
        flow = m.Flow(6, FLOW.local_ip, port, FLOW.remote_ip, 443)
        self.capture.send(m.encode(m.PacketHeld(hold_id, flow, Direction.OUTBOUND, PKT, 0)))

    def from_capture_side(self, timeout: float = 5.0) -> m.Message:
        if not self.pending:
            assert self.capture.poll(int(timeout * 1000)), "the ALE sent the capture nothing"
            msg = m.decode(self.capture.recv())
            self.capture_frames += 1
            self.capture_bundles += isinstance(msg, m.Bundle)
            self.pending.extend(m.unbundle(msg))
        return self.pending.popleft()


@pytest.fixture
def ale(tmp_path: Path) -> Iterator[Ale]:
    ctx = zmq.Context.instance()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(f"ipc://{run}/actors.sock")
    log = tmp_path / "ale.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *KEXTLESS,
                "run",
                "ale",
                "--run-dir",
                str(run),
                "--verdict-timeout",
                str(TIMEOUT_S),
                "--default-verdict",
                "Drop",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    capture = ctx.socket(zmq.DEALER)
    capture.setsockopt(zmq.LINGER, 0)
    capture.connect(f"ipc://{run}/ale.sock")
    a = Ale(proc, broker, capture, log)
    try:
        first = a.broker_messages_until(m.Health, timeout=10)
        assert isinstance(first[0], m.Hello) and first[0].owns[0] == CommandType.VERDICT
        yield a
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()  # only the PID this fixture started
                proc.wait(5)
        capture.close(0)
        broker.close(0)


def test_a_held_packet_gets_the_default_verdict_at_its_timeout(ale: Ale) -> None:
    t0 = time.monotonic()
    ale.hold(7)
    (emit,) = [msg for msg in ale.broker_messages_until(m.Emit) if isinstance(msg, m.Emit)]
    assert emit.id >= 1
    assert not ale.capture.poll(int(TIMEOUT_S * 1000 * 0.8)), "answered before its timeout"
    assert ale.from_capture_side() == m.CacheSet(
        FLOW, Verdict.DROP
    ) and ale.from_capture_side() == m.Decision((7,), Verdict.DROP)
    waited = time.monotonic() - t0
    assert TIMEOUT_S * 0.9 < waited < TIMEOUT_S + 0.5, waited
    # The timeout's Log line goes to the broker, not to the capture.
    msgs = ale.broker_messages_until(m.Log)
    assert any(isinstance(x, m.Log) and "verdict timeout" in x.line for x in msgs)


def test_a_burst_of_events_reaches_the_broker_batched(ale: Ale) -> None:
    n = 300
    for i in range(n):
        ale.hold(i, port=1000 + i)
    ids: list[int] = []
    batches = 0
    deadline = time.monotonic() + 10
    while len(ids) < n:
        for msg in ale.from_broker_side(max(0.0, deadline - time.monotonic())):
            if isinstance(msg, m.Emits):
                batches += 1
                ids += [e.id for e in msg.emits]
            elif isinstance(msg, m.Emit):
                batches += 1
                ids.append(msg.id)
    assert ids == sorted(ids) and len(set(ids)) == n
    assert batches < n  # one Emits per loop pass, not one message per event


def test_a_burst_of_verdicts_reaches_the_capture_bundled_in_order(ale: Ale) -> None:
    n = 200
    for i in range(n):
        ale.hold(i, port=1000 + i)
    # Each held packet of a new flow times out (no broker answers): CacheSet then Decision.
    got: list[m.Message] = []
    deadline = time.monotonic() + 10
    while len(got) < 2 * n:
        got.append(ale.from_capture_side(max(0.1, deadline - time.monotonic())))
    decided = [d.hold_ids for d in got if isinstance(d, m.Decision)]
    assert [h for ids in decided for h in ids] == list(range(n))  # every one, in order
    for i, msg in enumerate(got):  # each flow's CacheSet comes before its Decision
        if isinstance(msg, m.Decision):
            assert isinstance(got[i - 1], m.CacheSet)
    assert ale.capture_bundles >= 1 and ale.capture_frames < n  # not one frame per message


def test_health_keeps_its_cadence_and_sigterm_stops_at_once(ale: Ale) -> None:
    # Nothing is held, so the only deadline is the keepalive: Hello + Health about every 1 s.
    t0 = time.monotonic()
    msgs = ale.broker_messages_until(m.Health, timeout=3)
    assert any(isinstance(x, m.Hello) for x in msgs)
    assert 0.5 < time.monotonic() - t0 < 1.6
    health = next(x for x in msgs if isinstance(x, m.Health))
    assert health.counters["pending"] == 0 and health.actor == "ale"
    t0 = time.monotonic()
    ale.proc.send_signal(signal.SIGTERM)
    assert ale.proc.wait(5) == 0
    assert time.monotonic() - t0 < 0.8  # the signal wakes the poll; no waiting for a timeout
    assert "stopping: 0 packet(s) still pending" in ale.log.read_text()
