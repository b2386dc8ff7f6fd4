"""The "file:line" tag the kext puts at the start of every LogLine's text.

Portmaster shows kext log lines as they come (`src/device.rs:201 Verdict invalid id: 7`), so
the tag is part of what a LogLine carries on the wire; kextless tags its own lines the same
way, with the path relative to the package root (`broker/core.py:132 ...`).
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The folder holding protocol/, broker/, actors/ ...: in a checkout the repository root, in
#: an installed copy site-packages/kextless.
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def source_tag(depth: int = 1) -> str:
    """`file:line` of the caller `depth` frames up."""
    frame = sys._getframe(depth + 1)
    path = frame.f_code.co_filename
    if path.startswith(_ROOT):
        path = path[len(_ROOT) :]
    return f"{path}:{frame.f_lineno}"
