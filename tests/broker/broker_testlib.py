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


# ---- malformed input, answered by the core (tests at both levels use these) -------------------

#: Malformed W commands and the reason the broker gives (status 1, an Error LogLine).
MALFORMED = [
    (b"", "empty command"),
    (b"\x01", "short Verdict command: 1 bytes, expected 10"),
    (b"\x01" + bytes(8), "short Verdict command: 9 bytes, expected 10"),
    (b"\x02", "short UpdateV4 command"),
    (b"\x02" + bytes(13), "short UpdateV4 command: 14 bytes, expected 15"),
    (b"\x03" + bytes(37), "short UpdateV6 command: 38 bytes, expected 39"),
    (b"\x00\x00", "trailing bytes after Shutdown command: 2 bytes, expected 1"),
    (b"\x01" + bytes(9) + b"\x07", "trailing bytes after Verdict command"),
    (b"\x05" + b"junk", "trailing bytes after GetLogs command"),
    (b"\x09", "unknown command type 9"),
    (b"\xff" + bytes(9), "unknown command type 255"),
    (b"\x01" + (7).to_bytes(8, "little") + b"\x0c", "Verdict: unknown verdict value 12"),
    (b"\x02\x06" + bytes(12) + b"\xc8", "UpdateV4: unknown verdict value 200"),
    (b"\x03\x11" + bytes(36) + b"\x0c", "UpdateV6: unknown verdict value 12"),
]

#: Requests refused with X for their framing (frames after the routing id), and the reason.
BAD_FRAMES = [
    ([b"Z"], b"unknown op"),
    ([b""], b"unknown op"),
    ([b"OO"], b"unknown op"),
    ([b"o"], b"unknown op"),
    ([wire.OPEN, b"x"], b"takes no frames"),
    ([wire.VERSION, b""], b"takes no frames"),
    ([wire.STATS, b"1", b"2"], b"takes no frames"),
    ([wire.READ], b"R takes one u32"),
    ([wire.READ, b"\x00\x04\x00"], b"R takes one u32"),
    ([wire.READ, wire.U32.pack(10), b"\x01"], b"R takes one u32"),
    ([wire.READ, wire.U32.pack(10), wire.U32.pack(1), wire.U32.pack(1)], b"R takes one u32"),
    ([wire.READ, wire.U32.pack(0)], b"max_bytes must be"),
    ([wire.READ, wire.U32.pack(0xFFFFFFFF)], b"max_bytes must be"),
    ([wire.WRITE], b"W takes exactly one command frame"),
    ([wire.WRITE, b"\x05", b"\x05"], b"W takes exactly one command frame"),
]


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
