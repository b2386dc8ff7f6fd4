"""The lifecycle actor's I/O shell: FLOW and SOCKET sniff handles, socket-table reads, two DEALERs.

Runs inside the guarded namespace (`nsenter --net=`; the divert FLOW/SOCKET layers need it),
so its socket-diagnostics reads see that namespace's sockets only. FLOW and SOCKET events are
machine-wide, though: an event is kept only if its process's network namespace
(`/proc/PID/ns/net`) is ours. An event whose process is already gone (its socket closed as it
exited) is kept only for a flow this actor already follows in the namespace.

Effects: Attribution and ConnectionEnded to the ALE (its ale.sock, beside the capture), Log,
Hello (owning CleanEndedConnections) and Health to the broker. The socket table is read in a
worker thread every `--table-interval` so a big table never delays an attribution.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import zmq
from pydivert import EBPFDivert
from pydivert.consts import Flag, Layer

from kextless.actors.lifecycle.core import (
    TO_ALE,
    DivertEvent,
    FlowEvent,
    LifecycleCore,
    SocketEvent,
    SocketRow,
)
from kextless.base.cores import wait_ms
from kextless.protocol import messages as m
from kextless.protocol.enums import CommandType, IpProtocol

log = logging.getLogger("lifecycle")

OWNED_COMMANDS = (CommandType.CLEAN_ENDED_CONNECTIONS,)
HEALTH_NS = 1_000_000_000
_BATCH = 256
_PID_TTL_NS = 2_000_000_000
_PROTOCOLS = frozenset({int(IpProtocol.TCP), int(IpProtocol.UDP)})

# sock_diag TCP states (linux/tcp_states.h)
_ESTABLISHED, _SYN_SENT, _SYN_RECV, _FIN_WAIT1, _FIN_WAIT2 = 1, 2, 3, 4, 5
_TIME_WAIT, _CLOSE, _CLOSE_WAIT, _LAST_ACK, _LISTEN, _CLOSING = 6, 7, 8, 9, 10, 11
#: Synchronized (and about to be) states: the connection has not closed.
_LIVE = frozenset({_ESTABLISHED, _SYN_SENT, _SYN_RECV, _FIN_WAIT1, _FIN_WAIT2, _CLOSE_WAIT})
_LIVE |= {_LAST_ACK, _CLOSING}
_LIVE_MASK = sum(1 << s for s in _LIVE)


def address(words: Iterable[int]) -> bytes:
    """pydivert's address (uint32[4], least significant word first) as raw bytes; a
    v4-mapped address (how IPv4 comes, 0.0.0.0 too) as 4 bytes, which is what packets carry."""
    value = 0
    for i, w in enumerate(words):
        value |= int(w) << (32 * i)
    if value >> 32 == 0xFFFF:
        return (value & 0xFFFFFFFF).to_bytes(4, "big")
    return value.to_bytes(16, "big")


def _packed(text: str) -> bytes:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def event_from(layer: Layer, event: int, data: Any) -> DivertEvent | None:
    """A FLOW/SOCKET packet's metadata as a DivertEvent (None: not TCP/UDP or unknown)."""
    if int(data.Protocol) not in _PROTOCOLS:
        return None
    try:
        kind: FlowEvent | SocketEvent = (
            FlowEvent(event) if layer == Layer.FLOW else SocketEvent(event)
        )
    except ValueError:
        return None
    local, remote = address(data.LocalAddr), address(data.RemoteAddr)
    flow = m.Flow(int(data.Protocol), local, int(data.LocalPort), remote, int(data.RemotePort))
    return DivertEvent(kind, int(data.ProcessId), int(data.EndpointId), flow)


def rows_from(answers: Iterable[Mapping[str, Any]], protocol: int) -> list[tuple[SocketRow, int]]:
    """sock_diag answers as (SocketRow, inode)."""
    return [(row, ino) for row, ino, _cookie in rows_cookies(answers, protocol)]


def rows_cookies(
    answers: Iterable[Mapping[str, Any]], protocol: int
) -> list[tuple[SocketRow, int, int]]:
    """sock_diag answers as (SocketRow, inode, cookie); the cookie is the divert EndpointId."""
    out = []
    for a in answers:
        try:
            flow = m.Flow(
                protocol,
                _packed(a["idiag_src"]),
                int(a["idiag_sport"]),
                _packed(a["idiag_dst"]),
                int(a["idiag_dport"]),
            )
        except (KeyError, ValueError):
            continue
        state = int(a["idiag_state"])
        listening = state == _LISTEN or (protocol == IpProtocol.UDP and not flow.remote_port)
        synced = protocol == IpProtocol.UDP or state in _LIVE - {_SYN_SENT, _SYN_RECV}
        cookie = int(a.get("idiag_cookie") or 0)
        out.append((SocketRow(flow, listening, synced), int(a["idiag_inode"]), cookie))
    return out


_FIELDS = (
    "idiag_state",
    "idiag_src",
    "idiag_sport",
    "idiag_dst",
    "idiag_dport",
    "idiag_inode",
    "idiag_cookie",
)
#: A CONNECT whose socket is not in the table within this time stays a hint only.
CONNECT_RESOLVE_NS = 100_000_000


