"""Fault injection against the whole system (issue 12): a kextless instance in a kxr- namespace
pair, a steady load of new TCP connections, a bulk stream and two established connections,
and measurements of what a fault did to them.

    with Rig(policy=False) as rig:          # `kextless up --netns kxr-..-a` (own Answerer)
        rig.start_load()                    # a connect every 20 ms, a bulk stream, 2 idle conns
        t = rig.kill("capture", SIGKILL)    # by its pid from supervisord's XML-RPC
        m = rig.measure(t)                  # Measured: whole_s, max_wait_s, gap_s, lost ...

Everything is measured from the applications' side (CLOCK_MONOTONIC, shared by namespaces)
and from what the decision client was asked; nothing is inferred from the product's logs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextEOF, KextError, KextTimeout
from kextless.deploy.filters import divert_filters
from kextless.deploy.supervisor_rpc import RPC_ERRORS, rpc
from kextless.protocol.enums import Verdict
from kextless.protocol.infos import ConnectionIpv4, ConnectionIpv6
from tests import apps
from tests.entry import KEXTLESS
from tests.netns import NetnsPair, wait_diverted

#: A new connection slower than this (connect + greeting) counts as "not whole yet".
SLOW_S = 0.5
#: The issue's bound: whole again within 2 s of any fault.
WHOLE_S = 2.0
#: Load: a new connection every LOAD_EVERY_S, for PRE_S before and POST_S after the fault.
LOAD_EVERY_S = 0.02
PRE_S = 2.0
POST_S = 8.0
#: Each load connection gives up after this (longer than the 3 s verdict timeout used here).
CONNECT_TIMEOUT_S = 6.0

#: A verdict sent this close before a fault may still be in flight (written to a broker that
#: dies before passing it on): its flow asked again is reported apart from decided ones.
REASK_GRACE_S = 0.5
#: Where each rig's logs are kept after its instance is gone ($KEXTLESS_RELIABILITY_LOGS).
LOGS_ENV = "KEXTLESS_RELIABILITY_LOGS"

Key = tuple[int, bytes, int, bytes, int]

#: One connection per LOAD_EVERY_S, each in its own thread so a held one delays no other;
#: prints "ready", then at the end one JSON list: start time, wait, result, local port.
LOAD_CLIENT = r"""
import json, socket, sys, threading, time
host, port, every, secs, tmo = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4]), float(sys.argv[5])
out = []; lock = threading.Lock()
def one(t):
    s = socket.socket(); s.settimeout(tmo); r = {"t": t, "port": 0}
    try:
        s.connect((host, port)); r["port"] = s.getsockname()[1]
        r["result"] = "ok" if s.recv(100) else "closed"
    except ConnectionRefusedError: r["result"] = "refused"
    except ConnectionResetError: r["result"] = "reset"
    except (socket.timeout, TimeoutError): r["result"] = "timeout"
    except OSError as e: r["result"] = "errno%s" % e.errno
    r["wait"] = time.monotonic() - t
    try: r["port"] = r["port"] or s.getsockname()[1]
    except OSError: pass
    s.close()
    with lock: out.append(r)
print("ready", flush=True)
t0 = time.monotonic(); threads = []; n = 0
while n * every < secs:
    d = t0 + n * every - time.monotonic()
    if d > 0: time.sleep(d)
    th = threading.Thread(target=one, args=(time.monotonic(),), daemon=True)
    th.start(); threads.append(th); n += 1
for th in threads: th.join(tmo + 5)
with lock: print(json.dumps(out), flush=True)
"""

#: Receives one stream; at its end prints the bytes, the longest gap between two reads and
#: when (monotonic) that gap ended.
GAP_SINK = r"""
import json, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30); total = 0; last = time.monotonic(); gap = 0.0; gap_end = 0
try:
    while True:
        n = len(c.recv(1 << 20)); now = time.monotonic()
        if not n: break
        if now - last > gap: gap, gap_end = now - last, now
        total += n; last = now
    res = "eof"
