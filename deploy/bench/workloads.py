"""The traffic: tiny Python programs run inside the namespaces (`python -c CODE ARGS`), each
printing one JSON line. The same program makes the baseline's and kextless's traffic, so the
difference is kextless. Start times are CLOCK_MONOTONIC, which every namespace shares.
"""

from __future__ import annotations

#: TCP (accept, then close at once or swallow a stream) and UDP echo, v4 and v6, one port.
SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(4096)
    while True:
        c, _ = s.accept(); c.close()
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

#: n sequential connects; every latency in ms (new 5-tuple each: a new connection to decide).
CONNECT_LATENCY = r"""
import json, socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
lat = []; failed = 0
for _ in range(n):
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    t = time.perf_counter()
    try:
        s.connect((host, port)); lat.append((time.perf_counter() - t) * 1e3)
    except OSError:
        failed += 1; break  # the measure has failed: do not wait out n timeouts
    s.close()
print(json.dumps({"ms": lat, "failed": failed}))
"""

#: n request/responses, each from a new socket (a new UDP flow to decide); ms each.
UDP_NEW_FLOW = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
lat = []; failed = 0
for _ in range(n):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(2); s.connect((host, port))
    t = time.perf_counter()
    try:
        s.send(b"x" * 64); s.recv(2048); lat.append((time.perf_counter() - t) * 1e3)
    except OSError:
        failed += 1; break  # the measure has failed: do not wait out n timeouts
    s.close()
print(json.dumps({"ms": lat, "failed": failed}))
"""

#: Connect as fast as possible from `start` for `secs`; RST on close (no TIME_WAIT), so each
#: port is used once. A connect that fails or times out (3 s) is a lost connection.
CONNECT_RATE = r"""
import json, socket, struct, sys, time
host, port, start, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
linger = struct.pack("ii", 1, 0)
while time.monotonic() < start: time.sleep(0.001)
ok = failed = 0; errors = {}
end = start + secs
while time.monotonic() < end:
    s = socket.socket(); s.settimeout(3); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    try:
        s.connect((host, port)); ok += 1
    except OSError as e:
        failed += 1; errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    s.close()
print(json.dumps({"ok": ok, "failed": failed, "errors": errors,
                  "seconds": time.monotonic() - start}))
"""

#: Count 64-byte datagrams on `port` until none came for 0.5 s after the first (or `limit` s).
UDP_SINK = r"""
import json, socket, sys, time
port, limit = int(sys.argv[1]), float(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24); u.bind(("0.0.0.0", port))
print("ready", flush=True)
u.settimeout(limit); n = 0; first = last = None
try:
    u.recv(2048); n = 1; first = last = time.monotonic(); u.settimeout(0.5)
    while True:
        u.recv(2048); n += 1; last = time.monotonic()
except OSError:
    pass
print(json.dumps({"received": n, "first": first, "last": last}), flush=True)
"""

#: One UDP flow of 64-byte datagrams at `rate` per second (0: as fast as possible) for `secs`.
UDP_BLAST = r"""
import json, socket, sys, time
host, port, rate, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((host, port))
payload = b"x" * 64; sent = 0; t0 = time.monotonic(); end = t0 + secs
s.send(payload); sent = 1; time.sleep(0.2)  # the flow's first datagram: decided, then blast
t0 = time.monotonic(); end = t0 + secs
while True:
    now = time.monotonic()
    if now >= end: break
    due = int((now - t0) * rate) if rate else sent + 256
    while sent < due:
        try:
            s.send(payload); sent += 1
        except OSError:
            break
print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}))
"""

#: Receive one TCP stream; once it stops for 1 s print the monotonic time of its last byte.
BULK_SINK = r"""
import json, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(1.0); total = 0; last = time.monotonic()
try:
    while True:
        k = len(c.recv(1 << 20))
        if not k: break
        total += k; last = time.monotonic()
except OSError:
    pass
print(json.dumps({"total": total, "last": last}), flush=True)
"""

#: Stream to the sink for `secs`; print the local port first so the client can Update it.
BULK_SENDER = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=2)
print(json.dumps({"local_port": s.getsockname()[1]}), flush=True)
chunk = b"x" * 65536; end = time.monotonic() + secs
try:
    while time.monotonic() < end: s.sendall(chunk)
except OSError:
    pass
"""

#: Open n TCP connections (to a server that keeps them), giving up after `limit` seconds, and
#: hold them until killed.
HOLD_CLIENT = r"""
import json, resource, socket, sys, time
host, port, n, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
socks = []; failed = 0; end = time.monotonic() + limit
for _ in range(n):
    if time.monotonic() > end: break
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); socks.append(s)
    except OSError:
        failed += 1; s.close()
print(json.dumps({"open": len(socks), "failed": failed}), flush=True)
import threading; threading.Event().wait()
"""

HOLD_SERVER = r"""
import resource, socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(4096); print("ready", flush=True); kept = []
while True:
    c, _ = s.accept(); kept.append(c)
"""
