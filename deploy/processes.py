"""Finding an instance's processes in /proc, so `down` can end them even when supervisord is gone
(or restarted them under PIDs nobody recorded), and never touches anyone else's process."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kextless.base.rundir import RuntimeDir


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a daemonized supervisord may be reaped late, or never)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _names_instance(cmdline: bytes, run: RuntimeDir) -> bool:
    """Every process `up` starts has the run dir (or, for supervisord, its config) as one whole
    argument; a user's `tail -f RUN/logs/x.log` does not, so it is never mistaken for ours."""
    args = cmdline.split(b"\0")
    return str(run.path).encode() in args or str(run.supervisor_conf).encode() in args


def pid_is_ours(pid: int, run: RuntimeDir) -> bool:
    """Guards against PID reuse: is this live process one that `up` started for `run`?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _names_instance(cmdline, run) and pid_alive(pid)


def instance_processes(run: RuntimeDir) -> list[int]:
    """Live processes of this instance, found by argv: also those restarted after `up`
    recorded their PIDs, which matters once supervisord itself is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if _names_instance((entry / "cmdline").read_bytes(), run):
                    found.append(int(entry.name))
    return [p for p in found if pid_alive(p)]


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Poll until every pid has exited; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def argv_of(pid: int) -> list[str]:
    """A process's argv ([] once it is gone), for naming it in a report."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def program_of(pid: int, argvs: Mapping[str, Sequence[str]]) -> str | None:
    """Which program a process is, when supervisord restarted it under a PID we never saw.
    Its argv and the configured one end alike: `ip netns exec NS` has exec'd away, or a
    script's interpreter was put in front."""
    argv = argv_of(pid)
    for name, configured in argvs.items():
        k = min(len(argv), len(configured))
        if k and argv[-k:] == list(configured[-k:]):
            return name
    return None
