"""One line per event on stderr, which supervisord captures per process."""

from __future__ import annotations

import logging
import sys


def setup(name: str, level: str = "INFO") -> logging.Logger:
    """Route every logger of this process to stderr as `time name[pid] LEVEL message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(name)
