"""Malformed and tricky packets sent INTO a guarded namespace through the whole running system.

Namespace b writes raw Ethernet frames (AF_PACKET, so no kernel sanitises lengths) onto the
veth towards namespace a, which `kextless up` guards with every verdict PermanentBlock but one
control port. Listeners in a on a TCP and a UDP port count what reaches them: nothing may
(well-formed packets behind IPv4 options and IPv6 extension chains, fragments first, later and
overlapping, a tiny first fragment, TCP with SYN+FIN / SYN+RST / no flags / all flags, bad data
offsets, truncated headers, bad IHL and lengths). Afterwards no process has restarted and the
control port still connects, so the system decided everything and kept working.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.protocol.enums import Verdict
from tests.netns import NetnsPair, netns_exec
from tests.system.harness import Answerer, Rules, System, addr, status

pytestmark = [pytest.mark.root, pytest.mark.slow]

TCP_PORT, UDP_PORT, CONTROL_PORT = 8080, 9999, 7000
MAC_A, MAC_B = bytes.fromhex("026b6c00000a"), bytes.fromhex("026b6c00000b")


class KxfPair(NetnsPair):
    """A NetnsPair whose namespaces carry this helper's prefix (kxf-)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = self.a.replace("klt-", "kxf-", 1)
        self.b = self.b.replace("klt-", "kxf-", 1)


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with KxfPair() as p:
        yield p


# ---- packets --------------------------------------------------------------------------------


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _tcp(src: bytes, dst: bytes, dport: int, flags: int, doff: int = 5, opts: bytes = b"") -> bytes:
    hdr = struct.pack("!HHIIBBHHH", 40123, dport, 1, 0, doff << 4, flags, 1024, 0, 0) + opts
    v = len(src) == 16
    pseudo = (
        src
        + dst
        + (struct.pack("!I3xB", len(hdr), 6) if v else struct.pack("!BBH", 0, 6, len(hdr)))
    )
    return hdr[:16] + struct.pack("!H", _sum(pseudo + hdr)) + hdr[18:]


def _udp(src: bytes, dst: bytes, dport: int, payload: bytes = b"kxf-probe") -> bytes:
    hdr = struct.pack("!HHHH", 40124, dport, 8 + len(payload), 0) + payload
    v = len(src) == 16
    n = len(hdr)
    pseudo = src + dst + (struct.pack("!I3xB", n, 17) if v else struct.pack("!BBH", 0, 17, n))
    return hdr[:6] + struct.pack("!H", _sum(pseudo + hdr) or 0xFFFF) + hdr[8:]


def _v4(src: bytes, dst: bytes, proto: int, l4: bytes, opts: bytes = b"", frag: int = 0,
        ident: int = 7, total: int | None = None, ihl: int | None = None) -> bytes:  # fmt: skip
    ihl = (20 + len(opts)) // 4 if ihl is None else ihl
    total = 20 + len(opts) + len(l4) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, frag, 64, proto, 0, src, dst)
    hdr += opts
    return hdr[:10] + struct.pack("!H", _sum(hdr)) + hdr[12:] + l4


def _v6(src: bytes, dst: bytes, chain: list[tuple[int, bytes]], proto: int, l4: bytes) -> bytes:
    """`chain`: (type, body after next-header) of each extension header, in order."""
    exts = b""
    for i, (_kind, body) in enumerate(chain):
        nxt = chain[i + 1][0] if i + 1 < len(chain) else proto
        exts += bytes([nxt]) + body
    first = chain[0][0] if chain else proto
    return (
        struct.pack("!IHBB16s16s", 0x60000000, len(exts) + len(l4), first, 64, src, dst) + exts + l4
    )


def _pad(units: int) -> bytes:  # hop-by-hop / destination options body: PadN to 8*(units+1)
    return bytes([units]) + b"\x01" + bytes([8 * (units + 1) - 4]) + bytes(8 * (units + 1) - 4)


