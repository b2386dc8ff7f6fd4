"""The shape every actor's pure core has, so shells and tests read them all the same way.

A core is a class whose input methods take the input and `now_ns` (a monotonic clock reading
the shell took) and return one kind of value: a list of that actor's effects, frozen records
the shell carries out in order (send this message, reinject that packet, log this line). A
core never sleeps, reads a clock, touches a socket, a handle or /proc: facts it needs (its
own RSS, a pid) come in as arguments.

`next_deadline_ns()` says when the core next has something to do on its own (a timeout, an
expiry); the shell calls `on_deadline(now_ns)` once that time has come, and otherwise sleeps
until the earlier of that deadline and its next input, instead of ticking at a fixed rate.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

E = TypeVar("E")


class Core(Protocol[E]):
    """What a shell needs of a core besides its input methods."""

    def next_deadline_ns(self) -> int | None:
        """Monotonic time of the next `on_deadline` work, or None if there is none."""
        ...

    def on_deadline(self, now_ns: int) -> list[E]:
        """Do what is due at `now_ns` (calling it early is harmless: nothing is due yet)."""
        ...


def wait_ms(deadline_ns: int | None, now_ns: int, longest_ms: int | None = None) -> int:
    """How long a shell may block (ms, for zmq poll) before `deadline_ns`: rounded up so it
    never wakes just short of the deadline, 0 if it has passed, -1 (forever) if there is no
    deadline and no `longest_ms` bound."""
    if deadline_ns is None:
        return -1 if longest_ms is None else longest_ms
    ms = max(0, -(-(deadline_ns - now_ns) // 1_000_000))
    return ms if longest_ms is None else min(ms, longest_ms)
