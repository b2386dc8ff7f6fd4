"""The log-line budget (base/linebudget.py, shared by the ALE and the broker): one line per
event up to a rate, then one summary per window."""

from __future__ import annotations

import pytest

from kextless.base.linebudget import LineBudget

S = 1_000_000_000


def test_lines_up_to_the_budget_then_one_summary_when_the_window_is_over() -> None:
    b = LineBudget(per_window=3)
    assert [b.note(i) for i in range(5)] == [(0, True)] * 3 + [(0, False)] * 2
    assert b.due_ns() == S and b.flush(S - 1) == 0
    assert b.flush(S) == 2 and b.due_ns() is None and b.flush(2 * S) == 0
    assert b.note(2 * S) == (0, True)  # a new window


def test_the_next_event_after_the_window_carries_the_summary() -> None:
    b = LineBudget(per_window=1)
    b.note(0)
    b.note(1)
    assert b.note(5 * S) == (1, True)


def test_a_quiet_budget_is_never_due() -> None:
    b = LineBudget()
    assert b.due_ns() is None
    b.note(0)
    assert b.due_ns() is None  # nothing suppressed: nothing to sum up


def test_a_budget_needs_lines_and_a_window() -> None:
    with pytest.raises(ValueError, match="at least one line"):
        LineBudget(per_window=0)
