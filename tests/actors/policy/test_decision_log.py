"""The embedded policy's decision log: a line per decision while few, counts under a storm
(so logging never costs more than deciding), and nothing lost from the counts."""

from __future__ import annotations

import logging

import pytest

from kextless.actors.policy.main import DecisionLog
from kextless.protocol.enums import Direction, Verdict
from tests.actors.policy.test_rules import v4


def test_few_decisions_get_a_line_each_a_storm_gets_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dl = DecisionLog(per_s=3)
    caplog.set_level(logging.INFO, logger="policy")
    for port in range(1000, 1010):
        verdict = Verdict.PERMANENT_BLOCK if port % 2 else Verdict.PERMANENT_ACCEPT
        dl.decided(v4(Direction.OUTBOUND, 6, "10.0.0.2", port), verdict)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"id=1 pid=0 proto=6 10.0.0.1:40000 -> 10.0.0.2:{p} verdict="
        + ("PermanentBlock" if p % 2 else "PermanentAccept")
        for p in (1000, 1001, 1002)
    ]
    caplog.clear()
    dl.tick()  # the second is over: the rest, counted by verdict
    (summary,) = [r.getMessage() for r in caplog.records]
    assert summary.startswith("7 more decision(s)")
    assert "PermanentAccept=3" in summary and "PermanentBlock=4" in summary
    caplog.clear()
    dl.tick()  # nothing unlogged: no line
    assert caplog.records == []
    dl.decided(v4(Direction.OUTBOUND, 6, "10.0.0.2", 2000), Verdict.PERMANENT_ACCEPT)
    assert [r.getMessage().endswith(":2000 verdict=PermanentAccept") for r in caplog.records] == [
        True
    ]  # a new second: lines again
