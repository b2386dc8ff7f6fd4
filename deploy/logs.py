"""One line per event on stderr, which supervisord captures per process."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

#: Log-line locations are given relative to the project root, like the kext's `src/device.rs`.
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def setup(name: str, level: str = "INFO") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(name)


def source_tag(depth: int = 1) -> str:
    """`file:line` of the caller `depth` frames up: the prefix the kext puts on every LogLine
    (`src/device.rs:201 Verdict invalid id: 7`)."""
    frame = sys._getframe(depth + 1)
    path = frame.f_code.co_filename
    if path.startswith(_ROOT):
        path = path[len(_ROOT):]
    return f"{path}:{frame.f_lineno}"
