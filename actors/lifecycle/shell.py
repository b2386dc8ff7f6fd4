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
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import zmq
from pydivert import EBPFDivert
from pydivert.consts import Flag, Layer
from pyroute2 import IPRoute

from kextless.actors.lifecycle.core import (
    TO_ALE,
    DivertEvent,
    FlowEvent,
    LifecycleCore,
    SocketEvent,
    SocketRow,
)
from kextless.actors.lifecycle.diag import DiagRow, SockDiag
from kextless.base.cores import wait_ms
from kextless.base.heartbeat import capped_timeout_ms, open_heartbeat
from kextless.base.kernel_maps import OwnerMap
from kextless.protocol import messages as m
from kextless.protocol.enums import CommandType, IpProtocol, Severity
from kextless.protocol.logtag import source_tag

log = logging.getLogger("lifecycle")

OWNED_COMMANDS = (CommandType.CLEAN_ENDED_CONNECTIONS,)
HEALTH_NS = 1_000_000_000
_BATCH = 256
_PID_TTL_NS = 2_000_000_000
#: At most one socket-table dump for pending CONNECTs this often (~0.4 ms each; a CONNECT's
#: socket is usually in SYN_SENT by the first dump after its event).
_RESOLVE_GAP_NS = 200_000
_OUR_SOCKETS = 65_536
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


#: How often to look again whether the capture's kernel program records owners.
_OWNERS_CHECK_NS = 2_000_000_000
#: A CONNECT whose socket is not in the table within this time stays a hint only.
CONNECT_RESOLVE_NS = 100_000_000
#: How long events may wait before they are read when no connect waits on them (a verdict
#: round trip is 1-3 ms; an end event has 1 s).
COALESCE_S = 0.005


def read_table(
    states: int, protocols: Iterable[int], diag: SockDiag | None = None
) -> list[tuple[SocketRow, int]]:
    """The namespace's sockets (both families) in `states`, from socket diagnostics."""
    own = diag is None
    d = SockDiag() if diag is None else diag
    try:
        out: list[tuple[SocketRow, int]] = []
        for proto in protocols:
            for family in (socket.AF_INET, socket.AF_INET6):
                out += [(row_of(r, proto), r.inode) for r in d.dump(family, proto, states)]
        return out
    finally:
        if own:
            d.close()


