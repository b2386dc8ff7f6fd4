"""The capture shell's loop, with a stand-in divert handle (no network, no eBPF) and a real
ZMQ ALE peer: when it reads the handle, how often an idle loop wakes, that it acts on the
core's deadlines."""

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
from pydivert.consts import Direction as DivertDirection

from kextless.actors.capture import shell as shell_mod
from kextless.actors.capture.core import CaptureCore, Config
from kextless.actors.capture.shell import CaptureShell, ShellConfig
from kextless.protocol.enums import Verdict
from tests.actors.capture import crafted as c
from tests.actors.capture.ale_peer import AlePeer


@dataclass
class FakePacket:
    _raw: bytes
    _direction: DivertDirection = DivertDirection.OUTBOUND
    _loopback: bool = False
    _timestamp: int = 0


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

    def recv(self, timeout: float | None = None) -> FakePacket:
        self.recvs += 1
        if self.queue:
            return self.queue.popleft()
        raise TimeoutError

    def send(self, p: object, recalculate_checksum: bool = True) -> None:
        self.sent.append(p)

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


def test_a_packet_whose_wakeup_never_came_is_read_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (_shell, handle, ale):
        pkt = _udp()
        t0 = time.monotonic()
        handle.queue.append(pkt)  # in the ring, but the event fd stays quiet
        assert ale.wait_for(lambda: bool(ale.held), 2)
        assert time.monotonic() - t0 < 0.35  # the 100 ms read bound, plus scheduling slack
        assert ale.wait_for(lambda: pkt in handle.sent, 2)  # the verdict released it


def test_an_idle_shell_wakes_about_ten_times_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    with running(monkeypatch, Verdict.PERMANENT_ACCEPT) as (_shell, handle, _ale):
        time.sleep(0.2)
        before = handle.recvs
        time.sleep(1.0)
        assert 5 <= handle.recvs - before <= 13  # the read bound alone; no busy loop


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
