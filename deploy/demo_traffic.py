"""The demo's servers and clients: `python -m kextless.deploy.demo_traffic ROLE ARGS...`.

`kextless demo` starts each role as its own process inside a sandbox namespace (`ip netns exec
NS python -m ...`), so every connection kextless decides has a real process behind it. Each
process names itself (prctl PR_SET_NAME: its /proc/PID/comm) before it opens a socket, so the
policy's process column reads `demo-web`, `demo-dns`, ... instead of `python3` for all.

Servers print `ready` on stdout once listening, then serve until killed. Clients do one thing,
print one JSON line (`{"ok": ..., "detail": ..., "local": [ip, port], ...}`) and exit 0
whatever happened: the demo compares the outcome with what the rule should have done.

Only the standard library: the demo must run on a fresh machine with nothing but kextless
installed. The resolver is a few lines because it only ever answers one A record (and the
"upstream" one in the sandbox's internet another, so a redirected query is recognisable).
"""

from __future__ import annotations

import ctypes
import json
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PR_SET_NAME = 15
#: What a plain GET of the demo web server returns.
WEB_BODY = b"hello from the kextless demo's internet\n"
BULK_CHUNK = 64 * 1024


def set_name(name: str) -> None:
    """Name this process (comm, 15 bytes) so the policy's process column is the step's role."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _out(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _ready() -> None:
    print("ready", flush=True)


# ---- DNS: one A record -------------------------------------------------------------------------


def dns_query(name: str, qid: int = 0x6B78) -> bytes:
    """A standard query for `name` IN A, recursion desired."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)
    )


def dns_answer(query: bytes, address: str) -> bytes | None:
    """The reply to `query` with one A record `address` (TTL 60), or None if it is not a query
    with one question (then the resolver stays silent, as a real one drops garbage)."""
    if len(query) < 17:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    end = 12
    while end < len(query) and query[end] != 0:
        end += query[end] + 1
    question = query[12 : end + 5]
    if len(question) != end + 5 - 12:
        return None
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    record = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    return header + question + record


