"""Issue 10 (lifecycle) end to end: real connections in a namespace carry their process's pid,
and each reported connection ends exactly once.

Namespace `a` is guarded by a whole `kextless up --netns a --no-policy` (lifecycle included,
UDP idle timeout 2 s); `b` runs an echo server. Clients in `a` print their own pid and local
port, so every expectation comes from the application itself.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from kextless.protocol.enums import Direction, IpProtocol
from kextless.protocol.infos import ConnectionEndEventV4, ConnectionEndEventV6
from tests import apps
from tests.netns import NetnsPair
from tests.system.harness import Answerer, System

pytestmark = [pytest.mark.root, pytest.mark.slow]

_PORTS = itertools.count(23000)
IDLE_S = 2
END_WAIT_S = 3.0

#: Opens `n` connections of argv[3] ("tcp", "udp" connected, "sendto", "rst") to host:port and
#: prints one JSON line per connection: its pid, local port and when it was closed.
CLIENT = r"""
import json, os, socket, struct, sys, time
host, port, kind, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
hold = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
keep = []
for _ in range(n):
    if kind in ("tcp", "rst"):
        s = socket.create_connection((host, port), timeout=5)
        s.recv(1000)
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5)
        if kind == "udp":
            s.connect((host, port)); s.send(b"x")
        else:
            s.sendto(b"x", (host, port))
        s.recv(1000)
    lport = s.getsockname()[1]
    if hold:
        keep.append(s)
    else:
        if kind == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    print(json.dumps({"pid": os.getpid(), "port": lport, "closed": time.time()}), flush=True)
time.sleep(hold)
"""

#: A parent makes the socket, a forked child connects it and reports; the parent waits.
FORK = r"""
import json, os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:
    s.settimeout(5); s.connect((host, port)); s.recv(1000)
    print(json.dumps({"pid": os.getpid(), "parent": os.getppid(), "port": s.getsockname()[1]}),
          flush=True)
    s.close(); os._exit(0)
s.close(); os.waitpid(pid, 0)
"""

#: A TCP and UDP server in `a`: prints its pid, serves each TCP connection with a greeting.
SERVER = r"""
import json, os, socket, sys, threading
port = int(sys.argv[1])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port)); t.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
def udp():
    while True:
        d, a = u.recvfrom(100); u.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
print("ready " + json.dumps({"pid": os.getpid()}), flush=True)
while True:
    c, _ = t.accept(); c.sendall(b"hi"); c.close()
"""

#: From `b`: connect to a's server (TCP) and send it a datagram; print the local ports used.
PEER = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5); s.recv(10)
tp = s.getsockname()[1]; s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"x", (host, port)); u.recv(10)
print(json.dumps({"tcp": tp, "udp": u.getsockname()[1]}), flush=True)
"""


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with NetnsPair("l") as p:
        yield p


@pytest.fixture(scope="module")
def echo_port(pair: NetnsPair) -> int:
    port = next(_PORTS)
    apps.start(pair, pair.b, apps.ECHO_SERVER, port, "::")
    return port


@pytest.fixture(scope="module")
def system(pair: NetnsPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(
        pair,
        tmp_path_factory.mktemp("run"),
        "--verdict-timeout",
        "3",
        "--actor-arg",
        f"lifecycle=--udp-idle-timeout={IDLE_S}",
        # measurement only: the ALE's faster, race-prone hint path (actors/lifecycle/README.md)
        *(["--actor-arg", "ale=--opener-hints"] if os.environ.get("KEXTLESS_OPENER_HINTS") else []),
        # measurement only: e.g. "--nice=0 --coalesce-ms=0", the eager lifecycle of before
        *(
            a
            for arg in os.environ.get("KEXTLESS_LIFECYCLE_ARGS", "").split()
            for a in ("--actor-arg", f"lifecycle={arg}")
        ),
    )
    try:
        # `up` returns once the lifecycle process runs; its divert handles open ~1-2 s later.
        log = s.run.log_dir / "lifecycle.log"
        deadline = time.monotonic() + 30
        while not (log.exists() and "running in netns" in log.read_text()):
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.1)
        time.sleep(0.2)  # its first PRESENT reaches the ALE
        yield s
    finally:
        s.close()


