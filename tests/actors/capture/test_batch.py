"""actors/capture/batch.py: batch receive and re-inject through a real divert handle.

The root tests run a worker (`_WORKER`) inside namespace a that opens a real EBPFDivert
handle and drives it only through `Batch`; the traffic is real UDP between a and b (veth) and
on a's loopback. What is checked is what the library delivered (fields, bytes) and what the
applications received; nothing is faked. The non-root tests pin the address layout batch.py
reads by offset against pydivert's own ctypes structure.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from kextless.actors.capture import packets as pk
from kextless.actors.capture.batch import ADDR_SIZE, AddrFlag, fresh_address, length_ok
from tests.actors.capture import crafted as c
from tests.netns import NetnsPair

PORT = 18100
FILTER = f"udp.DstPort == {PORT} or udp.SrcPort == {PORT}"

# ---- layout (no root) ---------------------------------------------------------------------


def test_flag_bits_match_pydivert_address_structure() -> None:
    from pydivert.windivert_dll.structs import WinDivertAddress

    for name, bit in (
        ("Outbound", AddrFlag.OUTBOUND),
        ("Loopback", AddrFlag.LOOPBACK),
        ("Impostor", AddrFlag.IMPOSTOR),
        ("IPv6", AddrFlag.IPV6),
        ("Sniffed", AddrFlag.SNIFFED),
        ("IPChecksum", AddrFlag.IP_CHECKSUM),
        ("TCPChecksum", AddrFlag.TCP_CHECKSUM),
        ("UDPChecksum", AddrFlag.UDP_CHECKSUM),
    ):
        a = WinDivertAddress()
        setattr(a, name, 1)
        word = int.from_bytes(bytes(a)[8:12], "little")
        assert word == int(bit), name
    assert ctypes.sizeof(WinDivertAddress) == ADDR_SIZE


def test_fresh_address_reads_back_through_pydivert() -> None:
    from pydivert.windivert_dll.structs import WinDivertAddress

    a = WinDivertAddress.from_buffer_copy(fresh_address(7, outbound=False, loopback=False))
    assert (a.Outbound, a.Loopback, a.u.Network.IfIdx) == (0, 0, 7)
    lo = WinDivertAddress.from_buffer_copy(fresh_address(1, outbound=False, loopback=True))
    assert (lo.Outbound, lo.Loopback, lo.u.Network.IfIdx) == (1, 1, 1)  # lo: always outbound


def test_length_ok_checks_the_ip_length_field() -> None:
    v4 = c.v4("10.0.0.1", "10.0.0.2", c.udp(1, 2, b"abc"))
    v6 = c.v6("fd00::1", "fd00::2", c.udp(1, 2, b"abc"))
    assert length_ok(v4) and length_ok(v6)
    assert not length_ok(v4 + b"\0")  # trailing byte: send_ex would misplace the next packet
    assert not length_ok(v6[:-1])
    assert not length_ok(b"\x45" + b"\0" * 10)
    assert not length_ok(b"\x20" * 40)  # not IP


# ---- real handle in a namespace -----------------------------------------------------------

_WORKER = r"""
import json, socket, sys, time
from pydivert import EBPFDivert
from kextless.actors.capture.batch import Batch

filt, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
h = EBPFDivert(filt).open()
b = Batch(h, size=64, lo_ifindex=socket.if_nametoindex("lo"))
print(json.dumps({"va": socket.if_nametoindex("va")}), flush=True)

def rec(t):
    return {"hex": bytes(t.raw).hex(), "outbound": t.outbound, "loopback": t.loopback,
            "ifindex": t.ifindex, "ipv6": t.ipv6, "ts": t.timestamp}

out = {}
if mode == "fields":
    sys.stdin.readline()  # packets wait in the library until this one call
    first = b.recv(timeout_ms=1000)
    out["first"] = [rec(t) for t in first]
    out["first_calls"] = b.counters.recv_calls
    out["now"] = time.monotonic_ns()
    for t in first:
        b.reinject(t)
    later = []
    end = time.monotonic() + float(arg)
    while time.monotonic() < end:
        for t in b.recv(timeout_ms=20):
            later.append(rec(t))
            b.reinject(t)
    out["later"] = later
