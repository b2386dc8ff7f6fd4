"""Tiny real applications for the real-traffic tests and benchmarks, run inside namespaces.

Each client prints one JSON line with what the application saw: "ok" (data flowed),
"refused" (ECONNREFUSED / RST at once), "reset", "timeout", plus the elapsed seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.netns import NetnsPair

#: TCP + UDP echo server on all addresses (v4 and v6); "bulk" streams are swallowed.
ECHO_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1]); host = sys.argv[2] if len(sys.argv) > 2 else "::"
fam = socket.AF_INET if "." in host else socket.AF_INET6
def tcp():
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port)); s.listen(512)
    def serve(c):
        with c:
            try:
                c.sendall(b"hello from " + repr(c.getsockname()[:2]).encode()
                          + b" to " + repr(c.getpeername()[:2]).encode())
                bulk = False
                while True:
                    data = c.recv(1 << 20)
                    if not data:
                        return
                    bulk = bulk or data.startswith(b"bulk")
                    if not bulk:
                        c.sendall(b"echo " + data)
            except OSError:
                return
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp():
    u = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind((host, port))
    while True:
        data, addr = u.recvfrom(65536)
        u.sendto(b"echo " + repr(addr[:2]).encode() + b" " + data, addr)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

TCP_CLIENT = r"""
import errno, json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(timeout)
t = time.monotonic(); out = {}
try:
    s.connect((host, port))
    out["local"] = list(s.getsockname()[:2]); out["peer"] = list(s.getpeername()[:2])
    data = s.recv(1000)
    out["data"] = data.decode(errors="replace")
    out["result"] = "ok" if data else "closed"
except ConnectionRefusedError:
    out["result"] = "refused"
except ConnectionResetError:
    out["result"] = "reset"
except (socket.timeout, TimeoutError):
    out["result"] = "timeout"
except OSError as e:
    out["result"] = errno.errorcode.get(e.errno, str(e))
out["elapsed"] = time.monotonic() - t
print(json.dumps(out))
"""

UDP_CLIENT = r"""
import errno, json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(timeout)
if len(sys.argv) > 5:  # raw IPv4 options (hex), e.g. NOPs: the header grows beyond 20 bytes
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes.fromhex(sys.argv[5]))
t = time.monotonic(); out = {"replies": []}
try:
    s.connect((host, port))
    out["local"] = list(s.getsockname()[:2])
    for i in range(count):
        s.send(b"ping%d" % i)
        data, peer = s.recvfrom(2000)
        out["replies"].append(data.decode(errors="replace")); out["peer"] = list(peer[:2])
    out["result"] = "ok"
except ConnectionRefusedError:
    out["result"] = "refused"
except (socket.timeout, TimeoutError):
    out["result"] = "timeout"
except OSError as e:
    out["result"] = errno.errorcode.get(e.errno, str(e))
out["elapsed"] = time.monotonic() - t
print(json.dumps(out))
"""

#: Stream bytes for `secs` seconds; report progress times so a mid-stream block is measurable.
BULK_CLIENT = r"""
import errno, json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(5)
s.connect((host, port)); s.recv(1000)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
buf = b"bulk" + b"x" * 65532
t0 = time.monotonic(); sent = 0; last_ok = t0; out = {"local": list(s.getsockname()[:2])}
print(json.dumps({"started": out["local"]}), flush=True)
s.settimeout(0.05)
try:
    while time.monotonic() - t0 < secs:
        try:
            sent += s.send(buf); last_ok = time.monotonic()
        except (socket.timeout, TimeoutError):
            continue
    out["result"] = "finished"
except OSError as e:
    out["result"] = errno.errorcode.get(e.errno, str(e))
