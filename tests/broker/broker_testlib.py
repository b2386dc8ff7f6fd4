"""Broker test helpers: encoded infos of every kind (real codecs, no canned bytes), a real
`kextless run broker` process, and a real actor peer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from kextless.broker import wire
from kextless.protocol.enums import CommandType, Direction, InfoType, PayloadLayer, Severity
from kextless.protocol.infos import (
    BandwidthEntry,
    BandwidthStatsV4,
    ConnectionEndEventV4,
    ConnectionIpv4,
    Info,
    LogLine,
)
from kextless.protocol.messages import CONTRACT_VERSION, Emit, Emits, Hello, Message, decode, encode
from tests.entry import KEXTLESS


def conn(id_: int, payload: int = 0) -> ConnectionIpv4:
    return ConnectionIpv4(
        id_,
        1000 + id_,
        Direction.OUTBOUND,
        6,
        b"\x0a\x00\x00\x01",
        b"\x01\x02\x03\x04",
        40000 + id_ % 1000,
        443,
        PayloadLayer.NETWORK,
        bytes(i % 251 for i in range(payload)),
    )


def log(text: str, severity: Severity = Severity.ERROR) -> LogLine:
    return LogLine(severity, text)


def bandwidth(n: int) -> BandwidthStatsV4:
    return BandwidthStatsV4(
        6,
        tuple(
            BandwidthEntry(b"\x0a\x00\x00\x01", 1000 + i, b"\x01\x02\x03\x04", 443, i, 2 * i)
            for i in range(n)
        ),
    )


def end(pid: int) -> ConnectionEndEventV4:
    return ConnectionEndEventV4(
        pid, Direction.INBOUND, 17, b"\x0a\x00\x00\x01", b"\x01\x02\x03\x04", 53, 5353
    )


def kind(info: Info) -> InfoType:
    return info.TYPE


REPO = Path(__file__).resolve().parents[2]


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    dir: Path
    endpoint: str
    actors_endpoint: str
    ctx: zmq.Context = field(default_factory=zmq.Context.instance)

    @property
    def sock_path(self) -> Path:
        return Path(self.endpoint[len("ipc://") :])

    def dealer(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def request(self, sock: zmq.Socket, *frames: bytes, timeout: float = 5.0) -> list[bytes]:
        sock.send_multipart(list(frames))
        assert sock.poll(int(timeout * 1000)), f"no reply to {frames!r}"
        return sock.recv_multipart()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stderr_text(self) -> str:
        return (self.dir / "broker.log").read_text()


def start_broker(extra: list[str] | None = None, tmp: Path | None = None) -> Broker:
    d = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp")) if tmp is None else tmp
    endpoint = f"ipc://{d}/run/kext.sock"
    log = open(d / "broker.log", "wb")  # noqa: SIM115 - the process owns it until it exits
    proc = subprocess.Popen(
        [*KEXTLESS, "run", "broker", "--endpoint", endpoint, *(extra or [])],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    b = Broker(proc, d, endpoint, f"ipc://{d}/run/actors.sock")
    deadline = time.monotonic() + 10
    probe = b.dealer()
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"broker exited {proc.returncode}: {b.stderr_text()}")
            probe.send(wire.VERSION)
            if probe.poll(200):
                probe.recv_multipart()
                break
            assert time.monotonic() < deadline, "broker did not answer V within 10 s"
            probe.close(0)
            probe = b.dealer()
    finally:
        probe.close(0)
    return b


def stop_broker(b: Broker) -> int:
    if b.proc.poll() is None:
        b.proc.send_signal(signal.SIGTERM)
        try:
            b.proc.wait(10)
        except subprocess.TimeoutExpired:
            b.proc.kill()  # only the PID this fixture started
            b.proc.wait(5)
    return b.proc.returncode


class FakeActor:
    """A real actor peer: a DEALER named like the actor, speaking protocol.messages."""

    def __init__(self, b: Broker, name: str, owns: tuple[CommandType, ...] = ()) -> None:
        self.name = name
        self.sock = b.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.connect(b.actors_endpoint)
        self.send(Hello(name, os.getpid(), CONTRACT_VERSION, owns))
        # Hello is processed once the broker lists us; wait for that (bounded).
        s = b.dealer()
        try:
            deadline = time.monotonic() + 5
            while True:
                stats = json.loads(b.request(s, wire.STATS)[1])
                if name in stats["actors"] and (not owns or stats["actors"][name]["owns"]):
                    break
                assert time.monotonic() < deadline, "broker never registered the actor"
                time.sleep(0.01)
        finally:
            s.close(0)

    def send(self, *msgs: Message) -> None:
        self.sock.send_multipart([encode(m) for m in msgs])

    def emit(self, *infos: Info, batch: bool = False) -> None:
        """One multipart message with an Emit per frame, or one Emits message (batch)."""
        emits = [Emit(i.TYPE, i.encode(), getattr(i, "id", 0)) for i in infos]
        if batch:
            self.send(Emits(tuple(emits)))
        else:
            self.send(*emits)

    def recv(self, timeout: float = 5.0) -> Message:
        assert self.sock.poll(int(timeout * 1000)), f"{self.name}: nothing received"
        frames = self.sock.recv_multipart()
        assert len(frames) == 1
        return decode(frames[0])

    def nothing(self, timeout: float = 0.2) -> bool:
        return not self.sock.poll(int(timeout * 1000))

    def close(self) -> None:
        self.sock.close(0)
