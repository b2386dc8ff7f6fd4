"""recv/send vs. recv_ex/send_ex (actors/capture/batch.py), and what the wakeup bound costs.

    .venv/bin/python tests/benchmarks/bench_batch.py [--rounds 3] [--seconds 3] [--batch 64]
                                                     [--skip-wakeup] [--skip-throughput]

Needs root. Everything runs in a throw-away namespace pair (tests/netns.py), traffic only
between the two namespaces; every child has a timeout. ~90 s with the defaults.

1. Throughput: a Python UDP blaster in b sends 64-byte datagrams at full speed to a sink in a;
   a hold-and-reinject loop in a (filter: that port) either calls pydivert's recv()/send() per
   packet (what actors/capture/shell.py does today) or Batch.recv()/reinject()/flush(). The
   figure is examined packets per CPU-second of the loop process (getrusage: user+system,
   every thread). Rounds alternate the two modes; medians with min-max.
2. Wakeups: the loop waits on the handle's event fd, like the shell, with a forced read every
   F ms (F = 1000, 100, 10; 1000 stands for "no bound"). 64 threads in b connect to a server
   in a (every TCP packet of the port diverted) for --seconds, after 3 s idle. Reported:
   connects/s, connect latency p50/p99/max, and idle wake-ups/s and CPU% of the loop.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.netns import NetnsPair

UPORT, TPORT = 18200, 18201

LOOP = r"""
import json, resource, select, socket, sys, time
from pydivert import EBPFDivert
from kextless.actors.capture.batch import Batch
mode, filt, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
batch, bound_ms, busy_ms = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
h = EBPFDivert(filt).open()
b = Batch(h, size=batch)
efd = h._event_fd
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
poller = select.poll()
poller.register(efd, select.POLLIN)
poller.register(sys.stdin.fileno(), select.POLLIN)
# rescued: forced reads (poll timed out, the event fd quiet) that found packets: each one is
# a ring wakeup the library missed.
stats = {"wakeups": 0, "empty": 0, "examined": 0, "rescued": 0, "rescued_pkts": 0}
marks = []
delays = []  # ns from capture (address timestamp) to our receive: time spent in the library
last_pkt = 0.0
def drain():
    got = 0
    if mode == "single":
        for _ in range(256):
            try:
                p = h.recv(timeout=0)
            except TimeoutError:
                break
            _ = (p._direction, p._loopback, p._timestamp)  # what the shell reads
            h.send(p, recalculate_checksum=False)
            got += 1
    else:
        for _ in range(256 // batch + 1):
            toks = b.recv(0)
            now = time.monotonic_ns()
            for t in toks:
                delays.append(now - t.timestamp)
                _ = (t.outbound, t.loopback, t.timestamp)
                b.reinject(t)
            got += len(toks)
            if len(toks) < batch:
                break
        b.flush()
    return got
print("ready", flush=True)
end = time.monotonic() + secs
last_read = time.monotonic()
if mode == "blocking":  # no event fd: recv_ex itself waits, at most bound_ms (its epoll_wait)
    import threading
    quit = threading.Event()
    def cmds():
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            marks.append({"t": time.monotonic(), "cpu": cpu(), **stats})
        quit.set()
    threading.Thread(target=cmds, daemon=True).start()
    while not quit.is_set() and time.monotonic() < end:
        t0 = time.monotonic()
        toks = b.recv(bound_ms)
        now = time.monotonic_ns()
        stats["wakeups"] += 1
        if toks and now / 1e9 - t0 >= 0.9 * bound_ms / 1000:  # found only by the timeout
            stats["rescued"] += 1
            stats["rescued_pkts"] += len(toks)
        for t in toks:
            delays.append(now - t.timestamp)
            b.reinject(t)
        stats["examined"] += len(toks)
        if not toks:
            stats["empty"] += 1
    b.flush()
    end = 0
while time.monotonic() < end:
    # The forced-read bound: busy_ms while packets came in the last 250 ms, else bound_ms.
    bnd = busy_ms if busy_ms and time.monotonic() - last_pkt < 0.25 else bound_ms
    wait = max(0, int((last_read + bnd / 1000 - time.monotonic()) * 1000) + 1)
    ev = poller.poll(wait)
    stats["wakeups"] += 1
    if any(fd == sys.stdin.fileno() for fd, _ in ev):
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            break
        marks.append({"t": time.monotonic(), "cpu": cpu(), **stats})
        continue
    n = drain()
    last_read = time.monotonic()
    if n == 0:
        stats["empty"] += 1
    else:
        last_pkt = last_read
        if not ev:
            stats["rescued"] += 1
            stats["rescued_pkts"] += n
    stats["examined"] += n
marks.append({"t": time.monotonic(), "cpu": cpu(), **stats})
st = h.stats()
c = b.counters
h.close()
delays.sort()
print(json.dumps({"marks": marks, "final": stats, "stats": st, "send_failed": c.send_failed,
                  "delays": delays[:: max(1, len(delays) // 20000)], "n_delays": len(delays),
                  "late_5ms": sum(d > 5_000_000 for d in delays),
                  "late_50ms": sum(d > 50_000_000 for d in delays)}), flush=True)
"""

BLAST = r"""
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 64; n = 0; end = time.monotonic() + secs; dst = (host, port)
while time.monotonic() < end:
    for _ in range(100):
        try:
            s.sendto(payload, dst)
        except OSError:
            pass
    n += 100
print(n, flush=True)
"""

SINK = r"""
import socket, sys, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24); s.settimeout(0.2)
print("ready", flush=True)
n = 0; end = time.monotonic() + secs
while time.monotonic() < end:
    try:
        s.recv(2048); n += 1
    except OSError:
        pass
print(n, flush=True)
"""

# The client closes first (its TIME_WAIT is in b, where tcp_tw_reuse lets a port come back
# after 1 s, far beyond any packet the loop delays); the server closes on the client's FIN.
SERVER = r"""
import selectors, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096); s.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is s:
            try:
                while True:
                    c, _ = s.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ)
            except BlockingIOError:
                pass
        else:
            try:
                if key.fileobj.recv(4096):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(key.fileobj); key.fileobj.close()
