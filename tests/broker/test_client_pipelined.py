"""KextClient.write_many against a real broker: N writes pipelined on one socket reach the
owning actor in order, each with its own result, and a bad one does not take the others."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from kextless.actors.ale.shell import OWNED_COMMANDS
from kextless.broker.client import KextClient, KextError
from kextless.protocol.commands import VerdictCommand, decode_command, encode_command
from kextless.protocol.enums import Verdict
from kextless.protocol.messages import Command
from tests.broker.broker_testlib import Broker, FakeActor, conn, start_broker, stop_broker


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = start_broker()
    try:
        yield b
    finally:
        stop_broker(b)
        shutil.rmtree(b.dir, ignore_errors=True)


def test_pipelined_verdicts_arrive_in_order_each_with_its_result(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", OWNED_COMMANDS)
    with KextClient(broker.endpoint) as k:
        ale.emit(*[conn(i) for i in range(1, 41)], batch=True)
        got = []
        while len(got) < 40:
            got.append(k.recv_info(timeout=5))
            got += k.take_read()  # the rest of that read, without another request
        assert [x.id for x in got] == list(range(1, 41))  # type: ignore[union-attr]
        verdicts = [(x.id, Verdict.ACCEPT if x.id % 2 else Verdict.BLOCK) for x in got]  # type: ignore[union-attr]
        t0 = time.monotonic()
        assert k.send_verdicts(verdicts) == [None] * 40
        elapsed = time.monotonic() - t0
        seen = []
        while len(seen) < 40:
            msg = ale.recv()
            assert isinstance(msg, Command)
            cmd = decode_command(msg.raw)
            assert isinstance(cmd, VerdictCommand)
            seen.append((cmd.id, cmd.verdict))
        assert seen == verdicts
        assert elapsed < 5.0
        # A command the broker refuses gets its error; those around it still go through.
        bad = b"\xff"  # no such command type
        good = encode_command(VerdictCommand(41, Verdict.ACCEPT))
        res = k.write_many([good, bad, good])
        assert res[0] is None and res[2] is None and isinstance(res[1], KextError)
        assert [decode_command(ale.recv().raw).id for _ in range(2)] == [41, 41]  # type: ignore[union-attr]
    ale.close()
