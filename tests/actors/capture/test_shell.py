"""The capture shell's loop, with a stand-in divert handle and batch (no network, no eBPF) and
a real ZMQ ALE peer: when it reads the handle (the adaptive read bound), how often an idle loop
wakes, that it acts on the core's deadlines, that re-injections go out in one flush."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from kextless.actors.capture import shell as shell_mod
from kextless.actors.capture.batch import BatchCounters
from kextless.actors.capture.core import CaptureCore, Config
from kextless.actors.capture.shell import CaptureShell, ShellConfig
from kextless.protocol.enums import Verdict
from tests.actors.capture import crafted as c
from tests.actors.capture.ale_peer import AlePeer


@dataclass(eq=False)
class FakePacket:
    """What batch.Captured gives the shell: raw, direction, loopback, timestamp."""

    raw: bytes
    outbound: bool = True
    loopback: bool = False
    timestamp: int = 0


class FakeHandle:
    """An open divert handle whose event fd never becomes readable: every wakeup is missed."""

    def __init__(self, filt: str, priority: int = 0, ring_bytes: int = 0) -> None:
        self.filter = filt
        self.queue: deque[FakePacket] = deque()
        self.sent: list[object] = []
        self.recvs = 0
        self._r, self._w = os.pipe()
        self._event_fd = self._r

    def open(self) -> FakeHandle:
        return self

    def recv_batch(self, n: int) -> list[FakePacket]:
        self.recvs += 1
        out: list[FakePacket] = []
        while self.queue and len(out) < n:
            out.append(self.queue.popleft())
        return out

    def shutdown(self, how: int) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        for fd in (self._r, self._w):
            os.close(fd)

    @staticmethod
    def check_filter(filt: str) -> tuple[bool, int, str]:
        return True, 0, ""


class FakeBatch:
    """batch.Batch over a FakeHandle: receives up to `size` per call, queues re-injections
    and sends them on flush (one `flushes` entry per non-empty flush)."""

    def __init__(self, handle: FakeHandle, size: int = 64, lo_ifindex: int = 1) -> None:
        self.handle = handle
        self.size = size
        self.queue: list[object] = []
        self.flushes: list[int] = []
        self.counters = BatchCounters()

    def recv(self, timeout_ms: int = 0) -> list[FakePacket]:
        self.flush()
        return self.handle.recv_batch(self.size)

    def reinject(self, tok: object) -> None:
        self.queue.append(tok)

    def reroute(self, tok: object, raw: bytes, loopback: bool) -> None:
        self.queue.append(tok)

    def inject_like(self, like: object, raw: bytes, inbound: bool) -> None:
        self.queue.append(raw)

    def drop(self, tok: object) -> None:
        pass

    def pending(self) -> int:
        return len(self.queue)

    def flush(self) -> int:
        n = len(self.queue)
        if n:
            self.handle.sent.extend(self.queue)
            self.flushes.append(n)
            self.queue = []
        return n


@contextmanager
def running(
    monkeypatch: pytest.MonkeyPatch, policy: Verdict | None, config: Config | None = None
) -> Iterator[tuple[CaptureShell, FakeHandle, AlePeer]]:
    handles: list[FakeHandle] = []

    def make(*args: object, **kw: object) -> FakeHandle:
        h = FakeHandle(*args, **kw)  # type: ignore[arg-type]
        handles.append(h)
        return h

    monkeypatch.setattr(shell_mod, "EBPFDivert", make)
    monkeypatch.setattr(shell_mod, "Batch", FakeBatch)
    with (
        tempfile.TemporaryDirectory(prefix="klt-shell-") as tmp,
        AlePeer(f"ipc://{tmp}/ale.sock", lambda _m: policy) as ale,
    ):
        shell = CaptureShell(CaptureCore(config), ShellConfig(f"ipc://{tmp}/ale.sock"))
        thread = threading.Thread(target=shell.run, daemon=True)
        thread.start()
        try:
            assert ale.ready.wait(5), "the shell never announced itself"
            yield shell, handles[0], ale
        finally:
            shell.stop()
            thread.join(5)
            assert not thread.is_alive()


def _udp() -> FakePacket:
    return FakePacket(c.v4("10.0.0.1", "10.0.0.2", c.udp(5000, 53, b"query")))


def test_a_packet_whose_wakeup_never_came_is_read_within_the_idle_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (_shell, handle, ale):
        time.sleep(0.3)  # idle: past the busy window of the announcement
        pkt = _udp()
        t0 = time.monotonic()
        handle.queue.append(pkt)  # in the ring, but the event fd stays quiet
        assert ale.wait_for(lambda: bool(ale.held), 3)
        assert time.monotonic() - t0 < 1.3  # the 1 s idle bound, plus scheduling slack
        assert ale.wait_for(lambda: pkt in handle.sent, 2)  # the verdict released it


def test_while_packets_flow_a_stranded_packet_waits_at_most_the_busy_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (_shell, handle, ale):
        first = _udp()
        handle.queue.append(first)
        assert ale.wait_for(lambda: first in handle.sent, 3)
        second = FakePacket(c.v4("10.0.0.1", "10.0.0.2", c.udp(5001, 53, b"query")))
        t0 = time.monotonic()
        handle.queue.append(second)  # right after a read: the busy bound (10 ms) applies
        assert ale.wait_for(lambda: len(ale.held) == 2, 2)
        assert time.monotonic() - t0 < 0.08


def test_an_idle_shell_wakes_about_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (_shell, handle, _ale):
        time.sleep(0.5)
        before = handle.recvs
        time.sleep(2.0)
        assert 1 <= handle.recvs - before <= 3  # the idle read bound alone; no busy loop


def test_a_burst_is_read_in_batches_and_reinjected_in_one_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (shell, handle, ale):
        first = _udp()
        handle.queue.append(first)
        assert ale.wait_for(lambda: first in handle.sent, 3)
        batch = shell._batch(handle)  # type: ignore[arg-type]
        # Packets of the flow just accepted: decided in the core, no ALE round trip.
        burst = [_udp() for _ in range(100)]
        recvs = handle.recvs
        handle.queue.extend(burst)
        assert ale.wait_for(lambda: all(p in handle.sent for p in burst), 3)
        assert handle.recvs - recvs <= 6  # 64 + 36 per call, not one call per packet
        assert max(batch.flushes) >= 36  # a batch's verdicts went out together


def test_the_shell_expires_a_held_packet_at_the_cores_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = Config(hold_ttl_ns=300_000_000)
    with running(monkeypatch, None, config) as (shell, handle, ale):  # the ALE never answers
        handle.queue.append(_udp())
        assert ale.wait_for(lambda: bool(ale.held), 2)
        t0 = time.monotonic()
        assert ale.wait_for(lambda: shell.core.counters["expired"] == 1, 2)
        assert 0.15 < time.monotonic() - t0 < 0.6
        assert handle.sent == [] and shell.core.held == {}
