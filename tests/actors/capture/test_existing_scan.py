"""Real traffic: packets keep flowing while the capture reads a large socket table.

Namespace a holds 5000 idle loopback connections (10 000 sockets) made before the capture
starts, and a UDP echo server; namespace b pings it every millisecond, so every ping crosses
the capture's loop twice (all UDP is diverted) while the capture reads those sockets (about a
second, docs/measurements.md M21) and asks about each. The ALE peer accepts everything.

Run as a measurement, against the old arrangement (the read on the loop, handed over whole)
in the same run, alternating:
    timeout 600 .venv/bin/python -m tests.actors.capture.test_existing_scan --rounds 5
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from kextless.protocol.enums import Verdict
from tests import apps
from tests.actors.capture.ale_peer import AlePeer
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONNS = 5000
UDP_PORT = 18201
HOLD_PORT = 18202

#: Opens `n` loopback connections to its own listener and keeps both ends open.
_HOLDER = r"""
import resource, socket, sys, threading
n, port = int(sys.argv[1]), int(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n + 100), hard))
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(4096)
keep = []
def accept():
    for _ in range(n):
        keep.append(l.accept()[0])
t = threading.Thread(target=accept); t.start()
for _ in range(n):
    keep.append(socket.create_connection(("127.0.0.1", port)))
t.join()
print("ready", len(keep), flush=True)
threading.Event().wait()
"""

#: Pings the UDP echo server every `interval` s for `secs` s; reports each ping's round trip.
_PINGER = r"""
import json, socket, sys, threading, time
host, port, secs, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((host, port))
sent, back = {}, {}
def rx():
    s.settimeout(0.2)
    while True:
        try:
            d = s.recv(2000)
        except OSError:
            if done.is_set():
                return
            continue
        back[int(d.rsplit(b" ", 1)[-1])] = time.monotonic()
done = threading.Event()
t = threading.Thread(target=rx, daemon=True); t.start()
start = time.monotonic(); i = 0
while time.monotonic() - start < secs:
    sent[i] = time.monotonic(); s.send(b"ping %d" % i); i += 1
    time.sleep(interval)
time.sleep(1.0); done.set(); t.join()
rtts = [back[k] - sent[k] for k in sent if k in back]
out = {"sent": len(sent), "lost": len(sent) - len(rtts), "rtts_ms": [r * 1e3 for r in rtts]}
print(json.dumps(out))
"""

#: The old arrangement, for the measurement's baseline: the read on the loop thread, its
#: result handed to the core whole (the shell's ScanExisting handling before the child).
_ON_LOOP = r"""
import sys, time
from kextless.actors.capture import existing, shell
from kextless.actors.capture.core import ScanExisting
run = shell.CaptureShell._run
def on_loop(self, a):
    if isinstance(a, ScanExisting):
        self._run_actions(self.core.existing(existing.read(), time.monotonic_ns()))
    else:
        run(self, a)
shell.CaptureShell._run = on_loop
from kextless.actors.capture.main import main
sys.exit(main(sys.argv[1:]))
"""


def _round(pair: NetnsPair, on_loop: bool, secs: float = 6.0) -> dict[str, Any]:
    """One capture start under ping load; the pings' round trips and the capture's scan log."""
    with tempfile.TemporaryDirectory(prefix="klt-scan-") as tmp:
        endpoint = f"ipc://{tmp}/ale.sock"
        log_path = Path(tmp) / "capture.log"
        argv = [sys.executable, "-c", _ON_LOOP] if on_loop else [*KEXTLESS, "run", "capture"]
        with (
            AlePeer(endpoint, lambda _m: Verdict.PERMANENT_ACCEPT) as ale,
            log_path.open("wb") as log_file,
        ):
            proc = pair.popen(
                pair.a,
                [*argv, "--ale-endpoint", endpoint],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
            try:
                assert ale.ready.wait(10), log_path.read_text()
                r = pair.run(
                    pair.b,
                    [sys.executable, "-c", _PINGER, pair.ip4_a, UDP_PORT, secs, 0.001],
                    timeout=secs + 20,
                )
                assert ale.wait_for(lambda: len(ale.held) >= CONNS, 10), log_path.read_text()[
                    -2000:
                ]
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        text = log_path.read_text()
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, r.stderr[-2000:]
    out: dict[str, Any] = json.loads(lines[-1])
    out["log"] = text
    m = re.search(r"existing connections: (\d+) read in ([\d.]+) ms", text)
    out["scanned"] = int(m.group(1)) if m else None
    out["scan_ms"] = float(m.group(2)) if m else None
    if on_loop:  # no read-time line: count what the core reported
        m = re.search(r"existing connections: (\d+) asked", text)
        out["scanned"] = int(m.group(1)) if m else None
    out["asked"] = len(ale.held)
    return out


def _setup(pair: NetnsPair) -> None:
    apps.start(pair, pair.a, apps.ECHO_SERVER, UDP_PORT, "0.0.0.0")
    holder = pair.popen(pair.a, [sys.executable, "-c", _HOLDER, CONNS, HOLD_PORT])
    assert holder.stdout is not None
    line = holder.stdout.readline()
    assert line.startswith(b"ready"), holder.stderr.read() if holder.stderr else line


def _summary(r: dict[str, Any]) -> str:
    rtts = sorted(r["rtts_ms"])
    p99 = rtts[int(len(rtts) * 0.99)] if rtts else float("nan")
    return (
        f"sent {r['sent']} lost {r['lost']} max {max(rtts, default=float('nan')):.1f} ms "
        f"p99 {p99:.2f} ms (scan: {r['scanned']} flows read in {r['scan_ms']} ms)"
    )


def test_packets_keep_flowing_while_a_large_socket_table_is_read() -> None:
    with NetnsPair() as pair:
        _setup(pair)
        r = _round(pair, on_loop=False)
        print(_summary(r))
        # The scan was the large one it is meant to be, and happened during the pings.
        assert r["scanned"] == CONNS and r["asked"] >= CONNS, r["log"][-3000:]
        assert "off the loop" in r["log"]
        # On the loop, pings waited 1.3-2.2 s and hundreds were lost (the measurement in the
        # module docstring); now none is lost and none waits long (measured: 41-247 ms on a
        # loaded 2-CPU VM, so the bound leaves room for load, not for the old stall).
        assert r["lost"] == 0, _summary(r)
        assert max(r["rtts_ms"]) < 500, _summary(r)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res: dict[str, list[dict[str, Any]]] = {"on loop (before)": [], "off loop (now)": []}
    with NetnsPair() as pair:
        _setup(pair)
        for i in range(args.rounds):
            for name, on_loop in (("on loop (before)", True), ("off loop (now)", False)):
                r = _round(pair, on_loop)
                res[name].append(r)
                print(f"round {i + 1} {name}: {_summary(r)}", flush=True)
                time.sleep(0.5)
    for name, rs in res.items():
        maxes = [max(r["rtts_ms"], default=float("nan")) for r in rs]
        lost = [r["lost"] for r in rs]
        p99s = [sorted(r["rtts_ms"])[int(len(r["rtts_ms"]) * 0.99)] for r in rs]
        med = statistics.median
        print(
            f"{name}: max RTT median {med(maxes):.1f} ms (range {min(maxes):.1f}-"
            f"{max(maxes):.1f}), p99 median {med(p99s):.2f} ms, lost median {med(lost)} "
            f"(range {min(lost)}-{max(lost)}) of ~{rs[0]['sent']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