out["sent"] = sent; out["elapsed"] = time.monotonic() - t0
out["last_ok_at"] = last_ok - t0; out["error_wall"] = time.time()
print(json.dumps(out), flush=True)
"""

#: Connect, say "connected", then for each stdin line send it and print the answer (JSON).
INTERACTIVE_TCP = r"""
import errno, json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
s.connect((host, port)); s.recv(1000)
print(json.dumps({"connected": list(s.getsockname()[:2])}), flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.strip().encode()); out = {"result": "ok", "data": s.recv(1000).decode()}
    except (socket.timeout, TimeoutError):
        out = {"result": "timeout"}
    except OSError as e:
        out = {"result": errno.errorcode.get(e.errno, str(e))}
    print(json.dumps(out), flush=True)
"""

#: Raw-socket ICMP(v6) echo: send `count` requests, report how many replies came back.
PING = r"""
import json, os, socket, struct, sys, time
host, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
kind = sys.argv[4] if len(sys.argv) > 4 else "raw"  # raw, or dgram: a ping socket
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                  socket.SOCK_RAW if kind == "raw" else socket.SOCK_DGRAM,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
s.settimeout(timeout)
def csum(b):
    b += b"\0" * (len(b) % 2); n = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while n >> 16: n = (n & 0xFFFF) + (n >> 16)
    return ~n & 0xFFFF
replies = 0
for i in range(count):
    body = struct.pack("!HH", 4242, i) + b"kextless"
    hdr = struct.pack("!BBH", 128 if v6 else 8, 0, 0)
    pkt = hdr + body if v6 else struct.pack("!BBH", 8, 0, csum(hdr + body)) + body
    s.sendto(pkt, (host, 0))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            data = s.recv(2000)
        except (socket.timeout, TimeoutError):
            break
        icmp = data[(data[0] & 15) * 4:] if (kind == "raw" and not v6) else data
        # A ping socket's kernel rewrites the identifier: match the sequence number only.
        if icmp[0] == (129 if v6 else 0) and icmp[6:8] == struct.pack("!H", i):
            replies += 1
            break
print(json.dumps({"replies": replies, "sent": count, "pid": os.getpid()}))
"""

#: Open `n` TCP connections at once (non-blocking connects), report how many completed.
MANY_CONNECTS = r"""
import json, selectors, socket, sys, time
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector(); socks = []
for _ in range(n):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((host, port)); sel.register(s, selectors.EVENT_WRITE); socks.append(s)
ok = failed = 0; end = time.monotonic() + timeout
while ok + failed < n and time.monotonic() < end:
    for key, _ in sel.select(0.1):
        err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        ok, failed = (ok + 1, failed) if err == 0 else (ok, failed + 1)
        sel.unregister(key.fileobj)
print(json.dumps({"ok": ok, "failed": failed, "n": n,
                  "ports": sorted(s.getsockname()[1] for s in socks)}))
"""

#: A resolver-like UDP server and a TCP server on one address (e.g. 127.0.0.1:53 / :717).
LOCAL_SERVICE = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((host, port))
t = socket.socket(fam, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((host, port)); t.listen(64)
def udp():
    while True:
        data, addr = u.recvfrom(2000)
        u.sendto(b"local-service saw " + repr(addr[:2]).encode(), addr)
def tcp():
    while True:
        c, addr = t.accept()
        c.sendall(b"local-service saw " + repr(addr[:2]).encode()); c.close()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


#: Connect, print {"local_port"}, then stream for `seconds` (no greeting needed).
BULK_SENDER = r"""
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


def start(pair: NetnsPair, ns: str, code: str, *args: object) -> subprocess.Popen[bytes]:
    """Start a server program in `ns` and wait for its "ready" line."""
    proc = pair.popen(ns, [sys.executable, "-c", code, *map(str, args)])
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        raise RuntimeError(f"server failed: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc


def run(pair: NetnsPair, ns: str, code: str, *args: object, timeout: float = 15) -> dict[str, Any]:
    """Run a client program in `ns` and return its JSON report."""
    r = (
        pair.run_py(ns, code + "\n", timeout=timeout)
        if not args
        else pair.run(ns, [sys.executable, "-c", code, *map(str, args)], timeout=timeout)
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"client printed nothing: rc={r.returncode} {r.stderr[-2000:]}")
    return json.loads(lines[-1])
