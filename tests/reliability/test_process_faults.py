"""Issue 12 fault 1: any process killed (SIGKILL) or hung (SIGSTOP) under a steady load of new
connections, a bulk stream and established connections.

Demanded outcome, checked for each process: it runs again (supervisord restarts a killed one,
a watchdog on loop progress a hung one) within 2 s; new connections are decided again within
2 s (across a capture kill no new connection waits 1 s); no new connection fails; no decided
flow is asked again; established connections and the bulk stream keep flowing; an Update for
a connection decided before the fault still takes effect; no divert program is left behind.
Where the product does not do this yet the case is xfail(strict) with the measured reason.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.reliability.conftest import Recorder
from tests.reliability.harness import WHOLE_S, Measured, Rig

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(60)]

#: How long a hung (SIGSTOPped) process is left for a watchdog before the test resumes it.
HUNG_WINDOW_S = 4.0
PROCESSES = ("broker", "capture", "ale", "lifecycle", "bandwidth", "policy")


def demands(name: str, m: Measured, sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """Every demand of fault 1 the measurement misses, as a short reason."""
    miss = []
    if m.restarted_s is None or m.restarted_s > WHOLE_S:
        miss.append(f"{name} not running again within {WHOLE_S:g} s ({m.restarted_s})")
    if m.whole_s > WHOLE_S:
        miss.append(f"new connections whole only after {m.whole_s:.2f} s")
    # Across a capture kill no connection may wait 1 s (TCP's first SYN resend): what it held
    # or was sent meanwhile is replayed (parked by kextless_pre, handed back by the ALE). A
    # hung capture is first detected (the watchdog), so there the bound is the 2 s of "whole".
    if name == "capture" and sig == signal.SIGKILL and m.max_wait_s >= 1.0:
        miss.append(f"a new connection waited {m.max_wait_s:.2f} s across a capture kill")
    if name == "capture" and sig == signal.SIGSTOP and m.max_wait_s > WHOLE_S:
        miss.append(f"a new connection waited {m.max_wait_s:.2f} s across a hung capture")
    if m.failed:
        miss.append(f"{m.failed} new connections failed {m.results}")
    if m.unasked:
        miss.append(f"{m.unasked} new connections passed without being asked")
    if m.reasked:
        miss.append(f"{m.reasked} flows decided before the fault asked again")
    if m.established_broken:
        miss.append(f"{m.established_broken} established connections broken")
    if m.bulk_gap_s > WHOLE_S or m.bulk_result != "eof":
        miss.append(f"bulk stream gap {m.bulk_gap_s:.2f} s ({m.bulk_result})")
    if m.update_honoured is False:
        miss.append("an Update for a connection decided before the fault was ignored")
    waited = 1.0 if name == "capture" else 2.5
    if m.waiting_result is not None and (m.waiting_result != "ok" or (m.waiting_s or 0) >= waited):
        miss.append(
            f"a connection waiting at the kill ended {m.waiting_result} after {m.waiting_s} s"
        )
    if m.leftover_programs:
        miss.append(f"{m.leftover_programs} divert programs left behind")
    return miss


def waiting_at_a_kill(rig: Rig, name: str, m: Measured) -> None:
    """A second SIGKILL with a connection certainly waiting: its info queued in the broker
    (the decision client paused; for the embedded policy: the policy itself SIGSTOPped).
    It must be decided (asked again after the restart) within WHOLE_S."""
    if rig.decider is not None:
        rig.decider.pause()
    else:
        rig.send_signal("policy", signal.SIGSTOP)
    proc = rig.probe()
    # Its SYN is held, its info queued. For the capture, 0.1 s: the SYN then must come back
    # from the ALE (Rehold) at the restart, well before TCP would resend it (1 s after it).
    time.sleep(0.1 if name == "capture" else 0.5)
    old, _t = rig.send_signal(name, signal.SIGKILL)
    if rig.decider is not None:
        rig.decider.resume()
    rig.wait_new_pid(name, old, 10.0)
    out = rig.probe_result(proc)
    m.waiting_result, m.waiting_s = out["result"], round(out.get("elapsed", -1.0), 2)


def happened(m: Measured) -> str:
    again = "never ran again" if m.restarted_s is None else f"ran again after {m.restarted_s:.2f} s"
    return (
        f"{again}; {m.connections} new conns {m.results}, longest wait {m.max_wait_s:.2f} s; "
        f"stream gap {m.bulk_gap_s:.2f} s"
    )


def inject(name: str, sig: signal.Signals, record: Recorder) -> None:
    with Rig(policy=name == "policy") as rig:
        rig.start_load()
        old, fault_t = rig.send_signal(name, sig)
        window = HUNG_WINDOW_S if sig == signal.SIGSTOP else 10.0
        new_t = rig.wait_new_pid(name, old, window)
        if sig == signal.SIGSTOP and new_t is None:
            rig.signal_pid(old, signal.SIGCONT)  # no watchdog: resume it ourselves
        m = rig.measure(fault_t)
        m.restarted_s = None if new_t is None else round(new_t - fault_t, 3)
        if sig == signal.SIGKILL:
            waiting_at_a_kill(rig, name, m)
        miss = demands(name, m, sig)
        label = "SIGKILL" if sig == signal.SIGKILL else "SIGSTOP (hung)"
        record(
            f"{label} {name}",
            happened(m) + ("" if not miss else "; MISSED: " + "; ".join(miss)),
            None if m.restarted_s is None and sig == signal.SIGSTOP else m.whole_s,
            m.lost(),
            m.as_dict()
            | {"logs": str(rig.kept_logs), "unguarded_after_up_s": rig.unguarded_after_up_s},
        )
        assert not miss, f"{miss}\n{m}\n{rig.logs()}"


def _cases(sig: signal.Signals, xfails: dict[str, str]) -> list[object]:
    return [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, reason=xfails[name])] if name in xfails else [],
            id=name,
        )
        for name in PROCESSES
    ]


#: Measured misses (see the session's fault table); each names the product change it needs.
#: None now: a capture kill's connections are replayed (actors/capture/parked.py and the
#: ALE's Rehold), the broker's, ALE's and policy's are kept across their restarts.
KILL_XFAILS: dict[str, str] = {}
STOP_XFAILS: dict[str, str] = {}


@pytest.mark.parametrize("name", _cases(signal.SIGKILL, KILL_XFAILS))
def test_sigkill(name: str, record: Recorder) -> None:
    inject(name, signal.SIGKILL, record)


@pytest.mark.parametrize("name", _cases(signal.SIGSTOP, STOP_XFAILS))
def test_sigstop(name: str, record: Recorder) -> None:
    inject(name, signal.SIGSTOP, record)