def read_table(states: int, protocols: Iterable[int]) -> list[tuple[SocketRow, int]]:
    """The namespace's sockets (both families) in `states`, from socket diagnostics."""
    from pyroute2 import DiagSocket  # (imported here: the worker thread's only user)

    out: list[tuple[SocketRow, int]] = []
    with DiagSocket() as ds:
        ds.bind()
        for proto in protocols:
            for family in (socket.AF_INET, socket.AF_INET6):
                answers = ds.get_sock_stats(family=family, states=states, protocol=proto)
                out += rows_from(({k: a.get(k) for k in _FIELDS} for a in answers), proto)
    return out


def socket_owners(netns_ino: int) -> dict[int, int]:
    """inode -> pid for every socket of the processes in this namespace (read at start)."""
    owners: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino != netns_ino:
                continue
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    owners.setdefault(int(target[8:-1]), int(entry.name))
        except OSError:
            continue  # gone, or not ours to read
    return owners


class LifecycleShell:
    def __init__(
        self,
        core: LifecycleCore,
        ale_endpoint: str,
        broker_endpoint: str,
        table_interval_s: float = 0.25,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.core = core
        self.ctx = ctx or zmq.Context.instance()
        self.ale = self.ctx.socket(zmq.DEALER)
        self.ale.setsockopt(zmq.LINGER, 0)
        self.ale.setsockopt(zmq.IDENTITY, b"lifecycle")
        self.ale.connect(ale_endpoint)
        self.broker = self.ctx.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        self.broker.setsockopt(zmq.IDENTITY, b"lifecycle")
        self.broker.connect(broker_endpoint)
        self.netns_ino = os.stat("/proc/self/ns/net").st_ino
        self.table_interval_s = table_interval_s
        self._pid_ns: dict[int, tuple[bool | None, int]] = {}
        self._tables: queue.SimpleQueue[tuple[int, set[m.Flow]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._running = True
        self.foreign = 0
        #: TCP CONNECTs whose local port is still to be read: cookie -> (pid, seen).
        self._connects: dict[int, tuple[int, int]] = {}
        self._diag: Any = None  # the loop's own DiagSocket (the worker thread has its own)
        self.resolved = 0
        self.unresolved = 0
        self._hello = m.encode(
            m.Hello("lifecycle", os.getpid(), m.CONTRACT_VERSION, OWNED_COMMANDS)
        )

    def stop(self, *_: object) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---- effects ----------------------------------------------------------------------------

    def _carry_out(self, effects: list[m.Message]) -> None:
        for msg in effects:
            target = self.ale if type(msg) in TO_ALE else self.broker
            try:
                target.send(m.encode(msg), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("peer not reachable; dropped %s", type(msg).__name__)

    # ---- namespace scope --------------------------------------------------------------------

    def _in_netns(self, pid: int, now: int) -> bool | None:
        """Whether process `pid` lives in our namespace (None: it is gone)."""
        cached = self._pid_ns.get(pid)
        if cached is not None and now - cached[1] < _PID_TTL_NS:
            return cached[0]
        try:
            ours: bool | None = os.stat(f"/proc/{pid}/ns/net").st_ino == self.netns_ino
        except OSError:
            ours = None
        if len(self._pid_ns) > 4096:
            self._pid_ns.clear()
        self._pid_ns[pid] = (ours, now)
        return ours

    def _on_event(self, layer: Layer, p: Any, now: int) -> None:
        data = p.flow if layer == Layer.FLOW else p.socket
        if data is None:
            return
        ev = event_from(layer, int(p.event), data)
        if ev is None:
            return
        ours = self._in_netns(ev.process_id, now)
        if ours is None and ev.event in (FlowEvent.DELETED, SocketEvent.CLOSE):
            ours = ev.flow in self.core.flows  # its process exited; a flow we follow
        if not ours:
            self.foreign += 1
            return
        if ev.event is SocketEvent.CONNECT and ev.flow.protocol == IpProtocol.TCP:
            self._connects[ev.endpoint_id] = (ev.process_id, now)
            log.debug("connect %d (pid %d) seen", ev.endpoint_id, ev.process_id)
        self._carry_out(self.core.divert_event(ev, now))

    def _resolve_connects(self) -> None:
        """Find pending CONNECTs' sockets (by cookie) among the SYN_SENT ones: their exact
        5-tuple, while the SYN is still held."""
        if self._diag is None:
            from pyroute2 import DiagSocket

            self._diag = DiagSocket()
            self._diag.bind()
        now = time.monotonic_ns()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                answers = self._diag.get_sock_stats(
                    family=family, states=1 << _SYN_SENT, protocol=socket.IPPROTO_TCP
                )
            except OSError as e:
                log.error("socket table read failed: %s", e)
                self._connects.clear()
                return
            fields = ({k: a.get(k) for k in _FIELDS} for a in answers)
            for row, _ino, cookie in rows_cookies(fields, socket.IPPROTO_TCP):
                pending = self._connects.pop(cookie, None)
                if pending is not None:
                    self.resolved += 1
                    log.debug(
                        "connect %d (pid %d) resolved after %d us",
                        cookie,
                        pending[0],
                        (now - pending[1]) // 1000,
                    )
                    self._carry_out(self.core.connect_resolved(row.flow, pending[0], now))
        for cookie, (_pid, seen) in list(self._connects.items()):
            if now - seen > CONNECT_RESOLVE_NS:
                del self._connects[cookie]
                self.unresolved += 1
                log.debug("connect %d (pid %d) not found in the socket table", cookie, _pid)

    def _drain(self, layer: Layer, h: EBPFDivert) -> None:
        for _ in range(_BATCH):
            try:
                p = h.recv(timeout=0)
            except TimeoutError:
                return
            except OSError as e:
                log.error("recv failed on %s: %s", layer.name, e)
                return
            self._on_event(layer, p, time.monotonic_ns())

    # ---- socket table -------------------------------------------------------------------------

    def _table_worker(self) -> None:
        """Read the live TCP sockets every interval and hand them to the loop."""
        while self._running:
            taken = time.monotonic_ns()
            try:
                rows = read_table(_LIVE_MASK, (socket.IPPROTO_TCP,))
            except OSError as e:
                log.error("socket table read failed: %s", e)
                rows = []
            else:
                live = {r.flow for r, _ino in rows}
                self._tables.put((taken, live))
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"t")
            time.sleep(self.table_interval_s)

    def _existing(self) -> None:
        """Owners of the connections and listeners already there when we start."""
        now = time.monotonic_ns()
        try:
            rows = read_table(_LIVE_MASK | (1 << _LISTEN), (socket.IPPROTO_TCP,))
            rows += read_table(0xFFFFFFFF, (socket.IPPROTO_UDP,))
        except OSError as e:
            log.error("socket table read at start failed: %s", e)
            return
        owners = socket_owners(self.netns_ino)
        table = [
            SocketRow(r.flow, r.listening, r.synchronized, owners.get(ino, 0)) for r, ino in rows
        ]
        effects = self.core.existing(table, now)
        log.info("start: %d socket(s) in the namespace, %d attributed", len(table), len(effects))
        self._carry_out(effects)

    # ---- loop ---------------------------------------------------------------------------------

    def _on_broker(self, payload: bytes) -> None:
        try:
            msg = m.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("garbage from the broker dropped: %s", exc)
            return
        if isinstance(msg, m.Command) and msg.type == CommandType.CLEAN_ENDED_CONNECTIONS:
            self._carry_out(self.core.clean_ended(time.monotonic_ns()))

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        filt = "true"
        flags = Flag.SNIFF | Flag.RECV_ONLY  # never hold or block: these layers are global
        handles = {
            Layer.FLOW: EBPFDivert(filt, layer=Layer.FLOW, flags=flags).open(),
            Layer.SOCKET: EBPFDivert(filt, layer=Layer.SOCKET, flags=flags).open(),
        }
        try:
            self._existing()
            worker = threading.Thread(target=self._table_worker, name="table", daemon=True)
            worker.start()
            self._loop(handles)
        finally:
            for h in handles.values():
                with contextlib.suppress(Exception):
                    h.close()
            self.ale.close()
            self.broker.close()
            if self._diag is not None:
                self._diag.close()

    def _loop(self, handles: dict[Layer, EBPFDivert]) -> None:
        core, clock = self.core, time.monotonic_ns
        poller = zmq.Poller()
        fds = {int(h._event_fd): layer for layer, h in handles.items()}
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        poller.register(self.broker, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_health = clock()
        log.info("running in netns inode %d", self.netns_ino)
        while self._running:
            now = clock()
            if now >= next_health:
                self.broker.send(self._hello)
                health = {
                    **core.health(),
                    "foreign_events": self.foreign,
                    "connects_resolved": self.resolved,
                    "connects_unresolved": self.unresolved,
                }
                self.broker.send(m.encode(m.Health("lifecycle", os.getpid(), health)))
                zero = m.Flow(0, b"\0" * 4, 0, b"\0" * 4, 0)
                self._carry_out([m.Attribution(m.AttributionKind.PRESENT, zero, 0, now)])
                next_health = now + HEALTH_NS
            due = core.next_deadline_ns()
            if due is not None and now >= due:
                self._carry_out(core.on_deadline(now))
                due = core.next_deadline_ns()
            if self._connects:
                self._resolve_connects()
            timeout = 0 if self._connects else wait_ms(due, now, wait_ms(next_health, now))
            for item, _ev in poller.poll(timeout):
                if item in fds:
                    layer = fds[item]
                    self._drain(layer, handles[layer])
                elif item is self.broker:
                    for _ in range(_BATCH):
                        try:
                            frames = self.broker.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        for frame in frames:
                            self._on_broker(frame)
                elif item == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    while not self._tables.empty():
                        taken, live = self._tables.get()
                        self._carry_out(core.socket_table(live, taken, clock()))
