"""The broker's ZMQ shell: two ROUTER sockets around BrokerCore, one single-threaded poll loop.

* client ROUTER (docs/broker-wire.md): Portmaster-style clients, one DEALER each;
* actors ROUTER: actors' DEALERs, identity = actor name, protocol.messages frames.
The shell only moves frames, time and facts about the process (its memory, for the S and
PrintMemoryStats requests); every decision is in the core, and the shell carries out the
effects the core returns, in order. It sleeps until the next message or the core's next
deadline (a parked read's timeout). It never trusts a peer: frame errors are answered by the
core, send failures (vanished peer, full pipe) are handled here, and a socket monitor tells it
when a client's connection drops, so a crashed Portmaster does not keep the device "busy"
forever. With a run directory each pass beats the broker's heartbeat (base/heartbeat.py, read
by the watchdog), and the poll never sleeps longer than its cap.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from kextless.base.cores import wait_ms
from kextless.base.heartbeat import Heartbeat, capped_timeout_ms
from kextless.broker import wire
from kextless.broker.core import BrokerCore, Effect, Event, Memory, ToActor, ToClient
from kextless.protocol.enums import CommandType

_SRCFD = 2  # ZMQ_SRCFD: the file descriptor a message arrived on (libzmq 4.x, deprecated)
#: Messages handled per socket before looking at the other sockets again (fairness).
_ACTOR_BATCH = 512
_CLIENT_BATCH = 64


# Plain ints: pyzmq's flag enums cost a microsecond per `|` on the hot path.
_NB = int(zmq.NOBLOCK)
_NB_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: First byte of a PrintMemoryStats command: the one write whose handling reports memory.
_PRINT_MEMORY_STATS = bytes((CommandType.PRINT_MEMORY_STATS,))


def _send_multipart(send: Callable[..., object], ident: bytes, frames: tuple[bytes, ...]) -> None:
    """Non-blocking send of one multipart message to routing id `ident`. On a ROUTER a failure
    (EAGAIN, and EHOSTUNREACH with ROUTER_MANDATORY) happens at the first frame, so nothing is
    half-sent."""
    send(ident, _NB_MORE)
    last = len(frames) - 1
    for i in range(last):
        send(frames[i], _NB_MORE)
    send(frames[last], _NB)


def read_memory() -> Memory:
    """This process's resident and peak memory (0 if /proc cannot be read)."""
    rss = 0
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                    break
    except OSError:
        pass
    return Memory(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class ConfigError(Exception):
    """A bad endpoint or key setup; the message says what to change."""


class CurveConfig:
    """Server key pair plus the directory of authorized client public keys (zmq.auth certs)."""

    def __init__(self, server_secret_file: Path, clients_dir: Path) -> None:
        if not server_secret_file.is_file():
            raise ConfigError(f"CURVE server secret file {server_secret_file} does not exist")
        public, secret = zmq.auth.load_certificate(server_secret_file)
        if not secret:
            raise ConfigError(
                f"{server_secret_file} holds no secret key (use the "
                "*.key_secret file from zmq.auth.create_certificates)"
            )
        if not clients_dir.is_dir():
            raise ConfigError(f"CURVE clients directory {clients_dir} does not exist")
        self.public = public
        self.secret = secret
        self.clients_dir = clients_dir


def check_endpoint(endpoint: str, curve: CurveConfig | None, what: str) -> None:
    """Refuse endpoints that would expose the control channel."""
    if endpoint.startswith("ipc://"):
        if not endpoint[len("ipc://") :] or endpoint.startswith("ipc://@"):
            raise ConfigError(
                f"{what} endpoint {endpoint!r}: give a filesystem path "
                "(abstract sockets have no permissions)"
            )
        return
    if endpoint.startswith("tcp://"):
        if curve is None:
            raise ConfigError(
                f"{what} endpoint {endpoint!r} refused: tcp:// is open to every "
                "process that can reach the port; configure CURVE with "
                "--curve-server-secret and --curve-clients, or use ipc://"
            )
        return
    if endpoint.startswith("inproc://"):
        return
    raise ConfigError(
        f"{what} endpoint {endpoint!r}: only ipc:// and tcp:// (with CURVE) are supported"
    )


def _prepare_ipc_dir(endpoint: str, log: logging.Logger) -> Path | None:
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://") :])
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        os.chmod(parent, 0o700)
    else:
        mode = stat.S_IMODE(parent.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "directory %s is mode %o, not 0700: the socket itself is 0600, but "
                "prefer a private directory",
                parent,
                mode,
            )
    return path


class BrokerServer:
    def __init__(
        self,
        core: BrokerCore,
        endpoint: str,
        actors_endpoint: str,
        curve: CurveConfig | None = None,
        log: logging.Logger | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        check_endpoint(endpoint, curve, "client")
        check_endpoint(actors_endpoint, None, "actors")
        self.core = core
        self.endpoint = endpoint
        self.actors_endpoint = actors_endpoint
        self.curve = curve
        self.log = log or logging.getLogger("broker")
        #: Beaten every loop pass, read by the watchdog (base/heartbeat.py).
        self.heartbeat = heartbeat
        self._stop = False
        self._fds: dict[bytes, int] = {}
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._bound: list[Path] = []

    # ---- setup ---------------------------------------------------------------------------------

    def _bind(self, sock: zmq.Socket[bytes], endpoint: str) -> None:
        path = _prepare_ipc_dir(endpoint, self.log)
        old = os.umask(0o077)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {endpoint}: {exc}") from None
        finally:
            os.umask(old)
        if path is not None:
            os.chmod(path, 0o600)
            self._bound.append(path)

    def bind(self) -> None:
        ctx = self._ctx
        client = ctx.socket(zmq.ROUTER)
        client.setsockopt(zmq.ROUTER_MANDATORY, 1)
        client.setsockopt(zmq.LINGER, 500)
        client.setsockopt(zmq.SNDHWM, 10000)
        client.setsockopt(zmq.RCVHWM, 10000)
        # Requests are tiny (the largest command is 39 bytes): a peer sending a huge frame is
        # disconnected by libzmq instead of making the broker buffer it.
        client.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        if self.curve is not None:
            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.curve.clients_dir))
            client.curve_server = True
            client.curve_secretkey = self.curve.secret
            client.curve_publickey = self.curve.public
        self._monitor = client.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        actors = ctx.socket(zmq.ROUTER)
        actors.setsockopt(zmq.ROUTER_MANDATORY, 1)
        actors.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted actor takes over its name
        actors.setsockopt(zmq.LINGER, 500)
        actors.setsockopt(zmq.SNDHWM, 100000)
        actors.setsockopt(zmq.RCVHWM, 100000)
        actors.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)  # one info (a bandwidth table)
        self._client = client
        self._actors = actors
        self._bind(client, self.endpoint)
        self._bind(actors, self.actors_endpoint)
        self.log.info(
            "listening: clients at %s, actors at %s%s",
            self.endpoint,
            self.actors_endpoint,
            " (CURVE)" if self.curve else "",
        )

    def request_stop(self, *_: object) -> None:
        self._stop = True

    # ---- loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop); 0 on a clean stop."""
        try:
            self.bind()
        except BaseException:
            self.close()
            raise
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {
            s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            wake_r.close()
            wake_w.close()
            self._carry_out(self.core.stop())
            self.close()
        self.log.info("stopped")
        return 0

    def _loop(self, wake: socket.socket) -> None:
        core = self.core
        client, actors, monitor = self._client, self._actors, self._monitor
        poller = zmq.Poller()
        poller.register(client, zmq.POLLIN)
        poller.register(actors, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(wake.fileno(), zmq.POLLIN)
        clock = time.monotonic_ns
        heartbeat = self.heartbeat
        while not self._stop:
            now = clock()
            if heartbeat is not None:
                heartbeat.beat(now)
            timeout = wait_ms(core.next_deadline_ns(), now)
            if heartbeat is not None:
                timeout = capped_timeout_ms(timeout)
            try:
                events = dict(poller.poll(timeout))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if actors in events:
                self._drain_actors()
            if client in events:
                self._drain_clients()
            if monitor in events:
                self._drain_monitor()
            if wake.fileno() in events:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(4096)
            due = core.next_deadline_ns()
            if due is not None:
                now = clock()
                if now >= due:
                    self._carry_out(core.on_deadline(now))

    def _drain_actors(self) -> None:
        core, sock, clock = self.core, self._actors, time.monotonic_ns
        recv = sock.recv
        ready = cast("Callable[[int], int]", sock.getsockopt)
        for _ in range(_ACTOR_BATCH):
            if not ready(_EVENTS) & _POLLIN:
                break
            # Frame.more is a plain C call; getsockopt(RCVMORE) builds an enum per frame.
            msg = [recv(_NB, copy=False)]
            while msg[-1].more:
                msg.append(recv(_NB, copy=False))
            frames = [f.bytes for f in msg]
            try:
                effects = core.actor_message(frames[0], frames[1:], clock())
            except Exception:  # a bug must not take the firewall's control channel down
                self.log.exception(
                    "actor message from %r crashed the handler; dropped", frames[0][:64]
                )
                continue
            if effects:
                self._carry_out(effects)

    def _drain_clients(self) -> None:
        core, sock, clock = self.core, self._client, time.monotonic_ns
        recv = sock.recv
        ready = cast("Callable[[int], int]", sock.getsockopt)
        for _ in range(_CLIENT_BATCH):
            if not ready(_EVENTS) & _POLLIN:
                break
            first = recv(_NB, copy=False)
            msg = [first]
            while msg[-1].more:
                msg.append(recv(_NB, copy=False))
            peer = first.bytes
            frames = [f.bytes for f in msg[1:]]
            memory = None
            if frames:
                op = frames[0]
                if op in (wire.OPEN, wire.READ):
                    # libzmq queues a connection's DISCONNECTED event before closing its fd, so
                    # every event about an earlier owner of this fd number is visible now:
                    # handle them first, or a reused fd would end this peer's new session.
                    self._drain_monitor()
                    with contextlib.suppress(zmq.ZMQError):
                        self._fds[peer] = msg[1].get(_SRCFD)
                elif op == wire.STATS or (
                    op == wire.WRITE and len(frames) == 2 and frames[1][:1] == _PRINT_MEMORY_STATS
                ):
                    memory = read_memory()
            try:
                effects = core.client_message(peer, frames, clock(), memory)
            except Exception:
                self.log.exception("client message crashed the handler")
                effects = [ToClient(peer, (wire.ERROR, b"internal error; see broker log"))]
            self._carry_out(effects)
            if len(self._fds) > 4:
                self._prune_fds()

    def _prune_fds(self) -> None:
        keep = {self.core.owner, self.core.parked.peer if self.core.parked else None}
        self._fds = {p: fd for p, fd in self._fds.items() if p in keep}

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            fd = event["value"]
            for peer in [p for p, f in self._fds.items() if f == fd]:
                del self._fds[peer]
                self._carry_out(self.core.peer_gone(peer))

    def _carry_out(self, effects: list[Effect]) -> None:
        """Send, in order, what the core decided. A failed send is reported back to the core,
        and what it answers to that is carried out at once."""
        core = self.core
        for effect in effects:
            if type(effect) is ToClient:
                peer, frames = effect.peer, effect.frames
                try:
                    _send_multipart(self._client.send, peer, frames)
                except zmq.ZMQError as exc:
                    self.log.warning(
                        "reply %s to client %s not sent: %s",
                        frames[0].decode(),
                        peer.hex(),
                        exc.strerror,
                    )
                    if frames[0] == wire.READ:
                        self._carry_out(core.read_undeliverable(peer))
                    if exc.errno == errno.EHOSTUNREACH:
                        self._carry_out(core.peer_gone(peer))
            elif type(effect) is ToActor:
                try:
                    _send_multipart(self._actors.send, effect.actor, effect.frames)
                except zmq.ZMQError as exc:
                    self.log.warning(
                        "message to actor %r not sent: %s", effect.actor[:64], exc.strerror
                    )
                    if exc.errno == errno.EHOSTUNREACH:
                        self._carry_out(core.actor_gone(effect.actor))
            elif isinstance(effect, Event):
                self.log.info("%s", effect.text)

    def close(self) -> None:
        for sock in (
            getattr(self, "_monitor", None),
            getattr(self, "_client", None),
            getattr(self, "_actors", None),
        ):
            if sock is not None:
                sock.close(linger=0 if sock is getattr(self, "_monitor", None) else 500)
        if self._auth is not None:
            self._auth.stop()
        if self.heartbeat is not None:
            self.heartbeat.close()
        self._ctx.term()
        for path in self._bound:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
