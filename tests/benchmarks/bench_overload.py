"""Overload (issue 12 fault 3): at which offered rate the divert ring overflows (`ringbuf_full`)
with the shipped configuration, and whether anything passes unexamined when it does.

`kextless up --netns kxo-..-a` with the built-in policy and the shipped default rules plus one
rule accepting inbound UDP/TCP to ACCEPT ports; everything else inbound gets the default
PermanentDrop. Traffic comes from namespace b (raw IPv4 sockets, so a flood of new 5-tuples
costs the sender no socket each):

  udp-new   every datagram a new 5-tuple (source address x port), half to the accepted port,
            half to a BLOCKED one: each must be asked about
  tcp-new   new TCP connections opened at a rate (non-blocking, all in flight at once), to the
            accepted port and to a blocked one
  udp-one   one accepted UDP flow: decided once, then kept in the kernel (no ring at all)

Per step: offered (sent/s), delivered (received/s on the accepted port), the capture's counter
deltas (`ringbuf_full`, `guard_dropped`, `queue_full`, held-limit drops) from a report made
after the step, and LEAKED: datagrams/connections that reached the BLOCKED port's listener.
The policy never accepts that port, so each one passed unexamined. Bounded: under 5 minutes.

    sudo .venv/bin/python tests/benchmarks/bench_overload.py [--quick] [--fail-open]
        [--ring-bytes N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextError
from tests.reliability.harness import Rig

#: Shipped default rules, then this: the flood's accepted ports (the blocked ones fall to the
#: shipped `default = "PermanentDrop"`).
ACCEPT_RULES = """
[[rule]]
name = "overload: accepted udp"
direction = "inbound"
protocol = "udp"
local_port = {udp}
verdict = "PermanentAccept"

[[rule]]
name = "overload: accepted tcp"
direction = "inbound"
protocol = "tcp"
local_port = {tcp}
verdict = "PermanentAccept"
"""
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "actors" / "policy" / "default-rules.toml"

#: Ports in namespace a: the accepted and blocked UDP / TCP listeners.
UDP_ACC, UDP_BLK, TCP_ACC, TCP_BLK = 7710, 7711, 7720, 7721

#: Raw-socket UDP sender in b. mode "new": every datagram a new 5-tuple (source port 1024..
#: 65535 times `naddr` source addresses), alternating between the two destination ports;
#: "one": a single flow (fixed source port) to the first port. rate 0: as fast as it can.
#: Optional 8th argument: the first source address's last byte (default 100).
#: Prints {"sent": N, "secs": S}.
FLOOD = r"""
import json, socket, struct, sys, time
src_net, naddr, dst, ports, rate, secs, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], \
    [int(p) for p in sys.argv[4].split(",")], float(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
payload = b"o" * 32
a0 = int(sys.argv[8]) if len(sys.argv) > 8 else 100  # first source address's last byte
srcs = [socket.inet_aton(f"{src_net}.{a0 + i}") for i in range(naddr)]
dsta = socket.inet_aton(dst)
bufs = []
for src in srcs:
    for p in ports:
        b = bytearray(struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 0, 0, 0, 64, 17, 0, src, dsta,
                                  0, p, 8 + len(payload), 0) + payload)
        bufs.append(b)
np = len(ports); sport = 1024; ai = 0; sent = 0; addr = (dst, 0)
t0 = time.monotonic(); end = t0 + secs
while True:
    now = time.monotonic()
    if now >= end: break
    if rate:
        ahead = sent / rate - (now - t0)
        if ahead > 0.0005: time.sleep(ahead)
    for _ in range(32):
        if mode == "new":
            b = bufs[ai * np + (sent % np)]
            b[20] = sport >> 8; b[21] = sport & 255
            if sent % np == np - 1:
                sport += 1
                if sport > 65535: sport = 1024; ai = (ai + 1) % naddr
        else:
            b = bufs[0]; b[20] = 0x9c; b[21] = 0x40  # source port 40000
        try: s.sendto(b, addr)
        except OSError: pass  # ENOBUFS: not sent, not counted
        else: sent += 1