elif mode == "pass":
    end = time.monotonic() + float(arg)
    held = []
    while time.monotonic() < end:
        got = b.recv(timeout_ms=20)
        # Hold every fourth packet across the next receive: it must survive the buffer reuse.
        for i, t in enumerate(got):
            if i % 4 == 3:
                held.append(t)
            else:
                b.reinject(t)
        for t in held[:-1]:
            b.reinject(t)
        held = held[-1:]
    for t in held:
        b.reinject(t)
    b.flush()
elif mode == "inject":
    for spec in json.loads(arg):
        b.inject(bytes.fromhex(spec["hex"]), spec["ifindex"], spec["outbound"], spec["loopback"])
    out["flushed"] = b.flush()
c = b.counters
out["counters"] = {k: getattr(c, k) for k in ("recv_calls", "received", "detached",
    "send_calls", "sent", "send_failed", "sent_alone", "send_unconfirmed")}
out["errors"] = c.errors
h.close()
print(json.dumps(out), flush=True)
"""

_ECHO = r"""
import socket, sys, select
port = int(sys.argv[1])
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(("0.0.0.0", port))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s6.bind(("::", port))
print("ready", flush=True)
while True:
    for s in select.select([s4, s6], [], [])[0]:
        d, peer = s.recvfrom(65535)
        s.sendto(d, peer)
"""

_CLIENT = r"""
import json, socket, sys, time
port, timeout = int(sys.argv[1]), float(sys.argv[2])
targets = json.loads(sys.argv[3])  # [[host, payload], ...]
socks = []
for host, payload in targets:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.sendto(payload.encode(), (host, port))
    socks.append((s, payload))
got = {}
for s, payload in socks:
    try:
        got[payload] = s.recv(65535).decode()
    except OSError as e:
        got[payload] = repr(e)
print(json.dumps(got), flush=True)
"""

_SINK = r"""
import json, socket, sys, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(("0.0.0.0", port))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s6.bind(("::", port))
for s in (s4, s6):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22); s.settimeout(0.05)
print("ready", flush=True)
seen = set(); end = time.monotonic() + secs
while time.monotonic() < end:
    for s in (s4, s6):
        try:
            while True:
                seen.add(s.recv(100).decode())
        except OSError:
            pass
print(json.dumps(sorted(seen)), flush=True)
"""

_SENDER = r"""
import socket, sys, time
port, n, host4, host6 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(n):
    s4.sendto(f"4-{i}".encode(), (host4, port))
    s6.sendto(f"6-{i}".encode(), (host6, port))
    if i % 50 == 49:
        time.sleep(0.005)  # well under the library's queue: this tests delivery, not overload
