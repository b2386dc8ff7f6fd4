"""`kextless run watchdog`: kill a hung process so supervisord restarts it (issue 12, fault 1).

supervisord only sees exits: a process whose loop stopped (SIGSTOP, a deadlock, a call that
never returns) keeps its pid and would never be restarted. Every loop beats into
RUN/heartbeat/NAME (base/heartbeat.py); this program reads the beats every 100 ms and
supervisord's process table about every second, and SIGKILLs a RUNNING program whose beat is
older than STALE_NS (STOPPED_STALE_NS if it is stopped: /proc says state T). supervisord then
restarts it like any crashed process.

What it never does: kill itself or supervisord; kill a program that has not beaten since its
pid started (no heartbeat file, a 0 stamp, or only the previous pid's stamp: a process that
does not beat yet is not watched); kill within GRACE_NS of a pid's start; kill one pid twice;
kill on a process table older than TABLE_FRESH_NS (the pid must be the live one, not a
restarted program's old pid). An unreachable supervisord is retried (every second; every
0.3 s while a beat is stale) and logged once.

The decisions are a pure core (`WatchdogCore`: beats, the table and now_ns in, kills out);
`WatchdogShell` reads the files, calls supervisord and sends the signals.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kextless.base import logs
from kextless.base.heartbeat import STALE_NS, read_heartbeats
from kextless.base.rundir import RuntimeDir

log = logging.getLogger("watchdog")

NAME = "watchdog"
#: How often the beats are read (the detection delay past STALE_NS is at most this).
POLL_NS = 100_000_000
#: How often supervisord's process table is read when nothing is stale.
TABLE_EVERY_NS = 1_000_000_000
#: A kill needs a table at most this old, so the pid killed is the program's live one.
TABLE_FRESH_NS = 300_000_000
#: The least time between two table reads (also the retry period while supervisord is down).
TABLE_RETRY_NS = 1_000_000_000
#: No kill this soon after a pid started. Measured under the reliability suite's load (4
#: restarts each), from exec to the first beat: broker 0.19-0.88 s, ALE 0.22-0.66 s,
#: bandwidth 0.21-0.89 s, policy 0.13-0.44 s, lifecycle 0.95-1.44 s (once ~4 s, its divert
#: handles slow to open; it beats only from its loop on, so it is not watched until then).
#: 3 s is twice the slowest and costs nothing when a process that has been running hangs:
#: only a pid younger than the grace waits for it.
GRACE_NS = 3_000_000_000
#: How long an XML-RPC call to supervisord may take (local socket; it answers in ms).
RPC_TIMEOUT_S = 1.0
#: The watchdog's counters, read by `kextless status`.
STATE_FILE = "watchdog.json"
#: A process whose beat is this old is sampled (its state and scheduler times), so that by
#: STALE_NS the watchdog knows whether it is stuck or only waiting for a CPU.
SAMPLE_AFTER_NS = 300_000_000
#: A process found stopped (state T: SIGSTOP, SIGTSTP; nothing in kextless stops itself) is
#: hung for certain once its beat is this old: more than a loop's longest sleep (0.25 s,
#: base/heartbeat.MAX_SLEEP_S), so it cannot be a healthy loop caught between two beats. A
#: traced stop (t: a debugger) keeps the STALE_NS rule.
STOPPED_STALE_NS = 400_000_000
#: A process that spent at least this share of the sampled time runnable but waiting for a
#: CPU is starved, not hung (measured: a flood on 2 CPUs left healthy low-priority actors
#: without a beat for over 1 s, 22 wrongful kills in 135 s).
STARVED_SHARE = 0.25
#: A starved process is killed only when its beat is this old (it may still be hung).
STARVED_STALE_NS = 10_000_000_000


@dataclass(frozen=True)
class Proc:
    """One program in supervisord's table, as the core needs it."""

    name: str
    pid: int
    running: bool
    #: CLOCK_MONOTONIC time the pid started (from /proc, to 10 ms; else from supervisord's
    #: whole-second `start`, rounded up so that a beat of the previous pid never counts).
    started_ns: int


@dataclass(frozen=True)
class ReadTable:
    """Effect: read supervisord's process table now and hand it to `on_table`."""