def hostile(p: NetnsPair) -> list[bytes]:
    """IP packets b sends to a; none may deliver anything to a's TCP/UDP listeners."""
    s4, d4 = addr(p.ip4_b), addr(p.ip4_a)
    s6, d6 = addr(p.ip6_b), addr(p.ip6_a)
    syn4, syn6 = _tcp(s4, d4, TCP_PORT, 0x02), _tcp(s6, d6, TCP_PORT, 0x02)
    udp4, udp6 = _udp(s4, d4, UDP_PORT, b"x" * 40), _udp(s6, d6, UDP_PORT, b"x" * 40)
    nop = b"\x01\x01\x01\x01"
    out = [
        _v4(s4, d4, 6, syn4),
        _v4(s4, d4, 6, syn4, opts=nop * 2),  # IPv4 options
        _v4(s4, d4, 6, syn4, opts=b"\x07\x0b\x04" + bytes(9)),  # record route
        _v4(s4, d4, 17, udp4, opts=nop * 10),  # maximum IHL
        _v6(s6, d6, [], 6, syn6),
        _v6(s6, d6, [(0, _pad(0)), (60, _pad(1))], 6, syn6),  # hop-by-hop, dest options
        _v6(s6, d6, [(0, _pad(0)), (43, b"\x00\x00\x00" + bytes(4)), (60, _pad(0))], 17, udp6),
        _v6(s6, d6, [(60, _pad(0))] * 30, 17, udp6),  # a long chain
        _v6(s6, d6, [(44, struct.pack("!BHI", 0, 0, 9))], 17, udp6),  # atomic fragment
    ]
    for flags in (0x03, 0x06, 0x00, 0xFF, 0x29, 0x01, 0x10, 0x04):  # SYN+FIN, SYN+RST, none ...
        out.append(_v4(s4, d4, 6, _tcp(s4, d4, TCP_PORT, flags)))
        out.append(_v6(s6, d6, [], 6, _tcp(s6, d6, TCP_PORT, flags)))
    for doff in (0, 4, 6, 15):  # data offsets below 5 and past the segment
        out.append(_v4(s4, d4, 6, _tcp(s4, d4, TCP_PORT, 0x02, doff=doff)))
    # Fragments of the UDP datagram: first (MF), later, overlapping, and a tiny first one.
    body = udp4
    out += [
        _v4(s4, d4, 17, body[:24], frag=0x2000, ident=11),
        _v4(s4, d4, 17, body[24:], frag=3, ident=11),
        _v4(s4, d4, 17, body[8:], frag=1, ident=11),  # overlaps the first
        _v4(s4, d4, 6, syn4[:8], frag=0x2000, ident=12),  # tiny: ports only
        _v4(s4, d4, 6, syn4[8:], frag=1, ident=12),
        _v6(s6, d6, [(44, struct.pack("!BHI", 0, 0x0001, 13))], 17, udp6[:24]),
        _v6(s6, d6, [(44, struct.pack("!BHI", 0, 3 << 3, 13))], 17, udp6[24:]),
        _v6(s6, d6, [(44, struct.pack("!BHI", 0, 1 << 3, 13))], 17, udp6[8:]),  # overlapping
    ]
    # Damaged: truncated, bad IHL, lengths that lie.
    good = _v4(s4, d4, 17, udp4)
    out += [good[:n] for n in (1, 10, 19, 20, 24, 27)]
    out += [_v4(s4, d4, 17, udp4, ihl=ihl) for ihl in (0, 4, 15)]
    out += [_v4(s4, d4, 17, udp4, total=t) for t in (0, 10, 28, 60000)]
    out += [_v6(s6, d6, [(60, _pad(3))], 17, b"")[:60], _v6(s6, d6, [], 17, udp6)[:44]]
    return out


SENDER = r"""
import select, socket, struct, sys, time
frames = [bytes.fromhex(x) for x in sys.stdin.read().split()]
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
sniff.bind(("vb", 0))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("vb", 0))
for _ in range(3):
    for f in frames:
        s.send(f)
# Listen for a's answers: a SYN-ACK from the guarded port means a SYN reached its listener.
synacks = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    if not select.select([sniff], [], [], 0.1)[0]:
        continue
    f, meta = sniff.recvfrom(65535)
    if meta[2] == socket.PACKET_OUTGOING or len(f) < 14:
        continue
    et, ip = f[12:14], f[14:]
    if et == b"\x08\x00" and len(ip) >= 40 and ip[9] == 6:
        l4 = ip[4 * (ip[0] & 15):]
    elif et == b"\x86\xdd" and len(ip) >= 60 and ip[6] == 6:
        l4 = ip[40:]
    else:
        continue
    sport = struct.unpack("!H", l4[:2])[0] if len(l4) >= 14 else -1
    if sport == int(sys.argv[2]) and l4[13] & 0x12 == 0x12:
        synacks += 1
print(len(frames), synacks)
"""

