"""Which divert filter shapes ask about every IP protocol without costing bulk TCP, and does ARP
survive them? (issue 8 point 4; docs/measurements.md M22)

    .venv/bin/python tests/benchmarks/bench_filter_shapes.py [--seconds 2] [--shape NAME]...

For each shape, in a fresh throw-away namespace pair: a bare diverter in `a` (a pydivert handle
with the shape's filter, reinjecting everything, optionally with the l2pass program before it)
while `a` sends bulk TCP to `b` over IPv4 and IPv6. Reports MB/s, how many packets the kernel
handed the library (`diverted`) and how many reached Python, whether protocol 253 over IPv4
and IPv6 reached Python, and whether ARP and neighbour discovery still work with MACs of the
leading nibbles 4 and 6 (flushed neighbour caches, then ping both ways). Needs root. Prints
one JSON object per shape.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actors.capture import filters
from tests.netns import NetnsPair

OLD_BASE = (
    "(tcp.Syn and not tcp.Ack) or tcp.Fin or tcp.Rst or udp or icmp"
    " or (icmpv6 and (icmpv6.Type < 130 or icmpv6.Type > 137) and icmpv6.Type != 143)"
    + "".join(
        f" or ip.Protocol == {n}" for n in (2, 4, 41, 47, 50, 51, 89, 103, 112, 115, 132, 136)
    )
)
TCP_PART = "(tcp.Syn and not tcp.Ack) or tcp.Fin or tcp.Rst"
ND = "(icmpv6 and (icmpv6.Type < 130 or icmpv6.Type > 137) and icmpv6.Type != 143)"
SHAPES: dict[str, tuple[str, bool]] = {
    # name: (filter, l2pass before the divert program)
    "old": (OLD_BASE, False),
    "negated2": (f"{TCP_PART} or (ip and not tcp and not udp) or udp or icmpv6", False),
    "ip_proto_ne": (f"{TCP_PART} or ip.Protocol != 6", False),
    "not_tcp_v6_nd": (f"{TCP_PART} or (ip and not tcp) or {ND} or (ipv6 and not tcp)", False),
    "not_tcp_l2pass": (f"{TCP_PART} or (ip and not tcp) or {ND} or (ipv6 and not tcp)", True),
    "v6_not_tcp": (f"{TCP_PART} or (ipv6 and not tcp)", True),
    "not_tcp_any": (f"{TCP_PART} or not tcp", True),
    "v6_not_tcp_first": (f"(ipv6 and not tcp) or {TCP_PART}", True),
    "new": (filters.build(frozenset()), True),
    "new_no_l2pass": (filters.build(frozenset()), False),
    "new_excl": (filters.build(frozenset(), [5555]), True),
    "new_port_excl": (filters.build(frozenset({40000}), [5555]), True),
}

DIVERTER = r"""
import json, sys, time
from pydivert import EBPFDivert
sys.path.insert(0, sys.argv[3])
filt, secs, l2 = sys.argv[1], float(sys.argv[2]), sys.argv[4] == "1"
lp = None
if l2:
    from pyroute2 import IPRoute
    from actors.capture.l2pass import L2Pass
    ipr = IPRoute(); lp = L2Pass.open(ipr)
    for link in ipr.get_links():
        lp.attach(int(link["index"]), link.get_attr("IFLA_IFNAME"))
h = EBPFDivert(filt).open()
print("ready", flush=True)
seen = p253 = 0
protos = set()
t_end = time.monotonic() + secs
while time.monotonic() < t_end:
    try:
        p = h.recv(timeout=0.05)
    except TimeoutError:
        continue
    seen += 1
    raw = bytes(p.raw)
    v = raw[0] >> 4
    pr = raw[9] if v == 4 else raw[6] if v == 6 else -1
    if pr == 253:
        protos.add(v)
    else:
        h.send(p, recalculate_checksum=False)
