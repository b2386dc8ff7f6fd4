"""KextClient: Portmaster's kextinterface, over the broker's ZeroMQ wire (docs/broker-wire.md).

Thread safety: one reader plus any number of writers. A blocked read must never hold up a verdict
write, so the client uses three kinds of DEALER socket, never sharing one between threads:
* the control socket (open/close/version/stats), behind a lock; it owns the session;
* the reader socket, used by `read`/`recv_info`, behind its own lock;
* one writer socket per writing thread (created on first use), so writes run in parallel.

Infos keep the kext's raw fields (addresses as 4 or 16 network-order bytes, the version as 4
bytes); `local_address`, `remote_address` and `KextClient.version_tuple` give the same as
`ipaddress` objects and a tuple.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol

import zmq
import zmq.auth

from kextless.base.security import UnsafePath, check_private
from kextless.broker import wire
from kextless.protocol.commands import (
    CleanEndedConnectionsCommand,
    ClearCacheCommand,
    GetBandwidthStatsCommand,
    GetLogsCommand,
    PrintMemoryStatsCommand,
    ShutdownCommand,
    UpdateV4Command,
    UpdateV6Command,
    VerdictCommand,
    encode_command,
)
from kextless.protocol.enums import Verdict
from kextless.protocol.infos import Info
from kextless.protocol.stream import DecodeError, InfoStreamDecoder

#: Portmaster's read chunk is 1024 bytes; bigger reads cost the same round trip and carry more.
DEFAULT_READ_SIZE = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HasAddresses(Protocol):
    """A connection info, a connection-end info or a bandwidth entry: raw address fields."""

    @property
    def local_ip(self) -> bytes: ...

    @property
    def remote_ip(self) -> bytes: ...


def ip(raw: bytes) -> IPAddress:
    """A raw address as the kext sends it (4 or 16 network-order bytes) as an ipaddress
    object; ValueError for any other length."""
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ValueError(f"an address is 4 or 16 bytes, got {len(raw)}: {bytes(raw[:32])!r}")


def local_address(info: HasAddresses) -> IPAddress:
    """The info's local address (`info.local_ip`, raw) as an ipaddress object."""
    return ip(info.local_ip)


def remote_address(info: HasAddresses) -> IPAddress:
    """The info's remote address (`info.remote_ip`, raw) as an ipaddress object."""
    return ip(info.remote_ip)


class KextError(Exception):
    """The broker answered X, or rejected a command; `str(exc)` is its message."""

    def __init__(self, message: str, status: wire.Status | None = None) -> None:
        super().__init__(message)
        self.status = status


class KextEOF(KextError, EOFError):
    """The session ended (Shutdown, close, or the broker stopping): no more infos will come."""


class KextTimeout(KextError, TimeoutError):
    """A read's timeout passed with nothing queued (nothing was consumed), or the broker did
    not answer a request in time."""


def load_curve_certs(
    server_cert: str | os.PathLike[str], client_cert: str | os.PathLike[str]
) -> tuple[bytes, tuple[bytes, bytes]]:
    """(server public key, (client public, client secret)) from zmq.auth certificate files, as
    `zmq.auth.create_certificates` writes them. The server's may be its public or secret file;
    the client's must hold its secret key. ValueError with a one-line reason otherwise, also
    when another user could change either file (they would choose whom we trust, or be us)."""
    try:
        check_private(os.fspath(server_cert), "CURVE server certificate", secret=True)
        check_private(os.fspath(client_cert), "CURVE client certificate", secret=True)
    except UnsafePath as e:
        raise ValueError(str(e)) from None
    try:
        server_public, _ = zmq.auth.load_certificate(server_cert)
        public, secret = zmq.auth.load_certificate(client_cert)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load CURVE certificates: {e}") from None
    if secret is None:
        raise ValueError(f"{os.fspath(client_cert)} holds no secret key")
    return server_public, (public, secret)


class _Sock:
    """A DEALER and the lock that makes it single-threaded (zmq sockets are not thread-safe)."""

    __slots__ = ("lock", "sock")

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.lock = threading.Lock()


