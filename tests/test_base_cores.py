"""base.cores.wait_ms: the one rule by which every shell turns a core's deadline into a sleep."""

from __future__ import annotations

from kextless.base.cores import wait_ms

MS = 1_000_000


def test_no_deadline_waits_forever_or_up_to_the_bound() -> None:
    assert wait_ms(None, 0) == -1
    assert wait_ms(None, 0, longest_ms=250) == 250


def test_a_deadline_in_the_future_is_rounded_up_to_whole_ms() -> None:
    assert wait_ms(10 * MS, 0) == 10
    assert wait_ms(10 * MS + 1, 0) == 11  # never wake just before it
    assert wait_ms(10 * MS, 0, longest_ms=4) == 4


def test_a_deadline_that_has_passed_means_do_not_block() -> None:
    assert wait_ms(5 * MS, 5 * MS) == 0
    assert wait_ms(5 * MS, 9 * MS) == 0