@dataclass(frozen=True)
class Kill:
    """Effect: SIGKILL `pid` (program `name`), whose last beat is `beat_age_ns` old."""

    name: str
    pid: int
    beat_age_ns: int
    running_ns: int
    stopped: bool = False

    def line(self) -> str:
        limit = STOPPED_STALE_NS if self.stopped else STALE_NS
        return (
            f"{self.name} (pid {self.pid}) hung: no loop progress for "
            f"{self.beat_age_ns / 1e9:.2f} s (stale after {limit / 1e9:g} s"
            f"{', stopped' if self.stopped else ''}), running for "
            f"{self.running_ns / 1e9:.1f} s; SIGKILL, supervisord restarts it"
        )


Effect = ReadTable | Kill


@dataclass(frozen=True)
class Sched:
    """One sample of a process's scheduling (/proc/PID/stat state, /proc/PID/schedstat)."""

    state: str  # R, S, D, T, t, Z, ...
    run_ns: int  # time on a CPU so far
    wait_ns: int  # time runnable but waiting for a CPU so far
    at_ns: int  # when sampled (CLOCK_MONOTONIC)


def starved(before: Sched, now: Sched) -> bool:
    """Between two samples the process mostly waited for a CPU (a loaded machine), rather than
    being stopped, blocked or spinning: its stale beat says nothing about a hang yet."""
    if now.state in ("T", "t") or now.at_ns <= before.at_ns:
        return False
    return now.wait_ns - before.wait_ns >= STARVED_SHARE * (now.at_ns - before.at_ns)


@dataclass
class WatchdogCore:
    """Kill decisions from heartbeats and supervisord's table (no clock, files or signals)."""

    own_pid: int
    stale_ns: int = STALE_NS
    grace_ns: int = GRACE_NS
    table_every_ns: int = TABLE_EVERY_NS
    table_fresh_ns: int = TABLE_FRESH_NS
    table_retry_ns: int = TABLE_RETRY_NS
    procs: tuple[Proc, ...] = ()
    #: Never killed: ours, supervisord's (filled from the table's reader), pid 0 and 1.
    spared: set[int] = field(default_factory=set)
    table_ns: int | None = None
    asked_ns: int | None = None
    killed: set[int] = field(default_factory=set)
    kills: int = 0
    last_kill: Kill | None = None
    starved_stale_ns: int = STARVED_STALE_NS
    stopped_stale_ns: int = STOPPED_STALE_NS

    def on_table(self, procs: Sequence[Proc], supervisord_pid: int, now_ns: int) -> None:
        """A fresh process table (read at `now_ns`)."""
        self.procs = tuple(procs)
        self.spared.add(supervisord_pid)
        self.table_ns = now_ns
        live = {p.pid for p in self.procs}
        self.killed &= live  # a pid gone from the table can be reused by a new program

    def on_table_failed(self, now_ns: int) -> None:
        """supervisord did not answer; the old table stays (too old to kill on)."""
        self.asked_ns = now_ns

    def _may_ask(self, now_ns: int) -> bool:
        return self.asked_ns is None or now_ns - self.asked_ns >= self.table_retry_ns

    def _table_age(self, now_ns: int) -> int | None:
        return None if self.table_ns is None else now_ns - self.table_ns

    def on_beats(
        self,
        beats: Mapping[str, int],
        now_ns: int,
        starving: frozenset[int] = frozenset(),
        stopped: frozenset[int] = frozenset(),
    ) -> list[Effect]:
        """Every program's last beat (0: none yet) at `now_ns`: what to do now. `starving`:
        pids the shell saw waiting for a CPU (`starved`); they get STARVED_STALE_NS.
        `stopped`: pids it saw in state T; they get STOPPED_STALE_NS."""
        age = self._table_age(now_ns)
        if (age is None or age >= self.table_every_ns) and self._may_ask(now_ns):
            self.asked_ns = now_ns
            return [ReadTable()]
        hung = [
            p for p in self.procs if self._hung(p, beats.get(p.name, 0), now_ns, starving, stopped)
        ]
        if not hung:
            return []
        if age is None or age > self.table_fresh_ns:
            # Confirm the pid before killing it (retried every TABLE_FRESH_NS meanwhile).
            if self.asked_ns is None or now_ns - self.asked_ns >= self.table_fresh_ns:
                self.asked_ns = now_ns
                return [ReadTable()]
            return []
        out: list[Effect] = []
        for p in hung:
            age = now_ns - beats[p.name]
            kill = Kill(p.name, p.pid, age, now_ns - p.started_ns, p.pid in stopped)
            self.killed.add(p.pid)
            self.kills += 1
            self.last_kill = kill
            out.append(kill)
        return out

    def _hung(
        self,
        p: Proc,
        beat_ns: int,
        now_ns: int,
        starving: frozenset[int],
        stopped: frozenset[int],
    ) -> bool:
        if not p.running or p.name == NAME or p.pid <= 1:
            return False
        if p.pid == self.own_pid or p.pid in self.spared or p.pid in self.killed:
            return False
        if beat_ns <= 0 or beat_ns <= p.started_ns:
            return False  # has not beaten since this pid started: not watched (yet)
        if now_ns - p.started_ns < self.grace_ns:
            return False
        if p.pid in stopped:
            limit = self.stopped_stale_ns
        elif p.pid in starving:
            limit = self.starved_stale_ns
        else:
            limit = self.stale_ns
        return now_ns - beat_ns > limit

    def suspects(self, beats: Mapping[str, int], now_ns: int) -> list[int]:
        """Pids whose beat is old enough to sample their scheduling (SAMPLE_AFTER_NS)."""
        return [
            p.pid
            for p in self.procs
            if p.running
            and p.pid > 1
            and beats.get(p.name, 0) > p.started_ns
            and now_ns - beats[p.name] > SAMPLE_AFTER_NS
        ]


