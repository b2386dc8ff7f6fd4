"""Fixtures that run a real `kextless run broker` process (helpers in broker_testlib).

`broker` is a fresh process per test. `shared_broker` is one process per module, for tests that
need what only the process adds (framing through the ROUTER, routing ids, socket permissions)
but leave nothing behind: it is checked idle (no session, no waiting read, nothing queued)
before and after every test, so a test that leaks state fails itself, not the next one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from kextless.broker import wire
from tests.broker.broker_testlib import Broker, start_broker, stop_broker


def _running_broker() -> Iterator[Broker]:
    b = start_broker()
    try:
        yield b
    finally:
        stop_broker(b)
        shutil.rmtree(b.dir, ignore_errors=True)


broker = pytest.fixture(_running_broker, name="broker")
_module_broker = pytest.fixture(_running_broker, scope="module", name="_module_broker")


def _assert_idle(b: Broker) -> None:
    assert b.proc.poll() is None, f"the shared broker exited: {b.stderr_text()}"
    s = b.dealer()
    try:
        stats = json.loads(b.request(s, wire.STATS)[1])
    finally:
        s.close(0)
    assert stats["session"]["state"] == "none", stats["session"]
    assert not stats["session"]["reader_waiting"]
    assert stats["queue"]["depth"] == 0 and stats["queue"]["leftover_bytes"] == 0


@pytest.fixture
def shared_broker(_module_broker: Broker) -> Iterator[Broker]:
    _assert_idle(_module_broker)
    yield _module_broker
    _assert_idle(_module_broker)
