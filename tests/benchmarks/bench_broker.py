"""Broker benchmark: streaming rate and verdict round trip, each beside a raw-zmq baseline.

    .venv/bin/python tests/benchmarks/bench_broker.py [--infos N] [--verdicts N]

Starts a real `kextless run broker` on ipc:// in a private temp dir, plus helper processes
(this script with --role): an actor that emits connection infos as fast as it can, an actor
that drains the Commands it owns, and raw zmq peers for the baselines. Prints one JSON object.
Targets (issue 3): >= 300,000 infos/s to one client reading 64 KiB; Verdict W p50 < 150 us.
The producer batches 64 infos per Emits message (docs/broker-wire.md §9).
Set BENCH_PROFILE=/tmp/broker.prof to profile the broker process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kextless.broker import wire  # noqa: E402
from kextless.broker.client import KextClient, KextTimeout  # noqa: E402
from kextless.protocol.enums import CommandType, Direction, InfoType, PayloadLayer, Verdict  # noqa: E402
from kextless.protocol.infos import ConnectionIpv4  # noqa: E402
from kextless.protocol.messages import CONTRACT_VERSION, Emit, Emits, Hello, encode  # noqa: E402
from tests.entry import KEXTLESS, KEXTLESS_MODULE  # noqa: E402

_HEADER = struct.Struct("<BI")
EMIT_BATCH = 64  # Emits per Emits message (docs/broker-wire.md §9)


def _conn(i: int) -> bytes:
    return ConnectionIpv4(
        i,
        4242,
        Direction.OUTBOUND,
        6,
        b"\x0a\x00\x00\x01",
        b"\x01\x02\x03\x04",
        40000 + i % 20000,
        443,
        PayloadLayer.NETWORK,
        b"",
    ).encode()


# ---- helper roles (separate processes) ---------------------------------------------------------


def role_producer(actors_endpoint: str, n: int, mode: str) -> None:
    """An actor emitting n connection infos as fast as zmq takes them, 64 per message: one
    Emits frame (mode "emits") or 64 Emit frames of one multipart message ("frames")."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"capture-bench")
    s.setsockopt(zmq.SNDHWM, 1000)
    s.connect(actors_endpoint)
    s.send(encode(Hello("capture-bench", os.getpid(), CONTRACT_VERSION, ())))
    emits = [Emit(InfoType.CONNECTION_IPV4, _conn(i), i) for i in range(1, n + 1)]
    if mode == "emits":
        batches = [
            [encode(Emits(tuple(emits[i : i + EMIT_BATCH])))] for i in range(0, n, EMIT_BATCH)
        ]
    else:
        frames = [encode(e) for e in emits]
        batches = [frames[i : i + EMIT_BATCH] for i in range(0, n, EMIT_BATCH)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()  # go
    for b in batches:
        s.send_multipart(b)
    s.close(linger=10_000)
    ctx.term()


def role_sink(actors_endpoint: str) -> None:
    """The 'ale' actor: owns Verdict and drains every Command (until killed)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"ale")
    s.connect(actors_endpoint)
    s.send(
        encode(
            Hello("ale", os.getpid(), CONTRACT_VERSION, (CommandType.VERDICT, CommandType.SHUTDOWN))
        )
    )
    while True:
        s.recv_multipart()


def role_echo(endpoint: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        s.send_multipart(s.recv_multipart())


def role_push(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(endpoint)
    frames = [encode(Emit(InfoType.CONNECTION_IPV4, _conn(i), i)) for i in range(1, n + 1)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    for f in frames:
        s.send(f)
    s.close(linger=10_000)
    ctx.term()


# ---- measurements -------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _wait_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"helper failed to start: {line!r}")


def _stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def baseline_push_pull(tmp: Path, n: int) -> float:
    """Raw zmq: Emit-sized messages per second from one process to another (PUSH/PULL)."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    ep = f"ipc://{tmp}/pp.sock"
    pull.bind(ep)
    p = _spawn("push", ep, str(n))
    try:
        _wait_ready(p)
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        pull.recv()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            pull.recv()
        return (n - 1) / (time.perf_counter() - t0)
    finally:
        pull.close(0)
        _stop(p)


def baseline_echo_rtt(tmp: Path, n: int) -> dict[str, float]:
    """Raw zmq: DEALER -> ROUTER echo round trip with a W-sized request."""
    ep = f"ipc://{tmp}/echo.sock"
    p = _spawn("echo", ep)
    try:
        _wait_ready(p)
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.connect(ep)
        frames = [wire.WRITE, b"\x01" + bytes(8) + b"\x02"]
        for _ in range(200):
            s.send_multipart(frames)
            s.recv_multipart()
        samples = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t = clock()
            s.send_multipart(frames)
            s.recv_multipart()
            samples.append(clock() - t)
        s.close(0)
        return _quantiles(samples)
    finally:
        _stop(p)


def _quantiles(samples: list[int]) -> dict[str, float]:
    samples.sort()
    n = len(samples)
    return {
        "p50_us": round(samples[n // 2] / 1000, 1),
        "p99_us": round(samples[min(n - 1, int(n * 0.99))] / 1000, 1),
        "mean_us": round(statistics.fmean(samples) / 1000, 1),
        "n": n,
    }


class RecordCounter:
    """Counts infos in the read stream by walking their headers (no decoding: the client
    process must not be the bottleneck being measured)."""

    def __init__(self) -> None:
        self.skip = 0  # bytes of the current record still to come
        self.head = b""  # a header split across reads

    def feed(self, data: bytes) -> int:
        n = 0
        pos = 0
        if self.head:
            need = 5 - len(self.head)
            self.head += data[:need]
            if len(self.head) < 5:
                return 0
            pos = need + _HEADER.unpack(self.head)[1]
            self.head = b""
            n = 1
        else:
            pos = self.skip
        end = len(data)
        while pos < end:
            if end - pos < 5:
                self.head = data[pos:]
                self.skip = 0
                return n
            pos += 5 + _HEADER.unpack_from(data, pos)[1]
            n += 1
        self.skip = pos - end
        return n


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_streaming(
    endpoint: str, actors_endpoint: str, n: int, broker_pid: int, mode: str
) -> dict[str, float]:
    prod = _spawn("producer", actors_endpoint, str(n), mode)
    try:
        _wait_ready(prod)
        with KextClient(endpoint) as k:
            assert prod.stdin is not None
            prod.stdin.write("go\n")
            prod.stdin.flush()
            counter = RecordCounter()
            cpu0 = _cpu_seconds(broker_pid)
            first = k.read(65536, timeout=10)
            t0 = time.perf_counter()
            got = counter.feed(first)
            reads = 1
            bytes_ = len(first)
            while got < n:
                try:
                    data = k.read(65536, timeout=10)
                except KextTimeout:
                    break
                reads += 1
                bytes_ += len(data)
                got += counter.feed(data)
            dt = time.perf_counter() - t0
            cpu = _cpu_seconds(broker_pid) - cpu0
            stats = k.stats()
        delivered = stats["infos"]["delivered"]["ConnectionIpv4"]
        return {
            "infos": got,
            "seconds": round(dt, 3),
            "infos_per_s": round(got / dt),
            "reads": reads,
            "mean_read_bytes": round(bytes_ / reads),
            "broker_cpu_us_per_info": round(cpu / got * 1e6, 2),
            "broker_delivered_total": delivered,
            "refused": stats["infos"]["refused"]["ConnectionIpv4"],
        }
    finally:
        prod.wait(30) if prod.poll() is None else None
        _stop(prod)


def bench_verdicts(endpoint: str, actors_endpoint: str, n: int) -> dict[str, float]:
    sink = _spawn("sink", actors_endpoint)
    try:
        with KextClient(endpoint) as k:
            deadline = time.monotonic() + 10
            while "ale" not in k.stats()["actors"]:
                assert time.monotonic() < deadline, "sink actor never registered"
                time.sleep(0.01)
            for i in range(500):
                k.send_verdict(i + 1, Verdict.ACCEPT)
            samples = []
            clock = time.perf_counter_ns
            for i in range(n):
                t = clock()
                k.send_verdict(i + 1, Verdict.ACCEPT)
                samples.append(clock() - t)
            # Also the raw wire without the client library, for comparison.
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.connect(endpoint)
            raw = []
            cmd = b"\x01" + (7).to_bytes(8, "little") + b"\x02"
            for _ in range(n):
                t = clock()
                s.send_multipart([wire.WRITE, cmd])
                s.recv_multipart()
                raw.append(clock() - t)
            s.close(0)
            k.shutdown()
        return {"client": _quantiles(samples), "raw_dealer": _quantiles(raw)}
    finally:
        _stop(sink)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", nargs="+")
    ap.add_argument("--infos", type=int, default=600_000)
    ap.add_argument("--verdicts", type=int, default=5000)
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "producer":
            role_producer(rest[0], int(rest[1]), rest[2])
        elif role == "sink":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            role_sink(rest[0])
        elif role == "echo":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            role_echo(rest[0])
        elif role == "push":
            role_push(rest[0], int(rest[1]))
        return 0
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kextless-bench-"))
    os.chmod(tmp, 0o700)
    endpoint = f"ipc://{tmp}/kext.sock"
    actors = f"ipc://{tmp}/actors.sock"
    # BENCH_PROFILE=FILE runs the broker under cProfile (stats written on its clean stop).
    profile = os.environ.get("BENCH_PROFILE")
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    broker = subprocess.Popen(
        [
            *(KEXTLESS_MODULE[:1] + prof + KEXTLESS_MODULE[1:] if prof else KEXTLESS),
            "run",
            "broker",
            "--endpoint",
            endpoint,
            "--actors-endpoint",
            actors,
            "--queue-bytes",
            str(512 * 1024 * 1024),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                KextClient(endpoint, request_timeout=0.2).version()
                break
            except KextTimeout:
                assert time.monotonic() < deadline, "broker did not start"
        result = {
            "python": sys.version.split()[0],
            "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version(),
            "cpus": os.cpu_count(),
            "baseline": {
                "push_pull_msgs_per_s": round(baseline_push_pull(tmp, 300_000)),
                "dealer_router_echo": baseline_echo_rtt(tmp, args.verdicts),
            },
            "streaming": bench_streaming(endpoint, actors, args.infos, broker.pid, "emits"),
            "streaming_multipart_emit_frames": bench_streaming(
                endpoint, actors, args.infos // 2, broker.pid, "frames"
            ),
            "verdict_write": bench_verdicts(endpoint, actors, args.verdicts),
        }
        s = result["streaming"]
        v = result["verdict_write"]["client"]
        b = result["baseline"]
        result["ratios"] = {
            "streaming_vs_push_pull": round(s["infos_per_s"] / b["push_pull_msgs_per_s"], 2),
            "verdict_p50_vs_echo_p50": round(v["p50_us"] / b["dealer_router_echo"]["p50_us"], 2),
        }
        result["targets_met"] = {
            "streaming_300k": s["infos_per_s"] >= 300_000,
            "verdict_p50_150us": v["p50_us"] < 150,
        }
        result["wall_seconds"] = round(time.monotonic() - t_start, 1)
        print(json.dumps(result, indent=2))
        return 0
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
