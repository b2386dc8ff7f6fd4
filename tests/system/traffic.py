"""Small traffic programs run inside test namespaces; each prints one JSON line.

They are real applications from the kernel's point of view, so what they report (data
flowed, refused at once, timed out) is what a user's program would see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.netns import NetnsPair

SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(512)
    def serve(c):
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if data.startswith(b"bulk"):
                    while True:  # keep reading the bulk stream, never answer
                        try:
                            if not c.recv(1 << 20):
                                return
                        except OSError:
                            return
                c.sendall(data)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    while True:
        data, addr = u.recvfrom(65536)
        u.sendto(data, addr)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

TCP_PROBE = r"""
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(timeout)
t = time.monotonic(); out = {}
try:
    s.connect((host, port)); out["local_ip"], out["local_port"] = s.getsockname()[:2]
    s.sendall(b"ping"); data = s.recv(100)
    out["outcome"] = "ok" if data == b"ping" else "closed"
except ConnectionRefusedError: out["outcome"] = "refused"
except ConnectionResetError: out["outcome"] = "reset"
except (socket.timeout, TimeoutError): out["outcome"] = "timeout"
except OSError as e: out["outcome"] = "error:" + (e.strerror or str(e))
out["elapsed"] = time.monotonic() - t
print(json.dumps(out))
"""

UDP_PROBE = r"""
import json, socket, sys, time
host, port, timeout, count = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(timeout)
s.connect((host, port))
out = {"local_ip": s.getsockname()[0], "local_port": s.getsockname()[1], "replies": 0}
t = time.monotonic()
try:
    for i in range(count):
        s.send(b"dgram%d" % i)
        if s.recv(100) == b"dgram%d" % i: out["replies"] += 1
    out["outcome"] = "ok"
except ConnectionRefusedError: out["outcome"] = "refused"
except (socket.timeout, TimeoutError): out["outcome"] = "timeout"
except OSError as e: out["outcome"] = "error:" + (e.strerror or str(e))
out["elapsed"] = time.monotonic() - t
print(json.dumps(out))
"""

PING = r"""
import json, os, socket, struct, sys, time
host, timeout, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
s.settimeout(timeout)
ident = os.getpid() & 0xFFFF; replies = 0
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
for seq in range(count):
    typ = 128 if v6 else 8
    hdr = struct.pack("!BBHHH", typ, 0, 0, ident, seq) + b"kextless"
    if not v6: hdr = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
    s.sendto(hdr, (host, 0))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try: data = s.recv(2048)
        except (socket.timeout, TimeoutError): break
        icmp = data if v6 else data[(data[0] & 15) * 4:]
        if icmp[0] == (129 if v6 else 0) and struct.unpack("!H", icmp[4:6])[0] == ident:
            replies += 1; break
print(json.dumps({"replies": replies}))
"""

BULK = r"""
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(2)
s.connect((host, port)); print(json.dumps({"local_port": s.getsockname()[1]}), flush=True)
s.sendall(b"bulk"); chunk = b"x" * 65536; sent = 0; t0 = time.monotonic(); last_ok = t0
try:
    while time.monotonic() - t0 < seconds:
        s.sendall(chunk); sent += len(chunk); last_ok = time.monotonic()
    out = "completed"
except (socket.timeout, TimeoutError): out = "stalled"
except OSError as e: out = "error:" + (e.strerror or str(e))
print(json.dumps({"outcome": out, "sent": sent, "last_ok": last_ok, "t0": t0}), flush=True)
"""


#: Receives one bulk stream; prints the bytes received and the CLOCK_MONOTONIC time of the
#: last byte once the stream stops for 1.5 s (monotonic time is shared across namespaces).
BULK_SINK = r"""
import json, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(1.5); total = 0; last = time.monotonic()
try:
    while True:
        n = len(c.recv(1 << 20))
        if not n: break
        total += n; last = time.monotonic()
except (socket.timeout, TimeoutError, OSError): pass
print(json.dumps({"total": total, "last": last}), flush=True)
"""


def start_server(pair: NetnsPair, ns: str, port: int) -> subprocess.Popen[bytes]:
    proc = pair.popen(ns, [sys.executable, "-c", SERVER, str(port)])
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"ready", f"server did not start: {line!r}"
    return proc


def _json(pair: NetnsPair, ns: str, code: str, *args: object, timeout: float) -> dict[str, Any]:
    res = pair.run(ns, [sys.executable, "-c", code, *map(str, args)], timeout=timeout)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def tcp_probe(pair: NetnsPair, ns: str, host: str, port: int,
              timeout: float = 3.0) -> dict[str, Any]:
    return _json(pair, ns, TCP_PROBE, host, port, timeout, timeout=timeout + 10)


def udp_probe(pair: NetnsPair, ns: str, host: str, port: int, timeout: float = 2.0,
              count: int = 1) -> dict[str, Any]:
    return _json(pair, ns, UDP_PROBE, host, port, timeout, count,
                 timeout=timeout * count + 10)


def ping(pair: NetnsPair, ns: str, host: str, timeout: float = 2.0,
         count: int = 1) -> dict[str, Any]:
    return _json(pair, ns, PING, host, timeout, count, timeout=timeout * count + 10)
