"""Waiting for a condition in a test, with a bound."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(cond: Callable[[], object], timeout: float = 5.0, every: float = 0.01) -> bool:
    """True as soon as `cond()` is true, False if it is not within `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(every)
