"""Random multipart garbage against a real broker: every request answered, memory flat."""

from __future__ import annotations

import json
import random
import time

import pytest
import zmq

from kextless.broker import wire
from tests.broker.broker_testlib import Broker, FakeActor, start_broker, stop_broker

REPLY_OPS = {
    wire.OPEN,
    wire.CLOSE,
    wire.READ,
    wire.WRITE,
    wire.VERSION,
    wire.STATS,
    wire.EOF,
    wire.TIMEOUT,
    wire.ERROR,
}
OPS = [wire.OPEN, wire.CLOSE, wire.READ, wire.WRITE, wire.VERSION, wire.STATS]


def random_request(rng: random.Random) -> list[bytes]:
    """Mostly near-valid requests (to reach deep paths), some pure noise."""
    roll = rng.random()
    if roll < 0.15:
        return [rng.randbytes(rng.choice([0, 1, 2, 3, 100])) for _ in range(rng.randint(1, 6))]
    op = rng.choice(OPS)
    if op == wire.READ:
        frames = [op, wire.U32.pack(rng.choice([0, 1, 5, 6, 1024, 65536, 2**32 - 1]))]
        # A valid read always carries a short timeout so nothing can park forever; the
        # malformed variants are answered with X at once anyway.
        frames.append(wire.U32.pack(rng.randint(1, 3)))
        if rng.random() < 0.2:
            frames = [f[: rng.randint(0, 5)] if rng.random() < 0.5 else f for f in frames]
        if rng.random() < 0.1:
            frames.append(rng.randbytes(4))
        return frames
    if op == wire.WRITE:
        kind = rng.random()
        if kind < 0.5:
            cmd = bytes([rng.randint(0, 10)]) + rng.randbytes(
                rng.choice([0, 8, 9, 10, 13, 14, 37, 38, 39])
            )
        elif kind < 0.7:
            cmd = bytes([rng.choice([5, 7])])  # GetLogs / PrintMemoryStats: fill the queue
        else:
            cmd = rng.randbytes(rng.randint(0, 64))
        frames = [op, cmd]
        if rng.random() < 0.1:
            frames = [op] if rng.random() < 0.5 else [op, cmd, cmd]
        return frames
    frames = [op]
    if rng.random() < 0.1:
        frames.append(rng.randbytes(rng.randint(0, 8)))
    return frames


def run_fuzz(b: Broker, rng: random.Random, n: int) -> dict[bytes, int]:
    socks = [b.dealer() for _ in range(3)]
    seen: dict[bytes, int] = {}
    try:
        for i in range(n):
            s = socks[i % 3] if rng.random() < 0.3 else socks[0]
            frames = random_request(rng)
            s.send_multipart(frames)
            assert s.poll(5000), f"request #{i} {frames!r} got no reply"
            reply = s.recv_multipart()
            assert reply[0] in REPLY_OPS, (frames, reply)
            if reply[0] == wire.ERROR:
                assert len(reply) == 2 and reply[1], (frames, reply)
            if reply[0] == wire.READ:
                assert len(reply) == 2 and 1 <= len(reply[1]) <= wire.U32.unpack(frames[1])[0]
            seen[reply[0]] = seen.get(reply[0], 0) + 1
    finally:
        for s in socks:
            s.close(0)
    return seen


@pytest.mark.slow
def test_fuzzed_requests_are_all_answered_and_memory_stays_flat() -> None:
    b = start_broker(["--queue-bytes", "65536"])
    try:
        rng = random.Random(20261126)
        run_fuzz(b, rng, 3000)  # warm up: allocator, log ring, queue all reach steady state
        before = b.rss_kib()
        seen = run_fuzz(b, rng, 20000)
        after = b.rss_kib()
        # Every kind of reply was exercised, so the deep paths ran.
        assert set(seen) >= {
            wire.OPEN,
            wire.CLOSE,
            wire.READ,
            wire.WRITE,
            wire.VERSION,
            wire.STATS,
            wire.ERROR,
            wire.TIMEOUT,
            wire.EOF,
        }, seen
        assert after - before < 2048, f"RSS grew from {before} to {after} KiB"
        check = b.dealer()
        assert b.request(check, wire.VERSION)[0] == wire.VERSION
        check.close(0)
        assert b.proc.poll() is None
    finally:
        assert stop_broker(b) == 0


def test_actor_socket_garbage_never_crashes_the_broker(broker: Broker) -> None:
    rng = random.Random(7)
    raw = broker.ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.IDENTITY, b"noise")
    raw.connect(broker.actors_endpoint)
    for _ in range(3000):
        raw.send_multipart([rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 4))])
    # Near-valid msgpack: a tagged array with random fields.
    for _ in range(500):
        raw.send(
            bytes([0x90 + rng.randint(0, 5), 0xA4])
            + rng.choice([b"Emit", b"Hell", b"Heal", b"Log_"])
            + rng.randbytes(rng.randint(0, 30))
        )
    raw.close(0)
    ale = FakeActor(broker, "ale")  # still serving actors after all that
    s = broker.dealer()
    deadline = time.monotonic() + 10
    while True:
        stats = json.loads(broker.request(s, wire.STATS)[1])
        if stats["actors"].get("noise", {}).get("messages", 0) >= 3500:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stats["actor_garbage"] > 3000
    s.close(0)
    ale.close()
    assert broker.proc.poll() is None
