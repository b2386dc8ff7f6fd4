"""The divert library's loss counters, summed over every handle the capture opened, each with
the wall time it last rose.

A full ring buffer lets packets pass the firewall unexamined and a full userspace queue drops
them (../shared/reference/pydivert-linux.md §4.2); neither is visible anywhere else, so every
rise becomes a Warning LogLine for Portmaster and the totals travel to `kextless status` in the
capture's Health. Pure: the shell supplies the handle's stats and the clock.

With the kernel flow cache, what the divert program lets by unexamined meets the fail-closed
guard (kernel_cache.py), which drops it: `guard_dropped` counts those packets (a full ring, a
stall, or no capture running at all: the guard outlives a killed capture, and a restarted
one adopts its counter, so the first reading reports the drops of the time nobody captured).
kextless_pre's own counters (cached passes and drops, misses) travel as `kernel.KEY`.
"""

from __future__ import annotations

from collections.abc import Mapping

from kextless.protocol.enums import Severity
from kextless.protocol.messages import Health, Log

#: pydivert EBPFDivert.stats() keys that mean a packet was lost or not examined, and what a rise
#: means for the traffic.
HANDLE_COUNTERS: dict[str, str] = {
    "ringbuf_full": "passed UNEXAMINED (eBPF ring buffer full)",
    "queue_full": "dropped (userspace queue full or too old)",
    "too_big": "not diverted (too big for the ring)",
    "parsing_errors": "not diverted (the program could not parse them)",
}
#: The fail-closed guard's drops (kernel_cache.GuardStats.dropped), beside them in status.
GUARD_DROPPED = "guard_dropped"
KERNEL_LOSS: dict[str, str] = {
    GUARD_DROPPED: "dropped by the fail-closed guard: they passed the divert program "
    "unexamined (ring full, a stall, or no capture running)",
}
#: Every loss counter `kextless status` shows (`divert.KEY` in Health).
LOSS_COUNTERS: dict[str, str] = HANDLE_COUNTERS | KERNEL_LOSS
#: Health key prefix of kextless_pre's counters (kernel_cache.PreStat names, lower case).
KERNEL_PREFIX = "kernel."
#: Health counter key suffix for a counter's last rise (Unix seconds; 0: never rose).
LAST_RISE = ".last_rise_unix"
PREFIX = "divert."


class LossCounters:
    """Totals across handle swaps: each handle's stats count from zero, so the shell calls
    `new_handle` when it adopts one and `observe` with that handle's stats."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = dict.fromkeys(LOSS_COUNTERS, 0)
        self.last_rise_unix: dict[str, float] = dict.fromkeys(LOSS_COUNTERS, 0.0)
        self._prev: dict[str, int] = {}
        self._guard_prev = 0
        self.kernel: dict[str, int] = {}

    def new_handle(self) -> None:
        self._prev = {}

    def observe(self, stats: Mapping[str, int], wall_s: float) -> list[Log]:
        """Fold in a handle's stats; one Warning Log per counter that rose since last time."""
        logs = []
        for key, meaning in HANDLE_COUNTERS.items():
            try:
                cur = int(stats.get(key, 0))
            except (TypeError, ValueError):
                continue
            prev = self._prev.get(key, 0)
            if cur < prev:  # the counter restarted (a handle we were not told about)
                prev = 0
            self._prev[key] = cur
            if cur > prev:
                self.totals[key] += cur - prev
                self.last_rise_unix[key] = wall_s
                logs.append(
                    Log(
                        Severity.WARNING,
                        f"capture: divert {key} rose by {cur - prev} (total "
                        f"{self.totals[key]}): packets {meaning}",
                    )
                )
        return logs

    def observe_kernel(
        self, guard_dropped: int | None, pre: Mapping[str, int], wall_s: float
    ) -> list[Log]:
        """Fold in the kernel programs' counters (cumulative in their maps); a Warning Log when
        the guard's drops rose. `guard_dropped` None: no guard (fail open)."""
        self.kernel = {str(k): int(v) for k, v in pre.items()}
        if guard_dropped is None:
            return []
        prev = self._guard_prev
        if guard_dropped < prev:  # a new guard program (its counter starts at zero)
            prev = 0
        self._guard_prev = guard_dropped
        if guard_dropped <= prev:
            return []
        rise = guard_dropped - prev
        self.totals[GUARD_DROPPED] += rise
        self.last_rise_unix[GUARD_DROPPED] = wall_s
        return [
            Log(
                Severity.WARNING,
                f"capture: guard_dropped rose by {rise} (total {self.totals[GUARD_DROPPED]}): "
                f"packets {KERNEL_LOSS[GUARD_DROPPED]}",
            )
        ]

    def health(self, pid: int, extra: Mapping[str, int] | None = None) -> Health:
        """The capture's Health: `divert.KEY` totals and `divert.KEY.last_rise_unix`, plus the
        core's own counters."""
        counters: dict[str, float] = {k: float(v) for k, v in (extra or {}).items()}
        for key in LOSS_COUNTERS:
            counters[PREFIX + key] = float(self.totals[key])
            counters[PREFIX + key + LAST_RISE] = self.last_rise_unix[key]
        for key, value in self.kernel.items():
            counters[KERNEL_PREFIX + key] = float(value)
        return Health("capture", pid, counters)
