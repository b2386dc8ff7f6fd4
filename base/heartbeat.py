"""Loop-progress heartbeats: how the watchdog tells a hung process from a busy or idle one.

Each long-running process (broker, actors, policy) owns one 8-byte file, RUN/heartbeat/NAME,
holding the CLOCK_MONOTONIC time (ns) of its loop's last pass. The loop calls `beat(now_ns)` on
every pass and never sleeps longer than `MAX_SLEEP_S`, so a stale beat means the loop stopped
making progress while the pid lives (SIGSTOP, a deadlock, a blocking call that never returns):
the watchdog (deploy/watchdog.py) then kills the process and supervisord restarts it.

A beat is a store into a shared mapping, no system call, at most every `EVERY_NS`.
CLOCK_MONOTONIC is the same for every process of one boot, so readers compare against their own
`time.monotonic_ns()`.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

#: The longest a loop may sleep between passes (its poll timeout's cap).
MAX_SLEEP_S = 0.25
#: Beats closer together than this are not written (a busy loop passes thousands of times a
#: second; the watchdog needs ~10 a second).
EVERY_NS = 100_000_000
#: A beat older than this is a hung loop (4 missed passes at the longest sleep).
STALE_NS = 1_000_000_000

_STAMP = struct.Struct("<q")
DIR_NAME = "heartbeat"


def heartbeat_dir(run_dir: Path) -> Path:
    return run_dir / DIR_NAME


class Heartbeat:
    """One process's heartbeat file, mapped once; `beat` is a store into the mapping."""

    def __init__(self, run_dir: Path, name: str, every_ns: int = EVERY_NS) -> None:
        if not name.isidentifier():
            raise ValueError(f"heartbeat name {name!r} is not a plain name")
        d = heartbeat_dir(run_dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = d / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, _STAMP.size)
            self._map = mmap.mmap(fd, _STAMP.size)
        finally:
            os.close(fd)
        self.every_ns = every_ns
        self._last = 0

    def beat(self, now_ns: int) -> None:
        """The loop made a pass at `now_ns` (CLOCK_MONOTONIC)."""
        if now_ns - self._last >= self.every_ns:
            self._last = now_ns
            _STAMP.pack_into(self._map, 0, now_ns)

    def close(self) -> None:
        self._map.close()


def read_heartbeats(run_dir: Path) -> dict[str, int]:
    """Every process's last beat (CLOCK_MONOTONIC ns; 0: none yet). Unreadable files are
    left out rather than raising: the watchdog must keep watching the others."""
    out: dict[str, int] = {}
    d = heartbeat_dir(run_dir)
    try:
        entries = list(os.scandir(d))
    except OSError:
        return out
    for e in entries:
        try:
            with open(e.path, "rb") as f:
                raw = f.read(_STAMP.size)
        except OSError:
            continue
        if len(raw) == _STAMP.size:
            out[e.name] = _STAMP.unpack(raw)[0]
    return out


def capped_timeout_ms(timeout_ms: int | None) -> int:
    """A poll timeout (ms; None or -1: forever) capped so the loop beats often enough."""
    cap = int(MAX_SLEEP_S * 1000)
    if timeout_ms is None or timeout_ms < 0:
        return cap
    return min(timeout_ms, cap)


def open_heartbeat(run_dir: Path | None, name: str, broker_endpoint: str = "") -> Heartbeat | None:
    """RUN/heartbeat/NAME for the watchdog. Without `run_dir`, the run dir is the one the
    broker's ipc socket (RUN/actors.sock) lives in; with neither, or if the file cannot be
    made, no heartbeat: the process runs unwatched (said once), it is not refused."""
    if run_dir is None and broker_endpoint.startswith("ipc://"):
        run_dir = Path(broker_endpoint[len("ipc://") :]).parent
    if run_dir is None:
        return None
    try:
        return Heartbeat(run_dir, name)
    except OSError as e:
        logging.getLogger(name).warning(
            "no heartbeat (the watchdog will not watch this process): %s", e
        )
        return None
