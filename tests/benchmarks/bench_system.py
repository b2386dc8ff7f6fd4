"""Issue 4 targets, measured end to end in one run against a baseline from the same run.

    .venv/bin/python tests/benchmarks/bench_system.py [--connects 500] [--bulk-seconds 3]

Inside a throw-away namespace pair it measures, without kextless and then with
`kextless up --netns A --no-policy` and a client answering PermanentAccept at once over the
endpoint: TCP bulk throughput over an accepted connection, connect latency (p50/p99) of
new connections, and how soon an UpdateV4 to PermanentBlock stops an established transfer.
Prints one JSON object with the ratios. Needs root. Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kextless.protocol.enums import Verdict
from tests import apps
from tests.netns import NetnsPair
from tests.system.harness import Answerer, System, addr

SINK = r"""
import json, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1024); print("ready", flush=True)
while True:
    c, _ = s.accept(); first = c.recv(4)
    if first == b"bulk":
        total = 0; t0 = time.monotonic()
        while True:
            n = len(c.recv(1 << 20))
            if not n: break
            total += n
        print(json.dumps({"bytes": total, "seconds": time.monotonic() - t0}), flush=True)
    c.close()
"""

SEND = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"bulk"); chunk = b"x" * 65536; end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end: s.sendall(chunk)
s.close()
"""

CONNECTS = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for _ in range(n):
    s = socket.socket(); s.settimeout(5); t = time.perf_counter()
    s.connect((host, port)); lat.append(time.perf_counter() - t); s.sendall(b"ping"); s.close()
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * .99)] * 1e3}))
"""


def measure(pair: NetnsPair, port: int, connects: int, bulk_seconds: float) -> dict[str, float]:
    sink = pair.popen(pair.b, [sys.executable, "-c", SINK, str(port)])
    assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
    res = pair.run(
        pair.a,
        [sys.executable, "-c", CONNECTS, pair.ip4_b, str(port), str(connects)],
        timeout=120,
        check=True,
    )
    lat = json.loads(res.stdout)
    rates = []
    for _ in range(3):  # the median of three damps noise from the shared 2-CPU machine
        pair.run(
            pair.a,
            [sys.executable, "-c", SEND, pair.ip4_b, str(port), str(bulk_seconds)],
            timeout=bulk_seconds + 30,
            check=True,
        )
        bulk = json.loads(sink.stdout.readline())
        rates.append(bulk["bytes"] / bulk["seconds"] / 1e6)
    sink.kill()
    return {**lat, "bulk_MBps": sorted(rates)[1], "bulk_runs_MBps": rates}


def update_block_ms(pair: NetnsPair, answerer: Answerer, port: int) -> float:
    """ms from UpdateV4(PermanentBlock) leaving the client until the last byte of an
    established, permanently accepted bulk transfer arrives (the issue asks <= 100)."""
    sink = pair.popen(pair.b, [sys.executable, "-c", apps.BULK_SINK, str(port)])
    assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
    sender = pair.popen(
        pair.a, [sys.executable, "-c", apps.BULK_SENDER, pair.ip4_b, str(port), "8"]
    )
    assert sender.stdout is not None
    local_port = json.loads(sender.stdout.readline())["local_port"]
    time.sleep(1.0)  # established and streaming, not through Python
    sent_at = time.monotonic()
    answerer.client.send_update_v4(
        6, addr(pair.ip4_a), local_port, addr(pair.ip4_b), port, Verdict.PERMANENT_BLOCK
    )
    out = json.loads(sink.stdout.readline())
    sender.kill()
    sink.kill()
    return (out["last"] - sent_at) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--connects", type=int, default=500)
    p.add_argument("--bulk-seconds", type=float, default=3.0)
    args = p.parse_args()
    with NetnsPair("bench") as pair, tempfile.TemporaryDirectory() as tmp:
        baseline = measure(pair, 24001, args.connects, args.bulk_seconds)
        system = System(pair, Path(tmp))
        try:
            answerer = Answerer(system.endpoint).start()
            try:
                kextless = measure(pair, 24002, args.connects, args.bulk_seconds)
                decided = len(answerer.connections())
                blocks = sorted(update_block_ms(pair, answerer, 24010 + i) for i in range(3))
            finally:
                answerer.stop()
        finally:
            system.close()
        # A second baseline after `down` brackets the kextless run, so warm-up or drift of the
        # shared machine does not flatter (or punish) either side.
        after = measure(pair, 24003, args.connects, args.bulk_seconds)
    base_bulk = max(baseline["bulk_MBps"], after["bulk_MBps"])
    result = {
        "baseline": baseline,
        "kextless": kextless,
        "baseline_after": after,
        "connections_decided": decided,
        "bulk_ratio": kextless["bulk_MBps"] / base_bulk,
        "connect_added_p50_ms": kextless["p50_ms"] - baseline["p50_ms"],
        "connect_added_p99_ms": kextless["p99_ms"] - baseline["p99_ms"],
        "update_block_ms": {"median": blocks[1], "runs": blocks},
        "targets": {
            "bulk_ratio": ">= 0.95 (against the better baseline)",
            "connect_added_p50_ms": "<= 1",
            "connect_added_p99_ms": "<= 3",
            "update_block_ms": "<= 100",
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
