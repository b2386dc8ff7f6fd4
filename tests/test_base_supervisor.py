"""base/supervisor: what the capture asks at its SIGTERM (is the whole instance stopping?)."""

from __future__ import annotations

from pathlib import Path

from kextless.base.rundir import RuntimeDir
from kextless.base.supervisor import supervisor_state


def test_no_supervisord_is_said_and_never_taken_for_a_shutdown(tmp_path: Path) -> None:
    run = RuntimeDir(tmp_path)
    assert supervisor_state(run).startswith("no socket at ")
    run.supervisor_socket.write_text("")  # a file that is not a listening socket
    state = supervisor_state(run, timeout=0.2)
    assert state.startswith("unknown (") and state != "SHUTDOWN"