st = h.stats()
h.close()
if lp: lp.close()
print(json.dumps({"seen": seen, "diverted": st["diverted"], "p253": sorted(protos)}))
"""

BULK = r"""
import json, socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam); s.settimeout(10); s.connect((sys.argv[1], int(sys.argv[2])))
buf = b"x" * 65536; t0 = time.monotonic(); n = 0
while time.monotonic() - t0 < float(sys.argv[3]):
    s.sendall(buf); n += len(buf)
s.close(); print(json.dumps({"MBps": n / (time.monotonic() - t0) / 1e6}))
"""

SINK = r"""
import socket, threading
def srv(fam, host):
    s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, 18300)); s.listen(8)
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: [None for _ in iter(lambda: c.recv(1 << 20), b"")],
                         daemon=True).start()
threading.Thread(target=srv, args=(socket.AF_INET6, "::"), daemon=True).start()
srv(socket.AF_INET, "0.0.0.0")
"""

CONNECT = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
socket.create_connection((sys.argv[1], 18300), timeout=3).close()
"""

RAW253 = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, 253)
for _ in range(3):
    s.sendto(b"kextless-proto-253", (sys.argv[1], 0))
"""


def _neigh_ok(pair: NetnsPair) -> dict[str, bool]:
    out = {}
    for ns in (pair.a, pair.b):
        subprocess.run(["ip", "-n", ns, "neigh", "flush", "all"], timeout=5, check=False)
    for name, ns, dst in (
        ("arp_a_to_b", pair.a, pair.ip4_b),
        ("arp_b_to_a", pair.b, pair.ip4_a),
        ("nd_a_to_b", pair.a, pair.ip6_b),
        ("nd_b_to_a", pair.b, pair.ip6_a),
    ):
        out[name] = pair.run(ns, [sys.executable, "-c", CONNECT, dst], timeout=8).returncode == 0
    return out


def measure(name: str, filt: str, l2: bool, secs: float) -> dict:
    ok, pos, msg = __import__("pydivert").EBPFDivert.check_filter(filt)
    if not ok:
        return {"shape": name, "error": f"bad filter at {pos}: {msg}"}
    root = str(Path(__file__).resolve().parents[2])
    res: dict = {"shape": name, "l2pass": l2}
    with NetnsPair("shp") as pair:
        # MACs that libebpfdivert misreads: 6x (reads as IPv6) on a, 4x (as IPv4) on b.
        subprocess.run(
            ["ip", "-n", pair.a, "link", "set", "va", "address", "6a:6b:6c:00:00:0a"],
            timeout=5,
            check=True,
        )
        subprocess.run(
            ["ip", "-n", pair.b, "link", "set", "vb", "address", "4a:6b:6c:00:00:0b"],
            timeout=5,
            check=True,
        )
        pair.popen(pair.b, [sys.executable, "-c", SINK])
        pair.popen(pair.a, [sys.executable, "-c", SINK])
        time.sleep(0.5)
        total = 4 * secs + 14
        d = pair.popen(
            pair.a, [sys.executable, "-c", DIVERTER, filt, total, root, "1" if l2 else "0"]
        )
        assert d.stdout is not None and b"ready" in d.stdout.readline()
        for fam, dst in (("v4", pair.ip4_b), ("v6", pair.ip6_b)):
            r = pair.run(pair.a, [sys.executable, "-c", BULK, dst, 18300, secs], timeout=secs + 15)
            res[f"bulk_{fam}_MBps"] = (
                round(json.loads(r.stdout)["MBps"]) if r.returncode == 0 else r.stderr[-300:]
            )
        res.update(_neigh_ok(pair))
        for dst in (pair.ip4_a, pair.ip6_a):
            pair.run(pair.b, [sys.executable, "-c", RAW253, dst], timeout=5)
        assert d.stdout is not None
        out, err = d.communicate(timeout=total + 10)
        try:
            res.update(json.loads(out.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            res["diverter_error"] = err.decode()[-500:]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    args = ap.parse_args(argv)
    for name in args.shape or list(SHAPES):
        filt, l2 = SHAPES[name]
        print(json.dumps(measure(name, filt, l2, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
