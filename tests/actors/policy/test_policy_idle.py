"""The embedded policy against a real broker process: idle, its read waits without a
timeout (no read request every half second), and a stop still ends the session at once."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from kextless.actors.policy.main import PolicyRunner
from kextless.actors.policy.rules import Policy
from kextless.broker import wire
from tests.broker.broker_testlib import Broker, start_broker, stop_broker


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = start_broker()
    try:
        yield b
    finally:
        stop_broker(b)
        shutil.rmtree(b.dir, ignore_errors=True)


def _stats(b: Broker) -> dict:  # type: ignore[type-arg]
    s = b.dealer()
    try:
        return json.loads(b.request(s, wire.STATS)[1])  # type: ignore[no-any-return]
    finally:
        s.close(0)


def test_an_idle_policy_parks_one_read_and_a_stop_ends_it_promptly(broker: Broker) -> None:
    runner = PolicyRunner(broker.endpoint, Policy())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not _stats(broker)["session"]["reader_waiting"]:
            assert time.monotonic() < deadline, "the policy never parked a read"
            time.sleep(0.05)
        before = _stats(broker)["reads"]
        time.sleep(2.0)
        after = _stats(broker)["reads"]
        # One read stays parked: no timeouts and no new reads while nothing happens.
        assert after["timeouts"] == before["timeouts"] == 0
        assert after["parked"] == before["parked"]
    finally:
        t0 = time.monotonic()
        runner.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 2.0  # the ticker's 1 s wait at most, then the close
    stats = _stats(broker)
    assert stats["session"]["state"] == "none" and not stats["session"]["reader_waiting"]
    assert stats["reads"]["eof"] >= 1  # the parked read was ended by the close