class KextClient:
    """A session on the broker's device. Use as a context manager: `with KextClient(ep) as k:`."""

    def __init__(
        self,
        endpoint: str,
        *,
        request_timeout: float = 5.0,
        read_size: int = DEFAULT_READ_SIZE,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve_server_key: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
        curve_server_cert: str | os.PathLike[str] | None = None,
        curve_client_cert: str | os.PathLike[str] | None = None,
    ) -> None:
        """`curve_server_key` (z85 public key) and `curve_keypair` (public, secret) are needed
        only for a tcp:// broker with CURVE; `curve_server_cert` and `curve_client_cert` give the
        same as zmq.auth certificate files (see `load_curve_certs`, which raises ValueError).
        `request_timeout` bounds every request but a read, also one sent without a session."""
        if (curve_server_cert is None) != (curve_client_cert is None):
            raise ValueError("CURVE needs both curve_server_cert and curve_client_cert")
        if curve_server_cert is not None and curve_client_cert is not None:
            if curve_server_key is not None or curve_keypair is not None:
                raise ValueError("give CURVE keys or certificate files, not both")
            curve_server_key, curve_keypair = load_curve_certs(curve_server_cert, curve_client_cert)
        self.endpoint = endpoint
        self.request_timeout = request_timeout
        self.read_size = read_size
        self._ctx = context or zmq.Context.instance()
        self._curve: tuple[bytes, tuple[bytes, bytes]] | None = None
        if curve_server_key is not None:
            if curve_keypair is None:
                raise ValueError("curve_server_key needs curve_keypair (the client's own keys)")
            self._curve = (curve_server_key, curve_keypair)
        self._control_lock = threading.Lock()
        self._reader_lock = threading.Lock()
        self._sockets_lock = threading.Lock()
        self._local = threading.local()
        self._sockets: list[_Sock] = []
        self._control: _Sock | None = None
        self._reader: _Sock | None = None
        self._decoder = InfoStreamDecoder()
        self._pending: deque[Info | DecodeError] = deque()
        self._eof = False
        self._closed = True

    # ---- sockets -------------------------------------------------------------------------------

    def _socket(self) -> _Sock:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            server_key, (public, secret) = self._curve
            sock.curve_serverkey = server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(self.endpoint)
        s = _Sock(sock)
        with self._sockets_lock:
            self._sockets.append(s)
        return s

    def _forget(self, s: _Sock) -> None:
        """A socket whose request timed out may still get the late reply: never reuse it.
        Called with s.lock held."""
        with self._sockets_lock:
            if s in self._sockets:
                self._sockets.remove(s)
        s.sock.close(0)

    def _request(self, s: _Sock, frames: list[bytes], timeout: float | None) -> list[bytes]:
        """One request and its reply on `s`, under its lock. Waits in short slices so that a
        close() from another thread ends the wait within half a second."""
        with s.lock:
            sock = s.sock
            if sock.closed:
                raise KextEOF("client is closed")
            sock.send_multipart(frames)
            # Most replies (every W) come within microseconds: only a slow one pays for the
            # sliced wait below.
            if not sock.poll(2):
                self._wait_reply(s, frames, timeout)
            reply = sock.recv_multipart()
        if reply[0] == wire.ERROR:
            raise KextError(reply[1].decode("utf-8", "replace") if len(reply) > 1 else "error")
        return reply

    def _wait_reply(self, s: _Sock, frames: list[bytes], timeout: float | None) -> None:
        """Wait in half-second slices so a close() from another thread ends the wait. A request
        sent without a session (version, stats) has no close to wait for: it waits its time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        in_session = not self._closed
        while True:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if s.sock.poll(max(0, int(left * 1000))):
                return
            if in_session and self._closed:
                raise KextEOF("client closed while waiting")
            if deadline is not None and time.monotonic() >= deadline:
                self._forget(s)
                raise KextTimeout(
                    f"no reply to {frames[0].decode()} within {timeout} s from {self.endpoint}"
                )

    def _control_request(self, frames: list[bytes]) -> list[bytes]:
        with self._control_lock:
            if self._control is None or self._control.sock.closed:
                self._control = self._socket()
            return self._request(self._control, frames, self.request_timeout)

    # ---- session -------------------------------------------------------------------------------

    def open(self) -> KextClient:
        """Open the session (CreateFile). KextError("device busy ...") if another client has it."""
        self._closed = False
        self._eof = False
        self._decoder = InfoStreamDecoder()
        self._pending.clear()
        try:
            self._control_request([wire.OPEN])
        except BaseException:
            self.close_sockets()
            raise
        return self

    def close(self) -> None:
        """Close the session (CloseHandle). A waiting read ends with KextEOF."""
        if self._closed:
            return
        try:
            self._control_request([wire.CLOSE])
        except KextError:
            pass  # already closed broker-side (e.g. the broker restarted): nothing to undo
        finally:
            self.close_sockets()

    def close_sockets(self) -> None:
        """Close every socket once no thread is using it (waits are cut short by _closed)."""
        self._closed = True
        with self._sockets_lock:
            socks, self._sockets = self._sockets, []
        for s in socks:
            if s.lock.acquire(timeout=2.0):
                try:
                    s.sock.close(0)
                finally:
                    s.lock.release()

    def __enter__(self) -> KextClient:
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def version(self) -> bytes:
        """The 4 version bytes [major, minor, revision, build]; Portmaster needs major >= 2."""
        reply = self._control_request([wire.VERSION])
        return reply[1]

    def version_tuple(self) -> tuple[int, int, int, int]:
        """The version as (major, minor, revision, build), e.g. (2, 1, 0, 0): compare it with
        `>= (2, 0)`. KextError if the broker did not send 4 bytes."""
        raw = self.version()
        if len(raw) != 4:
            raise KextError(f"the broker's version is {len(raw)} bytes, not 4: {raw[:16]!r}")
        return (raw[0], raw[1], raw[2], raw[3])

    def stats(self) -> dict[str, Any]:
        """The broker's live counters (queue, sessions, infos, commands, verdict latency). Needs
        no session, so it works while another client (the policy) holds the device; call
        `close_sockets()` afterwards. KextError if the reply is not [S, a JSON object]."""
        reply = self._control_request([wire.STATS])
        if len(reply) != 2 or reply[0] != wire.STATS:
            raise KextError(f"unexpected status reply from the broker: {reply[:3]!r}")
        try:
            counters = json.loads(reply[1])
        except ValueError as e:
            raise KextError(f"the broker's status is not JSON: {e}") from None
        if not isinstance(counters, dict):
            raise KextError("the broker's status is not a JSON object")
        return counters

    # ---- reading -------------------------------------------------------------------------------

    def read(self, max_bytes: int = DEFAULT_READ_SIZE, timeout: float | None = None) -> bytes:
        """One kext read: blocks until data (never empty). KextEOF after Shutdown/close,
        KextTimeout when `timeout` seconds pass with nothing queued (nothing consumed)."""
        frames = [wire.READ, wire.U32.pack(max_bytes)]
        if timeout is not None:
            frames.append(wire.U32.pack(max(1, round(timeout * 1000))))
        with self._reader_lock:
            if self._closed:
                raise KextEOF("client is closed")
            if self._reader is None or self._reader.sock.closed:
                self._reader = self._socket()
            wait = None if timeout is None else timeout + self.request_timeout
            reply = self._request(self._reader, frames, wait)
        op = reply[0]
        if op == wire.READ:
            return reply[1]
        if op == wire.EOF:
            raise KextEOF("end of file: the session ended")
        if op == wire.TIMEOUT:
            raise KextTimeout(f"nothing to read within {timeout} s")
        raise KextError(f"unexpected reply {op!r} to R")

    def recv_info(self, timeout: float | None = None) -> Info | DecodeError:
        """The next info (or a DecodeError for a record that could not be decoded, which
        Portmaster logs and skips). Raises KextEOF at the end of the stream."""
        while not self._pending:
            if self._eof:
                raise KextEOF("end of file: the session ended")
            try:
                data = self.read(self.read_size, timeout)
            except KextEOF:
                self._eof = True
                self._pending.extend(self._decoder.close())
                continue
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def take_read(self) -> list[Info | DecodeError]:
        """The infos the last read brought that recv_info has not returned yet (no I/O): a
        decision maker can answer a whole read at once (`write_many`)."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def infos(self, timeout: float | None = None) -> Iterator[Info | DecodeError]:
        """Every info until the session ends; the iteration then stops cleanly."""
        while True:
            try:
                yield self.recv_info(timeout)
            except KextEOF:
                return

    # ---- writing -------------------------------------------------------------------------------

    def write(self, command: bytes) -> None:
        """Send one command in kext wire format; KextError if the broker rejects it."""
        if self._closed:
            raise KextError("client is closed")
        s = getattr(self._local, "sock", None)
        if s is None or s.sock.closed:
            s = self._local.sock = self._socket()
        reply = self._request(s, [wire.WRITE, command], self.request_timeout)
        status = reply[1]
        if status[0] != wire.Status.OK:
            raise KextError(status[1:].decode("utf-8", "replace"), wire.Status(status[0]))

    def write_many(self, commands: list[bytes]) -> list[KextError | None]:
        """Several writes, pipelined: every W is sent, then every reply read (the broker
        answers a connection's requests in order), so N verdicts cost one round trip, not N.
        Each command still is its own write, as the kext takes them; the result per command
        is None (OK) or the KextError a `write` would have raised."""
        if self._closed:
            raise KextError("client is closed")
        if len(commands) == 1:
            try:
                self.write(commands[0])
            except KextError as exc:
                return [exc]
            return [None]
        s = getattr(self._local, "sock", None)
        if s is None or s.sock.closed:
            s = self._local.sock = self._socket()
        out: list[KextError | None] = []
        with s.lock:
            sock = s.sock
            if sock.closed:
                raise KextEOF("client is closed")
            for command in commands:
                sock.send_multipart([wire.WRITE, command])
            deadline = time.monotonic() + self.request_timeout
            for _ in commands:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                    with self._sockets_lock:  # late replies must never answer a later write
                        if s in self._sockets:
                            self._sockets.remove(s)
                    sock.close(0)
                    raise KextTimeout(f"no reply to W within {self.request_timeout} s")
                reply = sock.recv_multipart()
                if reply[0] == wire.ERROR:
                    text = reply[1].decode("utf-8", "replace") if len(reply) > 1 else "error"
                    out.append(KextError(text))
                elif reply[1][0] != wire.Status.OK:
                    status = reply[1]
                    text = status[1:].decode("utf-8", "replace")
                    out.append(KextError(text, wire.Status(status[0])))
                else:
                    out.append(None)
        return out

    def send_verdicts(self, verdicts: list[tuple[int, Verdict]]) -> list[KextError | None]:
        """Verdict commands for several ids, pipelined (`write_many`)."""
        return self.write_many([encode_command(VerdictCommand(i, v)) for i, v in verdicts])

    def send_verdict(self, id_: int, verdict: Verdict) -> None:
        self.write(encode_command(VerdictCommand(id_, verdict)))

    def send_update_v4(
        self,
        protocol: int,
        local_address: bytes,
        local_port: int,
        remote_address: bytes,
        remote_port: int,
        verdict: Verdict,
    ) -> None:
        self.write(
            encode_command(
                UpdateV4Command(
                    protocol, local_address, local_port, remote_address, remote_port, verdict
                )
            )
        )

    def send_update_v6(
        self,
        protocol: int,
        local_address: bytes,
        local_port: int,
        remote_address: bytes,
        remote_port: int,
        verdict: Verdict,
    ) -> None:
        self.write(
            encode_command(
                UpdateV6Command(
                    protocol, local_address, local_port, remote_address, remote_port, verdict
                )
            )
        )

    def clear_cache(self) -> None:
        self.write(encode_command(ClearCacheCommand()))

    def get_logs(self) -> None:
        """Ask for the buffered log lines; they arrive as LogLine infos on the read stream."""
        self.write(encode_command(GetLogsCommand()))

    def get_bandwidth_stats(self) -> None:
        self.write(encode_command(GetBandwidthStatsCommand()))

    def clean_ended_connections(self) -> None:
        self.write(encode_command(CleanEndedConnectionsCommand()))

    def print_memory_stats(self) -> None:
        self.write(encode_command(PrintMemoryStatsCommand()))

    def shutdown(self) -> None:
        """End the session: the waiting read gets EOF and pending verdicts become blocks."""
        self.write(encode_command(ShutdownCommand()))
