"""The ALE actor's I/O shell: a ROUTER for the capture actor, a DEALER to the broker.

All decisions are made by AleCore; this file only moves messages and supplies the clock.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import msgspec
import zmq

from kextless.actors.ale.core import AleCore, Outbox
from kextless.actors.ale.ids import IdReservation
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
_TICK_S = 0.1
_HEALTH_S = 1.0


class AleShell:
    def __init__(
        self,
        core: AleCore,
        capture_endpoint: str,
        broker_endpoint: str,
        ids: IdReservation | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.core = core
        self.ids = ids
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
        self.broker.connect(broker_endpoint)
        self._capture_id: bytes | None = None
        #: Broker-bound messages of one loop pass: a burst of events leaves as one Emits.
        self._to_broker: list[m.Message] = []
        self._running = True
        self._hello = m.encode(m.Hello("ale", os.getpid(), m.CONTRACT_VERSION, OWNED_COMMANDS))

    def stop(self, *_: object) -> None:
        self._running = False

    def _flush(self, out: Outbox) -> None:
        self._to_broker += out.to_broker
        if out.to_capture:
            if self._capture_id is None:
                log.warning("no capture connected; dropped %d message(s)", len(out.to_capture))
                return
            for msg in out.to_capture:
                try:
                    self.capture.send_multipart([self._capture_id, m.encode(msg)])
                except zmq.ZMQError as exc:  # capture gone (ROUTER_MANDATORY)
                    log.warning("capture unreachable (%s); dropped %s", exc, type(msg).__name__)

    def _send_to_broker(self) -> None:
        batch, self._to_broker = self._to_broker, []
        emits = [msg for msg in batch if isinstance(msg, m.Emit)]
        if len(emits) > 1:
            self.broker.send(m.encode(m.Emits(tuple(emits))))
            batch = [msg for msg in batch if not isinstance(msg, m.Emit)]
        for msg in batch:
            self.broker.send(m.encode(msg))

    @staticmethod
    def _decode(payload: bytes, source: str) -> m.Message | None:
        try:
            return m.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("garbage from %s dropped: %s", source, exc)
            return None

    def _on_capture(self, ident: bytes, payload: bytes) -> None:
        msg = self._decode(payload, "capture")
        if msg is None:
            return
        now = time.monotonic_ns()
        if isinstance(msg, m.PacketHeld):
            self._capture_id = ident
            if self.ids is not None:
                self.ids.ensure(self.core.next_id)
            self._flush(self.core.packet_held(msg, now))
        elif isinstance(msg, m.CaptureReady):
            log.info(
                "capture pid %d ready; replaying %d verdict(s)", msg.pid, len(self.core.connections)
            )
            self._capture_id = ident
            self._flush(self.core.capture_ready(now))
        elif isinstance(msg, m.ConnectionEnded):
            self._flush(self.core.connection_ended(msg, now))
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
                log.warning("bad command from kextless.broker dropped: %s", exc)
                return
            self._flush(self.core.command(cmd, now))
        elif isinstance(msg, m.EmitRefused):
            self._flush(self.core.emit_refused(msg.id, msg.reason, now))
        elif isinstance(msg, m.ConnectionEnded):
            self._flush(self.core.connection_ended(msg, now))
        else:
            log.warning("unexpected %s from kextless.broker dropped", type(msg).__name__)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        poller = zmq.Poller()
        poller.register(self.capture, zmq.POLLIN)
        poller.register(self.broker, zmq.POLLIN)
        self.broker.send(self._hello)
        next_tick = next_health = time.monotonic()
        log.info(
            "running: verdict timeout %.1fs, default verdict %s",
            self.core.config.verdict_timeout_ns / 1e9,
            self.core.config.default_verdict.kext_name,
        )
        while self._running:
            timeout_ms = max(0.0, min(next_tick, next_health) - time.monotonic()) * 1000
            events = dict(poller.poll(timeout_ms))  # pyzmq retries EINTR itself
            if self.capture in events:
                for _ in range(256):  # drain in batches, but keep the broker served too
                    try:
                        frames = self.capture.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 2:
                        self._on_capture(frames[0], frames[1])
            if self.broker in events:
                for _ in range(256):
                    try:
                        frames = self.broker.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for frame in frames:
                        self._on_broker(frame)
            self._send_to_broker()
            now = time.monotonic()
            if now >= next_tick:
                self._flush(self.core.tick(time.monotonic_ns()))
                next_tick = now + _TICK_S
            if now >= next_health:
                # Hello doubles as a keepalive so a restarted broker relearns who owns what.
                self.broker.send(self._hello)
                self.broker.send(m.encode(m.Health("ale", os.getpid(), self.core.health())))
                next_health = now + _HEALTH_S
            self._send_to_broker()
        log.info("stopping: %d packet(s) still pending", len(self.core.pending))
        self.capture.close()
        self.broker.close()
