"""Pending ids survive an ALE restart: they are u64, global and never reused (kext-contract C10).

A restarted ALE must not hand Portmaster an id it already used in the same broker session, so
the shell reserves ids in blocks and records the end of the current block in a file before
issuing any id from it. After a crash the next process starts past everything that might
have been issued; the gap costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCK = 4096


class IdReservation:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.limit = 0

    def first_id(self) -> int:
        """Where the new process starts: after the last reserved block, or 1."""
        try:
            start = int(self.path.read_text().strip())
        except FileNotFoundError:
            start = 1
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the id reservation {self.path}: {exc}") from None
        if start < 1:
            raise RuntimeError(f"id reservation {self.path} holds {start}, expected >= 1")
        self.reserve(start)
        return start

    def reserve(self, next_id: int) -> None:
        """Record that ids below `next_id + BLOCK` may be issued (atomic replace)."""
        self.limit = next_id + BLOCK
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.limit}\n")
        os.replace(tmp, self.path)

    def ensure(self, next_id: int) -> None:
        """Call before issuing `next_id`; writes a new block only when one is used up."""
        if next_id >= self.limit:
            self.reserve(next_id)