print(json.dumps({"sent": sent, "secs": time.monotonic() - t0}), flush=True)
"""

#: UDP counter in a, one socket per port; each stdin line gets {"port": count, ...}.
UDP_COUNT = r"""
import json, socket, sys, threading
ports = [int(p) for p in sys.argv[1].split(",")]
n = {p: 0 for p in ports}
def rx(p):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, 33, 1 << 26)  # SO_RCVBUFFORCE: count, do not overflow
    u.bind(("0.0.0.0", p))
    while True:
        u.recv(2048); n[p] += 1
for p in ports: threading.Thread(target=rx, args=(p,), daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps({str(k): v for k, v in n.items()}), flush=True)
"""

#: TCP listeners in a; accept and close; each stdin line gets {"port": accepted, ...}.
TCP_COUNT = r"""
import json, socket, sys, threading
ports = [int(p) for p in sys.argv[1].split(",")]
n = {p: 0 for p in ports}
def serve(p):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(4096)
    while True:
        c, _ = s.accept(); n[p] += 1; c.close()
for p in ports: threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps({str(k): v for k, v in n.items()}), flush=True)
"""

#: New TCP connections from b at `rate`/s for `secs` (rate 0: all `secs`*1000 at once),
#: `every`-th one to the second port; non-blocking, all in flight together, each given up
#: after `tmo` s. Prints counts per port and connect times (s) of those that completed.
TCP_BURST = r"""
import json, resource, selectors, socket, sys, time
host, ports, rate, secs, tmo = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], \
    float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
every = int(sys.argv[6])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
total = int(rate * secs) if rate else int(secs * 1000)
sel = selectors.DefaultSelector(); start = {}; res = {p: {"ok": 0, "failed": 0, "open": 0}
                                                      for p in ports}
times = []; t0 = time.monotonic(); i = 0; pend = 0
def reap(wait):
    global pend
    for key, _ in sel.select(wait):
        s = key.fileobj; p, t = start.pop(s)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0: res[p]["ok"] += 1; times.append(time.monotonic() - t)
        else: res[p]["failed"] += 1
        sel.unregister(s); s.close(); pend -= 1
while i < total:
    due = t0 + (i / rate if rate else 0)
    now = time.monotonic()
    if due > now:
        reap(min(due - now, 0.01)); continue
    p = ports[1] if every and i % every == every - 1 else ports[0]
    s = socket.socket(); s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    s.connect_ex((host, p)); sel.register(s, selectors.EVENT_WRITE); start[s] = (p, now)
    i += 1; pend += 1
offered_s = time.monotonic() - t0
end = time.monotonic() + tmo
while pend and time.monotonic() < end: reap(0.05)
for s, (p, t) in list(start.items()): res[p]["open"] += 1; s.close()
times.sort()
q = lambda f: round(times[min(len(times) - 1, int(f * len(times)))], 4) if times else None
print(json.dumps({"sent": total, "secs": offered_s, "res": {str(k): v for k, v in res.items()},
                  "p50": q(0.5), "p99": q(0.99), "max": q(1.0)}), flush=True)
