"""The ALE relays the capture's Log lines and Health to the broker unchanged (the capture has
no broker socket), so its loss warnings reach Portmaster and its counters `kextless status`."""

from __future__ import annotations

import time

from kextless.protocol import messages as m
from kextless.protocol.enums import Severity
from tests.actors.ale.test_shell_process import Ale, ale  # noqa: F401  (the fixture)


def test_the_captures_log_and_health_reach_the_broker(ale: Ale) -> None:  # noqa: F811
    warn = m.Log(Severity.WARNING, "capture: divert ringbuf_full rose by 3 (total 3): ...")
    health = m.Health("capture", 4321, {"divert.ringbuf_full": 3.0})
    ale.capture.send(m.encode(warn))
    ale.capture.send(m.encode(health))
    got: list[m.Message] = []
    deadline = time.monotonic() + 5
    while not (warn in got and health in got) and time.monotonic() < deadline:
        got += ale.from_broker_side()  # the ALE's own Hello/Health come every second too
    assert warn in got and health in got
    assert "unexpected" not in ale.log.read_text()
