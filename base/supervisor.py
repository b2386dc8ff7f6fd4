"""Talking to an instance's supervisord: XML-RPC over the unix socket in its run dir.

Shared by `deploy` (up, status, down, reload, the watchdog) and the capture, which must know at
its SIGTERM whether the whole instance is stopping (then it takes its kernel programs and nft
table with it, leaving the network as it was) or only itself is restarted (then they stay, so
the namespace stays fail closed until the new capture adopts them).

supervisor ships the transport (`SupervisorTransport`); its unix connection opens a socket
without a timeout, so a stopped or hung supervisord would hang the caller forever. The one
change here is a connection whose socket has the timeout the caller asked for. The socket is
owner-only and asks for the per-instance password `up` writes to the run dir (mode 0600).
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from typing import Any

from supervisor.xmlrpc import Faults, SupervisorTransport, UnixStreamHTTPConnection

from kextless.base.rundir import RuntimeDir

RPC_TIMEOUT = 5.0
#: supervisord's HTTP user for the instance socket, and the file holding its password.
USERNAME = "kextless"
SECRET_FILE = "supervisor.secret"
#: What a call can raise when supervisord is gone, stopped, or answers badly.
RPC_ERRORS = (OSError, xmlrpc.client.Error, http.client.HTTPException)


class _TimedUnixConnection(UnixStreamHTTPConnection):  # type: ignore[misc]  # supervisor is untyped
    """supervisor's connection, but its socket honours `timeout` (connect, send and receive)."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)


def read_password(run: RuntimeDir) -> str | None:
    """The instance's password, or None (an instance started before passwords existed)."""
    try:
        return (run.path / SECRET_FILE).read_text().strip() or None
    except OSError:
        return None


def rpc(run: RuntimeDir, timeout: float = RPC_TIMEOUT) -> Any:
    """A proxy for supervisord's XML-RPC interface over the instance's unix socket; every call
    raises one of RPC_ERRORS instead of waiting longer than `timeout` seconds."""
    path = str(run.supervisor_socket)
    password = read_password(run)
    transport = SupervisorTransport(
        username=USERNAME if password else None, password=password, serverurl=f"unix://{path}"
    )

    def connection() -> _TimedUnixConnection:
        conn = _TimedUnixConnection("localhost", timeout=timeout)
        conn.socketfile = path
        return conn

    transport._get_connection = connection
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport, allow_none=True)


def supervisor_state(run: RuntimeDir, timeout: float = 1.0) -> str:
    """The instance's supervisord state (RUNNING, SHUTDOWN while it stops every program:
    `kextless down`, a SIGTERM to it), or why it cannot say."""
    if not run.supervisor_socket.exists():
        return f"no socket at {run.supervisor_socket}"
    try:
        return str(rpc(run, timeout).supervisor.getState()["statename"])
    except xmlrpc.client.Fault as e:
        if e.faultCode == Faults.SHUTDOWN_STATE:  # it refuses every call while it stops
            return "SHUTDOWN"
        return f"unknown ({e})"
    except (*RPC_ERRORS, KeyError, TypeError) as e:
        return f"unknown ({type(e).__name__}: {e})"
