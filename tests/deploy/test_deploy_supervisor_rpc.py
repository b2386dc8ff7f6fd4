"""Talking to supervisord never hangs: a supervisord that is stopped (SIGSTOP), hung or gone
makes `status` and `down` fail or clean up within their timeouts (no root needed).

A hung supervisord is stood in for by a process that listens on the instance's socket and
never accepts: the kernel completes connects into its backlog, so a client without a timeout
would wait for a reply forever, and once the backlog is full it would wait in connect().
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.base.rundir import RuntimeDir
from kextless.deploy.down import down
from kextless.deploy.instance import Instance, write_instance
from kextless.deploy.processes import pid_alive
from kextless.deploy.status import status
from kextless.deploy.supervisor_rpc import RPC_ERRORS, rpc, supervisord_alive


@pytest.fixture
def run_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="klt-r-", dir="/tmp"))  # short: sun_path is 107 bytes
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(0)
    return sock


def _fill_backlog(path: Path) -> list[socket.socket]:
    """Connect until the listener's queue is full, so the next connect() would block."""
    held = []
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return held
        held.append(s)
    raise AssertionError("the backlog never filled")


@pytest.mark.parametrize("backlog_full", [False, True], ids=["reply", "connect"])
def test_a_call_to_a_supervisord_that_never_answers_times_out(
    run_root: Path, backlog_full: bool
) -> None:
    run = RuntimeDir.for_instance(None, run_root).create()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_listener(run.supervisor_socket))
        if backlog_full:
            for s in _fill_backlog(run.supervisor_socket):
                stack.enter_context(s)
        start = time.monotonic()
        with pytest.raises(RPC_ERRORS):
            rpc(run, timeout=0.3).supervisor.getState()
        assert time.monotonic() - start < 2.0
        start = time.monotonic()
        assert supervisord_alive(run, timeout=0.3) is False
        assert time.monotonic() - start < 2.0


def test_a_socket_nobody_listens_on_is_not_alive(run_root: Path) -> None:
    run = RuntimeDir.for_instance(None, run_root).create()
    _listener(run.supervisor_socket).close()  # the file stays, as after a SIGKILL
    assert run.supervisor_socket.is_socket()
    assert supervisord_alive(run) is False


@pytest.mark.slow
def test_a_hung_supervisord_does_not_hang_status_or_down(run_root: Path) -> None:
    run = RuntimeDir.for_instance(None, run_root).create()
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(0)\n"
        "print('ready', flush=True); time.sleep(600)"
    )
    # It names the instance's config like supervisord does, so `down` knows it for ours.
    hung = subprocess.Popen(
        [sys.executable, "-c", code, str(run.supervisor_socket), "-c", str(run.supervisor_conf)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hung.stdout is not None and hung.stdout.readline() == "ready\n"
        write_instance(
            run,
            Instance(
                netns=None,
                run_dir=str(run.path),
                endpoint=run.kext_endpoint,
                supervisord_pid=hung.pid,
            ),
        )
        start = time.monotonic()
        code_, report = status(None, run_root)
        assert (code_, report["broker_error"]) == (3, "not running")
        assert time.monotonic() - start < 5
        start = time.monotonic()
        lines: list[str] = []
        result = down(None, run_root, out=lines.append)
        assert time.monotonic() - start < 10
        # It did not answer, so down sent it SIGTERM and waited for it to go.
        assert result.was_running and result.problems == []
        assert lines[0] == "kextless stopped for the host namespace: no programs were running"
        assert [line for line in lines[1:] if not line.startswith("kept: ")] == []
        assert hung.wait(5) == -15 and not pid_alive(hung.pid)
        assert not run.supervisor_socket.exists()
    finally:
        if hung.poll() is None:
            hung.kill()
            hung.wait(5)
