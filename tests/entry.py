"""The `kextless` command under test: the entry point installed beside this interpreter.

Tests run what supervisord runs and users type, so a broken `[project.scripts]` entry fails
them; there is no fallback that would hide it.
"""

from __future__ import annotations

import sys
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("kextless")
if not _SCRIPT.is_file():
    raise RuntimeError(f"{_SCRIPT} is missing: install the project first (pip install -e '.[dev]')")

#: argv prefix of the installed command line, e.g. `[*KEXTLESS, "run", "broker"]`.
KEXTLESS: list[str] = [str(_SCRIPT)]
#: The same dispatcher as a module, for wrappers that need an interpreter (cProfile).
KEXTLESS_MODULE: list[str] = [sys.executable, "-m", "kextless.deploy.cli"]
