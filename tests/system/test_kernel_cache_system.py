"""The kernel flow cache and the fail-closed guard with real traffic (issue 9, items 1-3).

A real `kextless run capture` guards namespace a of a NetnsPair; a test ALE peer answers it
(tests/actors/capture/ale_peer.py) and pushes CacheSet / CacheClear like the ALE does on an
Update or ClearCache. How many packets reached Python is the core's `packets` counter, which
the capture logs when it stops. Baselines run in the same pair with none of our programs
attached (removed with orphans.remove_orphans between rounds), alternating with the measured
rounds. Every figure is printed as `MEASURE name {json}`.
"""

from __future__ import annotations

import ast
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import NetNS

from kextless.actors.capture import orphans
from kextless.protocol.enums import Verdict
from kextless.protocol.messages import CacheClear, CacheSet, Flow, PacketHeld
from tests import apps
from tests.actors.capture.ale_peer import AlePeer
from tests.entry import KEXTLESS
from tests.netns import NetnsPair
from tests.wait import until

pytestmark = [pytest.mark.root]

#: UDP receiver: counts datagrams on a port; answers "n" on stdin with the count so far.
_RECEIVER = r"""
import socket, sys, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
u.bind(("0.0.0.0", int(sys.argv[1])))
n = [0]
def rx():
    while True:
        u.recv(2048); n[0] += 1
threading.Thread(target=rx, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    print(n[0], flush=True)
"""

#: UDP sender from a fixed source port: `secs` seconds as fast as it can (or at `pps`);
#: prints how many it sent.
_BLASTER = r"""
import socket, sys, time
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
secs, pps = float(sys.argv[4]), float(sys.argv[5])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", sport)); u.connect((host, port))
payload = b"x" * 64; n = 0; t0 = time.monotonic(); end = t0 + secs
gap = 1 / pps if pps else 0.0; nxt = t0
while True:
    now = time.monotonic()
    if now >= end: break
    if gap and now < nxt: continue
    try:
        u.send(payload); n += 1
    except OSError:
        pass
    nxt += gap
print(n, flush=True)
"""

#: TCP bulk sink: accepts connections one after another; per connection prints bytes and
#: the monotonic time of its last byte once it stops (EOF or 1 s of silence).
_SINK = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.settimeout(1.0); total = 0; last = t0 = time.monotonic()
    try:
        while True:
            n = len(c.recv(1 << 20))
            if not n: break
            total += n; last = time.monotonic()
    except OSError:
        pass
    c.close()
    print(json.dumps({"total": total, "first": t0, "last": last}), flush=True)
"""

#: TCP sender: connects, prints its local port, streams for `secs` seconds, reports.
_SENDER = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(3)
s.connect((host, port)); print(json.dumps({"local_port": s.getsockname()[1]}), flush=True)
chunk = b"x" * 65536; sent = 0; t0 = time.monotonic(); out = "completed"
try:
    while time.monotonic() - t0 < secs:
        s.sendall(chunk); sent += len(chunk)
except OSError as e:
    out = "error:" + (e.strerror or str(e))
s.close()
print(json.dumps({"outcome": out, "sent": sent, "secs": time.monotonic() - t0}), flush=True)
"""


