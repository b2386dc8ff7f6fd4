"""The divert loss counters: totals across handle swaps, the time each last rose, and one
Warning LogLine per rise (actors/capture/counters.py)."""

from __future__ import annotations

from kextless.actors.capture.counters import LAST_RISE, LOSS_COUNTERS, PREFIX, LossCounters
from kextless.protocol.enums import Severity
from kextless.protocol.messages import Health, Log, decode, encode

ZERO = dict.fromkeys(("diverted", "dropped", "sniffed", *LOSS_COUNTERS), 0)


def test_a_quiet_handle_warns_nothing_and_reports_never() -> None:
    c = LossCounters()
    assert c.observe(ZERO | {"diverted": 500}, 100.0) == []
    h = c.health(7)
    assert h.actor == "capture" and h.pid == 7
    for key in LOSS_COUNTERS:
        assert h.counters[PREFIX + key] == 0.0
        assert h.counters[PREFIX + key + LAST_RISE] == 0.0


def test_each_rise_is_one_warning_with_its_time() -> None:
    c = LossCounters()
    assert c.observe(ZERO, 100.0) == []
    logs = c.observe(ZERO | {"ringbuf_full": 12}, 105.0)
    assert logs == [
        Log(
            Severity.WARNING,
            "capture: divert ringbuf_full rose by 12 (total 12): packets passed UNEXAMINED "
            "(eBPF ring buffer full)",
        )
    ]
    # No further rise: no warning, the time stays that of the rise.
    assert c.observe(ZERO | {"ringbuf_full": 12}, 110.0) == []
    both = c.observe(ZERO | {"ringbuf_full": 15, "queue_full": 2}, 115.0)
    assert [(x.severity, x.line.split(" rose")[0]) for x in both] == [
        (Severity.WARNING, "capture: divert ringbuf_full"),
        (Severity.WARNING, "capture: divert queue_full"),
    ]
    h = c.health(1).counters
    assert h["divert.ringbuf_full"] == 15 and h["divert.ringbuf_full.last_rise_unix"] == 115.0
    assert h["divert.queue_full"] == 2 and h["divert.queue_full.last_rise_unix"] == 115.0
    assert h["divert.too_big"] == 0 and h["divert.too_big.last_rise_unix"] == 0.0


def test_totals_survive_a_handle_swap() -> None:
    """A new handle counts from zero: its first 3 are 3 more, not a drop from 40 to 3."""
    c = LossCounters()
    c.observe(ZERO | {"queue_full": 40}, 1.0)
    c.new_handle()
    (log,) = c.observe(ZERO | {"queue_full": 3}, 2.0)
    assert "rose by 3 (total 43)" in log.line
    assert c.totals["queue_full"] == 43
    # A counter that went backwards without new_handle (a swap we missed) is a restart too.
    (again,) = c.observe(ZERO | {"queue_full": 1}, 3.0)
    assert "rose by 1 (total 44)" in again.line


def test_garbage_stats_are_skipped_not_fatal() -> None:
    c = LossCounters()
    assert c.observe({"ringbuf_full": "lots", "queue_full": None}, 1.0) == []  # type: ignore[dict-item]
    assert c.totals == dict.fromkeys(LOSS_COUNTERS, 0)


def test_health_carries_the_core_counters_and_round_trips() -> None:
    c = LossCounters()
    c.observe(ZERO | {"too_big": 1}, 9.5)
    h = c.health(3, {"packets": 10, "held": 2})
    back = decode(encode(h))
    assert isinstance(back, Health) and back == h
    assert back.counters["packets"] == 10 and back.counters["divert.too_big"] == 1


def test_guard_drops_warn_once_per_rise_and_reach_health_beside_the_cache_counters() -> None:
    from kextless.actors.capture.counters import GUARD_DROPPED, KERNEL_PREFIX

    c = LossCounters()
    # The first reading of an adopted guard reports what it dropped while nobody captured.
    logs = c.observe_kernel(40, {"passed": 1000, "missed": 3}, 200.0)
    assert [x.severity for x in logs] == [Severity.WARNING]
    assert logs[0].line.startswith("capture: guard_dropped rose by 40 (total 40)")
    assert c.observe_kernel(40, {"passed": 1500, "missed": 3}, 205.0) == []
    (log,) = c.observe_kernel(45, {"passed": 1600, "missed": 4}, 210.0)
    assert "rose by 5 (total 45)" in log.line
    # A fresh guard (counter back at zero) counts from zero again, the total keeps growing.
    (log,) = c.observe_kernel(2, {}, 215.0)
    assert "rose by 2 (total 47)" in log.line
    # Fail open: no guard, nothing to warn about.
    assert c.observe_kernel(None, {"passed": 1}, 220.0) == []
    h = c.health(7)
    assert h.counters[PREFIX + GUARD_DROPPED] == 47.0
    assert h.counters[PREFIX + GUARD_DROPPED + LAST_RISE] == 215.0
    assert h.counters[KERNEL_PREFIX + "passed"] == 1.0
    # The handle's counters never touch the guard's.
    assert c.observe(ZERO | {"ringbuf_full": 3}, 230.0)
    assert c.totals[GUARD_DROPPED] == 47
