"""`kextless status` text and JSON for coverage and loss counters, from a report built by hand
(the root tests in test_coverage_process.py and tests/system read real ones): short by default,
every counter with verbose."""

from __future__ import annotations

import json
import time
from typing import Any

from kextless.deploy.status import divert_counters, format_status, not_ready, problems

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
    text = format_status(report(divert_counters=counters), verbose=True)
    assert "divert loss counters (capture):\n" in text
    assert f"  ringbuf_full: 7 (last rose {when})\n" in text
    assert "  queue_full: 0 (never rose)\n" in text
    aged = format_status(report(divert_counters=counters, divert_counters_age_s=4.25), verbose=True)
    assert "divert loss counters (capture, reported 4.2 s ago):\n" in aged
    stale = format_status(
        report(divert_counters=counters, divert_counters_age_s=31.0), verbose=True
    )
    assert "reported 31.0 s ago; STALE: the capture stopped reporting):" in stale

    short = format_status(report(divert_counters=counters))
    assert "divert loss counters" not in short  # only what went wrong, under problems
    assert (
        "  ringbuf_full: 7 packet(s) passed UNEXAMINED (eBPF ring buffer full) "
        f"(last rose {when})" in short
    )
    assert "queue_full" not in short


def test_no_capture_health_yet_means_no_counters() -> None:
    assert divert_counters({"actors": {"ale": {"pid": 2}}}) is None
    assert divert_counters({}) is None
    assert divert_counters({"actors": {"capture": {"pid": 3, "counters": {}}}}) is None
    assert "divert loss counters" not in format_status(report())


PROGRAMS = [
    {"name": n, "state": "RUNNING", "pid": 10 + i, "uptime_s": 62, "description": ""}
    for i, n in enumerate(("broker", "ale", "capture", "lifecycle", "bandwidth", "policy"))
]

#: A broker's S as the real one has it (broker/core.py stats), the counters a run leaves.
BROKER: dict[str, Any] = {
    "version": "2.1.0.0",
    "pid": 10,
    "queue": {"depth": 0, "bytes": 0, "capacity_bytes": 67108864, "overflow_episodes": 0},
    "session": {
        "state": "open",
        "reader_waiting": True,
        "opened": 2,
        "closed": 1,
        "shutdowns": 0,
        "busy_refused": 0,
        "owner_disconnects": 0,
    },
    "infos": {
        "queued": {"ConnectionIpv4": 50},
        "delivered": {"ConnectionIpv4": 45},
        "dropped": {"ConnectionIpv4": 0, "BandwidthStatsV4": 0},
        "refused": {"ConnectionIpv4": 0},
        "discarded": {"ConnectionIpv4": 0},
        "withdrawn": {"ConnectionIpv4": 3, "ConnectionIpv6": 0},
    },
    "no_client": {"mode": "wait", "refused": 0},
    "commands": {
        "Verdict": {"ok": 47, "malformed": 1, "unhandled": 0},
        "ClearCache": {"ok": 0, "malformed": 0, "unhandled": 2},
    },
    "malformed_unknown_type": 0,
    "reads": {"answered": 40, "parked": 30, "timeouts": 0, "eof": 1, "undelivered": 0},
    "frame_errors": 0,
    "actor_garbage": 0,
    "pending_verdicts": 1,
    "connections_tracked": 12,
    "verdict_rtt_us": {"samples": 45, "p50": 410.0, "p90": 900.0, "p99": 2100.0, "max": 3000.0},
    "log_ring": {"lines": 3, "overwritten": 0},
    "actors": {
        "ale": {
            "pid": 11,
            "owns": ["Verdict"],
            "counters": {
                "ids_issued": 50,
                "verdicts": 45,
                "timeouts": 5,
                "refused": 0,
                "verdicts_unknown_id": 0,
                "decided.PermanentAccept": 40,
                "decided.Block": 10,
            },
        },
    },
}


