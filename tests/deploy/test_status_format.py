"""`kextless status` text and JSON for coverage and loss counters, from a report built by hand
(the root tests in test_coverage_process.py read real ones)."""

from __future__ import annotations

import json
import time
from typing import Any

from kextless.deploy.status import divert_counters, format_status

ROSE = 1_764_579_661.0  # 2025-12-01 09:01:01 UTC


def report(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "netns": "klt-x",
        "run_dir": "/run/kextless/netns-klt-x",
        "running": True,
        "endpoint": "ipc:///run/kextless/netns-klt-x/kext.sock",
        "programs": [],
        "broker": {"pid": 1},
        "broker_error": None,
        "interfaces": [
            {"name": "lo", "index": 1, "kind": "loopback", "up": True}
            | {"ingress": True, "egress": True, "guarded": True},
            {"name": "wg0", "index": 4, "kind": "wireguard", "up": True}
            | {"ingress": False, "egress": True, "guarded": False},
        ],
        "interfaces_error": None,
        "divert_counters": None,
    }
    return r | over


def test_interfaces_show_each_hook_and_flag_the_unguarded() -> None:
    text = format_status(report())
    assert "  lo         loopback up   ingress guarded egress guarded\n" in text
    assert (
        "  wg0        wireguard up   ingress UNGUARDED egress guarded"
        "  <- UNGUARDED: its packets pass kextless unseen\n"
    ) in text


def test_a_link_under_the_fail_closed_guard_is_held_not_unguarded() -> None:
    veth = {"name": "vn", "index": 5, "kind": "veth", "up": True} | {
        "ingress": False,
        "egress": True,
        "guarded": False,
        "held_ingress": True,
        "held_egress": True,
        "closed": True,
    }
    text = format_status(report(interfaces=[veth]))
    assert (
        "  vn         veth     up   ingress held egress guarded"
        "  <- held: IP dropped by the fail-closed guard until diverted\n"
    ) in text
    assert "UNGUARDED" not in text


def test_an_unreadable_namespace_says_so() -> None:
    text = format_status(report(interfaces=[], interfaces_error="cannot open netlink"))
    assert "interfaces: UNKNOWN (cannot open netlink)" in text


def test_loss_counters_come_from_the_captures_relayed_health() -> None:
    broker = {
        "actors": {
            "ale": {"pid": 2},
            "capture": {
                "pid": 3,
                "relayed": True,
                "counters": {
                    "divert.ringbuf_full": 7.0,
                    "divert.ringbuf_full.last_rise_unix": ROSE,
                    "divert.queue_full": 0.0,
                    "divert.queue_full.last_rise_unix": 0.0,
                },
            },
        }
    }
    counters = divert_counters(broker)
    assert counters is not None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ROSE))
    assert counters["ringbuf_full"] == {"count": 7, "last_rise": when}
    assert counters["queue_full"] == {"count": 0, "last_rise": None}
    assert counters["too_big"] == {"count": 0, "last_rise": None}  # not sent: zero, never
    json.dumps(counters)  # what --json prints
    text = format_status(report(divert_counters=counters))
    assert "divert loss counters (capture):\n" in text
    assert f"  ringbuf_full: 7 (last rose {when})\n" in text
    assert "  queue_full: 0 (never rose)\n" in text
    aged = format_status(report(divert_counters=counters, divert_counters_age_s=4.25))
    assert "divert loss counters (capture, reported 4.2 s ago):\n" in aged
    stale = format_status(report(divert_counters=counters, divert_counters_age_s=31.0))
    assert "reported 31.0 s ago; STALE: the capture stopped reporting):" in stale


def test_no_capture_health_yet_means_no_counters() -> None:
    assert divert_counters({"actors": {"ale": {"pid": 2}}}) is None
    assert divert_counters({}) is None
    assert divert_counters({"actors": {"capture": {"pid": 3, "counters": {}}}}) is None
    assert "divert loss counters" not in format_status(report())