"""

#: Capture counters kept per step (their deltas). `dropped`: dropped in Python (a Drop verdict,
#: or the held-packet limit); `expired`: held ones nobody decided in time.
SHOWN = (
    "divert.ringbuf_full",
    "divert.guard_dropped",
    "divert.queue_full",
    "packets",
    "asked",
    "dropped",
    "expired",
)


class OverloadRig(Rig):
    """The reliability Rig (read-only, shared) with kxo- namespace names (this helper's)."""

    def __init__(self, *up_args: str) -> None:
        super().__init__(True, *up_args)
        n = self.pair.a.split("-", 1)[1].rsplit("-", 1)[0]
        self.pair.a, self.pair.b = f"kxo-{n}-a", f"kxo-{n}-b"
        self.run = RuntimeDir.for_instance(self.pair.a, root=self.run_root)
        self.kept_logs = self.kept_logs.parent / self.pair.a

    def __enter__(self) -> OverloadRig:
        super().__enter__()
        return self


def rules_file(directory: Path) -> Path:
    """The shipped default rules plus the accepted ports' rules."""
    path = directory / "overload-rules.toml"
    path.write_text(DEFAULT_RULES.read_text() + ACCEPT_RULES.format(udp=UDP_ACC, tcp=TCP_ACC))
    return path


def broker_stats(run: RuntimeDir) -> dict[str, Any]:
    client = KextClient(run.kext_endpoint, request_timeout=2.0)
    try:
        return client.stats()
    finally:
        client.close_sockets()


def _capture_now(run: RuntimeDir) -> dict[str, float] | None:
    try:
        cap = broker_stats(run).get("actors", {}).get("capture")
    except KextError:
        return None
    if not isinstance(cap, dict) or not cap.get("counters"):
        return None
    return {k: float(v) for k, v in cap["counters"].items()}


#: Counters unchanged this long: nothing of the step is left to count (reports every 5 s).
STABLE_S = 11.0


def capture_counters(
    run: RuntimeDir, fresh: bool = True, timeout: float = 45.0
) -> dict[str, float]:
    """The capture's counters (it reports every 5 s through the ALE). `fresh`: once the SHOWN
    ones stayed the same for STABLE_S, two report intervals: a capture (or ALE) still
    working off a flood's backlog reports late, and a report made mid-backlog would put part
    of a step's counts into the next one."""
    deadline = time.monotonic() + timeout
    first = _capture_now(run)
    while first is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no capture report within {timeout:g} s")
        time.sleep(0.25)
        first = _capture_now(run)
    if not fresh:
        return first
    last, since = first, time.monotonic()
    while time.monotonic() - since < STABLE_S and time.monotonic() < deadline:
        time.sleep(0.25)
        now = _capture_now(run)
        if now is not None and any(now.get(k) != last.get(k) for k in SHOWN):
            last, since = now, time.monotonic()
        elif now is not None:
            last = now
    return last


def waiting(run: RuntimeDir) -> int:
    """Connections held for a verdict right now (the ALE's pending count)."""
    try:
        ale = broker_stats(run).get("actors", {}).get("ale") or {}
    except KextError:
        return -1
    return int((ale.get("counters") or {}).get("pending", 0))


def drain(
    run: RuntimeDir, counts: Callable[[], object] | None = None, limit_s: float = 20.0
) -> float:
    """Seconds until nothing is held (the ALE's pending count is 0) and what the listeners
    got (`counts()`) stopped changing for a second: a step must not inherit the last one's
    backlog, and packets released late still count for their own step."""
    t0 = time.monotonic()
    last = counts() if counts else None
    still = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        time.sleep(0.25)
        now = counts() if counts else None
        if now != last:
            last, still = now, time.monotonic()
        elif waiting(run) == 0 and time.monotonic() - still >= (1.0 if counts else 0.0):
            break
    return round(time.monotonic() - t0, 2)


@dataclass
class Step:
    scenario: str
    rate: int  # offered per second asked for (0: as fast as the sender can)
    secs: float
    offered_per_s: float = 0.0
    sent: int = 0
    delivered: int = 0  # to the accepted port
    delivered_per_s: float = 0.0
    leaked: int = 0  # to the blocked port: passed unexamined
    counters: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def delta(self, key: str) -> int:
        return int(self.counters.get(key, 0.0))


def _ask(proc: subprocess.Popen[bytes]) -> dict[int, int]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"n\n")
    proc.stdin.flush()
    return {int(k): int(v) for k, v in json.loads(proc.stdout.readline()).items()}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SHOWN}