"""

CONNECTS = r"""
import json, socket, sys, threading, time
host, port, secs, par = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lat = []; fails = [0]; end = time.monotonic() + secs
def run():
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            c = socket.create_connection((host, port), timeout=3)
            lat.append(time.perf_counter() - t0)
            c.close()
        except OSError:
            fails[0] += 1
ts = [threading.Thread(target=run) for _ in range(par)]
t0 = time.monotonic()
for t in ts: t.start()
for t in ts: t.join()
el = time.monotonic() - t0
print(json.dumps({"n": len(lat), "fails": fails[0], "secs": el, "lat": sorted(lat)}), flush=True)
"""

# Two senders pinned to different CPUs send at the same instant, then stay silent until the
# next burst: a packet whose ring wakeup was missed waits for the forced read (or the next
# burst), which the loop sees as time spent in the library.
BURST = r"""
import os, socket, sys, time
host, port, cpu, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gap, start = float(sys.argv[5]), float(sys.argv[6])
os.sched_setaffinity(0, {cpu})
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    t = start + i * gap
    while time.monotonic() < t - 0.002:
        time.sleep(0.001)
    while time.monotonic() < t:
        pass
    s.sendto(b"a", (host, port)); s.sendto(b"b", (host, port))
"""
BPORT = 18202


def _line(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    if not r:
        raise RuntimeError("helper silent")
    return proc.stdout.readline().decode()


def _finish(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return out.decode().strip().splitlines()[-1]


def _py(p: NetnsPair, ns: str, code: str, *args: object) -> subprocess.Popen[bytes]:
    return p.popen(ns, [sys.executable, "-c", code, *args], stdin=subprocess.PIPE)


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def throughput_round(p: NetnsPair, mode: str, secs: float, batch: int) -> dict[str, Any]:
    sink = _py(p, p.a, SINK, UPORT, secs + 3)
    _line(sink)
    loop = _py(p, p.a, LOOP, mode, f"udp.DstPort == {UPORT}", secs + 2, batch, 10, 0)
    _line(loop)
    assert loop.stdin is not None
    loop.stdin.write(b"mark\n")
    loop.stdin.flush()
    blast = p.run(p.b, [sys.executable, "-c", BLAST, p.ip4_a, UPORT, secs], timeout=secs + 10)
    time.sleep(0.3)  # the last held packets out
    loop.stdin.write(b"mark\n")
    loop.stdin.flush()
    time.sleep(0.1)
    loop.stdin.write(b"quit\n")
    loop.stdin.flush()
    res = json.loads(_finish(loop))
    received = int(_finish(sink))
    m0, m1 = res["marks"][0], res["marks"][1]
    cpu = m1["cpu"] - m0["cpu"]
    examined = m1["examined"] - m0["examined"]
    return {
        "mode": mode,
        "offered": int(blast.stdout.strip() or 0),
        "sink_received": received,
        "examined": examined,
        "loop_cpu_s": round(cpu, 3),
        "examined_per_cpu_s": round(examined / cpu) if cpu else 0,
        "wall_cpu_pct": round(100 * cpu / (m1["t"] - m0["t"]), 1),
        "ringbuf_full": res["stats"].get("ringbuf_full", 0),
        "queue_full": res["stats"].get("queue_full", 0),
        "send_failed": res["send_failed"],
    }


#: name -> (bound_ms, busy_ms); None: no divert loop at all (the baseline).
VARIANTS: dict[str, tuple[str, int, int] | None] = {
    "baseline": None,
    "blocking_recv_ex_100ms": ("blocking", 100, 0),
    "blocking_recv_ex_10ms": ("blocking", 10, 0),
    "bound_1000ms": ("batch", 1000, 0),
    "bound_100ms": ("batch", 100, 0),
    "bound_10ms": ("batch", 10, 0),
    "adaptive_10ms_busy_100ms_idle": ("batch", 100, 10),
}


def _connects(p: NetnsPair, secs: float) -> dict[str, Any]:
    r = p.run(
        p.b,
        [sys.executable, "-c", CONNECTS, p.ip4_a, TPORT, secs, 64],
        timeout=secs + 15,
    )
    c: dict[str, Any] = json.loads(r.stdout)
    return c


def _ms(xs: list[float], f: float, scale: float) -> float:
    return round(scale * xs[min(len(xs) - 1, int(f * len(xs)))], 3) if xs else -1.0


def wakeup_round(p: NetnsPair, variant: str, secs: float, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"variant": variant}
    v = VARIANTS[variant]
    if v is None:
        c = _connects(p, secs)
    else:
        idle = 3.0
        filt = f"tcp.DstPort == {TPORT} or tcp.SrcPort == {TPORT}"
        loop = _py(p, p.a, LOOP, v[0], filt, secs + idle + 8, batch, v[1], v[2])
        _line(loop)
        assert loop.stdin is not None

        def mark() -> None:
            assert loop.stdin is not None
            loop.stdin.write(b"mark\n")
            loop.stdin.flush()

        time.sleep(0.3)
        mark()
        time.sleep(idle)
        mark()
        c = _connects(p, secs)
        loop.stdin.write(b"quit\n")
        loop.stdin.flush()
        res = json.loads(_finish(loop))
        m0, m1 = res["marks"][0], res["marks"][1]
        idle_s = m1["t"] - m0["t"]
        d = res["delays"]
        out |= {
            "idle_wakeups_per_s": round((m1["wakeups"] - m0["wakeups"] - 1) / idle_s, 1),
            "idle_cpu_pct": round(100 * (m1["cpu"] - m0["cpu"]) / idle_s, 3),
            # Time each diverted packet spent inside the library before we read it.
            "in_library_p50_ms": _ms(d, 0.5, 1e-6),
            "in_library_p99_ms": _ms(d, 0.99, 1e-6),
            "in_library_max_ms": _ms(d, 1.0, 1e-6),
            "packets": res["n_delays"],
            "late_over_5ms": res["late_5ms"],
            "late_over_50ms": res["late_50ms"],
            "missed_wakeups": res["final"]["rescued"],
            "ringbuf_full": res["stats"].get("ringbuf_full", 0),
            "queue_full": res["stats"].get("queue_full", 0),
        }
    lat = c["lat"]
    out |= {
        "connects_per_s": round(c["n"] / c["secs"]),
        "connect_fails": c["fails"],
        "p50_ms": _ms(lat, 0.5, 1e3),
        "p99_ms": _ms(lat, 0.99, 1e3),
        "max_ms": _ms(lat, 1.0, 1e3),
    }
    return out


#: name -> (loop mode, bound_ms): the event-fd loop (like the shell) or a blocking recv_ex.
BURST_VARIANTS = {
    "event_fd_1000ms": ("batch", 1000),
    "event_fd_100ms": ("batch", 100),
    "event_fd_10ms": ("batch", 10),
    "blocking_recv_ex_1000ms": ("blocking", 1000),
    "blocking_recv_ex_100ms": ("blocking", 100),
    "blocking_recv_ex_10ms": ("blocking", 10),
}


def burst_round(p: NetnsPair, variant: str, bursts: int, gap_s: float) -> dict[str, Any]:
    mode, bound_ms = BURST_VARIANTS[variant]
    loop = _py(p, p.a, LOOP, mode, f"udp.DstPort == {BPORT}", bursts * gap_s + 8, 64,
               bound_ms, 0)  # fmt: skip
    _line(loop)
    assert loop.stdin is not None
    start = time.monotonic() + 0.5
    senders = [_py(p, p.b, BURST, p.ip4_a, BPORT, cpu, bursts, gap_s, start) for cpu in (0, 1)]
    for s in senders:
        s.communicate(timeout=bursts * gap_s + 10)
    time.sleep(max(0.2, bound_ms / 1000 + 0.1))  # the last stuck packet is read by the bound
    loop.stdin.write(b"quit\n")
    loop.stdin.flush()
    res = json.loads(_finish(loop))
    d = res["delays"]
    return {
        "variant": variant,
        "packets": res["n_delays"],
        "sent": 4 * bursts,
        "late_over_5ms": res["late_5ms"],
        "late_over_50ms": res["late_50ms"],
        "missed_wakeups": res["final"]["rescued"],
        "in_library_p50_ms": _ms(d, 0.5, 1e-6),
        "in_library_max_ms": _ms(d, 1.0, 1e-6),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip-wakeup", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-bursts", action="store_true")
    ap.add_argument("--bursts", type=int, default=30)
    args = ap.parse_args()
    out: dict[str, Any] = {"batch": args.batch, "seconds": args.seconds}
    with NetnsPair("bb") as p:
        # Namespace-local sysctls of b (the client): more ports, TIME_WAIT reuse after 1 s.
        for kv in ("net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"):
            p.run(p.b, ["sysctl", "-q", "-w", kv], check=True)
        srv = _py(p, p.a, SERVER, TPORT)
        _line(srv)
        if not args.skip_throughput:
            rounds: dict[str, list[dict[str, Any]]] = {"single": [], "batch": []}
            for _ in range(args.rounds):
                for mode in ("single", "batch"):
                    rounds[mode].append(throughput_round(p, mode, args.seconds, args.batch))
            out["throughput"] = {
                m: {
                    "examined_per_cpu_s": _summary([r["examined_per_cpu_s"] for r in rs]),
                    "sink_received": _summary([r["sink_received"] for r in rs]),
                    "rounds": rs,
                }
                for m, rs in rounds.items()
            }
            s = out["throughput"]["single"]["examined_per_cpu_s"]["median"]
            b = out["throughput"]["batch"]["examined_per_cpu_s"]["median"]
            out["throughput"]["ratio_batch_vs_single"] = round(b / s, 2) if s else None
        if not args.skip_wakeup:
            wr: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
            for _ in range(args.rounds):
                for name in wr:
                    wr[name].append(wakeup_round(p, name, args.seconds, args.batch))
            out["wakeup"] = {
                name: {k: _summary([r[k] for r in rs]) for k in rs[0] if k != "variant"}
                | {"rounds": rs}
                for name, rs in wr.items()
            }
        if not args.skip_bursts:
            br: dict[str, list[dict[str, Any]]] = {k: [] for k in BURST_VARIANTS}
            for _ in range(args.rounds):
                for name in br:
                    br[name].append(burst_round(p, name, args.bursts, 0.15))
            out["bursts"] = {
                name: {k: _summary([r[k] for r in rs]) for k in rs[0] if k != "variant"}
                | {"rounds": rs}
                for name, rs in br.items()
            }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
