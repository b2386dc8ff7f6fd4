"""Issue 8 through the whole system: `kextless up --netns a`, a test client deciding as
Portmaster would, and interfaces that appear after `up`, connections that predate it and
protocols no list names. Every packet of the namespace must pass kextless.

Namespace `a` is firewalled; `b` is the far end of every link. The module's system (conftest
`system`) runs with --no-policy and a 3 s verdict timeout; the tests of existing connections
and of the built-in policy start their own systems because they need a fresh `up`.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kextless.base.rundir import RuntimeDir
from kextless.deploy.status import interfaces
from kextless.protocol.enums import Direction, PayloadLayer, Severity, Verdict
from kextless.protocol.infos import LogLine
from tests import apps
from tests.entry import KEXTLESS
from tests.netns import NetnsPair, add_veth_later, link_names, wait_diverted
from tests.system.harness import Answerer, Conn, Rules, System, addr, status

pytestmark = [pytest.mark.root, pytest.mark.slow]

_PORTS = itertools.count(23000, 2)
_LINKS = itertools.count(1)


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with NetnsPair("i") as p:
        yield p


@pytest.fixture()
def rules() -> Rules:
    return Rules()


@pytest.fixture()
def answerer(answerer: Answerer, rules: Rules) -> Answerer:
    """conftest's answerer, deciding by this module's rules (read per info, so set after its
    start but before any traffic)."""
    answerer.decide = rules
    return answerer


def _new_link() -> int:
    """The number of a link this module adds: it names the link, its MAC and its subnet."""
    return next(_LINKS)


def _net(pair: NetnsPair, n: int) -> str:
    return f"10.{200 + n}.{pair.subnet}"


def _client_errors(answerer: Answerer) -> list[str]:
    """Error LogLines the client got: a link kextless cannot guard is refused with one, so a
    link it did guard must produce none."""
    infos = list(answerer.infos)  # a copy: the answerer thread only appends
    return [i.line for i in infos if isinstance(i, LogLine) and i.severity >= Severity.ERROR]


def _flow(proto: int, port: int) -> Callable[[Conn], bool]:
    return lambda i: i.protocol == proto and port in (i.local_port, i.remote_port)


def _check(
    info: Conn,
    direction: Direction,
    local: tuple[str, int],
    remote: tuple[str, int],
    proto: int = 6,
) -> None:
    """The info names the flow on the new link: its addresses are the link's own (the kext
    protocol has no interface field; the local address is what identifies the interface)."""
    assert info.direction == direction, info
    assert info.protocol == proto
    assert (info.local_ip, info.local_port) == (addr(local[0]), local[1]), info
    assert (info.remote_ip, info.remote_port) == (addr(remote[0]), remote[1]), info
    assert info.payload_layer == PayloadLayer.NETWORK
    src, dst = (info.payload[12:16], info.payload[16:20])
    assert (src, dst) == (
        (info.local_ip, info.remote_ip)
        if direction == Direction.OUTBOUND
        else (info.remote_ip, info.local_ip)
    )


def _blocked_and_allowed(
    pair: NetnsPair, answerer: Answerer, rules: Rules, a_ip: str, b_ip: str
) -> None:
    """Over the link a_ip <-> b_ip, both directions: a blocked port is refused at once (RST),
    an allowed port is asked about with the link's addresses and carries data both ways."""
    blocked, allowed = next(_PORTS), next(_PORTS)
    rules.by_port[(6, blocked)] = Verdict.PERMANENT_BLOCK
    for port in (blocked, allowed):
        apps.start(pair, pair.b, apps.ECHO_SERVER, port, b_ip)
        apps.start(pair, pair.a, apps.ECHO_SERVER, port, a_ip)
    for label, src_ns, dst_ip, direction in (
        ("outbound", pair.a, b_ip, Direction.OUTBOUND),
        ("inbound", pair.b, a_ip, Direction.INBOUND),
    ):
        seen = len(answerer.connections(_flow(6, blocked)))
        res = apps.run(pair, src_ns, apps.TCP_CLIENT, dst_ip, blocked, 3)
        assert res["result"] == "refused", (label, res)
        assert res["elapsed"] < 1.0, (label, res)  # the RST of the verdict, not a timeout
        assert len(answerer.connections(_flow(6, blocked))) > seen, label
        proc = pair.popen(
            src_ns, [sys.executable, "-c", apps.INTERACTIVE_TCP, dst_ip, allowed],
            stdin=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, (label, proc.stderr.read() if proc.stderr else "")
        client = tuple(json.loads(line)["connected"])
        proc.stdin.write(b"ping-both-ways\n")
        proc.stdin.flush()
        echoed = json.loads(proc.stdout.readline())
        assert echoed == {"result": "ok", "data": "echo ping-both-ways"}, (label, echoed)
        proc.stdin.close()
        proc.wait(5)

        def this(i: Conn, port: int = allowed, c_port: int = client[1]) -> bool:
            return _flow(6, port)(i) and c_port in (i.local_port, i.remote_port)

        (info,) = answerer.wait_for(this)
        if direction == Direction.OUTBOUND:
            _check(info, direction, (a_ip, client[1]), (b_ip, allowed))
        else:
            _check(info, direction, (a_ip, allowed), (b_ip, client[1]))
        assert answerer.answered[info.id] == Verdict.PERMANENT_ACCEPT


# ---- 1, 2, 3: links that appear after `up` ---------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("move_from_b", [False, True], ids=["created-in-a", "moved-into-a"])
def test_a_veth_added_after_up_is_asked_about_and_obeyed(
    pair: NetnsPair, system: System, answerer: Answerer, rules: Rules, move_from_b: bool
) -> None:
    n = _new_link()
    a_dev, b_dev = f"vi{n}", f"vj{n}"
    a_ip, b_ip = add_veth_later(pair, a_dev, b_dev, _net(pair, n), n, move_from_b=move_from_b)
    print(f"{a_dev}: diverted {wait_diverted(pair.a, a_dev) * 1000:.0f} ms after it was up")
    _blocked_and_allowed(pair, answerer, rules, a_ip, b_ip)
    assert _client_errors(answerer) == []


@pytest.mark.timeout(90)
def test_a_veth_removed_and_readded_under_the_same_name_is_still_guarded_and_asked(
    pair: NetnsPair, system: System, answerer: Answerer, rules: Rules
) -> None:
    n = _new_link()
    a_dev, b_dev = f"vr{n}", f"vs{n}"
    a_ip, b_ip = add_veth_later(pair, a_dev, b_dev, _net(pair, n), n)
    wait_diverted(pair.a, a_dev)
    _blocked_and_allowed(pair, answerer, rules, a_ip, b_ip)
    subprocess.run(["ip", "-n", pair.a, "link", "del", a_dev], check=True, timeout=10)
    time.sleep(0.3)
    assert a_dev not in link_names(pair.a)
    a_ip, b_ip = add_veth_later(pair, a_dev, b_dev, _net(pair, n), n)
    print(f"{a_dev} re-added: diverted {wait_diverted(pair.a, a_dev) * 1000:.0f} ms after up")
    _blocked_and_allowed(pair, answerer, rules, a_ip, b_ip)
    assert _client_errors(answerer) == []


#: A tun device "tunN" driven by this program as the far host: per stdin line (a source port)
#: it writes a SYN from `peer` to `local`:port and reports the flags of the answer.
_TUN = r"""
import fcntl, json, os, select, struct, sys, time
from tests.actors.capture import crafted as c
name, local, peer, port = sys.argv[1].encode(), sys.argv[2], sys.argv[3], int(sys.argv[4])
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name, 0x0001 | 0x1000))  # TUN, NO_PI
print("ready", flush=True)
for line in sys.stdin:
    sport = int(line)
    os.write(fd, c.v4(peer, local, c.tcp(sport, port)))
    end, flags = time.monotonic() + 2.0, None
    while flags is None and time.monotonic() < end:
        if select.select([fd], [], [], 0.05)[0]:
            pkt = os.read(fd, 2048)
            ihl = (pkt[0] & 15) * 4
            dport = struct.unpack_from("!H", pkt, ihl + 2)[0]
            if pkt[0] >> 4 == 4 and pkt[9] == 6 and dport == sport:
                flags = pkt[ihl + 13]
    print(json.dumps({"flags": flags}), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_tun_device_added_after_up_is_asked_about_and_obeyed(
    pair: NetnsPair, system: System, answerer: Answerer, rules: Rules
) -> None:
    """A tun device with an address, created by an application after `up` (this kernel has no
    dummy link type: `ip link add X type dummy` says "Unknown device type"). A SYN arriving on
    it is asked about with the tun's addresses; a block verdict answers RST, accept SYN-ACK."""
    n = _new_link()
    dev, port = f"tun{n}", next(_PORTS)
    local, peer = f"{_net(pair, n)}.1", f"{_net(pair, n)}.2"
    apps.start(pair, pair.a, apps.ECHO_SERVER, port)
    tun = pair.popen(
        pair.a, [sys.executable, "-c", _TUN, dev, local, peer, port],
        stdin=subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[2]),
    )  # fmt: skip
    assert tun.stdout is not None and tun.stdin is not None
    assert tun.stdout.readline().strip() == b"ready", tun.stderr.read() if tun.stderr else ""
    for args in (["addr", "add", local, "peer", peer, "dev", dev], ["link", "set", dev, "up"]):
        subprocess.run(["ip", "-n", pair.a, *args], check=True, timeout=10)
    print(f"{dev}: diverted {wait_diverted(pair.a, dev) * 1000:.0f} ms after it was up")

    def syn(sport: int) -> int | None:
        assert tun.stdin is not None and tun.stdout is not None
        tun.stdin.write(f"{sport}\n".encode())
        tun.stdin.flush()
        flags = json.loads(tun.stdout.readline())["flags"]
        return None if flags is None else int(flags)

    rules.by_port[(6, port)] = Verdict.PERMANENT_BLOCK
    assert syn(41001) == 0x14  # RST+ACK: refused
    (info,) = answerer.wait_for(lambda i: _flow(6, port)(i) and i.remote_port == 41001)
    _check(info, Direction.INBOUND, (local, port), (peer, 41001))
    rules.by_port[(6, port)] = Verdict.PERMANENT_ACCEPT
    assert syn(41002) == 0x12  # SYN+ACK: accepted
    assert _client_errors(answerer) == []
    (info,) = answerer.wait_for(lambda i: _flow(6, port)(i) and i.remote_port == 41002)
    _check(info, Direction.INBOUND, (local, port), (peer, 41002))
    assert answerer.answered[info.id] == Verdict.PERMANENT_ACCEPT


