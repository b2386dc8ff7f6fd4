"""A Health relayed by another actor (the capture's, through the ALE) is filed under its own
name in S, and never overwrites the relaying actor's counters."""

from __future__ import annotations

import json

from kextless.broker import wire
from kextless.broker.core import MAX_ACTORS
from kextless.protocol.messages import Health
from tests.broker.test_broker_core import ALE, ALE_OWNS, OTHER, Harness


def stats(h: Harness) -> dict:
    (reply,) = h.client(OTHER, wire.STATS)
    return json.loads(reply[2])


def test_the_captures_health_via_the_ale_shows_as_its_own_actor() -> None:
    h = Harness()
    h.hello(ALE, ALE_OWNS)
    h.actor(ALE, Health("ale", 77, {"pending": 3, "connections": 41}))
    h.now += 2_000_000_000
    h.actor(ALE, Health("capture", 88, {"divert.ringbuf_full": 5.0, "packets": 9.0}))
    s = stats(h)
    assert s["pending_verdicts"] == 3 and s["connections_tracked"] == 41  # the ALE's, intact
    assert s["actors"]["ale"]["pid"] == 77
    cap = s["actors"]["capture"]
    assert cap["pid"] == 88 and cap["relayed"] is True
    assert cap["counters"] == {"divert.ringbuf_full": 5.0, "packets": 9.0}
    h.now += 1_500_000_000
    assert stats(h)["actors"]["capture"]["last_seen_s_ago"] == 1.5
    # A newer Health replaces the older one.
    h.actor(ALE, Health("capture", 88, {"divert.ringbuf_full": 6.0}))
    assert stats(h)["actors"]["capture"]["counters"] == {"divert.ringbuf_full": 6.0}


def test_relayed_names_are_bounded() -> None:
    h = Harness()
    h.hello(ALE, ALE_OWNS)
    for i in range(MAX_ACTORS + 10):
        h.now += 1
        h.actor(ALE, Health(f"x{i}", i, {}))
    assert len(h.core.relayed) == MAX_ACTORS
    assert "x0" not in h.core.relayed and f"x{MAX_ACTORS + 9}" in h.core.relayed