class Bench:
    """One instance, its listeners in a, and the steps run against it."""

    def __init__(self, rig: OverloadRig) -> None:
        self.rig = rig
        p = rig.pair
        self.src_net = p.ip4_b.rsplit(".", 1)[0]
        self.udp = p.popen(
            p.a, [sys.executable, "-c", UDP_COUNT, f"{UDP_ACC},{UDP_BLK}"], stdin=subprocess.PIPE
        )
        self.tcp = p.popen(
            p.a, [sys.executable, "-c", TCP_COUNT, f"{TCP_ACC},{TCP_BLK}"], stdin=subprocess.PIPE
        )
        for proc in (self.udp, self.tcp):
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        self.before = capture_counters(rig.run, fresh=False)
        self._addr = 20  # the next free source address (last byte) in b's /24

    def _counters(self) -> dict[str, float]:
        after = capture_counters(self.rig.run)
        d = _delta(after, self.before)
        self.before = after
        return d

    def udp_step(self, scenario: str, rate: int, secs: float, naddr: int = 8) -> Step:
        """One flood from b; `udp-new` alternates the accepted and blocked port."""
        st = Step(scenario, rate, secs)
        c0 = _ask(self.udp)
        p = self.rig.pair
        mode, ports = (
            ("new", f"{UDP_ACC},{UDP_BLK}") if scenario == "udp-new" else ("one", f"{UDP_ACC}")
        )
        # As fast as it can: one sender per CPU (disjoint source addresses), else one.
        n = 2 if rate == 0 else 1
        argv = [sys.executable, "-c", FLOOD, self.src_net, naddr, p.ip4_a, ports, rate, secs]
        # Source addresses no earlier step used: its 5-tuples are all new (a repeated one is
        # decided in the kernel already and never asked).
        a0, self._addr = self._addr, self._addr + n * naddr
        if self._addr > 254:
            raise RuntimeError("out of source addresses: fewer udp steps")
        procs = [p.popen(p.b, [*argv, mode, a0 + naddr * i]) for i in range(n)]
        out = {"sent": 0, "secs": 0.0}
        for proc in procs:
            o, e = proc.communicate(timeout=secs + 30)
            if proc.returncode != 0:
                raise RuntimeError(f"flood failed: {e.decode()[-500:]}")
            one = json.loads(o.decode().strip().splitlines()[-1])
            out["sent"] += one["sent"]
            out["secs"] = max(out["secs"], one["secs"])
        st.extra["drain_s"] = drain(self.rig.run, lambda: _ask(self.udp))
        st.counters = self._counters()
        c1 = _ask(self.udp)
        st.sent, st.offered_per_s = int(out["sent"]), round(out["sent"] / out["secs"])
        st.delivered = c1[UDP_ACC] - c0[UDP_ACC]
        st.delivered_per_s = round(st.delivered / out["secs"])
        st.leaked = c1[UDP_BLK] - c0[UDP_BLK]
        st.extra["to_accepted"] = st.sent if mode == "one" else (st.sent + 1) // 2
        return st

    def tcp_step(self, rate: int, secs: float, every: int = 4, tmo: float = 6.0) -> Step:
        """New connections from b at `rate`/s (every `every`-th to the blocked port)."""
        st = Step("tcp-new", rate, secs)
        c0 = _ask(self.tcp)
        p = self.rig.pair
        argv = [sys.executable, "-c", TCP_BURST, p.ip4_a, f"{TCP_ACC},{TCP_BLK}"]
        r = p.run(p.b, [*argv, rate, secs, tmo, every], timeout=secs + tmo + 60)
        if r.returncode != 0:
            raise RuntimeError(f"tcp burst failed: {r.stderr[-500:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        st.extra["drain_s"] = drain(self.rig.run, lambda: _ask(self.tcp))
        c1 = _ask(self.tcp)
        st.sent = int(out["sent"])
        st.offered_per_s = round(st.sent / max(out["secs"], 1e-3))
        res = out["res"]
        st.delivered = int(res[str(TCP_ACC)]["ok"])
        st.delivered_per_s = round(st.delivered / max(out["secs"], 1e-3))
        st.leaked = c1[TCP_BLK] - c0[TCP_BLK]
        st.counters = self._counters()
        st.extra.update(
            to_accepted=res[str(TCP_ACC)],
            to_blocked=res[str(TCP_BLK)],
            connect_p50_s=out["p50"],
            connect_p99_s=out["p99"],
            connect_max_s=out["max"],
        )
        return st


def plan(quick: bool) -> list[tuple[str, int, float]]:
    """(scenario, offered rate, seconds): steps up to far above saturation."""
    if quick:
        return [("udp-new", 1000, 1.0), ("udp-new", 0, 1.0), ("tcp-new", 1000, 1.0),
                ("tcp-new", 0, 2.0), ("udp-one", 0, 1.0)]  # fmt: skip
    udp = [("udp-new", r, 2.0) for r in (1000, 5000, 20000)] + [("udp-new", 0, 1.0)]
    tcp = [("tcp-new", r, 2.0) for r in (1000, 4000)] + [("tcp-new", 0, 8.0)]
    one = [("udp-one", r, 1.5) for r in (50000, 0)]
    return udp + tcp + one


def run(quick: bool, fail_open: bool, ring_bytes: int, log: Any = print) -> dict[str, Any]:
    up_args: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="kxo-rules-"))
    up_args += ["--policy-rules", str(rules_file(tmp))]
    if fail_open:
        up_args.append("--fail-open")
    if ring_bytes:
        up_args += ["--actor-arg", f"capture=--ring-bytes={ring_bytes}"]
    t0 = time.monotonic()
    steps: list[Step] = []
    try:
        with OverloadRig(*up_args) as rig:
            bench = Bench(rig)
            pids0 = {n: rig.pid(n) for n in ("broker", "ale", "capture", "policy", "lifecycle")}
            for scenario, rate, secs in plan(quick):
                st = (
                    bench.tcp_step(rate, secs)
                    if scenario == "tcp-new"
                    else bench.udp_step(scenario, rate, secs)
                )
                steps.append(st)
                log(row(st))
            pids1 = {n: rig.pid(n) for n in pids0}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "config": {"fail_open": fail_open, "ring_bytes": ring_bytes or "default (8 MiB)",
                   "quick": quick},
        "restarted": sorted(n for n in pids0 if pids0[n] != pids1[n]),
        "seconds": round(time.monotonic() - t0, 1),
        "steps": [asdict(s) for s in steps],
    }  # fmt: skip