def dns_first_a(reply: bytes) -> str | None:
    """The first A record's address in a reply to `dns_query` (one question, our own format)."""
    if len(reply) < 12 or struct.unpack("!H", reply[6:8])[0] == 0:
        return None
    end = 12
    while end < len(reply) and reply[end] != 0:
        end += reply[end] + 1
    pos = end + 5  # the question's terminating zero, qtype, qclass
    while pos + 12 <= len(reply):
        if reply[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while pos < len(reply) and reply[pos] != 0:
                pos += reply[pos] + 1
            pos += 1
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(reply[pos : pos + 4])
        pos += rdlen
    return None


def serve_dns(host: str, port: int, address: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    _ready()
    while True:
        query, peer = sock.recvfrom(2048)
        reply = dns_answer(query, address)
        if reply is not None:
            sock.sendto(reply, peer)


# ---- the sandbox's internet --------------------------------------------------------------------


class _Web(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(WEB_BODY)))
        self.end_headers()
        self.wfile.write(WEB_BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _V6Web(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Bulk(socketserver.BaseRequestHandler):
    """Sends the number of bytes the client asks for (its first line), then closes."""

    def handle(self) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 32:
            got = self.request.recv(32)
            if not got:
                return
            line += got
        left = int(line.strip() or 0)
        chunk = b"k" * BULK_CHUNK
        while left > 0:
            self.request.sendall(chunk[: min(left, BULK_CHUNK)])
            left -= BULK_CHUNK


class _Echo(socketserver.StreamRequestHandler):
    """TCP echo, line by line: the live connection the demo's reload step cuts."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve_internet(upstream_dns: str, upstream_answer: str) -> None:
    """kxd-net: HTTP on port 80 (every address, v4 and v6), bulk on 9000, UDP echo on 5005,
    TCP line echo on 7007 and an "upstream" resolver whose answer differs from the local
    one's."""
    servers: list[Callable[[], object]] = []
    web = _V6Web(("::", 80), _Web)
    web.daemon_threads = True
    servers.append(web.serve_forever)
    servers.append(_ThreadingTCP(("0.0.0.0", 9000), _Bulk).serve_forever)
    servers.append(socketserver.UDPServer(("0.0.0.0", 5005), _UdpEcho).serve_forever)
    servers.append(_ThreadingTCP(("0.0.0.0", 7007), _Echo).serve_forever)
    servers.append(lambda: serve_dns(upstream_dns, 53, upstream_answer))
    for run in servers:
        threading.Thread(target=run, daemon=True).start()
    # serve_dns prints its own "ready"; the others are listening already.
    while True:
        time.sleep(3600)


def serve_inbound(port: int) -> None:
    """kxd-host: a service reached from the internet; greets and reports who connected."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    _ready()
    while True:
        conn, _peer = srv.accept()
        with conn:
            conn.sendall(b"hello from kxd-host\n")


# ---- clients -----------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound_socket(host: str, kind: socket.SocketKind, timeout: float) -> socket.socket:
    """A socket with its ephemeral port chosen before connecting, so the port is known
    (and reported) even when the connection is refused or dropped."""
    sock = socket.socket(_family(host), kind)
    sock.settimeout(timeout)
    sock.bind(("::" if ":" in host else "0.0.0.0", 0))
    return sock


def client_http(host: str, port: int, timeout: float) -> None:
    sock = _bound_socket(host, socket.SOCK_STREAM, timeout)
    t0 = time.monotonic()
    local: tuple[object, ...] = _bound(sock)
    try:
        sock.connect((host, port))
        local = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {shown}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        status = data.split(b"\r\n", 1)[0].decode(errors="replace")
        ok = status.split()[1:2] == ["200"] and data.endswith(WEB_BODY)
        _out(ok=ok, detail=f"{status}, {len(data)} bytes", local=local, received=len(data))
    except ConnectionRefusedError:
        _out(ok=False, refused=True, detail=f"refused (reset) after {_ms(t0)}", local=local)
    except ConnectionResetError:
        _out(ok=False, refused=True, detail=f"reset after {_ms(t0)}", local=local)
    except TimeoutError:
        _out(ok=False, timeout=True, detail=f"no answer in {timeout:g} s", local=local)
    except OSError as exc:
        _out(ok=False, detail=f"{type(exc).__name__}: {exc}", local=local)
    finally:
        sock.close()


def _bound(sock: socket.socket) -> tuple[object, ...]:
    try:
        return tuple(sock.getsockname()[:2])
    except OSError:
        return ()


def _ms(t0: float) -> str:
    return f"{(time.monotonic() - t0) * 1000:.0f} ms"


def client_dns(server: str, name: str, timeout: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.connect((server, 53))
        sock.send(dns_query(name))
        reply, peer = sock.recvfrom(2048)
        answer = dns_first_a(reply)
        _out(ok=answer is not None, answer=answer, peer=list(peer), local=sock.getsockname()[:2],
             detail=f"{name} A {answer} (reply from {peer[0]}:{peer[1]})")  # fmt: skip
    except TimeoutError:
        _out(ok=False, detail=f"no answer in {timeout:g} s", local=_bound(sock))
    except OSError as exc:
        _out(ok=False, detail=f"{type(exc).__name__}: {exc}", local=_bound(sock))
    finally:
        sock.close()


def client_udp(host: str, port: int, count: int, timeout: float) -> None:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    echoed = 0
    try:
        sock.connect((host, port))
        for i in range(count):
            payload = f"datagram {i}".encode() * 8
            sock.send(payload)
            if sock.recv(2048) == payload:
                echoed += 1
        _out(ok=echoed == count, detail=f"{echoed}/{count} datagrams echoed",
             local=sock.getsockname()[:2])  # fmt: skip
    except (TimeoutError, OSError) as exc:
        _out(ok=False, detail=f"{echoed}/{count} echoed, then {type(exc).__name__}",
             local=_bound(sock))  # fmt: skip
    finally:
        sock.close()


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    n: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while n >> 16:
        n = (n & 0xFFFF) + (n >> 16)
    return ~n & 0xFFFF


def client_ping(host: str, count: int, timeout: float) -> None:
    """ICMP echo through a raw socket (no ping binary needed; the demo runs as root)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(timeout)
    replies, ident = 0, 0x6B78
    rtts: list[float] = []
    for seq in range(count):
        body = struct.pack("!HH", ident, seq) + b"kextless demo"
        hdr = struct.pack("!BBH", 8, 0, 0)
        sock.sendto(struct.pack("!BBH", 8, 0, _checksum(hdr + body)) + body, (host, 0))
        t0 = time.monotonic()
        end = t0 + timeout
        while time.monotonic() < end:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            icmp = data[(data[0] & 15) * 4 :]
            if icmp[0] == 0 and icmp[4:8] == struct.pack("!HH", ident, seq):
                replies += 1
                rtts.append((time.monotonic() - t0) * 1000)
                break
    rtt = f", rtt {min(rtts):.1f} ms" if rtts else ""
    _out(ok=replies == count, detail=f"{replies}/{count} echo replies{rtt}", local=["", 0])
    sock.close()


def client_bulk(host: str, port: int, size: int, timeout: float) -> None:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    got = 0
    t0 = time.monotonic()
    try:
        sock.connect((host, port))
        local = sock.getsockname()[:2]
        sock.sendall(f"{size}\n".encode())
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
        secs = time.monotonic() - t0
        secs = max(secs, 1e-6)
        mib = got / (1 << 20)
        _out(ok=got == size, detail=f"{mib:.1f} MB in {secs:.2f} s ({mib / secs:.0f} MB/s)",
             local=local, received=got)  # fmt: skip
    except (TimeoutError, OSError) as exc:
        _out(ok=False, detail=f"{got} bytes, then {type(exc).__name__}: {exc}", local=_bound(sock))
    finally:
        sock.close()


def client_banner(host: str, port: int, timeout: float) -> None:
    """From the internet into kxd-host: connect, read the greeting."""
    client_http_like = socket.socket(_family(host), socket.SOCK_STREAM)
    client_http_like.settimeout(timeout)
    try:
        client_http_like.connect((host, port))
        local = client_http_like.getsockname()[:2]
        data = client_http_like.recv(256)
        ok = data == b"hello from kxd-host\n"
        _out(ok=ok, detail=f"greeting {data.decode(errors='replace').strip()!r}", local=local)
    except (TimeoutError, OSError) as exc:
        _out(ok=False, detail=f"{type(exc).__name__}: {exc}", local=_bound(client_http_like))
    finally:
        client_http_like.close()


def client_chat(host: str, port: int, seconds: float) -> None:
    """A live connection: one line every 0.2 s, each echoed back, for up to `seconds`. Prints
    `{"connected": ...}` once the first echo is back, then the result when the connection
    ends (or the time is up: then ok is false, nothing cut it)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.settimeout(2.0)
    echoed, t0 = 0, time.monotonic()
    local: tuple[object, ...] = ()
    try:
        sock.connect((host, port))
        local = tuple(sock.getsockname()[:2])
        while time.monotonic() - t0 < seconds:
            line = f"line {echoed}\n".encode()
            sock.sendall(line)
            got = b""
            while not got.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    raise ConnectionResetError("closed by the peer")
                got += chunk
            echoed += 1
            if echoed == 1:
                _out(connected=True, local=local)
            time.sleep(0.2)
        _out(ok=False, detail=f"{echoed} lines echoed, never cut", local=local, echoed=echoed)
    except (TimeoutError, OSError) as exc:
        detail = f"{echoed} lines echoed, then {type(exc).__name__} after {_ms(t0)}"
        _out(ok=echoed > 0, cut=True, echoed=echoed, local=local, detail=detail)
    finally:
        sock.close()


# ---- dispatch ----------------------------------------------------------------------------------

_ROLES: dict[str, Callable[..., None]] = {
    "internet": lambda dns, answer: serve_internet(dns, answer),
    "resolver": lambda host, port, answer: serve_dns(host, int(port), answer),
    "inbound-server": lambda port: serve_inbound(int(port)),
    "http": lambda host, port, t: client_http(host, int(port), float(t)),
    "dns": lambda server, name, t: client_dns(server, name, float(t)),
    "udp": lambda host, port, n, t: client_udp(host, int(port), int(n), float(t)),
    "ping": lambda host, n, t: client_ping(host, int(n), float(t)),
    "bulk": lambda host, port, size, t: client_bulk(host, int(port), int(size), float(t)),
    "chat": lambda host, port, secs: client_chat(host, int(port), float(secs)),
    "banner": lambda host, port, t: client_banner(host, int(port), float(t)),
}


def main(argv: list[str]) -> int:
    """`NAME ROLE ARGS...`: name the process NAME, then play ROLE."""
    if len(argv) < 2 or argv[1] not in _ROLES:
        print(f"usage: demo_traffic NAME ROLE ARGS ({', '.join(_ROLES)})", file=sys.stderr)
        return 2
    set_name(argv[0])
    try:
        _ROLES[argv[1]](*argv[2:])
    except TypeError as exc:
        print(f"demo_traffic {argv[1]}: bad arguments: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