# ---- 5: protocols no list names ------------------------------------------------------------

#: Count raw packets of protocol argv[2] (family argv[1]) carrying our marker for argv[3] s.
_RAW_SINK = r"""
import json, socket, sys, time
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, int(sys.argv[2])); s.settimeout(0.1)
print("ready", flush=True)
n = 0; end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        d = s.recv(4096)
    except (socket.timeout, TimeoutError):
        continue
    if b"kextless-proto" in d:
        n += 1
print(json.dumps({"got": n}))
"""

_RAW_SEND = r"""
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, int(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    s.sendto(b"kextless-proto", (sys.argv[1], 0)); time.sleep(0.05)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("verdict", "delivered"),
    [
        (Verdict.PERMANENT_ACCEPT, 3),
        (Verdict.PERMANENT_BLOCK, 0),
        (Verdict.PERMANENT_DROP, 0),
    ],
    ids=["accept", "block", "drop"],
)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4-proto-253", "ipv6-nexthdr-253"])
def test_an_unlisted_protocol_is_held_and_decided(
    pair: NetnsPair,
    system: System,
    answerer: Answerer,
    rules: Rules,
    verdict: Verdict,
    delivered: int,
    v6: bool,
) -> None:
    proto = 253  # "use for experimentation" (RFC 3692): in no list of the product
    rules.by_port[(proto, 0)] = verdict
    for label, sender, receiver, dst, direction in (
        ("inbound", pair.b, pair.a, pair.ip6_a if v6 else pair.ip4_a, Direction.INBOUND),
        ("outbound", pair.a, pair.b, pair.ip6_b if v6 else pair.ip4_b, Direction.OUTBOUND),
    ):

        def asked(d: Direction = direction) -> list[Conn]:
            return answerer.connections(lambda c: c.protocol == proto and c.direction == d)

        before = len(asked())
        sink = pair.popen(receiver, [sys.executable, "-c", _RAW_SINK, 6 if v6 else 4, proto, 2.5])
        assert sink.stdout is not None and b"ready" in sink.stdout.readline()
        pair.run(sender, [sys.executable, "-c", _RAW_SEND, dst, proto, 3], timeout=5, check=True)
        out, _ = sink.communicate(timeout=10)
        got = int(json.loads(out)["got"])
        new = asked()[before:]
        assert len(new) >= 1, (label, "never asked")
        assert all(type(i).__name__ == ("ConnectionIpv6" if v6 else "ConnectionIpv4") for i in new)
        assert all(answerer.answered.get(i.id) == verdict for i in new), label
        assert got == delivered, (label, got, len(new))
        print(f"{label}: {len(new)} asked, {got} delivered of 3")


# ---- 7: status while a link is added ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_status_lists_every_interface_and_shows_a_new_one_guarded_once_settled(
    pair: NetnsPair, system: System, answerer: Answerer
) -> None:
    """`kextless status` polled while a veth is added; alongside, the very reading status
    prints (deploy.status.interfaces) polled as fast as it goes, to see the attach window."""
    n = _new_link()
    a_dev, b_dev = f"vt{n}", f"vu{n}"
    states: list[tuple[float, str]] = []  # (s since polling began, what status said)
    fast: list[tuple[float, str]] = []  # the same from deploy.status.interfaces
    stop = threading.Event()

    def hooks(row: dict[str, Any] | None) -> str:
        if row is None:
            return "absent"
        return " ".join(
            f"{h} {'guarded' if row[h] else 'UNGUARDED'}" for h in ("ingress", "egress")
        )

    def record(into: list[tuple[float, str]], seen: str) -> None:
        if not into or into[-1][1] != seen:
            into.append((time.monotonic() - t0, seen))

    def poll() -> None:
        while not stop.is_set():
            code, out = status(system)
            try:
                rows = json.loads(out)["interfaces"]
            except (ValueError, KeyError):
                record(states, f"unreadable (exit {code})")
                continue
            row = next((i for i in rows if i["name"] == a_dev), None)
            record(states, f"{hooks(row)} exit={code}")

    def poll_fast() -> None:
        while not stop.is_set():
            row = next((i for i in interfaces(pair.a) if i["name"] == a_dev), None)
            record(fast, hooks(row))

    t0 = time.monotonic()
    pollers = [threading.Thread(target=f, daemon=True) for f in (poll, poll_fast)]
    for th in pollers:
        th.start()
    try:
        time.sleep(0.3)
        t_add = time.monotonic() - t0
        add_veth_later(pair, a_dev, b_dev, _net(pair, n), n)
        t_up = time.monotonic() - t0
        wait_diverted(pair.a, a_dev)
        time.sleep(0.5)
    finally:
        stop.set()
        for th in pollers:
            th.join(timeout=35)
    print(f"{a_dev} add began at +{t_add * 1000:.0f} ms, up at +{t_up * 1000:.0f} ms")
    for t, seen in fast:
        print(f"interfaces() of {a_dev} at +{t * 1000:.0f} ms: {seen}")
    assert fast[-1][1] == "ingress guarded egress guarded", fast
    for t, seen in states:
        print(f"status of {a_dev} at +{t * 1000:.0f} ms: {seen}")
    assert states[-1][1] == "ingress guarded egress guarded exit=0", states

    code, out = status(system)
    assert code == 0, out
    listed = {i["name"]: i for i in json.loads(out)["interfaces"]}
    names = link_names(pair.a)
    assert sorted(listed) == sorted(names)
    assert all(i["guarded"] and i["ingress"] and i["egress"] for i in listed.values()), listed
    code, text = status(system, as_json=False)
    print(text.split("divert loss counters")[0])
    for name in names:
        (row,) = [ln for ln in text.splitlines() if ln.split()[:1] == [name]]
        assert "ingress guarded egress guarded" in row and "UNGUARDED" not in row, row


# ---- 4: connections that predate `up` --------------------------------------------------------

#: One connection kept open; per stdin line "ping" it sends and reports what came back, per
#: "watch" it waits in recv (idle, sends nothing) and reports when and how the connection died.
_KEEP = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.recv(1000)  # the server's hello
print(json.dumps({"local": list(s.getsockname()[:2])}), flush=True)
for line in sys.stdin:
    s.settimeout(3 if line.strip() == "ping" else 10)
    try:
        if line.strip() == "ping":
            s.sendall(b"ping")
        d = s.recv(1000)
        r = "ok" if d.startswith(b"echo") else ("eof" if not d else "other")
    except ConnectionResetError:
        r = "reset"
    except ConnectionAbortedError:  # our own socket destroyed (sock_destroy): ECONNABORTED
        r = "aborted"
    except (socket.timeout, TimeoutError):
        r = "timeout"
    except OSError as e:
        r = "error " + str(e)
    print(json.dumps({"result": r, "t": time.time()}), flush=True)
"""


