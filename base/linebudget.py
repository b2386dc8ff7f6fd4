"""A log-line budget: one line per event up to a rate, then one summary per window.

A pure helper (time comes in): a burst of timeouts or refused commands must leave a trace in
the log file without becoming a line storm. Per window (1 s) the first `per_window` events get
their own line; the rest are counted, and the count is reported once the window is over, at
the next event or at `due_ns()` (a core includes it in its `next_deadline_ns`).
"""

from __future__ import annotations

WINDOW_NS = 1_000_000_000
PER_WINDOW = 10


class LineBudget:
    def __init__(self, per_window: int = PER_WINDOW, window_ns: int = WINDOW_NS) -> None:
        if per_window < 1 or window_ns < 1:
            raise ValueError("a line budget needs at least one line per window of >= 1 ns")
        self.per_window = per_window
        self.window_ns = window_ns
        self._start: int | None = None
        self._used = 0
        #: Events of the current window that got no line of their own.
        self.suppressed = 0

    def note(self, now_ns: int) -> tuple[int, bool]:
        """One event: (events of a finished window to sum up first, or 0; whether this event
        gets its own line)."""
        summary = self.flush(now_ns)
        if self._start is None or now_ns >= self._start + self.window_ns:
            self._start, self._used = now_ns, 0
        if self._used < self.per_window:
            self._used += 1
            return summary, True
        self.suppressed += 1
        return summary, False

    def due_ns(self) -> int | None:
        """When the suppressed events' summary is due (None: nothing to sum up)."""
        if not self.suppressed or self._start is None:
            return None
        return self._start + self.window_ns

    def flush(self, now_ns: int) -> int:
        """The suppressed count once its window is over (then forgotten), else 0."""
        due = self.due_ns()
        if due is None or now_ns < due:
            return 0
        n, self.suppressed = self.suppressed, 0
        self._start, self._used = None, 0
        return n