@dataclass
class Capture:
    """A capture process in namespace a with its ALE peer and log."""

    pair: NetnsPair
    ale: AlePeer
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> dict[str, int]:
        """Stop it; its core counters from the exit line ({} after SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        for line in reversed(self.log().splitlines()):
            if "handles closed;" in line and "counters " in line:
                return dict(ast.literal_eval(line.split("counters ", 1)[1]))
        return {}


def _start(pair: NetnsPair, ale: AlePeer, tmp: Path, *args: str) -> Capture:
    log_path = tmp / f"capture-{time.monotonic_ns()}.log"
    with log_path.open("wb") as f:
        proc = pair.popen(
            pair.a,
            [*KEXTLESS, "run", "capture", "--ale-endpoint", ale.endpoint, *args],
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    cap = Capture(pair, ale, proc, log_path)
    if not ale.ready.wait(10):
        cap.stop(signal.SIGKILL)
        raise RuntimeError(f"capture never became ready:\n{cap.log()}")
    ale.ready.clear()
    return cap


@contextmanager
def _env(policy: object = Verdict.PERMANENT_ACCEPT) -> Iterator[tuple[NetnsPair, AlePeer, Path]]:
    holder = [policy]

    def answer(msg: PacketHeld) -> Verdict | None:
        p = holder[0]
        return p(msg) if callable(p) else p  # type: ignore[no-any-return]

    with (
        tempfile.TemporaryDirectory(prefix="klt-kc-") as tmp,
        NetnsPair("kc") as pair,
        AlePeer(f"ipc://{tmp}/ale.sock", answer) as ale,
    ):
        pair.run(pair.b, ["ping", "-c", "1", "-W", "1", pair.ip4_a])  # ARP, untimed
        yield pair, ale, Path(tmp)


def _blocking(port: int) -> Callable[[PacketHeld], Verdict]:
    """A policy: PermanentBlock for flows with `port` at either end, PermanentAccept else."""

    def policy(msg: PacketHeld) -> Verdict:
        if port in (msg.flow.local_port, msg.flow.remote_port):
            return Verdict.PERMANENT_BLOCK
        return Verdict.PERMANENT_ACCEPT

    return policy


def _clean(pair: NetnsPair) -> None:
    """None of our programs (nor divert ones) left in namespace a: a baseline round."""
    with NetNS(pair.a) as ipr:
        orphans.remove_orphans(ipr)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _measure(name: str, fig: object) -> None:
    print(f"MEASURE {name} {json.dumps(fig)}", file=sys.stderr)


def _rx(rcv: subprocess.Popen[bytes]) -> int:
    assert rcv.stdin is not None and rcv.stdout is not None
    rcv.stdin.write(b"n\n")
    rcv.stdin.flush()
    return int(rcv.stdout.readline())


def _blast(
    pair: NetnsPair,
    rcv: subprocess.Popen[bytes],
    port: int,
    sport: int,
    secs: float,
    pps: float = 0,
    loopback: bool = False,
) -> tuple[int, int]:
    """(sent, received) of one blast b -> a (`loopback`: inside a, to 127.0.0.1)."""
    before = _rx(rcv)
    ns, host = (pair.a, "127.0.0.1") if loopback else (pair.b, pair.ip4_a)
    r = pair.run(ns, [sys.executable, "-c", _BLASTER, host, port, sport, secs, pps], timeout=30)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)  # the receiver drains
    return int(r.stdout), _rx(rcv) - before


@pytest.mark.slow
def test_an_accepted_udp_blast_reaches_python_only_at_its_start_at_the_native_rate() -> None:
    port = 7410
    with _env() as (pair, ale, tmp):
        rcv = pair.popen(pair.a, [sys.executable, "-c", _RECEIVER, port], stdin=subprocess.PIPE)
        assert rcv.stdout is not None and rcv.stdout.readline().strip() == b"ready"
        base, kx, seen = [], [], []
        for i in range(3):
            _clean(pair)
            _, got = _blast(pair, rcv, port, 41400 + i, 1.0)
            base.append(got / 1.0)
            cap = _start(pair, ale, tmp)
            sent_k, got_k = _blast(pair, rcv, port, 41500 + i, 1.0)
            counters = cap.stop()
            kx.append(got_k / 1.0)
            seen.append(counters["packets"])
            assert sent_k > 10_000, sent_k
            # Python saw the flow's first datagrams - those sent before the verdict was in
            # the kernel, and those already queued in the divert ring (~4000 slots) when it
            # was - not the blast: a bound set by the ring and the verdict's latency.
            assert counters["packets"] < 6000, (counters, sent_k, cap.log()[-3000:])
        fig = {
            "baseline_rx_pps": _stats(base),
            "kextless_rx_pps": _stats(kx),
            "python_packets": _stats([float(x) for x in seen]),
            "ratio": statistics.median(kx) / statistics.median(base),
        }
        _measure("udp_accepted_blast", fig)
        # The rate target (0.9) is the bench's to measure (`kextless bench`, README); on a
        # loaded 2-CPU VM single runs swing to 0.74. Through Python the blast would arrive at
        # 0.15-0.3 of the baseline (M24's per-packet cost), so this still catches that.
        assert fig["ratio"] >= 0.5, fig


def _sink_line(sink: subprocess.Popen[bytes]) -> dict[str, float]:
    assert sink.stdout is not None
    return dict(json.loads(sink.stdout.readline()))


def _send(pair: NetnsPair, port: int, secs: float) -> dict[str, object]:
    return apps.run(pair, pair.b, _SENDER, pair.ip4_a, port, secs, timeout=secs + 20)


@pytest.mark.slow
def test_an_accepted_tcp_bulk_transfer_shows_python_only_its_syn_and_fin() -> None:
    port = 7420
    with _env() as (pair, ale, tmp):
        sink = pair.popen(pair.a, [sys.executable, "-c", _SINK, port])
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
        base, kx, seen = [], [], []
        for _ in range(5):
            _clean(pair)
            _send(pair, port, 1.0)
            r = _sink_line(sink)
            base.append(r["total"] / (r["last"] - r["first"]) / 1e6)
            cap = _start(pair, ale, tmp)
            _send(pair, port, 1.0)
            r = _sink_line(sink)
            counters = cap.stop()
            kx.append(r["total"] / (r["last"] - r["first"]) / 1e6)
            seen.append(counters["packets"])
            # SYN, SYN-ACK, FIN and FIN-ACK both ways: a handful, not the ~10^4 segments.
            assert counters["packets"] <= 12, (counters, cap.log()[-3000:])
        fig = {
            "baseline_MBps": _stats(base),
            "kextless_MBps": _stats(kx),
            "python_packets": _stats([float(x) for x in seen]),
            "ratio": statistics.median(kx) / statistics.median(base),
        }
        _measure("tcp_accepted_bulk", fig)
        # Target 0.95 (kextless bench measures it); a 2-core VM shared with other work
        # swings single rounds by +-40%, so this only catches a path through Python.
        assert fig["ratio"] >= 0.7, fig


@pytest.mark.slow
def test_an_update_to_block_stops_a_live_bulk_transfer_within_milliseconds() -> None:
    port = 7430
    with _env() as (pair, ale, tmp):
        sink = pair.popen(pair.a, [sys.executable, "-c", _SINK, port])
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
        cap = _start(pair, ale, tmp)
        delays = []
        for _ in range(5):
            snd = pair.popen(pair.b, [sys.executable, "-c", _SENDER, pair.ip4_a, port, 5.0])
            assert snd.stdout is not None
            lport = json.loads(snd.stdout.readline())["local_port"]
            time.sleep(0.5)  # established, accepted, in the kernel
            flow = Flow(
                6,
                bytes(map(int, pair.ip4_a.split("."))),
                port,
                bytes(map(int, pair.ip4_b.split("."))),
                lport,
            )
            t_update = time.monotonic()
            ale.send(CacheSet(flow, Verdict.PERMANENT_BLOCK))
            r = _sink_line(sink)
            out = json.loads(snd.communicate(timeout=15)[0].decode().splitlines()[-1])
            assert out["outcome"].startswith("error"), out  # reset, not finished
            delays.append((r["last"] - t_update) * 1e3)
        counters = cap.stop()
        fig = {"update_to_last_byte_ms": _stats(delays), "python_packets": counters["packets"]}
        _measure("update_block_live_bulk", fig)
        assert fig["update_to_last_byte_ms"]["median"] <= 20, fig  # target 10 ms


@pytest.mark.slow
def test_cache_clear_re_asks_flows_decided_in_the_kernel() -> None:
    port = 7440
    with _env() as (pair, ale, tmp):
        rcv = pair.popen(pair.a, [sys.executable, "-c", _RECEIVER, port], stdin=subprocess.PIPE)
        assert rcv.stdout is not None and rcv.stdout.readline().strip() == b"ready"
        cap = _start(pair, ale, tmp)

        def asked() -> int:
            return len(ale.held_matching(lambda m: m.flow.local_port == port))

        _blast(pair, rcv, port, 41440, 0.3, 1000)
        first = asked()
        assert first >= 1
        _, got = _blast(pair, rcv, port, 41440, 0.3, 1000)
        assert asked() == first and got > 250  # decided in the kernel: nobody asked
        ale.send(CacheClear())
        time.sleep(0.2)
        _, got = _blast(pair, rcv, port, 41440, 0.3, 1000)
        assert asked() > first, cap.log()[-2000:]  # asked again, and accepted again
        assert got > 250
        cap.stop()


_INTERACTIVE = r"""
import json, socket, sys, time
s = socket.socket(); s.settimeout(2); s.connect((sys.argv[1], int(sys.argv[2])))
s.recv(1000)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode()); print(json.dumps({"ok": s.recv(1000).decode()}), flush=True)
    except OSError as e:
        print(json.dumps({"error": str(e)}), flush=True)