class _Kept:
    """A client of _KEEP: an open TCP connection the test drives line by line."""

    def __init__(self, pair: NetnsPair, ns: str, host: str, port: int) -> None:
        self.proc = pair.popen(ns, [sys.executable, "-c", _KEEP, host, port], stdin=subprocess.PIPE)
        self.local = tuple(json.loads(self._line(10))["local"])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "client gave no answer"
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "client died"
        return line.decode()

    def send(self, what: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{what}\n".encode())
        self.proc.stdin.flush()

    def result(self, timeout: float = 12) -> dict[str, Any]:
        return dict(json.loads(self._line(timeout)))

    def ping(self) -> str:
        self.send("ping")
        return str(self.result()["result"])


@pytest.fixture()
def fresh_pair() -> Iterator[NetnsPair]:
    with NetnsPair("e") as p:
        yield p


@pytest.fixture()
def run_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kli"))  # short: unix socket paths are limited
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_a_connection_from_before_up_is_reported_and_reset_by_a_block_verdict(
    fresh_pair: NetnsPair, run_root: Path
) -> None:
    pair = fresh_pair
    port_b, port_a = next(_PORTS), next(_PORTS)
    apps.start(pair, pair.b, apps.ECHO_SERVER, port_b)
    apps.start(pair, pair.a, apps.ECHO_SERVER, port_a)
    out = _Kept(pair, pair.a, pair.ip4_b, port_b)  # a -> b over IPv4
    inc = _Kept(pair, pair.b, pair.ip6_a, port_a)  # b -> a over IPv6, left idle in recv
    assert out.ping() == "ok" and inc.ping() == "ok"
    rules = Rules()
    rules.by_port[(6, port_b)] = Verdict.PERMANENT_BLOCK
    rules.by_port[(6, port_a)] = Verdict.PERMANENT_BLOCK
    system = System(pair, run_root, "--verdict-timeout", "10")
    answerer = Answerer(system.endpoint)
    answerer.decide = rules
    try:
        out.send("watch")  # from now on both ends only listen: no packet of their own
        inc.send("watch")
        answerer.start()
        infos = answerer.wait_for(
            lambda i: (
                (i.protocol, i.remote_port, i.local_port)
                in ((6, port_b, out.local[1]), (6, inc.local[1], port_a))
            ),
            count=2,
            timeout=15,
        )
        assert len(infos) == 2, (infos, system.logs())
        (i_out,) = [i for i in infos if i.remote_port == port_b]
        (i_in,) = [i for i in infos if i.local_port == port_a]
        _check(i_out, Direction.OUTBOUND, (pair.ip4_a, out.local[1]), (pair.ip4_b, port_b))
        assert i_in.direction == Direction.INBOUND
        assert (i_in.local_ip, i_in.remote_ip) == (addr(pair.ip6_a), addr(pair.ip6_b))
        assert i_in.remote_port == inc.local[1]
        # Each idle end learns of the verdict without sending: the local socket in `a` is
        # aborted, the peer in `b` gets a reset.
        for label, kept, key in (("outbound", out, port_b), ("inbound", inc, port_a)):
            died = kept.result(timeout=12)
            delay = died["t"] - rules.sent_at[(6, key)]
            print(f"idle {label} connection: {died['result']} {delay * 1000:.0f} ms after verdict")
            assert died["result"] in ("reset", "eof", "aborted"), (label, died)
            assert delay < 2.0, (label, died)
    finally:
        answerer.stop()
        print(system.logs())
        system.close()
    assert not answerer.errors, answerer.errors


@pytest.mark.timeout(120)
def test_with_existing_connections_accept_nothing_is_asked_and_they_keep_working(
    fresh_pair: NetnsPair, run_root: Path
) -> None:
    pair = fresh_pair
    port_b, port_a = next(_PORTS), next(_PORTS)
    apps.start(pair, pair.b, apps.ECHO_SERVER, port_b)
    apps.start(pair, pair.a, apps.ECHO_SERVER, port_a)
    out = _Kept(pair, pair.a, pair.ip4_b, port_b)
    inc = _Kept(pair, pair.b, pair.ip6_a, port_a)
    assert out.ping() == "ok" and inc.ping() == "ok"
    rules = Rules(default=Verdict.PERMANENT_BLOCK)  # anything asked would be blocked
    system = System(pair, run_root, "--verdict-timeout", "10", "--existing-connections", "accept")
    answerer = Answerer(system.endpoint)
    answerer.decide = rules
    try:
        answerer.start()
        log = system.run.log_dir / "capture.log"
        deadline = time.monotonic() + 10
        while "existing connections:" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, system.logs()
            time.sleep(0.1)
        assert "0 asked, 2 accepted silently" in log.read_text(), system.logs()
        assert out.ping() == "ok" and inc.ping() == "ok"
        time.sleep(0.5)
        assert out.ping() == "ok" and inc.ping() == "ok"
        assert answerer.connections(_flow(6, port_b)) == []
        assert answerer.connections(_flow(6, port_a)) == []
    finally:
        answerer.stop()
        print(system.logs())
        system.close()
    assert not answerer.errors, answerer.errors


# ---- 6: the built-in policy with a rules file ------------------------------------------------

_RULES = """
default = "PermanentAccept"

[[rule]]
protocol = "tcp"
remote_port = 8082
verdict = "PermanentBlock"
"""


@pytest.mark.timeout(120)
def test_a_rule_blocking_tcp_8082_applies_on_a_veth_added_after_up(
    fresh_pair: NetnsPair, run_root: Path
) -> None:
    """The issue's own report: a rules file blocking TCP port 8082, a veth added after `up`."""
    pair = fresh_pair
    rules = run_root / "rules.toml"
    rules.write_text(_RULES)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    up_argv = [*KEXTLESS, "up", "--netns", pair.a, "--run-root", str(run_root)]
    up = subprocess.run(
        [*up_argv, "--policy-rules", str(rules)], capture_output=True, text=True, timeout=90,
        env=env,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        a_ip, b_ip = add_veth_later(pair, "vp1", "vq1", f"10.240.{pair.subnet}", 0x40)
        print(f"vp1: diverted {wait_diverted(pair.a, 'vp1') * 1000:.0f} ms after it was up")
        for port in (8082, 8083):
            apps.start(pair, pair.b, apps.ECHO_SERVER, port, b_ip)
        blocked = apps.run(pair, pair.a, apps.TCP_CLIENT, b_ip, 8082, 3)
        assert blocked["result"] == "refused" and blocked["elapsed"] < 1.0, blocked
        allowed = apps.run(pair, pair.a, apps.TCP_CLIENT, b_ip, 8083, 3)
        assert allowed["result"] == "ok", allowed
        assert allowed["local"][0] == a_ip and allowed["data"].startswith("hello"), allowed
        policy_log = RuntimeDir.for_instance(pair.a, root=run_root).log_dir / "policy.log"
        text = policy_log.read_text()
        assert f"{a_ip}:{allowed['local'][1]} -> {b_ip}:8083 verdict=PermanentAccept" in text
        assert f" -> {b_ip}:8082 verdict=PermanentBlock" in text
    finally:
        down = subprocess.run(
            [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(run_root)],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    assert down.returncode == 0, down.stdout + down.stderr
