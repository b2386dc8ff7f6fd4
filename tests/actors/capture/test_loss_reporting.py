"""The capture shell turns a rising divert loss counter into a Warning Log and a Health with
the total and its last-rise time, both sent to the ALE (which relays them to the broker). A
stand-in handle whose stats the test sets; no network, no eBPF."""

from __future__ import annotations

import time

import pytest

from kextless.actors.capture import shell as shell_mod
from kextless.protocol.enums import Severity, Verdict
from kextless.protocol.messages import Health, Log
from tests.actors.capture.test_shell import FakeHandle, running


def test_a_rising_counter_is_one_warning_and_shows_in_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stats = {"ringbuf_full": 0, "queue_full": 0}
    monkeypatch.setattr(FakeHandle, "stats", lambda _self: dict(stats))
    monkeypatch.setattr(shell_mod, "_STATS_NS", 50_000_000)
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (_shell, _handle, ale):

        def healths() -> list[Health]:
            return [m for m in list(ale.received) if isinstance(m, Health)]

        def warnings() -> list[Log]:
            return [m for m in list(ale.received) if isinstance(m, Log)]

        assert ale.wait_for(lambda: bool(healths()), 2)
        first = healths()[-1].counters
        assert (
            first["divert.ringbuf_full"] == 0 and first["divert.ringbuf_full.last_rise_unix"] == 0
        )
        assert warnings() == []
        before = time.time()
        stats["ringbuf_full"] = 9
        assert ale.wait_for(lambda: healths()[-1].counters["divert.ringbuf_full"] == 9, 2)
        (warn,) = warnings()
        assert warn.severity is Severity.WARNING
        assert "ringbuf_full rose by 9 (total 9): packets passed UNEXAMINED" in warn.line
        h = healths()[-1]
        assert h.actor == "capture" and h.pid > 0
        assert before <= h.counters["divert.ringbuf_full.last_rise_unix"] <= time.time()
        # Steady counter: more Health, no more warnings.
        n = len(healths())
        assert ale.wait_for(lambda: len(healths()) >= n + 2, 2)
        assert len(warnings()) == 1