def procs_from(
    infos: Sequence[Mapping[str, Any]], now_ns: int, starts: Mapping[int, int] | None = None
) -> list[Proc]:
    """supervisord's getAllProcessInfo() as Procs; `now_ns` is when the answer came, `starts`
    each pid's exact start (CLOCK_MONOTONIC ns) where the shell could read it.

    Without an exact start, supervisord's `start` (whole seconds, truncated) is taken 1 s
    later than it says: the previous pid's last beats, from the same second, must not make a
    restarted program that has not beaten yet look watched (seen: a lifecycle still opening
    its handles 3 s after its start killed on its predecessor's stamp)."""
    starts = starts or {}
    out = []
    for info in infos:
        try:
            pid = int(info["pid"])
            running = info["statename"] == "RUNNING"
            up_ns = (int(info["now"]) - int(info["start"]) - 1) * 1_000_000_000
            started = starts.get(pid, now_ns - up_ns)
            out.append(Proc(str(info["name"]), pid, running, started))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed entry: that program is not watched
    return out


def read_sched(pid: int, now_ns: int) -> Sched | None:
    """`pid`'s state and scheduler times now (None: gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
    except (OSError, IndexError, ValueError, UnicodeDecodeError):
        return None
    return Sched(state, run_ns, wait_ns, now_ns)


def pid_start_ns(pid: int) -> int | None:
    """When `pid` started, in CLOCK_MONOTONIC ns (/proc/PID/stat's starttime is in clock ticks
    of CLOCK_BOOTTIME, which runs ahead of CLOCK_MONOTONIC by the time spent suspended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat.rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    boot_ns = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return boot_ns - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns())