"""


def _py(pair: NetnsPair, ns: str, code: str, *args: object, stdin: bool = False) -> Any:
    return pair.popen(
        ns,
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE if stdin else None,
    )


def _line(proc: Any, timeout: float = 15.0) -> str:
    """The next stdout line of a helper (fails the test if it died or stayed silent)."""
    import select

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            line = proc.stdout.readline().decode()
            if line:
                return line
        if proc.poll() is not None:
            break
    err = proc.stderr.read().decode() if proc.poll() is not None else ""
    raise AssertionError(f"helper gave no line (rc={proc.poll()}): {err[-2000:]}")


def _worker(pair: NetnsPair, mode: str, arg: str, stdin: bool = False) -> tuple[Any, int]:
    w = _py(pair, pair.a, _WORKER, FILTER, mode, arg, stdin=stdin)
    return w, json.loads(_line(w))["va"]


def _result(proc: Any, timeout: float = 30.0) -> Any:
    # Not communicate(): with a timeout it reads the pipe's fd directly, missing what `_line`'s
    # buffered readline already took in (the result line, when the helper was quick).
    proc.wait(timeout=timeout)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.root
def test_a_mixed_batch_arrives_in_one_call_with_its_fields_and_every_echo_returns() -> None:
    with NetnsPair("bt") as p:
        echo = _py(p, p.a, _ECHO, PORT)
        assert _line(echo).strip() == "ready"
        w, va = _worker(p, "fields", "3", stdin=True)
        t_sent = time.monotonic_ns()
        remote = _py(p, p.b, _CLIENT, PORT, 6, json.dumps([[p.ip4_a, "v4-in"], [p.ip6_a, "v6-in"]]))
        local = _py(
            p, p.a, _CLIENT, PORT, 6, json.dumps([["127.0.0.1", "v4-lo"], ["::1", "v6-lo"]])
        )
        time.sleep(0.7)  # all four are now held in the library, unread
        assert w.stdin is not None
        w.stdin.write(b"go\n")
        w.stdin.flush()
        got_remote, got_local = _result(remote), _result(local)
        res = _result(w)
    # Every datagram was re-injected by the batch and answered; so were the answers.
    assert got_remote == {"v4-in": "v4-in", "v6-in": "v6-in"}
    assert got_local == {"v4-lo": "v4-lo", "v6-lo": "v6-lo"}
    # The four held datagrams came back in ONE recv_ex call, each with its own fields.
    assert res["first_calls"] == 1
    first = {bytes.fromhex(r["hex"])[-5:].decode(): r for r in res["first"]}
    assert sorted(first) == ["v4-in", "v4-lo", "v6-in", "v6-lo"]
    want = {
        "v4-in": (False, False, va, False, p.ip4_b, p.ip4_a),
        "v6-in": (False, False, va, True, p.ip6_b, p.ip6_a),
        "v4-lo": (True, True, 1, False, "127.0.0.1", "127.0.0.1"),
        "v6-lo": (True, True, 1, True, "::1", "::1"),
    }
    for payload, (out, loop, ifx, v6, src, dst) in want.items():
        r = first[payload]
        raw = bytes.fromhex(r["hex"])
        q = pk.parse(raw)
        assert q is not None, payload
        assert (r["outbound"], r["loopback"], r["ifindex"], r["ipv6"]) == (out, loop, ifx, v6)
        assert (q.src, q.dst, q.dport, q.protocol) == (c.a(src), c.a(dst), PORT, c.UDP), payload
        assert raw.endswith(payload.encode()) and len(raw) == (48 if v6 else 28) + 5
        assert t_sent <= r["ts"] <= res["now"], payload  # CLOCK_MONOTONIC, at capture
    # The echoes to b left through va, outbound, not loopback; both families.
    replies = [
        r
        for r in res["later"]
        if pk.parse(bytes.fromhex(r["hex"])).sport == PORT  # type: ignore[union-attr]
    ]
    on_va = {
        (r["ipv6"], r["outbound"], r["loopback"], r["ifindex"])
        for r in replies
        if r["ifindex"] == va
    }
    assert on_va == {(False, True, False, va), (True, True, False, va)}
    assert res["counters"]["send_failed"] == 0


@pytest.mark.root
def test_every_packet_of_a_reinjected_stream_arrives_even_those_held_across_receives() -> None:
    n = 400
    with NetnsPair("bt") as p:
        sink = _py(p, p.a, _SINK, PORT, 8)
        assert _line(sink).strip() == "ready"
        w, _va = _worker(p, "pass", "5")
        sender = p.run(p.b, [sys.executable, "-c", _SENDER, PORT, n, p.ip4_a, p.ip6_a], timeout=20)
        assert sender.returncode == 0, sender.stderr
        res = _result(w)
        seen = set(_result(sink))
    want = {f"{f}-{i}" for f in (4, 6) for i in range(n)}
    assert want - seen == set(), f"{len(want - seen)} lost"
    co = res["counters"]
    assert co["received"] >= 2 * n and co["sent"] == co["received"]
    assert co["send_failed"] == co["send_unconfirmed"] == 0
    assert co["detached"] > 0  # the held quarter really outlived its receive buffer
    assert co["send_calls"] < co["sent"]  # batched, not one call per packet


_CATCH = r"""
import json, socket, sys
port, fam, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET, socket.SOCK_DGRAM)
if fam == "6":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::" if fam == "6" else "0.0.0.0", port)); s.settimeout(secs)
print("ready", flush=True)
got = []
try:
    while True:
        got.append(s.recv(100).decode())
