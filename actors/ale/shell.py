"""The ALE actor's I/O shell: a ROUTER for the capture actor, a DEALER to the broker.

All decisions are made by AleCore; this file only moves messages and supplies the clock. It
routes the core's messages by type (`core.TO_CAPTURE` to the capture, the rest to the broker),
logs the core's `Note`s (one line each: verdict timeouts, refused infos), sends each loop
pass's broker-bound messages together (one multipart message; a burst of Emits
is one `Emits` frame) and its capture-bound ones as one frame (a `Bundle` when several),
and sleeps until the next input, the core's next deadline (a held packet's verdict timeout) or
its own keepalive: Hello and Health to the broker every second. That cadence is the shell's,
not the core's: it is about the broker connection (a restarted broker relearns who owns what),
and the core only supplies the counters (`health()`).

Restarts (issue 12): a socket monitor on the broker DEALER tells the core when the broker
connection drops and when a (restarted) broker is connected again; the shell then says Hello at
once (so Verdicts are routed to it again) and sends what the core emits again, the pending
connection infos that died in the old broker's queue. Each pass's changes to decided
connections go to the journal (`journal.py`) and the id reservation is extended before that
pass's messages leave, so nothing a capture enforces or a client holds is unknown to a
restarted ALE. Every pass beats the heartbeat (`base/heartbeat.py`) the watchdog reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from kextless.actors.ale.core import TO_CAPTURE, AleCore, Effect, Note
from kextless.actors.ale.ids import IdReservation
from kextless.actors.ale.journal import Journal
from kextless.base.cores import wait_ms
from kextless.base.heartbeat import Heartbeat, capped_timeout_ms
from kextless.protocol import messages as m
from kextless.protocol.commands import decode_command
from kextless.protocol.enums import CommandType
from kextless.protocol.errors import ProtocolError

log = logging.getLogger("ale")

OWNED_COMMANDS = (
    CommandType.VERDICT,
    CommandType.UPDATE_V4,
    CommandType.UPDATE_V6,
    CommandType.CLEAR_CACHE,
    CommandType.SHUTDOWN,
    CommandType.CLEAN_ENDED_CONNECTIONS,
)
#: Hello (as a keepalive) and Health to the broker this often.
HEALTH_NS = 1_000_000_000
#: Messages taken from one socket before looking at the other again.
_BATCH = 256


class AleShell:
    def __init__(
        self,
        core: AleCore,
        capture_endpoint: str,
        broker_endpoint: str,
        ids: IdReservation | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        journal: Journal | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.core = core
        self.ids = ids
        self.journal = journal
        self.heartbeat = heartbeat
        self.ctx = ctx or zmq.Context.instance()
        self.capture = self.ctx.socket(zmq.ROUTER)
        self.capture.setsockopt(zmq.LINGER, 0)
        self.capture.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.capture.bind(capture_endpoint)
        if capture_endpoint.startswith("ipc://"):
            os.chmod(capture_endpoint[len("ipc://") :], 0o600)
        self.broker = self.ctx.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        self.broker.setsockopt(zmq.IDENTITY, b"ale")
        # Before connect, so the first connection is seen too.
        self._monitor = self.broker.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.broker.connect(broker_endpoint)
        self._capture_id: bytes | None = None
        #: Broker-bound messages of one loop pass: a burst of events leaves as one Emits.
        self._to_broker: list[m.Message] = []
        #: Capture-bound messages of one loop pass (Decisions, CacheSets): one frame, a Bundle
        #: when several, sent at the end of the pass in order.
        self._to_capture: list[m.Message] = []
        self._running = True
        self._lost_broker = False
        self._hello = m.encode(m.Hello("ale", os.getpid(), m.CONTRACT_VERSION, OWNED_COMMANDS))

    def stop(self, *_: object) -> None:
        self._running = False

    def _carry_out(self, effects: list[Effect]) -> None:
        """Queue capture-bound messages (in order) and broker-bound ones for this pass's end;
        write Notes to the log."""
        for msg in effects:
            if type(msg) in TO_CAPTURE:
                self._to_capture.append(msg)  # type: ignore[arg-type]
            elif type(msg) is Note:
                log.log(msg.level, "%s", msg.text)
            else:
                self._to_broker.append(msg)  # type: ignore[arg-type]

    def _send_to_capture(self) -> None:
        out, self._to_capture = self._to_capture, []
        if not out:
            return
        if self._capture_id is None:
            log.warning("no capture connected; dropped %d message(s)", len(out))
            return
        for frame in m.encode_many(out):
            try:
                self.capture.send_multipart([self._capture_id, frame])
            except zmq.ZMQError as exc:  # capture gone (ROUTER_MANDATORY)
                log.warning("capture unreachable (%s); dropped %d message(s)", exc, len(out))
                return

    def _persist(self) -> None:
        """Before a pass's messages leave: its decided connections into the journal, and an
        id reservation covering every id issued (the ids a client may hold)."""
        if self.ids is not None:
            self.ids.ensure(self.core.next_id)
        if self.journal is not None:
            cleared, changes = self.core.take_journal()
            if cleared or changes:
                try:
                    self.journal.append(cleared, changes, self.core.connection_cache)
                except OSError as exc:  # a full disk must not stop the decisions
                    log.error("journal write failed (%s): %d change(s) not kept", exc, len(changes))

    def _send_to_broker(self) -> None:
        self._persist()
        self._send_to_capture()
        batch, self._to_broker = self._to_broker, []
        if not batch:
            return
        frames: list[bytes] = []
        emits = [msg for msg in batch if isinstance(msg, m.Emit)]
        if len(emits) > 1:
            frames.append(m.encode(m.Emits(tuple(emits))))
            batch = [msg for msg in batch if not isinstance(msg, m.Emit)]
        frames += [m.encode(msg) for msg in batch]
        # One multipart message (the broker reads every frame as one message, in order).
        self.broker.send_multipart(frames)

    @staticmethod
    def _decode(payload: bytes, source: str) -> m.Message | None:
        try:
            return m.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("garbage from %s dropped: %s", source, exc)
            return None

    def _on_capture(self, ident: bytes, payload: bytes) -> None:
        """A frame on ale.sock (one message or a Bundle): from the capture, or from the
        lifecycle actor (its Attribution, ConnectionEnded, Log and Health)."""
        msg = self._decode(payload, "capture")
        if msg is None:
            return
        now = time.monotonic_ns()
        for one in m.unbundle(msg):
            self._on_capture_msg(ident, one, now)

    def _on_capture_msg(self, ident: bytes, msg: m.Message, now: int) -> None:
        """One message from the capture or the lifecycle actor; only the capture's set
        `_capture_id`."""
        if isinstance(msg, m.PacketHeld):
            self._capture_id = ident
            self._carry_out(self.core.packet_held(msg, now))
        elif isinstance(msg, m.CaptureReady):
            self._capture_id = ident
            effects = self.core.capture_ready(now)
            reholds = sum(type(e) is m.Rehold for e in effects)
            log.info(
                "capture pid %d ready; replaying %d verdict(s), handing back %d held packet(s)",
                msg.pid,
                len(effects) - reholds,
                reholds,
            )
            self._carry_out(effects)
        elif isinstance(msg, m.Attribution):  # from the lifecycle actor, same socket
            effects = self.core.attribution(msg, now)
            if effects and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "pid %d arrived after a wait of %d us",
                    msg.process_id,
                    self.core.wait_samples_us[-1] if self.core.wait_samples_us else -1,
                )
            self._carry_out(effects)
        elif isinstance(msg, m.ConnectionEnded):
            self._carry_out(self.core.connection_ended(msg, now))
        elif isinstance(msg, m.Log | m.Health):
            # The capture's LogLines and counters (it has no broker socket): relayed as they
            # are; the broker files the Health under its `actor` name, not the ALE's.
            self._to_broker.append(msg)
        else:
            log.warning("unexpected %s from capture dropped", type(msg).__name__)

    def _on_broker(self, payload: bytes) -> None:
        msg = self._decode(payload, "broker")
        if msg is None:
            return
        now = time.monotonic_ns()
        if isinstance(msg, m.Command):
            try:
                cmd = decode_command(msg.raw)
            except ProtocolError as exc:  # the broker validates; this is defence in depth
                log.warning("bad command from the broker dropped: %s", exc)
                return
            self._carry_out(self.core.command(cmd, now))
        elif isinstance(msg, m.EmitRefused):
            self._carry_out(self.core.emit_refused(msg.id, msg.reason, now))
        elif isinstance(msg, m.ConnectionEnded):
            self._carry_out(self.core.connection_ended(msg, now))
        else:
            log.warning("unexpected %s from the broker dropped", type(msg).__name__)

    def run(self) -> None:
        # A signal writes to `wake`, so the poll returns at once instead of at its timeout.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_fd)
            wake_r.close()
            wake_w.close()
        log.info("stopping: %d packet(s) still pending", len(self.core.id_cache))
        self._persist()
        if self.journal is not None:
            self.journal.close()
        if self.heartbeat is not None:
            self.heartbeat.close()
        self.capture.close()
        self.broker.disable_monitor()
        self._monitor.close()
        self.broker.close()

    def _on_monitor(self, now: int) -> None:
        """The broker connection dropped (the broker died or stopped) or came (back)."""
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("broker connection lost; pending infos are emitted again on return")
                self._lost_broker = True
                self._carry_out(self.core.broker_lost(now))
            elif event["event"] == zmq.EVENT_CONNECTED and self._lost_broker:
                # (The first connection needs nothing: what was sent before it waited for it.)
                self._send_to_broker()  # what this pass queued belongs before the Hello
                self.broker.send_multipart(
                    [self._hello, m.encode(m.Health("ale", os.getpid(), self.core.health()))]
                )
                self._carry_out(self.core.broker_back(now))

    def _loop(self, wake: socket.socket) -> None:
        core, capture, broker = self.core, self.capture, self.broker
        clock = time.monotonic_ns
        poller = zmq.Poller()
        poller.register(capture, zmq.POLLIN)
        poller.register(broker, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(wake.fileno(), zmq.POLLIN)
        heartbeat = self.heartbeat
        broker.send(self._hello)
        next_health = clock()
        log.info(
            "running: verdict timeout %.1fs, default verdict %s",
            core.config.verdict_timeout_ns / 1e9,
            core.config.default_verdict.kext_name,
        )
        while self._running:
            now = clock()
            if heartbeat is not None:
                heartbeat.beat(now)
            timeout = wait_ms(core.next_deadline_ns(), now, wait_ms(next_health, now))
            events = dict(poller.poll(capped_timeout_ms(timeout)))  # pyzmq retries EINTR
            if self._monitor in events:
                self._on_monitor(clock())
            if capture in events:
                for _ in range(_BATCH):  # drain in batches, but keep the broker served too
                    try:
                        frames = capture.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 2:
                        self._on_capture(frames[0], frames[1])
            if broker in events:
                for _ in range(_BATCH):
                    try:
                        frames = broker.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for frame in frames:
                        self._on_broker(frame)
            if wake.fileno() in events:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(4096)
            self._send_to_broker()
            now = clock()
            due = core.next_deadline_ns()
            if due is not None and now >= due:
                timeouts = core.counters["pid_wait_timeouts"]
                self._carry_out(core.on_deadline(now))
                if core.counters["pid_wait_timeouts"] > timeouts:
                    log.debug(
                        "pid wait over: %d info(s) sent with pid 0",
                        core.counters["pid_wait_timeouts"] - timeouts,
                    )
            if now >= next_health:
                # Hello doubles as a keepalive so a restarted broker relearns who owns what.
                broker.send_multipart(
                    [self._hello, m.encode(m.Health("ale", os.getpid(), core.health()))]
                )
                next_health = now + HEALTH_NS
            self._send_to_broker()
