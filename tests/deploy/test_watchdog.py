"""The watchdog (deploy/watchdog.py): its kill decisions (pure core), the policy's notion of
progress, and a real supervisord whose SIGSTOPped program is killed and restarted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kextless.actors.policy.main import Progress
from kextless.base.heartbeat import EVERY_NS, STALE_NS, read_heartbeats
from kextless.base.rundir import RuntimeDir
from kextless.deploy import cli
from kextless.deploy.down import down
from kextless.deploy.options import UpOptions
from kextless.deploy.programs import ACTORS, Program, kextless_command, programs_for
from kextless.deploy.supervisor_rpc import rpc
from kextless.deploy.up import up
from kextless.deploy.watchdog import (
    GRACE_NS,
    STARVED_STALE_NS,
    STATE_FILE,
    STOPPED_STALE_NS,
    TABLE_EVERY_NS,
    TABLE_FRESH_NS,
    Kill,
    Proc,
    ReadTable,
    Sched,
    WatchdogCore,
    pid_start_ns,
    procs_from,
    read_sched,
    starved,
)
from tests.netns import NetnsPair

S = 1_000_000_000
OWN, SUPERVISORD = 4000, 4001
T0 = 100 * S  # the pids below started here


def core(**kw: int) -> WatchdogCore:
    return WatchdogCore(own_pid=OWN, **kw)


def table(c: WatchdogCore, now: int, *procs: Proc) -> None:
    c.on_table(list(procs), SUPERVISORD, now)


def ale(pid: int = 50, running: bool = True, started: int = T0) -> Proc:
    return Proc("ale", pid, running, started)


# ---- the core -----------------------------------------------------------------------------


def test_a_stale_beat_of_a_running_armed_process_kills_it_once() -> None:
    c = core()
    now = T0 + GRACE_NS + 5 * S
    table(c, now, ale())
    assert c.on_beats({"ale": now - STALE_NS}, now) == []  # exactly STALE_NS: not yet
    beat = now - STALE_NS - 1
    (kill,) = c.on_beats({"ale": beat}, now)
    assert kill == Kill("ale", 50, STALE_NS + 1, now - T0)
    assert "ale (pid 50) hung" in kill.line() and "SIGKILL" in kill.line()
    assert c.on_beats({"ale": beat}, now + 50_000_000) == []  # once per pid
    assert c.kills == 1 and c.last_kill == kill


def test_a_process_starved_of_cpu_gets_the_long_limit_and_a_stopped_one_does_not() -> None:
    c = core()
    now = T0 + GRACE_NS + 5 * S
    table(c, now, ale())
    beat = now - 2 * S
    assert c.suspects({"ale": beat}, now) == [50]
    assert c.on_beats({"ale": beat}, now, frozenset({50})) == []  # starved: not yet
    late = beat + STARVED_STALE_NS + 1
    table(c, late, ale())
    (kill,) = c.on_beats({"ale": beat}, late, frozenset({50}))
    assert kill.pid == 50  # starved that long: killed all the same
    # What counts as starved: waiting for a CPU a quarter of the time, not stopped.
    a = Sched("R", 0, 0, 0)
    assert starved(a, Sched("R", 100, 300_000_000, S))
    assert not starved(a, Sched("R", 900_000_000, 10_000_000, S))  # on a CPU: spinning
    assert not starved(a, Sched("S", 0, 0, S))  # blocked
    assert not starved(a, Sched("T", 0, 900_000_000, S))  # SIGSTOPped


def test_a_stopped_process_gets_the_short_limit_never_shorter_than_a_loop_s_sleep() -> None:
    c = core()
    now = T0 + GRACE_NS + 5 * S
    table(c, now, ale())
    stopped = frozenset({50})
    assert STOPPED_STALE_NS > 250_000_000  # base/heartbeat.MAX_SLEEP_S: a healthy loop's gap
    assert c.on_beats({"ale": now - STOPPED_STALE_NS}, now, frozenset(), stopped) == []
    (kill,) = c.on_beats({"ale": now - STOPPED_STALE_NS - 1}, now, frozenset(), stopped)
    assert kill.stopped and "stopped" in kill.line()
    # The same stale beat without the stopped state: not yet (the 1 s rule).
    c2 = core()
    table(c2, now, ale())
    assert c2.on_beats({"ale": now - STOPPED_STALE_NS - 1}, now) == []
    # Stopped and starved at once cannot happen (starved() says no for T); stopped wins.
    assert c2.suspects({"ale": now - 300_000_001}, now) == [50]


def test_our_own_scheduling_reads_back() -> None:
    sample = read_sched(os.getpid(), 5)
    assert sample is not None and sample.state == "R" and sample.run_ns > 0 and sample.at_ns == 5
    assert read_sched(2**22 + 12345, 0) is None


def test_fresh_beats_kill_nothing() -> None:
    c = core()
    now = T0 + 10 * S
    table(c, now, ale(), Proc("broker", 51, True, T0))
    assert c.on_beats({"ale": now - 10_000_000, "broker": now - 900_000_000}, now) == []


def test_a_process_that_never_beat_is_not_watched() -> None:
    c = core()
    now = T0 + 60 * S
    table(c, now, Proc("capture", 52, True, T0))
    assert c.on_beats({}, now) == []  # no heartbeat file
    assert c.on_beats({"capture": 0}, now) == []  # a file, no beat yet


def test_only_the_previous_pid_beat_so_the_new_one_is_not_watched() -> None:
    # After a restart the file still holds the old pid's last stamp.
    c = core()
    now = T0 + 60 * S
    table(c, now, ale(pid=77, started=T0))
    assert c.on_beats({"ale": T0 - 2 * S}, now) == []
    assert c.on_beats({"ale": T0 + 1}, now) != []  # once it beat after its start: watched


def test_no_kill_within_the_grace_after_a_start() -> None:
    c = core()
    beat = T0 + 100_000_000
    now = T0 + GRACE_NS - 1
    table(c, now, ale())
    assert now - beat > STALE_NS
    assert c.on_beats({"ale": beat}, now) == []
    assert [type(e) for e in c.on_beats({"ale": beat}, T0 + GRACE_NS)] == [Kill]


def test_only_running_programs_are_killed() -> None:
    c = core()
    now = T0 + 60 * S
    for state in ("STARTING", "STOPPING", "BACKOFF", "EXITED"):
        assert procs_from([_info("ale", 50, state, now)], now)[0].running is False
    table(c, now, ale(running=False))
    assert c.on_beats({"ale": T0 + S}, now) == []


def test_never_itself_supervisord_or_pid_1() -> None:
    c = core()
    now = T0 + 60 * S
    beat = T0 + S
    table(
        c,
        now,
        Proc("watchdog", 60, True, T0),  # by name (also under another pid)
        Proc("x", OWN, True, T0),
        Proc("y", SUPERVISORD, True, T0),
        Proc("z", 1, True, T0),
        Proc("w", 0, True, T0),
    )
    assert c.on_beats(dict.fromkeys(("watchdog", "x", "y", "z", "w"), beat), now) == []


def test_a_kill_waits_for_a_fresh_table_so_the_pid_is_the_live_one() -> None:
    c = core()
    t_table = T0 + 10 * S
    table(c, t_table, ale(pid=50))
    now = t_table + TABLE_FRESH_NS + 1  # a stale beat, the table a bit old
    beat = now - 2 * S
    assert c.on_beats({"ale": beat}, now) == [ReadTable()]
    assert c.on_beats({"ale": beat}, now + 1) == []  # not asked again at once
    # The table shows a restart meanwhile: the new pid has not beaten yet, nothing is killed.
    table(c, now + 2, ale(pid=51, started=now - S))
    assert c.on_beats({"ale": beat}, now + 3) == []


def test_the_table_is_read_first_and_then_about_every_second() -> None:
    c = core()
    assert c.on_beats({}, T0) == [ReadTable()]
    table(c, T0 + 1, ale())
    assert c.on_beats({}, T0 + TABLE_EVERY_NS // 2) == []
    assert c.on_beats({}, T0 + 1 + TABLE_EVERY_NS) == [ReadTable()]


def test_an_unreachable_supervisord_is_retried_and_nothing_killed_meanwhile() -> None:
    c = core()
    table(c, T0, ale())
    now = T0 + GRACE_NS + 5 * S
    assert c.on_beats({"ale": now - 2 * S}, now) == [ReadTable()]
    c.on_table_failed(now)
    for dt in range(1, 10):  # every 100 ms for a second: asks at most every 300 ms
        effects = c.on_beats({"ale": now - 2 * S}, now + dt * 100_000_000)
        assert all(isinstance(e, ReadTable) for e in effects)
        if effects:
            c.on_table_failed(now + dt * 100_000_000)
    assert c.kills == 0


def test_a_killed_pid_gone_from_the_table_may_be_killed_again_when_reused() -> None:
    c = core()
    now = T0 + GRACE_NS + 5 * S
    table(c, now, ale(pid=50))
    assert len(c.on_beats({"ale": T0 + S}, now)) == 1
    table(c, now + 1, ale(pid=51, started=now))  # restarted; 50 is gone
    assert 50 not in c.killed
    later = now + GRACE_NS + 5 * S
    table(c, later, ale(pid=51, started=now))
    assert [k.pid for k in c.on_beats({"ale": now + S}, later) if isinstance(k, Kill)] == [51]


def _info(name: str, pid: int, state: str, now_s: int, up_s: int = 5) -> dict[str, object]:
    return {"name": name, "pid": pid, "statename": state, "now": now_s, "start": now_s - up_s}


def test_procs_from_supervisord_s_table() -> None:
    now = 500 * S
    infos = [
        _info("ale", 50, "RUNNING", 1_700_000_000, up_s=7),
        {"name": "broken"},  # a malformed entry is not watched
        _info("policy", 0, "BACKOFF", 1_700_000_000),
    ]
    # whole seconds from supervisord: taken 1 s later, so the previous pid's beats never count
    assert procs_from(infos, now) == [
        Proc("ale", 50, True, now - 6 * S),
        Proc("policy", 0, False, now - 4 * S),
    ]
    exact = now - 6_543_000_000
    assert procs_from(infos, now, {50: exact})[0] == Proc("ale", 50, True, exact)


def test_a_pid_s_start_from_proc_is_on_the_monotonic_clock() -> None:
    before = time.monotonic_ns()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        start = pid_start_ns(child.pid)
        assert start is not None
        assert before - 20_000_000 <= start <= time.monotonic_ns()  # clock ticks: 10 ms
    finally:
        child.kill()
        child.wait()
    assert pid_start_ns(child.pid) is None  # gone


# ---- the policy's progress ------------------------------------------------------------------


def test_policy_progress_is_the_start_of_the_oldest_unfinished_work() -> None:
    p = Progress()
    now = time.monotonic_ns()
    assert p.progress_ns(now) == now  # nobody working (parked reads, broker round trips)
    entered, leave = threading.Event(), threading.Event()

    def stuck() -> None:
        with p.working():
            entered.set()
            leave.wait(5)

    t = threading.Thread(target=stuck)
    before = time.monotonic_ns()
    t.start()
    assert entered.wait(5)
    with p.working():
        later = time.monotonic_ns() + 10 * S
        held = p.progress_ns(later)
        assert before <= held <= time.monotonic_ns()  # the other thread's start holds it
    leave.set()
    t.join(5)
    assert p.progress_ns(later) == later


# ---- the program table and `kextless run watchdog` ----------------------------------------


def test_up_runs_the_watchdog_last_in_the_host_namespace(tmp_path: Path) -> None:
    (spec,) = [a for a in ACTORS if a.name == "watchdog"]
    assert spec.priority == max(a.priority for a in ACTORS) and not spec.in_netns
    opts = UpOptions(netns="n1", run_root=tmp_path)
    prog = next(p for p in programs_for(opts) if p.name == "watchdog")
    assert list(prog.argv) == [
        *kextless_command(),
        "run",
        "watchdog",
        "--run-dir",
        str(opts.run_dir.path),
    ]


def test_run_watchdog_refuses_a_bad_grace(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "watchdog", "--grace", "-1"])
    assert e.value.code == 2
    assert "--grace must be between 0 and 600 seconds" in capsys.readouterr().err


# ---- a real supervisord --------------------------------------------------------------------

#: A program whose loop beats every 50 ms (one line: supervisord's ini takes no line breaks).
#: Beats every 50 ms until SIGUSR1, then stays alive without beating (a deadlocked loop: state
#: S, not T).
BEATER = (
    "import signal, sys, time; from pathlib import Path; "
    "from kextless.base.heartbeat import Heartbeat; "
    "hb = Heartbeat(Path(sys.argv[1]), sys.argv[2]); stuck = []; "
    "signal.signal(signal.SIGUSR1, lambda *_: stuck.append(1)); "
    "[(hb.beat(time.monotonic_ns()) if not stuck else None, time.sleep(0.05)) "
    "for _ in iter(int, 1)]"
)


@pytest.fixture
def kxw() -> Iterator[tuple[str, Path]]:
    """(netns, run_root): a kxw- namespace for `up` (nothing in it holds packets)."""
    root = Path(tempfile.mkdtemp(prefix="kxw-", dir="/tmp"))
    pair = NetnsPair()
    n = pair.a.split("-", 1)[1].rsplit("-", 1)[0]
    pair.a, pair.b = f"kxw-{n}-a", f"kxw-{n}-b"
    try:
        with pair:
            try:
                yield pair.a, root
            finally:
                with contextlib.suppress(Exception):
                    down(pair.a, root, out=lambda _line: None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pid(run: RuntimeDir, name: str) -> tuple[int, str]:
    info = rpc(run, 2.0).supervisor.getProcessInfo(name)
    return int(info["pid"]), str(info["statename"])


def _wait(pred: Callable[[], bool], timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_sigstopped_program_is_killed_and_restarted_a_mute_one_never(
    kxw: tuple[str, Path],
) -> None:
    ns, root = kxw
    opts = UpOptions(netns=ns, run_root=root, timeout=20)
    run = opts.run_dir
    beater = Program("beater", (sys.executable, "-c", BEATER, str(run.path), "beater"), 100)
    mute = Program(
        "mute", (sys.executable, "-c", "import time; time.sleep(600)", str(run.path)), 110
    )
    grace_s = 1.0
    watchdog = Program(
        "watchdog",
        (*kextless_command(), "run", "watchdog", "--run-dir", str(run.path), "--grace", "1"),
        950,
    )
    up(opts, [beater, mute, watchdog], out=lambda _line: None)
    old, _ = _pid(run, "beater")
    mute_pid, _ = _pid(run, "mute")
    assert _wait(lambda: read_heartbeats(run.path).get("beater", 0) > 0, 5) is not None
    time.sleep(grace_s)
    os.kill(mute_pid, signal.SIGSTOP)  # never beat: never killed
    try:
        os.kill(old, signal.SIGSTOP)
        restarted = _wait(lambda: _pid(run, "beater")[0] not in (0, old), 5)
        assert restarted is not None, (run.log_dir / "watchdog.log").read_text()
        # stopped (state T): stale STOPPED_STALE_NS after the last beat (written at most
        # every EVERY_NS, so up to 0.1 s before the SIGSTOP), read every 0.1 s, then
        # supervisord's restart
        assert (STOPPED_STALE_NS - EVERY_NS) / 1e9 <= restarted < 1.5, restarted
        assert _wait(lambda: _pid(run, "beater")[1] == "RUNNING", 5) is not None
        log = (run.log_dir / "watchdog.log").read_text()
        assert f"beater (pid {old}) hung: no loop progress for " in log and "stopped" in log
        assert json.loads((run.path / STATE_FILE).read_text())["kills"] == 1
        time.sleep(1.5)
        assert _pid(run, "mute") == (mute_pid, "RUNNING")
        assert log.count("hung:") == 1
        # A loop that stops beating but is not stopped (a deadlock): the 1 s rule.
        second, _ = _pid(run, "beater")
        assert _wait(lambda: read_heartbeats(run.path).get("beater", 0) > 0, 5) is not None
        os.kill(second, signal.SIGUSR1)
        again = _wait(lambda: _pid(run, "beater")[0] not in (0, second), 5)
        assert again is not None, (run.log_dir / "watchdog.log").read_text()
        assert (STALE_NS - EVERY_NS) / 1e9 <= again < 2.5, again
        assert json.loads((run.path / STATE_FILE).read_text())["kills"] == 2
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(mute_pid, signal.SIGCONT)