LISTENER = r"""
import select, socket, sys, time
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
t.bind(("::", int(sys.argv[1]))); t.listen(64)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", int(sys.argv[2])))
c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
c.bind(("::", int(sys.argv[3]))); c.listen(8)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    r, _, _ = select.select([t, u, c], [], [], 0.1)
    for s in r:
        if s is u:
            data, peer = u.recvfrom(65535); print("udp", peer[0], len(data), flush=True)
        elif s is t:
            conn, peer = t.accept(); print("tcp", peer[0], flush=True); conn.close()
        else:
            conn, peer = c.accept(); print("control", peer[0], flush=True); conn.close()
"""


def _frame(ip: bytes) -> bytes:
    return MAC_A + MAC_B + (b"\x86\xdd" if ip and ip[0] >> 4 == 6 else b"\x08\x00") + ip


def _programs(system: System) -> dict[str, tuple[str, int | None]]:
    _, out = status(system)
    return {p["name"]: (p["state"], p["pid"]) for p in json.loads(out)["programs"]}


def _blast(pair: NetnsPair, rules: Rules, ips: list[bytes]) -> tuple[int, list[str], str]:
    """Bring the system up for `pair.a` with `rules`, send `ips` (three times) from b, and
    return (SYN-ACKs b saw from the guarded TCP port, the listener's lines, the logs). Asserts
    on the way that no process restarted and that the control port still connects."""
    run_root = Path(tempfile.mkdtemp(prefix="kxf-", dir="/tmp"))  # socket paths stay < 100 B
    system = System(pair, run_root, "--verdict-timeout", "3")
    answerer = None
    try:
        answerer = Answerer(system.endpoint)
        answerer.decide = rules
        answerer.start()
        before = _programs(system)
        assert all(state == "RUNNING" for state, _ in before.values()), before
        listener = pair.popen(
            pair.a,
            [sys.executable, "-c", LISTENER, TCP_PORT, UDP_PORT, CONTROL_PORT, 25],
        )
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == b"ready"
        sent = subprocess.run(
            netns_exec(pair.b, [sys.executable, "-c", SENDER, 4, TCP_PORT]),
            input=" ".join(_frame(ip).hex() for ip in ips),
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert sent.returncode == 0, sent.stderr
        n_frames, synacks = map(int, sent.stdout.split())
        assert n_frames == len(ips)
        # The system kept working: a connection the rules accept still connects.
        ok = pair.run_py(
            pair.b,
            f"import socket; socket.create_connection(({pair.ip4_a!r}, {CONTROL_PORT}), 5).close()",
            timeout=15,
        )
        assert ok.returncode == 0, ok.stderr + system.logs()
        after = _programs(system)
        assert after == before, (before, after, system.logs())  # nothing restarted
        assert answerer.errors == []
        time.sleep(0.5)
        listener.terminate()
        lines = listener.communicate(timeout=10)[0].decode().split("\n")
        assert any(line.startswith("control") for line in lines), lines
        logs = system.logs()
        assert "Traceback" not in logs, logs
        return synacks, lines, logs
    finally:
        if answerer is not None:
            answerer.stop()
        system.close()


def test_malformed_packets_into_the_namespace_pass_nothing_and_crash_nothing(
    pair: NetnsPair,
) -> None:
    rules = Rules(default=Verdict.PERMANENT_BLOCK)
    rules.by_port[(6, CONTROL_PORT)] = Verdict.PERMANENT_ACCEPT
    synacks, lines, logs = _blast(pair, rules, hostile(pair))
    assert synacks == 0, logs  # no SYN reached the listener on the blocked TCP port
    leaked = [line for line in lines if line.startswith(("tcp", "udp"))]
    assert not leaked, (leaked, logs)


def test_well_formed_packets_among_lying_ones_are_still_decided(pair: NetnsPair) -> None:
    s4, d4 = addr(pair.ip4_b), addr(pair.ip4_a)
    good = [_v4(s4, d4, 17, _udp(s4, d4, UDP_PORT, b"kxf-%03d" % i)) for i in range(20)]
    liar = _v4(s4, d4, 17, _udp(s4, d4, UDP_PORT, b"x" * 40), total=28)  # says 28, is 77
    ips = [x for g in good for x in (g, liar)]
    _, lines, logs = _blast(pair, Rules(default=Verdict.PERMANENT_ACCEPT), ips)
    # Each well-formed 7-byte datagram was sent three times: at least one copy of each arrives.
    delivered = [x for x in lines if x.startswith("udp") and x.endswith(" 7")]
    assert len(delivered) >= len(good), (len(delivered), logs[-3000:])
