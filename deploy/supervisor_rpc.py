"""Talking to an instance's supervisord: XML-RPC over the unix socket in its run dir.

supervisor ships the transport (`SupervisorTransport`); its unix connection opens a socket
without a timeout, so a stopped or hung supervisord would hang `status` and `down` forever.
The one change here is a connection whose socket has the timeout the caller asked for.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from typing import Any

from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

from kextless.base.rundir import RuntimeDir

RPC_TIMEOUT = 5.0
#: What a call can raise when supervisord is gone, stopped, or answers badly.
RPC_ERRORS = (OSError, xmlrpc.client.Error, http.client.HTTPException)


class _TimedUnixConnection(UnixStreamHTTPConnection):  # type: ignore[misc]  # supervisor is untyped
    """supervisor's connection, but its socket honours `timeout` (connect, send and receive)."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)


def rpc(run: RuntimeDir, timeout: float = RPC_TIMEOUT) -> Any:
    """A proxy for supervisord's XML-RPC interface over the instance's unix socket; every call
    raises one of RPC_ERRORS instead of waiting longer than `timeout` seconds."""
    path = str(run.supervisor_socket)
    transport = SupervisorTransport(serverurl=f"unix://{path}")

    def connection() -> _TimedUnixConnection:
        conn = _TimedUnixConnection("localhost", timeout=timeout)
        conn.socketfile = path
        return conn

    transport._get_connection = connection
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport, allow_none=True)


def supervisord_alive(run: RuntimeDir, timeout: float = 2.0) -> bool:
    """True when a supervisord answers on this instance's socket within `timeout` seconds."""
    if not run.supervisor_socket.exists():
        return False
    try:
        state: str = rpc(run, timeout).supervisor.getState()["statename"]
    except RPC_ERRORS:
        return False
    return state == "RUNNING"
