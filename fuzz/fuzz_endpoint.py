"""atheris: the broker's core (the endpoint's whole logic, in process) on arbitrary requests.

Each input is split into client requests and actor frames and fed to one BrokerCore, so the
fuzzer can build up sessions, queued infos and partial reads across requests. Every client
request must produce exactly one reply to its peer (or park a read, answered by the next
deadline), with a known reply op; nothing may raise. Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from kextless.broker import wire
    from kextless.broker.core import BrokerCore, ToClient

REPLIES = {b"O", b"C", b"R", b"W", b"V", b"S", b"E", b"T", b"X"}
PEERS = [b"p0", b"p1", b"p2"]
OPS = [wire.OPEN, wire.CLOSE, wire.READ, wire.WRITE, wire.VERSION, wire.STATS, b"?"]


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    core = BrokerCore(queue_bytes=8192, pid=1)
    now = 1_000_000_000
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        now += fdp.ConsumeIntInRange(0, 50_000_000)
        if fdp.ConsumeBool():  # an actor frame: Hello/Emit/garbage
            actor = fdp.PickValueInList([b"ale", b"bandwidth", b"x"])
            frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))]
            core.actor_message(actor, frames, now)
            continue
        peer = fdp.PickValueInList(PEERS)
        op = fdp.PickValueInList(OPS)
        extra = fdp.ConsumeIntInRange(0, 2)
        frames = [op] + [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)) for _ in range(extra)]
        effects = core.client_message(peer, frames, now)
        replies = [e for e in effects if isinstance(e, ToClient) and e.peer == peer]
        parked_read = op == wire.READ and not replies
        assert replies or parked_read, (frames, effects)  # answered, or a read waits
        for r in replies:
            assert r.frames and r.frames[0] in REPLIES, r
    core.on_deadline(now + 10**12)
    core.stop()


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