"""


def _say(proc: subprocess.Popen[bytes], text: str) -> dict[str, str]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(text.encode() + b"\n")
    proc.stdin.flush()
    return dict(json.loads(proc.stdout.readline()))


@pytest.mark.slow
def test_a_killed_capture_leaves_accepted_flows_working_and_blocked_ones_blocked() -> None:
    ok_port, blocked_port = 7450, 7451

    with _env(_blocking(blocked_port)) as (pair, ale, tmp):
        apps.start(pair, pair.a, apps.ECHO_SERVER, ok_port)
        apps.start(pair, pair.a, apps.ECHO_SERVER, blocked_port)
        cap = _start(pair, ale, tmp)
        client = pair.popen(
            pair.b, [sys.executable, "-c", _INTERACTIVE, pair.ip4_a, ok_port], stdin=subprocess.PIPE
        )
        assert client.stdout is not None and client.stdout.readline().strip() == b"connected"
        assert "ok" in _say(client, "before")
        assert (
            apps.run(pair, pair.b, apps.TCP_CLIENT, pair.ip4_a, blocked_port, 2)["result"]
            == "refused"
        )
        with NetNS(pair.a) as ipr:
            before = {(p.ifname, p.hook, p.pref, p.name) for p in orphans.leftover_programs(ipr)}
        cap.stop(signal.SIGKILL)
        # Dead capture: the accepted connection keeps working in the kernel; nothing else
        # passes (the guard drops it: the blocked port times out instead of being refused).
        t0 = time.monotonic()
        assert "ok" in _say(client, "while dead"), cap.log()[-2000:]
        print(f"echo while the capture is dead: {(time.monotonic() - t0) * 1e3:.1f} ms")
        res = apps.run(pair, pair.b, apps.TCP_CLIENT, pair.ip4_a, blocked_port, 1)
        assert res["result"] == "timeout", res
        # A new capture adopts the programs and their maps: same programs, same verdicts.
        cap = _start(pair, ale, tmp)
        assert "kernel cache adopted" in cap.log(), cap.log()
        with NetNS(pair.a) as ipr:
            ours = {(p.ifname, p.hook, p.pref, p.name) for p in orphans.leftover_programs(ipr)}
        kept = {x for x in before if x[3].startswith("kextless_")}
        assert kept <= ours
        assert "ok" in _say(client, "after restart")
        assert (
            apps.run(pair, pair.b, apps.TCP_CLIENT, pair.ip4_a, blocked_port, 2)["result"]
            == "refused"
        )
        log = cap.log()
        counters = cap.stop()
        # The established connection never reached the new capture's Python (but its
        # FIN when the test ends, after this). Asked: the blocked connect after the restart
        # (SYN and resend at most) and the one made while the capture was dead, whose SYN was
        # parked and is replayed by the new capture (actors/capture/parked.py).
        assert "parked packet(s) (oldest" in log, log[-3000:]
        assert counters["asked"] <= 3, counters
        client.kill()


def _guard_drops(log: str) -> int:
    total = 0
    for line in log.splitlines():
        if "guard_dropped rose by" in line:
            total = int(line.split("(total ")[1].split(")")[0])
    return total


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fail_open", "loopback"),
    [(False, False), (True, False), (False, True)],
    ids=["fail_closed", "fail_open", "fail_closed_loopback"],
)
def test_a_blast_that_fills_the_ring_passes_nothing_unexamined_unless_fail_open(
    fail_open: bool, loopback: bool
) -> None:
    """PermanentBlock for the blast's flow: Python rejects every datagram it sees, so every
    one the receiver gets passed the divert program unexamined (its ring was full). Over the
    veth, and on lo (diverted on its egress, guarded on its ingress).

    The ring is made to overflow, not hoped to: the capture is stopped (SIGSTOP, a stall like
    a page-in or a CPU hog would cause) for the first second of the blast, so its 8 MiB ring
    (~4000 packets) fills whatever the machine's speed; a capture fast enough to keep up
    would otherwise leave nothing to prove (the batch path often is)."""
    port = 7460
    with _env(Verdict.PERMANENT_BLOCK) as (pair, ale, tmp):
        rcv = pair.popen(pair.a, [sys.executable, "-c", _RECEIVER, port], stdin=subprocess.PIPE)
        assert rcv.stdout is not None and rcv.stdout.readline().strip() == b"ready"
        args = ("--fail-open",) if fail_open else ()
        cap = _start(pair, ale, tmp, *args)
        cap.proc.send_signal(signal.SIGSTOP)
        timer = threading.Timer(1.0, cap.proc.send_signal, (signal.SIGCONT,))
        timer.start()
        try:
            sent, got = _blast(pair, rcv, port, 41460, 1.5, loopback=loopback)
        finally:
            timer.join()
            cap.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 12  # the guard's count is logged with the stats (5 s)
        while not fail_open and _guard_drops(cap.log()) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        counters = cap.stop()
        drops = _guard_drops(cap.log())
        fig = {
            "sent": sent,
            "received_unexamined": got,
            "guard_drops": drops,
            "python_packets": counters.get("packets"),
        }
        name = ("fail_open" if fail_open else "fail_closed") + ("_lo" if loopback else "")
        _measure(f"ring_full_blast_{name}", fig)
        assert counters["packets"] < sent, fig  # the ring overflowed
        if fail_open:
            assert got > 0 and drops == 0, fig
        else:
            assert got == 0, fig
            assert drops > 0, fig


#: One UDP datagram from a fixed source port (a new flow nobody decided).
_ONE_DATAGRAM = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", int(sys.argv[3]))); u.sendto(b"parked?", (sys.argv[1], int(sys.argv[2])))
"""