except (socket.timeout, TimeoutError): res = "timeout"
except OSError as e: res = "errno%s" % e.errno
print(json.dumps({"total": total, "gap": gap, "gap_end": gap_end, "result": res}), flush=True)
"""


def flow_key(info: ConnectionIpv4 | ConnectionIpv6) -> Key:
    return (info.protocol, info.local_ip, info.local_port, info.remote_ip, info.remote_port)


def whole_after(conns: list[dict[str, Any]], fault_t: float) -> float:
    """Seconds from the fault until new connections are decided again: the start of the first
    good connection (ok within SLOW_S) after the last bad one (0 when none was bad). A bad
    connection is one whose SYN was not decided promptly when it was sent."""
    bad = [c["t"] for c in conns if c["result"] != "ok" or c["wait"] > SLOW_S]
    if not bad:
        return 0.0
    last_bad = max(bad)
    after = [c["t"] for c in conns if c["t"] > last_bad]
    end = min(after) if after else last_bad + CONNECT_TIMEOUT_S  # never whole in the window
    return round(max(0.0, float(end) - fault_t), 3)


class Decider:
    """A Portmaster stand-in that survives broker restarts: reads every info, answers each
    connection with PermanentAccept, and records which flows were asked again after their
    verdict was given (a decided flow asked again is a lost verdict). Updates queued with
    `update()` are written from its own thread (zmq sockets are not thread-safe)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.answered: dict[Key, float] = {}
        #: (flow, when its verdict was sent, when it was asked again), monotonic.
        self.reasked: list[tuple[Key, float, float]] = []
        self.asked = 0
        self.reconnects = 0
        self.errors: list[str] = []
        self._updates: list[tuple[Key, Verdict]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reading = threading.Event()
        self._reading.set()
        self._paused = threading.Event()
        self.asked_keys: set[Key] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pause(self) -> None:
        """Stop reading (infos queue in the broker) until `resume()`; returns once no read is
        in progress."""
        self._paused.clear()
        self._reading.clear()
        self._paused.wait(2.0)

    def resume(self) -> None:
        self._reading.set()

    def start(self) -> Decider:
        self._thread.start()
        return self

    def _open(self) -> KextClient | None:
        while not self._stop.is_set():
            client = KextClient(self.endpoint, request_timeout=1.0)
            try:
                return client.open()
            except KextError:
                client.close_sockets()
                time.sleep(0.05)
        return None

    def _run(self) -> None:
        client = self._open()
        while client is not None and not self._stop.is_set():
            if not self._reading.is_set():
                self._paused.set()
                self._reading.wait(0.05)
                continue
            try:
                self._flush_updates(client)
                info = client.recv_info(timeout=0.05)
            except KextTimeout:
                continue
            except (KextError, KextEOF) as exc:  # broker restarted: a new session
                self.errors.append(repr(exc))
                client.close_sockets()
                self.reconnects += 1
                client = self._open()
                continue
            if isinstance(info, ConnectionIpv4 | ConnectionIpv6):
                key = flow_key(info)
                with self._lock:
                    self.asked += 1
                    self.asked_keys.add(key)
                    if key in self.answered:
                        self.reasked.append((key, self.answered[key], time.monotonic()))
                try:
                    client.send_verdict(info.id, Verdict.PERMANENT_ACCEPT)
                except KextError as exc:
                    self.errors.append(f"verdict {info.id}: {exc!r}")
                    continue
                with self._lock:
                    self.answered.setdefault(key, time.monotonic())
        if client is not None:
            client.close()

    def _flush_updates(self, client: KextClient) -> None:
        with self._lock:
            todo, self._updates = self._updates, []
        for (proto, la, lp, ra, rp), verdict in todo:
            client.send_update_v4(proto, la, lp, ra, rp, verdict)

    def update(self, key: Key, verdict: Verdict) -> None:
        with self._lock:
            self._updates.append((key, verdict))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Measured:
    """What one fault did, from the applications' side."""

    connections: int = 0
    failed: int = 0
    results: dict[str, int] = field(default_factory=dict)
    max_wait_s: float = 0.0
    whole_s: float = 0.0
    restarted_s: float | None = None
    bulk_gap_s: float = 0.0
    bulk_result: str = ""
    established_broken: int = 0
    #: Flows decided (verdict sent) over REASK_GRACE_S before the fault and asked again.
    reasked: int | None = None
    #: New connections that completed without their flow ever being asked (passed unseen).
    unasked: int | None = None
    #: Flows whose verdict was sent within REASK_GRACE_S of the fault (in flight) asked again.
    reasked_in_flight: int | None = None
    update_honoured: bool | None = None
    #: A connection waiting for its verdict at the moment of a second fault: its outcome.
    waiting_result: str | None = None
    waiting_s: float | None = None
    leftover_programs: int = 0
    #: The slowest new connections: (start relative to the fault, s; wait, s), slowest first.
    slowest: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lost(self) -> str:
        parts = [f"{self.failed}/{self.connections} new conns failed"]
        if self.reasked is not None:
            parts.append(f"{self.reasked} decided flows re-asked")
            if self.unasked:
                parts.append(f"{self.unasked} conns PASSED UNASKED")
            if self.reasked_in_flight:
                parts.append(f"{self.reasked_in_flight} in-flight verdicts re-asked")
        parts.append(f"{self.established_broken} established broken")
        if self.update_honoured is not None:
            parts.append(
                "update after fault " + ("honoured" if self.update_honoured else "IGNORED")
            )
        if self.waiting_result is not None:
            parts.append(f"conn waiting at the fault: {self.waiting_result} {self.waiting_s} s")
        parts.append(f"{self.leftover_programs} divert programs left")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def hooks_with_extra_programs(ns: str) -> int:
    """Divert programs beyond one per hook: what a dead capture left beside the live one's."""
    per_hook = Counter(line.split(":")[0] for line in divert_filters(ns))
    return sum(n - 1 for n in per_hook.values())


def netns_state(ns: str) -> dict[str, str]:
    """What `down` must leave as it found it: links, tc filters on every hook, nft ruleset."""

    def run(*argv: str) -> str:
        res = subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=10
        )
        return res.stdout

    links = json.loads(run("ip", "-j", "link", "show") or "[]")
    state = {
        "links": " ".join(sorted(f"{x['ifname']}:{','.join(x.get('flags', []))}" for x in links)),
        "nft": run("nft", "list", "ruleset"),
    }
    for x in links:
        for hook in ("ingress", "egress"):
            state[f"tc {x['ifname']} {hook}"] = run(
                "tc", "filter", "show", "dev", x["ifname"], hook
            )
    return state