def clients(pair: NetnsPair, host: str, port: int, kind: str, n: int, procs: int) -> list[dict]:  # type: ignore[type-arg]
    """Run `procs` client processes at once in `a`; every connection's report."""
    running = [
        pair.popen(pair.a, [sys.executable, "-c", CLIENT, host, port, kind, n])
        for _ in range(procs)
    ]
    out = []
    for proc in running:
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr.decode()
        out += [json.loads(line) for line in stdout.decode().splitlines()]
    assert len(out) == n * procs
    return out


def ends(
    a: Answerer, proto: int, local_port: int
) -> list[ConnectionEndEventV4 | ConnectionEndEventV6]:
    with a._cond:
        return [
            i
            for i in a.infos
            if isinstance(i, ConnectionEndEventV4 | ConnectionEndEventV6)
            and i.protocol == proto
            and i.local_port == local_port
        ]


def wait_ends(a: Answerer, proto: int, ports: list[int], timeout: float = END_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(ends(a, proto, p) for p in ports):
        time.sleep(0.05)


def conn_pid(a: Answerer, proto: int, local_port: int) -> list[int]:
    found = a.wait_for(lambda i: i.protocol == proto and i.local_port == local_port)
    return [i.process_id for i in found]


@pytest.mark.parametrize("kind", ["tcp", "udp", "sendto"])
def test_outbound_connections_carry_their_openers_pid(
    pair: NetnsPair, echo_port: int, answerer: Answerer, kind: str
) -> None:
    proto = IpProtocol.TCP if kind == "tcp" else IpProtocol.UDP
    reports = clients(pair, pair.ip4_b, echo_port, kind, 5, 3)
    assert len({r["pid"] for r in reports}) == 3
    for r in reports:
        assert conn_pid(answerer, proto, r["port"]) == [r["pid"]], r


def test_ipv6_outbound_tcp_carries_its_pid(
    pair: NetnsPair, echo_port: int, answerer: Answerer
) -> None:
    # The neighbour resolved first: a SYN queued behind neighbour discovery leaves later from
    # softirq, where the kernel program may record whichever process the CPU was running
    # (a known limit, README "Known limits"; seen: the other client's pid).
    clients(pair, pair.ip6_b, echo_port, "tcp", 1, 1)
    for r in clients(pair, pair.ip6_b, echo_port, "tcp", 3, 2):
        assert conn_pid(answerer, IpProtocol.TCP, r["port"]) == [r["pid"]], r


def test_a_forked_child_that_connects_is_the_owner(
    pair: NetnsPair, echo_port: int, answerer: Answerer
) -> None:
    r = pair.run(pair.a, [sys.executable, "-c", FORK, pair.ip4_b, echo_port], timeout=20)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["pid"] != report["parent"]
    assert conn_pid(answerer, IpProtocol.TCP, report["port"]) == [report["pid"]]


def test_inbound_connections_carry_the_listeners_pid(pair: NetnsPair, answerer: Answerer) -> None:
    port = next(_PORTS)
    server = pair.popen(pair.a, [sys.executable, "-c", SERVER, port])
    assert server.stdout is not None
    line = server.stdout.readline().decode()
    assert line.startswith("ready"), line
    server_pid = json.loads(line.split(" ", 1)[1])["pid"]
    time.sleep(0.2)
    r = pair.run(pair.b, [sys.executable, "-c", PEER, pair.ip4_a, port], timeout=20)
    assert r.returncode == 0, r.stderr
    found = answerer.wait_for(lambda i: i.local_port == port, count=2)
    by_proto = {(i.protocol, i.direction): i.process_id for i in found}
    assert by_proto == {
        (IpProtocol.TCP, Direction.INBOUND): server_pid,
        (IpProtocol.UDP, Direction.INBOUND): server_pid,
    }


@pytest.mark.parametrize("kind", ["tcp", "rst", "udp", "sendto"])
def test_each_closed_connection_ends_exactly_once(
    pair: NetnsPair, echo_port: int, answerer: Answerer, kind: str
) -> None:
    """tcp: FIN both ways; rst: SO_LINGER 0; udp: a connected socket closed; sendto: an
    unconnected socket closed (its local port released)."""
    proto = IpProtocol.UDP if kind in ("udp", "sendto") else IpProtocol.TCP
    reports = clients(pair, pair.ip4_b, echo_port, kind, 4, 2)
    ports = [r["port"] for r in reports]
    wait_ends(answerer, proto, ports)
    time.sleep(0.6)  # later duplicates would arrive within a few table reads
    for r in reports:
        got = ends(answerer, proto, r["port"])
        assert len(got) == 1, (r, got)
        assert got[0].process_id == r["pid"]
        assert got[0].direction == Direction.OUTBOUND


def test_an_idle_udp_flow_ends_once_after_the_timeout(
    pair: NetnsPair, echo_port: int, answerer: Answerer
) -> None:
    hold = IDLE_S + 3.0
    proc = pair.popen(
        pair.a, [sys.executable, "-c", CLIENT, pair.ip4_b, echo_port, "sendto", 1, hold]
    )
    assert proc.stdout is not None
    report = json.loads(proc.stdout.readline())
    sent = time.monotonic()
    wait_ends(answerer, IpProtocol.UDP, [report["port"]], timeout=IDLE_S + 2.5)
    got = ends(answerer, IpProtocol.UDP, report["port"])
    assert len(got) == 1 and got[0].process_id == report["pid"]
    assert time.monotonic() - sent >= IDLE_S - 0.5  # not before the timeout
    assert proc.poll() is None  # the socket is still open: idle, not closed
    proc.wait(timeout=hold + 5)
    time.sleep(0.5)
    assert len(ends(answerer, IpProtocol.UDP, report["port"])) == 1  # not again at close


def test_a_connection_never_reported_never_ends(pair: NetnsPair, answerer: Answerer) -> None:
    """Loopback inside `a` is reported once (the client's end); the server's end of the same
    connection was never reported, so it gets no end event of its own."""
    port = next(_PORTS)
    server = pair.popen(pair.a, [sys.executable, "-c", SERVER, port])
    assert server.stdout is not None
    assert server.stdout.readline().startswith(b"ready")
    reports = clients(pair, "127.0.0.1", port, "tcp", 2, 1)
    wait_ends(answerer, IpProtocol.TCP, [r["port"] for r in reports])
    time.sleep(0.6)
    for r in reports:
        assert len(ends(answerer, IpProtocol.TCP, r["port"])) == 1
    assert ends(answerer, IpProtocol.TCP, port) == []


# ---- measurement (opt-in: KEXTLESS_LIFECYCLE_BENCH=1) ---------------------------------------

#: argv: host port n. One JSON line per connection: pid, local port, connect() time in us.
BENCH_CLIENT = r"""
import json, os, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET); s.settimeout(5)
    t = time.perf_counter_ns(); s.connect((host, port)); dt = time.perf_counter_ns() - t
    out.append({"pid": os.getpid(), "port": s.getsockname()[1], "us": dt // 1000})
    s.close()
print("\n".join(json.dumps(o) for o in out), flush=True)
"""


def _bench(pair: NetnsPair, host: str, port: int, n: int, procs: int) -> list[dict]:  # type: ignore[type-arg]
    running = [
        pair.popen(pair.a, [sys.executable, "-c", BENCH_CLIENT, host, port, n])
        for _ in range(procs)
    ]
    out = []
    for proc in running:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
        out += [json.loads(line) for line in stdout.decode().splitlines()]
    return out


def _lifecycle(system: System, action: str) -> None:
    from kextless.deploy.supervisor_rpc import rpc

    proxy = rpc(system.run)
    if action == "stop":
        proxy.supervisor.stopProcess("lifecycle")
        time.sleep(3.5)  # the ALE stops waiting once PRESENT is 3 s old
    else:
        log = system.run.log_dir / "lifecycle.log"
        seen = log.read_text().count("running in netns")
        proxy.supervisor.startProcess("lifecycle")
        deadline = time.monotonic() + 30
        while log.read_text().count("running in netns") <= seen:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2.0)  # its start-up reads (sockets, /proc) are over