except OSError:
    pass
print(json.dumps(got), flush=True)
"""


def _spec(raw: bytes, ifindex: int, outbound: bool, loopback: bool = False) -> dict[str, Any]:
    return {"hex": raw.hex(), "ifindex": ifindex, "outbound": outbound, "loopback": loopback}


@pytest.mark.root
def test_crafted_packets_injected_inbound_outbound_and_on_loopback_arrive() -> None:
    cport = 18103
    with NetnsPair("bt") as p:
        in_a4 = _py(p, p.a, _CATCH, cport, "4", 3)
        in_a6 = _py(p, p.a, _CATCH, cport, "6", 3)
        in_b4 = _py(p, p.b, _CATCH, cport, "4", 3)
        for proc in (in_a4, in_a6, in_b4):
            assert _line(proc).strip() == "ready"
        va = int(p.run(p.a, ["cat", "/sys/class/net/va/ifindex"]).stdout)
        specs = [
            # From b to a, as if it had arrived on va.
            _spec(c.v4(p.ip4_b, p.ip4_a, c.udp(999, cport, b"in4")), va, outbound=False),
            _spec(c.v6(p.ip6_b, p.ip6_a, c.udp(999, cport, b"in6")), va, outbound=False),
            # From a to b, leaving through va.
            _spec(c.v4(p.ip4_a, p.ip4_b, c.udp(999, cport, b"out4")), va, outbound=True),
            # On a's loopback.
            _spec(c.v4("127.0.0.1", "127.0.0.1", c.udp(999, cport, b"lo4")), 1, True, True),
        ]
        w = _py(p, p.a, _WORKER, FILTER, "inject", json.dumps(specs))
        _line(w)
        res = _result(w)
        a4, a6, b4 = _result(in_a4), _result(in_a6), _result(in_b4)
    assert sorted(a4) == ["in4", "lo4"] and a6 == ["in6"] and b4 == ["out4"]
    assert res["flushed"] == 4 and res["counters"]["send_calls"] == 1


@pytest.mark.root
@pytest.mark.parametrize("bad_at", [0, 1, 2], ids=["first", "middle", "last"])
def test_a_refused_packet_is_counted_with_its_error_and_the_rest_are_sent(bad_at: int) -> None:
    cport = 18104
    with NetnsPair("bt") as p:
        in_b = _py(p, p.b, _CATCH, cport, "4", 3)
        assert _line(in_b).strip() == "ready"
        va = int(p.run(p.a, ["cat", "/sys/class/net/va/ifindex"]).stdout)
        good = [
            _spec(c.v4(p.ip4_a, p.ip4_b, c.udp(999, cport, f"g{i}".encode())), va, True)
            for i in range(2)
        ]
        # No route to 10.99.99.99 in namespace a: the library's raw-socket send fails.
        bad = _spec(c.v4(p.ip4_a, "10.99.99.99", c.udp(999, cport, b"bad")), va, True)
        specs = [*good]
        specs.insert(bad_at, bad)
        w = _py(p, p.a, _WORKER, FILTER, "inject", json.dumps(specs))
        _line(w)
        res = _result(w)
        got = _result(in_b)
    assert sorted(got) == ["g0", "g1"]
    co = res["counters"]
    assert (res["flushed"], co["sent"], co["send_failed"]) == (2, 2, 1)
    assert res["errors"] == {"ENETUNREACH": 1}