class Rig:
    """A kxr- namespace pair with kextless up in `a` and the load's servers in `b`."""

    _ports = iter(range(7000, 7999, 3))

    def __init__(self, policy: bool = False, *up_args: str, decider: bool = True) -> None:
        self.policy = policy
        self.up_args = up_args
        self.want_decider = decider and not policy
        self.pair = NetnsPair()
        # kxr- prefix: this suite's namespaces, never another helper's.
        n = self.pair.a.split("-", 1)[1].rsplit("-", 1)[0]
        self.pair.a, self.pair.b = f"kxr-{n}-a", f"kxr-{n}-b"
        self.run_root = Path(tempfile.mkdtemp(prefix="kxr-run-"))
        self.run = RuntimeDir.for_instance(self.pair.a, root=self.run_root)
        self.decider: Decider | None = None
        self._load: subprocess.Popen[bytes] | None = None
        self._sink: subprocess.Popen[bytes] | None = None
        self._bulk: subprocess.Popen[bytes] | None = None
        self._idle: list[subprocess.Popen[bytes]] = []
        self._idle_keys: list[Key] = []
        self.port = next(self._ports)
        self.up_s = 0.0
        #: How long after `up` returned the divert programs were still missing.
        self.unguarded_after_up_s = 0.0
        self._stopped: list[int] = []
        keep = Path(os.environ.get(LOGS_ENV, "/tmp/kxr-logs"))
        self.kept_logs = keep / self.pair.a

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Rig:
        try:
            self.pair.__enter__()
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> None:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        argv = [*KEXTLESS, "up", "--netns", self.pair.a, "--run-root", str(self.run_root)]
        argv += [*([] if self.policy else ["--no-policy"]), *self.up_args]
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env)
        self.up_s = time.monotonic() - t0
        if res.returncode != 0:
            raise AssertionError(f"kextless up failed:\n{res.stdout}\n{res.stderr}")
        # `up` returns once supervisord says RUNNING, before the capture has attached: traffic
        # sent in between passes unexamined (measured, see the report). Faults are injected
        # into a guarded namespace, so wait for the divert programs on every link.
        t1 = time.monotonic()
        for dev in ("lo", "va"):
            wait_diverted(self.pair.a, dev, timeout=15)
        self.unguarded_after_up_s = round(time.monotonic() - t1, 3)
        if self.want_decider:
            self.decider = Decider(self.run.kext_endpoint).start()

    def down(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KEXTLESS, "down", "--netns", self.pair.a, "--run-root", str(self.run_root)],
            capture_output=True,
            text=True,
            timeout=90,
        )

    def close(self) -> None:
        for pid in self._stopped:
            with _quiet():
                os.kill(pid, signal.SIGCONT)
        if self.decider is not None:
            self.decider.stop()
        with _quiet():
            self.down()
        self.pair.close()
        with _quiet():
            if self.run.log_dir.is_dir():
                shutil.copytree(self.run.log_dir, self.kept_logs, dirs_exist_ok=True)
        shutil.rmtree(self.run_root, ignore_errors=True)

    def logs(self, tail: int = 3000) -> str:
        d = self.run.log_dir
        files = sorted(d.glob("*.log")) if d.exists() else []
        return "\n".join(f"==> {f.name}\n{f.read_text(errors='replace')[-tail:]}" for f in files)

    # ---- supervisord ----------------------------------------------------------------------

    def pid(self, name: str) -> int:
        info = rpc(self.run, 2.0).supervisor.getProcessInfo(name)
        return int(info["pid"]) if info["statename"] in ("RUNNING", "STARTING") else 0

    def supervisord_pid(self) -> int:
        return int(rpc(self.run, 2.0).supervisor.getPID())

    def wait_new_pid(self, name: str, old: int, timeout: float) -> float | None:
        """Monotonic time the program ran again under a pid other than `old`, None if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = self.pid(name)
            except RPC_ERRORS:
                pid = 0
            if pid and pid != old:
                return time.monotonic()
            time.sleep(0.05)
        return None

    # ---- load -----------------------------------------------------------------------------

    def start_load(self, pre_s: float = PRE_S, post_s: float = POST_S) -> None:
        """Servers in b; in a: 2 established idle connections, a bulk stream, the connect load.
        Returns once they run; the load started `pre_s` before the caller's fault."""
        p = self.pair
        apps.start(p, p.b, apps.ECHO_SERVER, self.port)
        self._sink = apps.start(p, p.b, GAP_SINK, self.port + 1)
        secs = pre_s + post_s
        for _ in range(2):
            proc = p.popen(
                p.a,
                [sys.executable, "-c", apps.INTERACTIVE_TCP, p.ip4_b, self.port],
                stdin=subprocess.PIPE,
            )
            assert proc.stdout is not None
            line = json.loads(proc.stdout.readline() or b"{}")
            assert "connected" in line, f"idle connection failed: {self.logs()}"
            self._idle.append(proc)
            self._idle_keys.append(
                (6, _a(p.ip4_a), int(line["connected"][1]), _a(p.ip4_b), self.port)
            )
            assert self.idle_echo(len(self._idle) - 1) == "ok"
        self._bulk = p.popen(
            p.a, [sys.executable, "-c", apps.BULK_SENDER, p.ip4_b, self.port + 1, secs + 1]
        )
        assert self._bulk.stdout is not None
        self._bulk.stdout.readline()
        self._load = p.popen(
            p.a,
            [
                sys.executable,
                "-c",
                LOAD_CLIENT,
                p.ip4_b,
                self.port,
                LOAD_EVERY_S,
                secs,
                CONNECT_TIMEOUT_S,
            ],
        )
        assert self._load.stdout is not None
        assert b"ready" in self._load.stdout.readline()
        time.sleep(pre_s)

    def idle_echo(self, i: int, timeout: float = 5.0) -> str:
        """One round trip on established connection `i`: "ok", "timeout", "ECONNRESET"..."""
        proc = self._idle[i]
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"ping\n")
            proc.stdin.flush()
        except OSError:
            return "dead"
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not got or not got[0]:
            return "no answer"
        return str(json.loads(got[0]).get("result"))

    def measure(self, fault_t: float, update: bool = True) -> Measured:
        """Wait for the load to end and say what the fault at `fault_t` (monotonic) did."""
        m = Measured()
        assert self._load is not None and self._bulk is not None and self._sink is not None
        out, _ = self._load.communicate(timeout=PRE_S + POST_S + CONNECT_TIMEOUT_S + 15)
        conns = json.loads(out.decode().strip().splitlines()[-1])
        m.connections = len(conns)
        m.results = dict(Counter(c["result"] for c in conns))
        m.failed = sum(c["result"] != "ok" for c in conns)
        m.max_wait_s = round(max((c["wait"] for c in conns), default=0.0), 3)
        slow = sorted(conns, key=lambda c: -c["wait"])[:5]
        m.slowest = [(round(c["t"] - fault_t, 3), round(c["wait"], 3)) for c in slow]
        m.whole_s = whole_after(conns, fault_t)
        self._bulk.wait(timeout=15)
        sink_out, _ = self._sink.communicate(timeout=40)
        sink = json.loads(sink_out.decode().strip().splitlines()[-1])
        m.bulk_gap_s, m.bulk_result = round(sink["gap"], 3), sink["result"]
        echoes = [self.idle_echo(i) for i in range(len(self._idle))]
        m.established_broken = sum(e != "ok" for e in echoes)
        if m.established_broken:
            m.notes.append(f"established: {echoes}")
        if self.decider is not None:
            here, there = _a(self.pair.ip4_a), _a(self.pair.ip4_b)
            m.unasked = sum(
                (6, here, c["port"], there, self.port) not in self.decider.asked_keys
                for c in conns
                if c["result"] == "ok"
            )
            asked = self.decider.reasked
            m.reasked = sum(sent < fault_t - REASK_GRACE_S for _k, sent, _t in asked)
            m.reasked_in_flight = len(asked) - m.reasked
            if update:
                m.update_honoured = self.update_blocks(0)
        m.leftover_programs = hooks_with_extra_programs(self.pair.a)
        return m

    def update_blocks(self, i: int) -> bool:
        """UpdateV4 PermanentBlock for established connection `i`: True if its next round trip
        fails (the verdict of a connection decided before the fault could still be changed)."""
        assert self.decider is not None
        self.decider.update(self._idle_keys[i], Verdict.PERMANENT_BLOCK)
        time.sleep(0.5)
        return self.idle_echo(i, timeout=3.0) != "ok"

    def probe(self, timeout: float = CONNECT_TIMEOUT_S) -> subprocess.Popen[bytes]:
        """One new connection (to the echo server) in the background: `probe_result()`."""
        p = self.pair
        argv = [sys.executable, "-c", apps.TCP_CLIENT, p.ip4_b, self.port, timeout]
        return p.popen(p.a, argv)

    @staticmethod
    def probe_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        out, _ = proc.communicate(timeout=CONNECT_TIMEOUT_S + 10)
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        return dict(json.loads(lines[-1])) if lines else {"result": "no output"}

    # ---- faults ---------------------------------------------------------------------------

    def send_signal(self, name: str, sig: signal.Signals) -> tuple[int, float]:
        """Send `sig` to program `name` (its pid from supervisord): (pid, monotonic time)."""
        pid = self.pid(name)
        assert pid > 0, f"{name} not running"
        if sig == signal.SIGSTOP:
            self._stopped.append(pid)
        t = time.monotonic()
        os.kill(pid, sig)
        return pid, t

    def signal_pid(self, pid: int, sig: signal.Signals) -> None:
        """A signal to a pid this rig signalled before (SIGCONT after SIGSTOP)."""
        os.kill(pid, sig)
        if sig == signal.SIGCONT and pid in self._stopped:
            self._stopped.remove(pid)


def _a(text: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(text).packed


class _quiet:
    """Suppress any exception (cleanup must go on)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True