def test_the_short_status_shows_processes_connections_decisions_and_problems() -> None:
    text = format_status(report(programs=PROGRAMS, broker=BROKER))
    lines = text.splitlines()
    assert 12 <= len(lines) <= 25, text
    assert "  capture    RUNNING   pid 12  uptime 0:01:02" in lines
    assert "client: session open (a reader waits) [2 session(s) since start]" in lines
    assert "connections: 12 tracked, 1 waiting for a verdict, 50 asked" in lines
    assert "decisions: 45 by the client, 5 by verdict timeout, 0 refused at once" in lines
    assert "  by verdict: PermanentAccept 40, Block 10" in lines
    assert "  3 decided by timeout before any client read them (not handed out)" in lines
    assert "  verdict latency: p50 0.41 ms, p99 2.10 ms (45 samples)" in lines
    assert "problems:" in lines
    logs = "/run/kextless/netns-klt-x/logs"
    assert (
        f"  5 verdict timeout(s): no verdict in time, got the default (see {logs}/ale.log)" in lines
    )
    assert f"  1 malformed command(s) refused (see {logs}/broker.log)" in lines
    assert f"  2 command(s) refused: no actor handles them (see {logs}/broker.log)" in lines
    assert "  interface wg0 is UNGUARDED: its packets pass kextless unseen" in lines
    assert "queue.capacity_bytes" not in text  # zero and routine counters: only with --verbose
    verbose = format_status(report(programs=PROGRAMS, broker=BROKER), verbose=True)
    assert "  queue.capacity_bytes: 67108864" in verbose.splitlines()
    assert "  actors.ale.counters.decided.Block: 10" in verbose.splitlines()
    assert "problems:" not in verbose  # verbose is every counter, as status always was


def test_packets_dropped_unasked_under_overload_show_as_a_decision_and_a_problem() -> None:
    broker = {**BROKER, "actors": {"ale": {**BROKER["actors"]["ale"]}}}  # type: ignore[dict-item]
    broker["actors"]["ale"]["counters"] = {**BROKER["actors"]["ale"]["counters"], "shed": 7}  # type: ignore[index]
    lines = format_status(report(programs=PROGRAMS, broker=broker)).splitlines()
    assert (
        "decisions: 45 by the client, 5 by verdict timeout, 0 refused at once, "
        "7 dropped unasked (overload)"
    ) in lines
    assert any(
        line.startswith("  7 packet(s) dropped unasked: verdicts.max_pending") for line in lines
    ), lines


def test_nothing_wrong_says_so() -> None:
    quiet = json.loads(json.dumps(BROKER))
    quiet["actors"]["ale"]["counters"].update(timeouts=0)
    quiet["commands"] = {"Verdict": {"ok": 1, "malformed": 0, "unhandled": 0}}
    r = report(programs=PROGRAMS, broker=quiet, interfaces=report()["interfaces"][:1])
    assert problems(r) == []
    assert "problems: none" in format_status(r).splitlines()


def test_a_stopped_or_restarted_program_and_a_down_broker_are_problems() -> None:
    progs = [dict(PROGRAMS[0], state="FATAL", pid=None, uptime_s=None)]
    progs.append(dict(PROGRAMS[1], restarted=True))
    r = report(programs=progs, broker=None, broker_error="the broker is not listening")
    text = format_status(r)
    assert "broker: DOWN (the broker is not listening)" in text
    logs = "/run/kextless/netns-klt-x/logs"
    assert f"  broker is FATAL (see {logs}/broker.log)" in text.splitlines()
    assert f"  ale was restarted since up (see {logs}/ale.log)" in text.splitlines()
    assert "  ale        RUNNING   pid 11  uptime 0:01:02  (restarted since up)" in text


def test_no_client_default_is_shown_while_no_client_is_connected() -> None:
    b = json.loads(json.dumps(BROKER))
    b["session"].update(state="none", reader_waiting=False)
    b["no_client"] = {"mode": "default", "refused": 4}
    text = format_status(report(broker=b))
    assert (
        "client: none connected; new connections get the default verdict at once "
        "(--no-client default) [2 session(s) since start]"
    ) in text.splitlines()


# ---- readiness (what `kextless up` waits for) ------------------------------------------------

PIDS = {"broker": 10, "ale": 11, "lifecycle": 12, "capture": 13, "bandwidth": 14, "policy": 15}
GUARDED = [
    {"name": "lo", "ingress": True, "egress": True, "guarded": True},
    {"name": "va", "ingress": True, "egress": True, "guarded": True},
]


