"""A minimal NETLINK_SOCK_DIAG reader: the namespace's TCP/UDP sockets, fast enough per connect.

pyroute2's DiagSocket parses every answer into nested objects (milliseconds per dump, under
the GIL), which is what an outbound TCP connect's attribution waited for. This reads the
fixed-layout inet_diag_msg structs with one `struct` call each (linux/inet_diag.h), and asks
for nothing but the base message (no extensions).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, ext, pad, states, then a zero sockid (48 bytes).
_REQ = struct.Struct("=BBBBI48x")
_PORTS = struct.Struct(">HH")


@dataclass(frozen=True, slots=True)
class DiagRow:
    state: int
    src: bytes  # 4 or 16 bytes; a v4-mapped IPv6 address as 4
    sport: int
    dst: bytes
    dport: int
    cookie: int
    inode: int


def _addr(family: int, raw: bytes) -> bytes:
    if family == socket.AF_INET:
        return raw[:4]
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return raw[12:]
    return raw


class SockDiag:
    """One netlink socket; `dump` may be called any number of times (not thread-safe)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self._sock.bind((0, 0))
        self._seq = 0

    def dump(self, family: int, protocol: int, states: int) -> list[DiagRow]:
        """Every socket of `family`/`protocol` whose state bit is set in `states`."""
        self._seq += 1
        body = _REQ.pack(family, protocol, 0, 0, states)
        hdr = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body),
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            self._seq,
            0,
        )
        self._sock.send(hdr + body)
        rows: list[DiagRow] = []
        while True:
            data = self._sock.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    return rows
                if seq != self._seq:
                    off += (length + 3) & ~3
                    continue
                if mtype == NLMSG_DONE:
                    return rows
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    if err:
                        raise OSError(-err, f"sock_diag: {-err}")
                    return rows
                if mtype == SOCK_DIAG_BY_FAMILY:
                    start = off + _NLMSGHDR.size
                    fam, state = data[start], data[start + 1]
                    sport, dport = _PORTS.unpack_from(data, start + 4)
                    src = data[start + 8 : start + 24]
                    dst = data[start + 24 : start + 40]
                    c0, c1 = struct.unpack_from("=II", data, start + 44)
                    (inode,) = struct.unpack_from("=I", data, start + 68)
                    rows.append(
                        DiagRow(
                            state,
                            _addr(fam, src),
                            sport,
                            _addr(fam, dst),
                            dport,
                            c0 | (c1 << 32),
                            inode,
                        )
                    )
                off += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
