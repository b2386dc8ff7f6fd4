"""Who a pid is, read from /proc once per connection (the I/O side of the rules' process keys).

A process that is gone by the time its connection is asked about gives what could be read
(maybe nothing). A short cache keeps a storm of connections from one process from reading
/proc each time; it is keyed by pid and lives `ttl_s` (a pid reused within a second is rare,
and an exec within that second would show the old executable).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
from pathlib import Path

from kextless.actors.policy.view import ProcessFacts

_NONE = ProcessFacts()


def read_facts(pid: int, proc: Path = Path("/proc")) -> ProcessFacts:
    """The facts of `pid` (pid 0: unknown, empty facts); fields it cannot read stay empty."""
    if pid <= 0:
        return _NONE
    base = proc / str(pid)
    name = exe = user = ""
    uid = -1
    with contextlib.suppress(OSError):
        name = (base / "comm").read_text(encoding="utf-8", errors="replace").rstrip("\n")
    with contextlib.suppress(OSError):
        exe = os.readlink(base / "exe")
    try:
        for line in (base / "status").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        pass
    if uid >= 0:
        user = _user_name(uid)
    return ProcessFacts(pid=pid, name=name, exe=exe, user=user, uid=uid)


_USERS: dict[int, str] = {}


def _user_name(uid: int) -> str:
    name = _USERS.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        if len(_USERS) < 4096:
            _USERS[uid] = name
    return name


class FactsCache:
    """read_facts with a per-pid cache of `ttl_s` seconds, at most `size` pids."""

    def __init__(self, ttl_s: float = 1.0, size: int = 4096, proc: Path = Path("/proc")) -> None:
        self.ttl_ns = int(ttl_s * 1e9)
        self.size = size
        self.proc = proc
        self._cache: dict[int, tuple[int, ProcessFacts]] = {}

    def get(self, pid: int) -> ProcessFacts:
        if pid <= 0:
            return _NONE
        now = time.monotonic_ns()
        hit = self._cache.get(pid)
        if hit is not None and now - hit[0] < self.ttl_ns:
            return hit[1]
        facts = read_facts(pid, self.proc)
        if len(self._cache) >= self.size:
            self._cache.clear()
        self._cache[pid] = (now, facts)
        return facts