class WatchdogShell:
    """The thin I/O part: heartbeat files, supervisord's RPC, os.kill, the state file."""

    def __init__(self, run: RuntimeDir, core: WatchdogCore | None = None) -> None:
        self.rundir = run
        self.core = core or WatchdogCore(own_pid=os.getpid())
        self._running = True
        self._rpc_down = False
        #: The first scheduling sample of each suspect pid (its beat past SAMPLE_AFTER_NS).
        self._samples: dict[int, Sched] = {}

    def stop(self, *_: object) -> None:
        self._running = False

    def read_table(self) -> None:
        from kextless.base.supervisor import RPC_ERRORS, rpc

        try:
            proxy = rpc(self.rundir, RPC_TIMEOUT_S)
            sv_pid = int(proxy.supervisor.getPID())
            infos = proxy.supervisor.getAllProcessInfo()
        except (*RPC_ERRORS, ValueError, TypeError) as e:
            if not self._rpc_down:
                log.warning("supervisord not reachable (%s); retrying every second", e)
                self._rpc_down = True
            self.core.on_table_failed(time.monotonic_ns())
            return
        if self._rpc_down:
            log.info("supervisord reachable again")
            self._rpc_down = False
        now = time.monotonic_ns()
        starts: dict[int, int] = {}
        for info in infos:
            pid = info.get("pid") if isinstance(info, dict) else None
            if isinstance(pid, int) and pid > 0:
                start = pid_start_ns(pid)
                if start is not None:
                    starts[pid] = start
        self.core.on_table(procs_from(infos, now, starts), sv_pid, now)

    def kill(self, k: Kill) -> None:
        try:
            os.kill(k.pid, signal.SIGKILL)
        except ProcessLookupError:
            log.info("%s (pid %d) was gone before its SIGKILL", k.name, k.pid)
            return
        except PermissionError as e:
            log.error("cannot kill %s (pid %d): %s", k.name, k.pid, e)
            return
        log.warning("%s", k.line())
        self._write_state()

    def _write_state(self) -> None:
        last = self.core.last_kill
        state = {
            "pid": os.getpid(),
            "kills": self.core.kills,
            "last": None if last is None else {"name": last.name, "pid": last.pid},
            "last_wall": time.time(),
        }
        path = self.rundir.path / STATE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e.strerror)

    def _sample(self, beats: Mapping[str, int], now: int) -> tuple[frozenset[int], frozenset[int]]:
        """Sample each suspect's scheduling: the pids that waited for a CPU since the first
        sample of their stale spell, and the pids stopped now (only suspects are read:
        nothing while all beat)."""
        suspects = set(self.core.suspects(beats, now))
        for pid in list(self._samples):
            if pid not in suspects:
                del self._samples[pid]  # beating again (or gone): a new spell starts afresh
        starving, stopped = set(), set()
        for pid in suspects:
            cur = read_sched(pid, now)
            if cur is None:
                continue
            first = self._samples.setdefault(pid, cur)
            if starved(first, cur):
                starving.add(pid)
            if cur.state == "T":
                stopped.add(pid)
        return frozenset(starving), frozenset(stopped)

    def step(self) -> None:
        """One pass: read the beats, carry out what the core says (a table read first)."""
        now = time.monotonic_ns()
        beats = read_heartbeats(self.rundir.path)
        effects = self.core.on_beats(beats, now, *self._sample(beats, now))
        if any(isinstance(e, ReadTable) for e in effects):
            self.read_table()
            now = time.monotonic_ns()
            beats = read_heartbeats(self.rundir.path)
            effects = self.core.on_beats(beats, now, *self._sample(beats, now))
        for e in effects:
            if isinstance(e, Kill):
                self.kill(e)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        log.info(
            "watching %s: stale after %.1f s, grace %.1f s after a start",
            self.rundir.path / "heartbeat",
            self.core.stale_ns / 1e9,
            self.core.grace_ns / 1e9,
        )
        self._write_state()
        while self._running:
            t0 = time.monotonic_ns()
            self.step()
            left = POLL_NS - (time.monotonic_ns() - t0)
            if left > 0:
                time.sleep(left / 1e9)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kextless run watchdog", description=__doc__)
    p.add_argument("--run-dir", type=Path, help="runtime directory (default: the host instance)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--grace",
        type=float,
        default=GRACE_NS / 1e9,
        metavar="SECONDS",
        help=f"no kill this soon after a process started (default {GRACE_NS / 1e9:g})",
    )
    args = p.parse_args(argv)
    if not 0 <= args.grace <= 600:
        p.error("--grace must be between 0 and 600 seconds")
    logs.setup(NAME, args.log_level or "INFO")
    run = RuntimeDir.from_arg(args.run_dir)
    core = WatchdogCore(own_pid=os.getpid(), grace_ns=int(args.grace * 1e9))
    WatchdogShell(run, core).run()
    return 0