def _connect(pair: NetnsPair, port: int, timeout: float = 5.0) -> subprocess.Popen[bytes]:
    return pair.popen(pair.b, [sys.executable, "-c", apps.TCP_CLIENT, pair.ip4_a, port, timeout])


def _result(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=15)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


@pytest.mark.slow
def test_what_arrives_while_no_capture_runs_is_parked_and_decided_by_the_next_one() -> None:
    """actors/capture/parked.py: a SYN and a datagram sent while the capture is dead are
    neither lost nor passed: the next capture decides them (a connection completes well
    before TCP's 1 s resend; a blocked port's datagram never arrives); one parked longer than
    parked.MAX_AGE_NS is not replayed."""
    ok_port, udp_ok, udp_blocked = 7460, 7461, 7462

    with _env(_blocking(udp_blocked)) as (pair, ale, tmp):
        apps.start(pair, pair.a, apps.ECHO_SERVER, ok_port)
        rcv_ok = pair.popen(
            pair.a, [sys.executable, "-c", _RECEIVER, udp_ok], stdin=subprocess.PIPE
        )
        rcv_blk = pair.popen(
            pair.a, [sys.executable, "-c", _RECEIVER, udp_blocked], stdin=subprocess.PIPE
        )
        for r in (rcv_ok, rcv_blk):
            assert r.stdout is not None and r.stdout.readline().strip() == b"ready"
        cap = _start(pair, ale, tmp)
        assert apps.run(pair, pair.b, apps.TCP_CLIENT, pair.ip4_a, ok_port, 2)["result"] == "ok"
        cap.stop(signal.SIGKILL)
        # Dead: a new connection and two new UDP flows.
        conn = _connect(pair, ok_port)
        for port, sport in ((udp_ok, 47001), (udp_blocked, 47002)):
            pair.run(pair.b, [sys.executable, "-c", _ONE_DATAGRAM, pair.ip4_a, port, sport])
        time.sleep(0.2)
        assert (_rx(rcv_ok), _rx(rcv_blk)) == (0, 0)  # nothing passed undecided
        cap = _start(pair, ale, tmp)
        res = _result(conn)
        assert res["result"] == "ok", (res, cap.log()[-3000:])
        # Decided at the restart, not by TCP's resend 1 s after the first SYN.
        assert float(res["elapsed"]) < 1.0, (res, cap.log()[-3000:])  # type: ignore[arg-type]
        assert until(lambda: _rx(rcv_ok) == 1, 2), cap.log()[-3000:]
        time.sleep(0.3)
        assert _rx(rcv_blk) == 0
        assert "replayed" in cap.log() and "parked packet(s)" in cap.log()
        # Parked too long: dropped, not replayed (the sender has resent or given up).
        cap.stop(signal.SIGKILL)
        pair.run(pair.b, [sys.executable, "-c", _ONE_DATAGRAM, pair.ip4_a, udp_ok, 47003])
        time.sleep(3.3)
        cap = _start(pair, ale, tmp)
        time.sleep(0.5)
        assert _rx(rcv_ok) == 1, cap.log()[-3000:]
        assert "1 too old" in cap.log(), cap.log()[-3000:]
        cap.stop()


@pytest.mark.slow
def test_a_stopped_capture_parks_and_replays_its_own_packets_when_continued() -> None:
    """A SIGSTOPped capture is no reader (kextless_pre reads its task's state): what arrives
    meanwhile is parked, not left in its divert ring, and replayed by the same process once it
    runs again (the ring wakes its loop)."""
    udp_ok = 7463
    with _env() as (pair, ale, tmp):
        rcv = pair.popen(pair.a, [sys.executable, "-c", _RECEIVER, udp_ok], stdin=subprocess.PIPE)
        assert rcv.stdout is not None and rcv.stdout.readline().strip() == b"ready"
        cap = _start(pair, ale, tmp)
        cap.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.1)
            pair.run(pair.b, [sys.executable, "-c", _ONE_DATAGRAM, pair.ip4_a, udp_ok, 47004])
            time.sleep(0.3)
            assert _rx(rcv) == 0
        finally:
            cap.proc.send_signal(signal.SIGCONT)
        assert until(lambda: _rx(rcv) == 1, 2), cap.log()[-3000:]
        counters = cap.stop()
        assert "replayed 1 parked packet(s)" in cap.log(), cap.log()[-3000:]
        assert counters.get("asked", 0) >= 1
