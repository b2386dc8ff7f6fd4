"""The kext's log ring (kext-contract C12), kept honest.

Like the kext: 1024 line slots, the oldest overwritten, lines reach Portmaster only when it sends
GetLogs. Unlike the kext: overwriting is counted and reported by a marker line at the next flush,
and order is never scrambled.
"""

from __future__ import annotations

from collections import deque

from kextless.protocol.enums import Severity
from kextless.protocol.infos import LogLine
from kextless.protocol.logtag import source_tag

RING_SLOTS = 1024
#: Longest text kept; the kext's lines are ~650 bytes at most.
MAX_LINE = 1000


def clean_line(text: str) -> str:
    """One line of non-empty text: Portmaster rejects empty LogLines and the wire has no room
    for newlines."""
    text = text.replace("\r", " ").replace("\n", " ").replace("\0", " ").strip()
    if len(text) > MAX_LINE:
        text = text[: MAX_LINE - 3] + "..."
    return text or "(empty log line)"


class LogRing:
    def __init__(self, slots: int = RING_SLOTS) -> None:
        self._lines: deque[tuple[Severity, str]] = deque(maxlen=slots)
        self.overwritten = 0  # since the last flush
        self.total_overwritten = 0
        self.total_lines = 0

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, severity: Severity, text: str) -> None:
        lines = self._lines
        if len(lines) == lines.maxlen:
            self.overwritten += 1
            self.total_overwritten += 1
        lines.append((severity, clean_line(text)))
        self.total_lines += 1

    def flush(self) -> list[bytes]:
        """Take every buffered line as an encoded LogLine info, oldest first, behind a marker
        line if some were overwritten since the last flush."""
        out: list[bytes] = []
        if self.overwritten:
            out.append(
                LogLine(
                    Severity.WARNING,
                    f"{source_tag(1)} log ring overflowed: "
                    f"{self.overwritten} older lines were lost",
                ).encode()
            )
            self.overwritten = 0
        out.extend(LogLine(sev, text).encode() for sev, text in self._lines)
        self._lines.clear()
        return out