def row_of(r: DiagRow, protocol: int) -> SocketRow:
    """A sock_diag row as the core's SocketRow (owner still unknown)."""
    flow = m.Flow(protocol, r.src, r.sport, r.dst, r.dport)
    listening = r.state == _LISTEN or (protocol == IpProtocol.UDP and not r.dport)
    synced = protocol == IpProtocol.UDP or r.state in _LIVE - {_SYN_SENT, _SYN_RECV}
    return SocketRow(flow, listening, synced)


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
        coalesce_s: float = COALESCE_S,
        run_dir: Path | None = None,
    ) -> None:
        self.core = core
        self.heartbeat = open_heartbeat(run_dir, "lifecycle", broker_endpoint)
        #: With outbound owners from the kernel, nothing on a connect's path waits for this
        #: actor: its events are read this long after they begin to arrive, so its work
        #: comes after the connect's verdict round trip, not beside it (M25).
        self.coalesce_s = coalesce_s
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
        #: Cookies (EndpointId) of this namespace's sockets, oldest first.
        self._our_sockets: OrderedDict[int, None] = OrderedDict()
        self._tables: queue.SimpleQueue[tuple[int, set[m.Flow]]] = queue.SimpleQueue()
        self._logs: queue.SimpleQueue[m.Log] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._running = True
        self.foreign = 0
        #: TCP CONNECTs whose local port is still to be read: cookie -> (pid, seen).
        self._connects: dict[int, tuple[int, int, int]] = {}  # cookie -> pid, seen, family
        self._diag: SockDiag | None = None  # the loop's own (the worker thread has its own)
        self.resolved = 0
        self.unresolved = 0
        self._hello = m.encode(
            m.Hello("lifecycle", os.getpid(), m.CONTRACT_VERSION, OWNED_COMMANDS)
        )
        self._to_ale: list[m.Message] = []
        self._to_broker: list[m.Message] = []
        #: When the last socket-table dump for pending CONNECTs ran (monotonic ns).
        self._last_resolve_ns = 0
        #: Whether the capture's kextless_pre records connection owners (`owners` map), and
        #: when that was last checked: then an outbound TCP opener's PacketHeld already
        #: carries its pid and resolving CONNECTs here would only cost CPU on the connect path.
        self._kernel_owners = False
        self._owners_checked_ns: int | None = None
        self.skipped_connects = 0

    def stop(self, *_: object) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---- effects ----------------------------------------------------------------------------

    def _carry_out(self, effects: list[m.Message]) -> None:
        """Queue the effects for the end of the loop pass (`_flush`), each for its peer."""
        for msg in effects:
            (self._to_ale if type(msg) in TO_ALE else self._to_broker).append(msg)

    def _flush(self) -> None:
        """Send the pass's messages, in order per peer: several to the ALE leave as one
        Bundle (a connect storm's Attributions: one send and one ALE wakeup per pass), those
        to the broker as one multipart message (it reads each frame as one message)."""
        if self._to_ale:
            out, self._to_ale = self._to_ale, []
            for frame in m.encode_many(out):
                try:
                    self.ale.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("ALE not reachable; dropped a frame of %d bytes", len(frame))
        if self._to_broker:
            out, self._to_broker = self._to_broker, []
            try:
                self.broker.send_multipart([m.encode(x) for x in out], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("broker not reachable; dropped %d message(s)", len(out))

    def _report(self, severity: Severity, text: str) -> None:
        """A warning or error: one stderr line, and a LogLine for GetLogs (from the worker
        thread too: only the loop thread sends, so the worker's go through a queue)."""
        log.log(logging.ERROR if severity >= Severity.ERROR else logging.WARNING, "%s", text)
        self._logs.put(m.Log(severity, f"{source_tag(1)} {text}"))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"l")

    # ---- namespace scope --------------------------------------------------------------------

    def _in_netns(self, pid: int, now: int) -> bool | None:
        """Whether process `pid` lives in our namespace (None: it is gone and was never seen).
        A process that exited keeps its last answer: its last events come after its exit."""
        cached = self._pid_ns.get(pid)
        if cached is not None and now - cached[1] < _PID_TTL_NS:
            return cached[0]
        try:
            ours: bool | None = os.stat(f"/proc/{pid}/ns/net").st_ino == self.netns_ino
        except OSError:
            ours = cached[0] if cached is not None else None
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
        # EndpointId is the socket cookie: a socket once seen as ours stays ours, also for
        # the events that arrive after its process exited.
        ours = True if ev.endpoint_id in self._our_sockets else self._in_netns(ev.process_id, now)
        if ours is None and ev.event in (FlowEvent.DELETED, SocketEvent.CLOSE):
            ours = ev.flow in self.core.flows  # its process exited; a flow we follow
        if not ours:
            self.foreign += 1
            return
        if ev.event is FlowEvent.DELETED:  # (SOCKET CLOSE comes before it: keep till then)
            self._our_sockets.pop(ev.endpoint_id, None)
        else:
            self._our_sockets[ev.endpoint_id] = None
            if len(self._our_sockets) > _OUR_SOCKETS:
                self._our_sockets.popitem(last=False)
        if (
            ev.event is SocketEvent.CONNECT
            and ev.flow.protocol == IpProtocol.TCP
            and self._owners_in_kernel(now)
        ):
            # The kernel gives the opener's pid with the SYN: neither resolving the CONNECT
            # nor its OPENER hint (a message and an ALE wakeup per connect) would add anything.
            self.skipped_connects += 1
            return
        if ev.event is SocketEvent.CONNECT and ev.flow.protocol == IpProtocol.TCP:
            family = socket.AF_INET6 if ev.flow.is_v6 else socket.AF_INET
            self._connects[ev.endpoint_id] = (ev.process_id, now, family)
            log.debug("connect %d (pid %d) seen", ev.endpoint_id, ev.process_id)
        self._carry_out(self.core.divert_event(ev, now))

    def _owners_in_kernel(self, now: int) -> bool:
        """Whether the namespace's kextless_pre has an `owners` map (checked at most every
        `_OWNERS_CHECK_NS`: the capture starts after us and may restart)."""
        checked = self._owners_checked_ns
        if checked is not None and now - checked < _OWNERS_CHECK_NS:
            return self._kernel_owners
        self._owners_checked_ns = now
        found = False
        try:
            with IPRoute() as ipr:
                owners = OwnerMap.open(ipr)
            if owners is not None:
                owners.close()
                found = True
        except Exception as e:  # no programs, no libbpf: resolve CONNECTs ourselves
            log.debug("no kernel owners map: %s", e)
        if found != self._kernel_owners:
            log.info(
                "outbound TCP owners %s",
                "come from the kernel: CONNECTs not resolved here"
                if found
                else "resolved here from CONNECT events",
            )
        self._kernel_owners = found
        return found

    def _coalescing(self) -> bool:
        """Whether the next drain may wait: only if no CONNECT is being resolved here (the
        kernel records outbound owners) and the wait is not switched off."""
        return self.coalesce_s > 0 and self._kernel_owners and not self._connects

    def _resolve_connects(self) -> None:
        """Find pending CONNECTs' sockets (by cookie) among the SYN_SENT ones: their exact
        5-tuple, while the SYN is still held. One dump per family with a pending connect
        (~0.4 ms: the kernel walks its whole connection hash)."""
        if self._diag is None:
            self._diag = SockDiag()
        now = time.monotonic_ns()
        families = {fam for _pid, _seen, fam in self._connects.values()}
        for family in families:
            try:
                rows = self._diag.dump(family, socket.IPPROTO_TCP, 1 << _SYN_SENT)
            except OSError as e:
                self._report(Severity.ERROR, f"socket table read failed: {e}")
                self._connects.clear()
                return
            for r in rows:
                pending = self._connects.pop(r.cookie, None)
                if pending is not None:
                    self.resolved += 1
                    flow = m.Flow(int(IpProtocol.TCP), r.src, r.sport, r.dst, r.dport)
                    log.debug(
                        "connect %d (pid %d) resolved after %d us",
                        r.cookie,
                        pending[0],
                        (now - pending[1]) // 1000,
                    )
                    self._carry_out(self.core.connect_resolved(flow, pending[0], now))
        for cookie, (pid, seen, _fam) in list(self._connects.items()):
            if now - seen > CONNECT_RESOLVE_NS:
                del self._connects[cookie]
                self.unresolved += 1
                log.debug("connect %d (pid %d) not found in the socket table", cookie, pid)

    def _drain(self, layer: Layer, h: EBPFDivert) -> None:
        for _ in range(_BATCH):
            try:
                p = h.recv(timeout=0)
            except TimeoutError:
                return
            except OSError as e:
                self._report(Severity.ERROR, f"{layer.name} events: recv failed: {e}")
                return
            self._on_event(layer, p, time.monotonic_ns())

    # ---- socket table -------------------------------------------------------------------------

    def _table_worker(self) -> None:
        """Read the live TCP sockets every interval and hand them to the loop - only while
        the core tracks a flow: with none, no read can end one (the read is most of an idle
        lifecycle actor's cost)."""
        diag = SockDiag()
        while self._running:
            if not self.core.flows:  # len() of a dict: safe against the loop's changes
                time.sleep(self.table_interval_s)
                continue
            taken = time.monotonic_ns()
            try:
                rows = read_table(_LIVE_MASK, (socket.IPPROTO_TCP,), diag)
            except OSError as e:
                self._report(Severity.ERROR, f"socket table read failed: {e}")
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
            self._report(Severity.ERROR, f"socket table read at start failed: {e}")
            return
        owners = socket_owners(self.netns_ino)
        table = [
            SocketRow(r.flow, r.listening, r.synchronized, owners.get(ino, 0)) for r, ino in rows
        ]
        effects = self.core.existing(table, now)
        log.info("start: %d socket(s) in the namespace, %d attributed", len(table), len(effects))
        self._carry_out(effects)
        self._flush()

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
            if self.heartbeat is not None:
                self.heartbeat.close()

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
            if self.heartbeat is not None:
                self.heartbeat.beat(now)
            if now >= next_health:
                health = {
                    **core.health(),
                    "foreign_events": self.foreign,
                    "connects_resolved": self.resolved,
                    "connects_unresolved": self.unresolved,
                }
                hello = [self._hello, m.encode(m.Health("lifecycle", os.getpid(), health))]
                self.broker.send_multipart(hello)  # one message, two frames: one wakeup
                zero = m.Flow(0, b"\0" * 4, 0, b"\0" * 4, 0)
                self._carry_out([m.Attribution(m.AttributionKind.PRESENT, zero, 0, now)])
                next_health = now + HEALTH_NS
            due = core.next_deadline_ns()
            if due is not None and now >= due:
                self._carry_out(core.on_deadline(now))
                due = core.next_deadline_ns()
            if self._connects and now - self._last_resolve_ns >= _RESOLVE_GAP_NS:
                self._resolve_connects()
                self._last_resolve_ns = now
            self._flush()
            timeout = 0 if self._connects else wait_ms(due, now, wait_ms(next_health, now))
            timeout = capped_timeout_ms(timeout)
            events = poller.poll(timeout)
            if not events and self._connects:
                # A CONNECT not in the table yet: look again shortly, not in a busy loop (a
                # storm's dumps, back to back, were this actor's largest cost).
                time.sleep(_RESOLVE_GAP_NS / 1e9)
            coalesced = False
            for item, _ev in events:
                if item in fds:
                    if not coalesced and self._coalescing():
                        time.sleep(self.coalesce_s)
                        coalesced = True
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
                    while not self._logs.empty():
                        self._carry_out([self._logs.get()])