def _p50(values: list[int]) -> int:
    return sorted(values)[len(values) // 2]


@pytest.mark.skipif(
    not os.environ.get("KEXTLESS_LIFECYCLE_BENCH"), reason="measurement: KEXTLESS_LIFECYCLE_BENCH=1"
)
def test_measure_pids_latency_and_end_delay(
    pair: NetnsPair, echo_port: int, system: System, answerer: Answerer
) -> None:
    """Pid correctness over 1000 outbound connections by 4 processes and 200 inbound ones;
    connect latency with the lifecycle actor on and off (same run, alternating rounds); end
    event delay after close. Prints one MEASURE line per figure."""
    rounds = int(os.environ.get("KEXTLESS_LIFECYCLE_ROUNDS", "3"))
    # Pids, outbound.
    outbound = _bench(pair, pair.ip4_b, echo_port, 250, 4)
    got = [conn_pid(answerer, IpProtocol.TCP, r["port"]) for r in outbound]
    right = sum(g == [r["pid"]] for g, r in zip(got, outbound, strict=True))
    zero = sum(g == [0] for g in got)
    print(f"MEASURE outbound pids right: {right}/{len(outbound)} (pid 0: {zero})")
    # Pids, inbound.
    port = next(_PORTS)
    server = pair.popen(pair.a, [sys.executable, "-c", SERVER, port])
    assert server.stdout is not None
    server_pid = json.loads(server.stdout.readline().decode().split(" ", 1)[1])["pid"]
    time.sleep(0.3)
    peers = _bench_peer(pair, port, 200)
    found = answerer.wait_for(
        lambda i: i.local_port == port and i.protocol == IpProtocol.TCP, count=len(peers)
    )
    inbound_right = sum(i.process_id == server_pid for i in found)
    print(f"MEASURE inbound pids right: {inbound_right}/{len(peers)} (infos {len(found)})")
    # Latency on vs off, alternating rounds in ABBA order (on-off, off-on, ...), so neither
    # state always comes right after the lifecycle actor's restart; paired per round.
    lat: dict[str, list[int]] = {"on": [], "off": []}
    running = True
    for i in range(rounds):
        for state in ("on", "off") if i % 2 == 0 else ("off", "on"):
            if (state == "on") != running:
                _lifecycle(system, "start" if state == "on" else "stop")
                running = state == "on"
            samples = [r["us"] for r in _bench(pair, pair.ip4_b, echo_port, 100, 2)]
            lat[state].append(_p50(samples))
    if not running:
        _lifecycle(system, "start")
    diffs = sorted(a - b for a, b in zip(lat["on"], lat["off"], strict=True))
    print(f"MEASURE connect p50 us per round: on {lat['on']} off {lat['off']}")
    print(
        f"MEASURE attribution adds (paired, on - off): median {_p50(diffs)} us, "
        f"spread {diffs[0]}..{diffs[-1]} us over {len(diffs)} rounds"
    )
    # End delay after close: when each end info reached the client (polled every 5 ms).
    # A 5-tuple reused from an earlier connection (the same remote, ~2000 connections
    # before) keeps that connection's cached verdict and ended entry: not asked, no new end.
    with answerer._cond:
        start = len(answerer.infos)
        used = {i.local_port for i in answerer.infos if hasattr(i, "local_port")}
    arrivals: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with answerer._cond:
                for i in answerer.infos[start:]:
                    if isinstance(i, ConnectionEndEventV4) and i.local_port not in arrivals:
                        arrivals[i.local_port] = time.time()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.1)
    reports = [
        r for r in clients(pair, pair.ip4_b, echo_port, "tcp", 50, 2) if r["port"] not in used
    ]
    wait_ends(answerer, IpProtocol.TCP, [r["port"] for r in reports], timeout=5)
    time.sleep(0.05)
    stop.set()
    watcher.join()
    delays = [
        int((arrivals[r["port"]] - r["closed"]) * 1000) for r in reports if r["port"] in arrivals
    ]
    print(
        f"MEASURE end delay ms: n={len(delays)}/{len(reports)} p50 {_p50(delays)} max {max(delays)}"
    )
    assert right >= 0.99 * len(outbound)
    assert inbound_right >= 0.99 * len(peers)
    assert len(delays) == len(reports) and max(delays) < 1000


