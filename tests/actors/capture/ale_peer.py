"""A real ZMQ ROUTER peer that plays the ALE actor for capture tests and the benchmark.

It binds where the ALE would, records every message the capture sends, answers each
PacketHeld with `policy(msg)` (CacheSet for the connection, then the Decision; None = leave
it held) and can push CacheSet / CacheClear on demand, exactly as the ALE's contract says.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import zmq

from kextless.protocol.enums import Verdict
from kextless.protocol.messages import (
    CacheSet,
    CaptureReady,
    Decision,
    Message,
    PacketHeld,
    decode,
    encode,
    unbundle,
)

Policy = Callable[[PacketHeld], Verdict | None]


class AlePeer:
    def __init__(self, endpoint: str, policy: Policy, cache_set: bool = True) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.cache_set = cache_set
        self.received: list[Message] = []
        self.held: list[PacketHeld] = []
        self.ready = threading.Event()
        self._out: queue.Queue[bytes] = queue.Queue()
        #: time.time() at which each queued message actually left (same order as sent).
        self.sent_at: list[float] = []
        self._ident: bytes | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bound = threading.Event()

    def __enter__(self) -> AlePeer:
        self._thread.start()
        if not self._bound.wait(5):
            raise RuntimeError("ALE peer did not bind")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def send(self, msg: Message) -> None:
        """Queue a message for the capture (sent from the peer's own thread)."""
        self._out.put(encode(msg))

    def send_raw(self, data: bytes) -> None:
        """Queue arbitrary bytes (garbage tests)."""
        self._out.put(data)

    def held_matching(self, pred: Callable[[PacketHeld], bool]) -> list[PacketHeld]:
        with self._lock:
            return [m for m in self.held if pred(m)]

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.01)
        return pred()

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._bound.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(2):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        ident, data = frames[0], frames[-1]
                        for msg in unbundle(decode(data)):  # a Bundle: each in order
                            self._handle(sock, ident, msg)
                while self._ident is not None:
                    try:
                        data = self._out.get_nowait()
                    except queue.Empty:
                        break
                    sock.send_multipart([self._ident, data])
                    self.sent_at.append(time.time())
        finally:
            sock.close(0)
            ctx.term()

    def _handle(self, sock: zmq.Socket, ident: bytes, msg: Message) -> None:
        with self._lock:
            self.received.append(msg)
        if isinstance(msg, CaptureReady):
            self._ident = ident
            self.ready.set()
            return
        if not isinstance(msg, PacketHeld):
            return
        with self._lock:
            self.held.append(msg)
        verdict = self.policy(msg)
        if verdict is None:
            return
        if self.cache_set and msg.flow.protocol in (6, 17):
            sock.send_multipart([ident, encode(CacheSet(msg.flow, verdict))])
        sock.send_multipart([ident, encode(Decision((msg.hold_id,), verdict))])
