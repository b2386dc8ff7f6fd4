"""Issue 12 fault 3, overload: a flood far above saturation degrades by holding or dropping,
never by passing unexamined packets, unless the configuration says `--fail-open`.

Plain `kextless up --netns` (shipped default rules: inbound UDP to an unlisted port gets
PermanentDrop) in a kxo- namespace pair. From namespace b, two raw-socket senders flood port
UDP_BLK in a as fast as they can for FLOOD_S, every datagram a new 5-tuple (each one must be
asked about), which overflows the divert library's ring (`ringbuf_full`). A listener on that
port counts what arrives: the policy never accepts it, so every datagram it gets passed
unexamined. Meanwhile a process in a opens a connection to b every LOAD_EVERY_S (outbound:
accepted), to see when new connections are decided promptly again after the flood.

Fail closed: 0 datagrams arrive and the guard dropped what the ring let by. `--fail-open`: the
ring's bypass reaches the listener (the test fails if nothing leaked there, so the fail-closed
case is not passing by accident). Both: every program RUNNING at the end and none restarted
but by the watchdog; none restarted at all, and new connections decided promptly again within
WHOLE_S of the flood's end (the ALE's max_pending bounds the backlog it leaves). Figures per
rate: tests/benchmarks/bench_overload.py, docs/overload.md. Each case takes 35-45 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from kextless.deploy.supervisor_rpc import rpc
from tests import apps
from tests.benchmarks.bench_overload import (
    FLOOD,
    UDP_BLK,
    UDP_COUNT,
    OverloadRig,
    capture_counters,
    drain,
)
from tests.reliability.harness import LOAD_CLIENT, WHOLE_S, whole_after

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: How long the flood lasts, and how many senders (each one CPU's worth of Python).
FLOOD_S = 3.0
SENDERS = 2
#: The connect load: one new connection every LOAD_EVERY_S, from PRE_S before the flood to
#: POST_S after it; each gives up after CONNECT_TIMEOUT_S.
LOAD_EVERY_S = 0.05
PRE_S = 1.0
POST_S = 5.0
CONNECT_TIMEOUT_S = 6.0
#: More `kextless up` arguments for a diagnosis, e.g. "--actor-arg watchdog=--grace=600"
#: (no watchdog kill for 600 s after a start: what the flood does without the watchdog).
UP_ARGS_ENV = "KEXTLESS_OVERLOAD_UP_ARGS"


def programs(rig: OverloadRig) -> dict[str, tuple[int, str]]:
    """{program: (pid, state)} from supervisord."""
    infos = rpc(rig.run, 2.0).supervisor.getAllProcessInfo()
    return {str(i["name"]): (int(i["pid"]), str(i["statename"])) for i in infos}


def watchdog_kills(rig: OverloadRig) -> list[str]:
    """Programs the watchdog SIGKILLed (its log: one line per kill), in order."""
    path = rig.run.log_dir / "watchdog.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [ln.split(" WARNING ")[1].split()[0] for ln in text.splitlines() if "SIGKILL" in ln]


def _ask(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"n\n")
    proc.stdin.flush()
    return int(json.loads(proc.stdout.readline())[str(UDP_BLK)])


def flood(rig: OverloadRig) -> tuple[int, float, float]:
    """SENDERS floods of new 5-tuples at UDP_BLK: (datagrams sent, start, end) (monotonic)."""
    p = rig.pair
    net = p.ip4_b.rsplit(".", 1)[0]
    senders = []
    t0 = time.monotonic()
    for i in range(SENDERS):
        # Disjoint source addresses per sender: every datagram of the flood is a new flow.
        argv = [sys.executable, "-c", FLOOD, net, 8, p.ip4_a, UDP_BLK, 0, FLOOD_S, "new"]
        argv.append(100 + 20 * i)
        senders.append(p.popen(p.b, argv))
    sent = 0
    for s in senders:
        out, err = s.communicate(timeout=FLOOD_S + 30)
        assert s.returncode == 0, err.decode()[-500:]
        sent += int(json.loads(out.decode().strip().splitlines()[-1])["sent"])
    return sent, t0, time.monotonic()


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail_closed", "fail_open"])
def test_a_flood_far_above_saturation_passes_nothing_unexamined_unless_fail_open(
    fail_open: bool, record: Any
) -> None:
    args = (*(("--fail-open",) if fail_open else ()), *os.environ.get(UP_ARGS_ENV, "").split())
    with OverloadRig(*args) as rig:
        p = rig.pair
        apps.start(p, p.b, apps.ECHO_SERVER, rig.port)
        counter = p.popen(p.a, [sys.executable, "-c", UDP_COUNT, UDP_BLK], stdin=subprocess.PIPE)
        assert counter.stdout is not None and counter.stdout.readline().strip() == b"ready"
        before_progs = programs(rig)
        before = capture_counters(rig.run, fresh=False)
        secs = PRE_S + FLOOD_S + 1.0 + POST_S
        load = p.popen(
            p.a,
            [sys.executable, "-c", LOAD_CLIENT, p.ip4_b, rig.port, LOAD_EVERY_S, secs,
             CONNECT_TIMEOUT_S],
        )  # fmt: skip
        assert load.stdout is not None and b"ready" in load.stdout.readline()
        time.sleep(PRE_S)
        sent, t_start, t_stop = flood(rig)
        out, _ = load.communicate(timeout=secs + CONNECT_TIMEOUT_S + 15)
        conns: list[dict[str, Any]] = json.loads(out.decode().strip().splitlines()[-1])
        drain(rig.run, lambda: _ask(counter))
        after = capture_counters(rig.run)
        leaked = _ask(counter)
        after_progs = programs(rig)
        ring = int(after.get("divert.ringbuf_full", 0) - before.get("divert.ringbuf_full", 0))
        guard = int(after.get("divert.guard_dropped", 0) - before.get("divert.guard_dropped", 0))
        qfull = int(after.get("divert.queue_full", 0) - before.get("divert.queue_full", 0))
        whole = whole_after(conns, t_stop)
        restarted = sorted(
            n for n, (pid, st) in after_progs.items() if (pid, st) != before_progs.get(n)
        )
        during = [c for c in conns if t_start <= c["t"] <= t_stop]
        fig = {
            "sent": sent,
            "offered_per_s": round(sent / (t_stop - t_start)),
            "leaked": leaked,
            "ringbuf_full": ring,
            "guard_dropped": guard,
            "queue_full": qfull,
            "whole_after_flood_s": whole,
            "load_results": {r: sum(c["result"] == r for c in conns) for r in {"ok", "timeout"}},
            "load_max_wait_during_flood_s": round(max((c["wait"] for c in during), default=0), 3),
            "watchdog_kills": watchdog_kills(rig),
            "restarted": restarted,
        }
        print(f"MEASURE overload_{'fail_open' if fail_open else 'fail_closed'} {json.dumps(fig)}")
        record(
            f"UDP flood of new flows, {fig['offered_per_s']:,}/s to a blocked port"
            + (" (--fail-open)" if fail_open else ""),
            f"ring overflowed {ring:,} times; guard dropped {guard:,}; "
            f"library queue dropped {qfull:,}; {leaked:,} reached the blocked port",
            whole,
            f"{leaked:,} datagrams PASSED UNEXAMINED; restarted: {fig['restarted'] or 'none'}"
            f" (watchdog kills: {fig['watchdog_kills'] or 'none'})",
            fig,
        )
        logs = rig.logs()
        killed = watchdog_kills(rig)
    # The flood really was far above saturation: it overflowed the ring.
    assert ring > 0, (fig, logs[-3000:])
    if fail_open:
        assert leaked > 0, fig  # what the ring let by passed: the choice --fail-open makes
        assert guard == 0, fig
    else:
        assert leaked == 0, fig
        assert guard >= ring, fig  # every bypassed packet met the guard
    assert all(st == "RUNNING" for _pid, st in after_progs.values()), after_progs
    not_watchdog = sorted(set(restarted) - set(killed))
    assert not_watchdog == [], (fig, logs[-3000:])  # a crash, not a watchdog kill
    # Recovery (issue 12, fault 3: whole again within 2 s): the flood starves the actors'
    # loops on 2 CPUs, but the watchdog waits for a starved one (deploy/watchdog.py), and the
    # ALE's max_pending keeps the backlog the flood leaves to well under a second of decisions
    # (measured without it: 3.3-5 s).
    assert restarted == [], (fig, logs[-3000:])
    assert whole <= WHOLE_S, (fig, logs[-3000:])