def ready_broker(**over: Any) -> dict[str, Any]:
    """A broker S with every actor reported by the pids in PIDS, kernel flow cache on."""
    actors: dict[str, Any] = {
        "ale": {"pid": 11, "counters": {"pending": 0}},
        "lifecycle": {"pid": 12, "counters": {"flows": 0}},
        "capture": {"pid": 13, "relayed": True, "counters": {"kernel.hit": 0.0}},
        "bandwidth": {"pid": 14, "counters": {"maps_found": 1.0}},
    }
    actors.update(over)
    return {"actors": actors, "session": {"state": "open"}}


def test_ready_when_every_actor_reported_and_every_interface_is_diverted() -> None:
    assert not_ready(PIDS, ready_broker(), GUARDED) == {}


def test_stand_in_programs_are_never_waited_for() -> None:
    assert not_ready({"broker": 1, "sleeper": 2}, None, None) == {}


def test_nothing_is_ready_while_the_broker_does_not_answer() -> None:
    assert list(not_ready(PIDS, None, None)) == [
        "ale",
        "capture",
        "lifecycle",
        "bandwidth",
        "policy",
    ]


def test_a_capture_that_has_not_reported_has_no_handle_and_bandwidth_waits_for_it() -> None:
    broker = ready_broker()
    del broker["actors"]["capture"]
    waiting = not_ready(PIDS, broker, GUARDED)
    assert waiting == {
        "capture": "no divert handle yet (its first report has not arrived)",
        "bandwidth": "waits for the capture's counter maps",
    }


def test_a_held_or_unguarded_interface_is_not_ready() -> None:
    held = {"name": "vb", "ingress": False, "egress": True, "guarded": False}
    held |= {"held_ingress": True, "held_egress": False}
    bare = {"name": "wg0", "ingress": False, "egress": False, "guarded": False}
    waiting = not_ready(PIDS, ready_broker(), [*GUARDED, held, bare])
    assert waiting == {
        "capture": "interface(s) not diverted on both hooks: vb ingress held egress guarded, "
        "wg0 ingress UNGUARDED egress UNGUARDED"
    }
    assert "could not be read" in not_ready(PIDS, ready_broker(), None)["capture"]


def test_a_report_of_a_replaced_process_does_not_count() -> None:
    broker = ready_broker(lifecycle={"pid": 99, "counters": {"flows": 0}})
    assert list(not_ready(PIDS, broker, GUARDED)) == ["lifecycle"]


def test_bandwidth_must_read_the_maps_only_with_the_kernel_flow_cache() -> None:
    no_maps = {"pid": 14, "counters": {"maps_found": 0.0}}
    waiting = not_ready(PIDS, ready_broker(bandwidth=no_maps), GUARDED)
    assert waiting == {"bandwidth": "not reading the capture's counter maps yet"}
    per_port = {"pid": 13, "relayed": True, "counters": {"packets": 0.0}}  # no kernel.* keys
    assert not_ready(PIDS, ready_broker(bandwidth=no_maps, capture=per_port), GUARDED) == {}


def test_the_policy_is_ready_once_a_session_is_open() -> None:
    broker = ready_broker() | {"session": {"state": "none"}}
    assert not_ready(PIDS, broker, GUARDED) == {"policy": "has no client session open yet"}
    without = {k: v for k, v in PIDS.items() if k != "policy"}
    assert not_ready(without, broker, GUARDED) == {}


def test_watchdog_kills_are_a_problem_with_the_last_one_named() -> None:
    quiet = json.loads(json.dumps(BROKER))
    quiet["actors"]["ale"]["counters"].update(timeouts=0)
    quiet["commands"] = {"Verdict": {"ok": 1, "malformed": 0, "unhandled": 0}}
    base = report(programs=PROGRAMS, broker=quiet, interfaces=report()["interfaces"][:1])
    assert problems(base | {"watchdog": {"kills": 0, "last": None}}) == []
    dog = {"kills": 2, "last": {"name": "capture", "pid": 4242}}
    assert problems(base | {"watchdog": dog}) == [
        "the watchdog killed 2 hung process(es), last capture pid 4242 "
        "(see /run/kextless/netns-klt-x/logs/watchdog.log)"
    ]