HEADER = (
    "| scenario | offered/s asked | offered/s | sent | delivered / sent to the accepted port "
    "| ringbuf_full | guard_dropped | queue_full | asked | LEAKED (blocked port) | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(st: Step) -> str:
    if st.scenario == "tcp-new":
        acc = st.extra["to_accepted"]
        to_acc = acc["ok"] + acc["failed"] + acc["open"]
        note = (
            f"accepted port: {acc['failed']} failed, {acc['open']} not connected within 6 s; "
            f"connect p50 {st.extra['connect_p50_s']} s, p99 {st.extra['connect_p99_s']} s, "
            f"max {st.extra['connect_max_s']} s"
        )
    else:
        to_acc = st.extra["to_accepted"]
        note = f"arrivals went on for {st.extra['drain_s']} s after the flood"
    return (
        f"| {st.scenario} | {st.rate or 'max'} | {st.offered_per_s:,} | {st.sent:,} | "
        f"{st.delivered:,} / {to_acc:,} | {st.delta('divert.ringbuf_full'):,} | "
        f"{st.delta('divert.guard_dropped'):,} | {st.delta('divert.queue_full'):,} | "
        f"{st.delta('asked'):,} | {st.leaked:,} | {note} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one step per scenario and the max")
    ap.add_argument("--fail-open", action="store_true", help="up --fail-open (leaks expected)")
    ap.add_argument("--ring-bytes", type=int, default=0, help="capture --ring-bytes (0: default)")
    ap.add_argument("--json", type=Path, help="also write every step here")
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    result = run(args.quick, args.fail_open, args.ring_bytes, log=lambda s: print(s, flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
