"""A hypothesis state machine against a real broker process: sessions opened and closed from
several sockets, reads, valid / truncated / oversized / unknown-verdict commands, raw multipart
noise, and hostile frames on the actors socket, in any order.

Beyond tests/broker/test_broker_fuzz.py (random requests, one seed): it checks what each reply
means. A write is refused with status 1 exactly when the kext codec rejects the bytes, and the
decision actor receives exactly the accepted commands, byte for byte, in order (a malformed
write changes nothing); every request is answered; the broker lives and its RSS stays bounded.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kextless.broker import wire
from kextless.protocol import messages as m
from kextless.protocol.commands import decode_command
from kextless.protocol.enums import CommandType
from kextless.protocol.errors import ProtocolError
from tests.broker.broker_testlib import Broker, FakeActor, conn, start_broker, stop_broker

pytestmark = pytest.mark.slow

REPLIES = {b"O", b"C", b"R", b"W", b"V", b"S", b"E", b"T", b"X"}
ALE_OWNS = (
    CommandType.SHUTDOWN,
    CommandType.VERDICT,
    CommandType.UPDATE_V4,
    CommandType.UPDATE_V6,
    CommandType.CLEAR_CACHE,
)

u8 = st.integers(0, 255)
verdict_values = st.integers(0, 12)  # 9..12 are unknown: malformed


def _with_verdict(type_byte: int, size: int) -> st.SearchStrategy[bytes]:
    body = st.binary(min_size=size, max_size=size)
    return st.builds(lambda b, v: bytes([type_byte]) + b + bytes([v]), body, verdict_values)


valid_commands = st.one_of(
    _with_verdict(1, 8),  # Verdict: any id, known or not
    _with_verdict(2, 13),  # UpdateV4
    _with_verdict(3, 37),  # UpdateV6
    st.sampled_from([b"\x00", b"\x04", b"\x05", b"\x06", b"\x07", b"\x08"]),
)
commands = st.one_of(
    valid_commands,  # includes unknown verdict values 9..12 and any id: the ALE's to judge
    valid_commands.flatmap(lambda c: st.integers(0, len(c) - 1).map(lambda n: c[:n])),  # short
    valid_commands.flatmap(lambda c: st.binary(min_size=1, max_size=8).map(lambda x: c + x)),
    st.builds(lambda t, rest: bytes([t]) + rest, u8, st.binary(max_size=40)),
    st.sampled_from([b"\x01" * 1000, b"\x05" + bytes(60000)]),  # long, under the frame limit
)
CLEAR = m.encode(m.CacheClear())
#: The client socket's ZMQ_MAXMSGSIZE (broker/server.py): a bigger message drops the connection.
CLIENT_MAX_MSG = 64 * 1024
frames = st.lists(st.binary(max_size=12) | st.sampled_from([b"R", b"W", b"O", b"C"]), max_size=6)


class Endpoint(RuleBasedStateMachine):
    broker: Broker

    def __init__(self) -> None:
        super().__init__()
        b = self.broker
        self.socks = [b.dealer() for _ in range(3)]
        self.ale = FakeActor(b, "ale", ALE_OWNS)
        self.expected: list[bytes] = []  # commands the ALE must receive, in order

    def ask(self, i: int, *req: bytes) -> list[bytes]:
        s = self.socks[i]
        s.send_multipart(list(req))
        assert s.poll(5000), f"no reply to {[f[:20] for f in req]!r}"
        reply = s.recv_multipart()
        assert reply and reply[0] in REPLIES, reply
        if reply[0] == wire.ERROR:
            assert len(reply) == 2 and reply[1].decode()
        return reply

    @rule(i=st.integers(0, 2))
    def open(self, i: int) -> None:
        assert self.ask(i, wire.OPEN)[0] in (wire.OPEN, wire.ERROR)

    @rule(i=st.integers(0, 2))
    def close(self, i: int) -> None:
        assert self.ask(i, wire.CLOSE)[0] in (wire.CLOSE, wire.ERROR)

    @rule(i=st.integers(0, 2), size=st.sampled_from([1, 5, 6, 64, 4096, 1 << 24, 0, 1 << 25]))
    def read(self, i: int, size: int) -> None:
        reply = self.ask(i, wire.READ, wire.U32.pack(size), wire.U32.pack(2))
        if reply[0] == wire.READ:
            assert len(reply) == 2 and 1 <= len(reply[1]) <= size
        else:
            assert reply[0] in (wire.TIMEOUT, wire.EOF, wire.ERROR)
            assert reply[0] == wire.ERROR or len(reply) == 1

    @rule(i=st.integers(0, 2), cmd=commands)
    def write(self, i: int, cmd: bytes) -> None:
        reply = self.ask(i, wire.WRITE, cmd)
        if reply[0] == wire.ERROR:
            assert b"no open session" in reply[1]
            return
        assert reply[0] == wire.WRITE and len(reply) == 2 and reply[1]
        try:
            decoded = decode_command(cmd)
        except ProtocolError as exc:
            assert reply[1][0] == wire.Status.MALFORMED, (cmd[:20], reply)
            assert str(exc).encode() in reply[1]
            return
        assert reply[1][:1] == bytes([wire.Status.OK]), (cmd, reply)
        if decoded.TYPE in ALE_OWNS:
            self.expected.append(cmd)

    @rule(i=st.integers(0, 2), req=frames)
    def noise(self, i: int, req: list[bytes]) -> None:
        if req:
            self.ask(i, *req)
        else:  # an empty multipart cannot be sent; an empty frame can
            self.ask(i, b"")

    @rule(i=st.integers(0, 2), size=st.sampled_from([CLIENT_MAX_MSG, 1 << 20, 4 << 20]))
    def oversized(self, i: int, size: int) -> None:
        """Past the frame limit libzmq drops the connection: no reply, the broker carries on
        (if that socket owned the session, the session ends as if the client had crashed)."""
        s = self.socks[i]
        s.send_multipart([wire.WRITE, b"\x05" + bytes(size)])
        assert not s.poll(300), "an oversized message was answered"
        s.close(0)
        self.socks[i] = self.broker.dealer()
        assert self.ask(i, wire.VERSION)[0] == wire.VERSION

    @rule(i=st.integers(0, 2), op=st.sampled_from([wire.VERSION, wire.STATS]))
    def query(self, i: int, op: bytes) -> None:
        reply = self.ask(i, op)
        assert reply[0] == op
        if op == wire.STATS:
            json.loads(reply[1])

    @rule(n=st.integers(1, 20), payload=st.integers(0, 3000))
    def emit(self, n: int, payload: int) -> None:
        self.ale.emit(*(conn(k + 1, payload) for k in range(n)), batch=n > 1)

    @rule(
        frame=st.one_of(
            st.binary(max_size=60),
            st.integers(400, 3000).map(lambda d: b"\x92\xa6Bundle\x91" * d + CLEAR),
            st.just(b"\x93\xa3Log\x03\xa3ab\xff"),
        )
    )  # fmt: skip
    def actor_garbage(self, frame: bytes) -> None:
        self.ale.sock.send(frame)

    @precondition(lambda self: bool(self.expected))
    @rule()
    def commands_arrive(self) -> None:
        """The ALE gets exactly the accepted commands, in order, and nothing else."""
        while self.expected:
            msg = self.ale.recv(timeout=5)
            if isinstance(msg, m.Command):
                assert msg.raw == self.expected.pop(0), (msg, self.expected[:1])

    @invariant()
    def alive(self) -> None:
        assert self.broker.proc.poll() is None, self.broker.stderr_text()[-2000:]

    def teardown(self) -> None:
        self.commands_arrive() if self.expected else None
        for s in self.socks:
            s.close(0)
        self.ale.close()


def test_endpoint_state_machine_answers_everything_and_stays_bounded() -> None:
    b = start_broker(["--queue-bytes", "262144"])
    try:
        Endpoint.broker = b
        run = Endpoint.TestCase
        run.settings = settings(
            max_examples=15,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        run().runTest()  # warm-up: queue, ring and allocator reach their steady state
        before = b.rss_kib()
        run().runTest()
        after = b.rss_kib()
        assert after - before < 4096, f"RSS grew from {before} to {after} KiB"
        s = b.dealer()
        assert b.request(s, wire.VERSION)[0] == wire.VERSION
        stats = json.loads(b.request(s, wire.STATS)[1])
        assert stats["actor_garbage"] > 0  # the hostile actor frames were counted, not fatal
        s.close(0)
        assert b.proc.poll() is None
    finally:
        assert stop_broker(b) == 0
