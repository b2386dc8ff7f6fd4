"""Capture actor cost, measured against a baseline from the same run.

    .venv/bin/python tests/benchmarks/bench_capture.py [--bulk-seconds 3] [--runs 3]
                                                         [--connects 400]

Inside a throw-away namespace pair (client in a, sink in b, over a veth) it measures TCP bulk
throughput and connect latency without capture, then with `kextless run capture` guarding a
and a test ALE peer (a real ZMQ ROUTER) answering PermanentAccept at once; also the UDP
request/response time, where every datagram passes through Python (cache hit). Bulk runs
alternate baseline/capture so drift hits both. Prints one JSON object. Needs root.
Bounded: ~40 s with the defaults (every child has a timeout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kextless.protocol.enums import Verdict
from tests.actors.capture.ale_peer import AlePeer
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

SINK = r"""
import socket, sys, threading
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1024); print("ready", flush=True)
def serve(c):
    n = 0; buf = bytearray(1 << 20)
    with c:
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            n += k
        try:
            c.sendall(str(n).encode())
        except OSError:
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

BULK = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
buf = b"x" * 65536; t0 = time.monotonic()
while time.monotonic() - t0 < secs:
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
n = int(s.recv(64)); dt = time.monotonic() - t0
print(json.dumps({"bytes": n, "seconds": dt, "MBps": n / dt / 1e6}))
"""

CONNECTS = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for _ in range(n):
    s = socket.socket(); s.settimeout(5)
    t = time.perf_counter(); s.connect((host, port)); lat.append(time.perf_counter() - t)
    s.close()
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * .99)] * 1e3,
                  "max_ms": lat[-1] * 1e3, "n": n}))
"""


UDP_ECHO = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = u.recvfrom(2000); u.sendto(d, a)
"""

UDP_RTT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect((host, port))
lat = []
for i in range(n):
    t = time.perf_counter(); s.send(b"x" * 64); s.recv(2000); lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * .99)] * 1e3,
                  "n": n}))
"""


def _json(pair: NetnsPair, code: str, *args: object, timeout: float) -> dict:
    r = pair.run(pair.a, [sys.executable, "-c", code, *args], timeout=timeout)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bulk-seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connects", type=int, default=400)
    args = ap.parse_args(argv)
    port = 18100
    out: dict = {"bulk_runs": {"baseline": [], "capture": []}}
    with tempfile.TemporaryDirectory(prefix="klt-bench-") as tmp, NetnsPair("bench") as pair:
        sink = pair.popen(pair.b, [sys.executable, "-c", SINK, port])
        assert sink.stdout is not None and b"ready" in sink.stdout.readline()
        echo = pair.popen(pair.b, [sys.executable, "-c", UDP_ECHO, port])
        assert echo.stdout is not None and b"ready" in echo.stdout.readline()
        endpoint = f"ipc://{tmp}/ale.sock"
        bulk_timeout = args.bulk_seconds + 20

        def bulk() -> float:
            return _json(pair, BULK, pair.ip4_b, port, args.bulk_seconds, timeout=bulk_timeout)[
                "MBps"
            ]

        def connects() -> dict:
            return _json(pair, CONNECTS, pair.ip4_b, port, args.connects, timeout=60)

        def udp_rtt() -> dict:
            return _json(pair, UDP_RTT, pair.ip4_b, port, 2000, timeout=60)

        _json(pair, CONNECTS, pair.ip4_b, port, 20, timeout=20)  # warm up (ARP, caches)
        out["connect_baseline"] = connects()
        out["udp_rtt_baseline"] = udp_rtt()
        with AlePeer(endpoint, lambda m: Verdict.PERMANENT_ACCEPT) as ale:
            cap = None

            def start_capture() -> subprocess.Popen[bytes]:
                with open(f"{tmp}/capture.log", "ab") as log:  # never a pipe nobody reads
                    proc = pair.popen(
                        pair.a,
                        [
                            *KEXTLESS,
                            "run",
                            "capture",
                            "--ale-endpoint",
                            endpoint,
                            "--log-level",
                            "WARNING",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                ale.ready.clear()
                if not ale.ready.wait(15):
                    raise RuntimeError("capture did not start")
                return proc

            def stop_capture(proc: subprocess.Popen[bytes]) -> None:
                proc.terminate()
                proc.wait(10)

            for _ in range(args.runs):
                out["bulk_runs"]["baseline"].append(bulk())
                cap = start_capture()
                out["bulk_runs"]["capture"].append(bulk())
                stop_capture(cap)
            cap = start_capture()
            held_before = len(ale.held)
            out["connect_capture"] = connects()
            out["connect_capture"]["asked"] = len(ale.held) - held_before
            held_before = len(ale.held)
            # Every datagram goes through Python both ways: one ask, then cache hits.
            out["udp_rtt_capture"] = udp_rtt()
            out["udp_rtt_capture"]["asked"] = len(ale.held) - held_before
            stop_capture(cap)
    base = statistics.median(out["bulk_runs"]["baseline"])
    withc = statistics.median(out["bulk_runs"]["capture"])
    out["bulk_MBps"] = {
        "baseline": round(base, 1),
        "capture": round(withc, 1),
        "ratio": round(withc / base, 3),
        "target_ratio": 0.95,
    }
    out["connect_added_ms"] = {
        "p50": round(out["connect_capture"]["p50_ms"] - out["connect_baseline"]["p50_ms"], 3),
        "p99": round(out["connect_capture"]["p99_ms"] - out["connect_baseline"]["p99_ms"], 3),
    }
    out["udp_rtt_added_ms"] = {
        "p50": round(out["udp_rtt_capture"]["p50_ms"] - out["udp_rtt_baseline"]["p50_ms"], 3),
        "p99": round(out["udp_rtt_capture"]["p99_ms"] - out["udp_rtt_baseline"]["p99_ms"], 3),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