#: argv: host port n. From `b`: n TCP connections to a's server.
BENCH_PEER = r"""
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.create_connection((host, port), timeout=5); s.recv(10); s.close()
print(json.dumps({"n": n}), flush=True)
"""


def _bench_peer(pair: NetnsPair, port: int, n: int) -> list[int]:
    r = pair.run(pair.b, [sys.executable, "-c", BENCH_PEER, pair.ip4_a, port, n], timeout=120)
    assert r.returncode == 0, r.stderr
    return list(range(json.loads(r.stdout.strip())["n"]))


#: argv: host port. Opens one TCP connection, reports it, and keeps it open.
HOLDER = r"""
import json, os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); s.recv(1000)
print(json.dumps({"pid": os.getpid(), "port": s.getsockname()[1]}), flush=True)
time.sleep(60)
"""


def test_connections_and_listeners_from_before_the_start_carry_their_owners(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with NetnsPair("x") as p:
        port = next(_PORTS)
        apps.start(p, p.b, apps.ECHO_SERVER, port, "::")
        holder = p.popen(p.a, [sys.executable, "-c", HOLDER, p.ip4_b, port])
        assert holder.stdout is not None
        held = json.loads(holder.stdout.readline())
        lport = next(_PORTS)
        server = p.popen(p.a, [sys.executable, "-c", SERVER, lport])
        assert server.stdout is not None
        server_pid = json.loads(server.stdout.readline().decode().split(" ", 1)[1])["pid"]
        s = System(p, tmp_path_factory.mktemp("run-x"), "--verdict-timeout", "3")
        try:
            log = s.run.log_dir / "lifecycle.log"
            deadline = time.monotonic() + 30
            while not (log.exists() and "running in netns" in log.read_text()):
                assert time.monotonic() < deadline, s.logs()
                time.sleep(0.1)
            a = Answerer(s.endpoint).start()
            try:
                time.sleep(0.3)
                found = a.wait_for(lambda i: i.local_port == held["port"], timeout=10)
                assert [i.process_id for i in found] == [held["pid"]], s.logs()
                r = p.run(p.b, [sys.executable, "-c", PEER, p.ip4_a, lport], timeout=20)
                assert r.returncode == 0, r.stderr
                inbound = a.wait_for(lambda i: i.local_port == lport, count=2)
                assert {i.process_id for i in inbound} == {server_pid}, s.logs()
            finally:
                a.stop()
        finally:
            s.close()


def test_outbound_tcp_owners_come_from_the_kernel_so_connects_are_not_resolved_here(
    pair: NetnsPair, system: System, echo_port: int, answerer: Answerer
) -> None:
    """With the capture's kextless_pre recording owners, the lifecycle actor leaves outbound
    TCP openers to it (no socket-table read on the connect path) and the pids stay right."""
    for r in clients(pair, pair.ip4_b, echo_port, "tcp", 3, 2):
        assert conn_pid(answerer, IpProtocol.TCP, r["port"]) == [r["pid"]], r
    log = (system.run.log_dir / "lifecycle.log").read_text()
    assert "outbound TCP owners come from the kernel" in log, log[-2000:]
