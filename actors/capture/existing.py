"""The TCP connections that already exist in this namespace, read from the kernel.

A connection established before the capture's handle opened is invisible to the base filter
(established TCP is not diverted), so nobody would ever be asked about it. At start the shell
reads the namespace's sockets with socket diagnostics (NETLINK_SOCK_DIAG, through pyroute2's
DiagSocket) and hands the flows to the core (`CaptureCore.existing`). The read runs in a child
process (`python -m kextless.actors.capture.existing`, which writes the flows to its stdout as
msgpack): 10 000 sockets take about a second of pure-Python parsing, which in the capture's
own process would compete with its loop for the interpreter lock.

Only TCP in synchronized states is read (established, and closing but not yet closed):
SYN_SENT's retransmitted SYN and a new SYN_RECV's next SYN match the base filter anyway, and
UDP needs nothing - every UDP packet reaches the core, and one of a flow with no verdict is
asked about. A socket whose local port is a listening port is an accepted (inbound) connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
from pyroute2 import DiagSocket
from pyroute2.netlink import NETLINK_SOCK_DIAG, NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.diag import (
    SOCK_DESTROY,
    SS_CLOSE_WAIT,
    SS_CLOSING,
    SS_ESTABLISHED,
    SS_FIN_WAIT1,
    SS_FIN_WAIT2,
    SS_LAST_ACK,
    SS_LISTEN,
    inet_diag_req,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkSocket

from kextless.actors.capture.core import ExistingFlow
from kextless.protocol.enums import Direction, IpProtocol
from kextless.protocol.messages import Flow

log = logging.getLogger("capture.existing")

#: Synchronized TCP states: data may still flow without any SYN, so only a scan finds them.
SYNCHRONIZED = frozenset(
    {SS_ESTABLISHED, SS_FIN_WAIT1, SS_FIN_WAIT2, SS_CLOSE_WAIT, SS_CLOSING, SS_LAST_ACK}
)
_CONNECTED_MASK = sum(1 << s for s in SYNCHRONIZED)
_LISTEN_MASK = 1 << SS_LISTEN
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _packed(text: str) -> bytes:
    """An address as raw bytes; a v4-mapped v6 address (a dual-stack socket) as plain v4,
    which is what its packets carry."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def flows_from(
    connected: Iterable[Mapping[str, Any]], listening: Iterable[Mapping[str, Any]]
) -> list[ExistingFlow]:
    """Turn sock_diag answers (inet_diag_msg fields) into flows with their direction.

    Both ends of a connection inside this namespace (loopback, or between two local
    addresses) are two sockets; the capture reports such a connection once, as outbound
    (what its packets look like on `lo`), so only the client's end is kept.
    """
    listen_ports = {int(m["idiag_sport"]) for m in listening}
    out: list[ExistingFlow] = []
    seen: set[Flow] = set()
    for m in connected:
        if int(m["idiag_state"]) not in SYNCHRONIZED:
            continue
        try:
            flow = Flow(
                int(IpProtocol.TCP),
                _packed(m["idiag_src"]),
                int(m["idiag_sport"]),
                _packed(m["idiag_dst"]),
                int(m["idiag_dport"]),
            )
        except (KeyError, ValueError) as e:
            log.warning("unreadable socket diagnostics entry skipped: %s", e)
            continue
        if flow in seen:
            continue  # a v4-mapped dual-stack socket also answered as v6
        seen.add(flow)
        inbound = flow.local_port in listen_ports
        out.append(ExistingFlow(flow, Direction.INBOUND if inbound else Direction.OUTBOUND))
    local = {(e.flow.local_ip, e.flow.local_port) for e in out}
    return [
        e
        for e in out
        if e.direction is Direction.OUTBOUND or (e.flow.remote_ip, e.flow.remote_port) not in local
    ]


_FIELDS = ("idiag_state", "idiag_src", "idiag_sport", "idiag_dst", "idiag_dport")


def read() -> list[ExistingFlow]:
    """The namespace's synchronized TCP connections (IPv4 and IPv6), from the kernel.

    Raises OSError if socket diagnostics are unavailable (the caller logs it)."""
    connected: list[Mapping[str, Any]] = []
    listening: list[Mapping[str, Any]] = []
    with DiagSocket() as ds:
        ds.bind()
        for family in _FAMILIES:
            for mask, into in ((_CONNECTED_MASK, connected), (_LISTEN_MASK, listening)):
                answers = ds.get_sock_stats(family=family, states=mask, protocol=socket.IPPROTO_TCP)
                into.extend({k: msg.get(k) for k in _FIELDS} for msg in answers)
    return flows_from(connected, listening)


#: inet_diag_sockid's "any socket with this tuple" cookie (INET_DIAG_NOCOOKIE, ~0).
_NOCOOKIE = (1 << 64) - 1


def _words(ip: bytes) -> tuple[int, int, int, int]:
    """An address as inet_diag_sockid's four big-endian 32-bit words (v4 in the first)."""
    padded = ip.ljust(16, b"\0")
    return (
        int.from_bytes(padded[0:4], "big"),
        int.from_bytes(padded[4:8], "big"),
        int.from_bytes(padded[8:12], "big"),
        int.from_bytes(padded[12:16], "big"),
    )


def destroy_request(flow: Flow) -> inet_diag_req:
    """The SOCK_DESTROY request for the TCP socket whose local end is `flow`'s local side.

    pyroute2 has the message (inet_diag_req) and the type, but no call that sends it."""
    req = inet_diag_req()
    req["sdiag_family"] = socket.AF_INET6 if flow.is_v6 else socket.AF_INET
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = _CONNECTED_MASK
    req["idiag_sport"] = flow.local_port
    req["idiag_dport"] = flow.remote_port
    req["idiag_src"] = _words(flow.local_ip)
    req["idiag_dst"] = _words(flow.remote_ip)
    req["idiag_if"] = 0
    req["idiag_cookie"] = _NOCOOKIE
    return req


class Destroyer:
    """Aborts local TCP sockets through sock_diag SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY).

    The kernel's abort (tcp_abort) reports ECONNABORTED to the socket's owner and sends the
    peer an RST numbered from the socket's own state. One netlink socket, opened on first use:
    a plain pyroute2 NetlinkSocket, whose marshal reads the kernel's NLMSG_ERROR answer (the
    DiagSocket's does not: it takes type 2 for an AF_INET socket entry, so a refusal would
    go unseen).
    """

    def __init__(self) -> None:
        self._ds: NetlinkSocket | None = None

    def destroy(self, flow: Flow) -> int:
        """Abort the sockets of `flow` here: its local end and, when both ends are local
        (loopback), the other one. Returns how many there were; raises OSError if the
        kernel refuses (e.g. EOPNOTSUPP without CONFIG_INET_DIAG_DESTROY)."""
        if self._ds is None:
            ds = NetlinkSocket(NETLINK_SOCK_DIAG)
            ds.bind()
            self._ds = ds
        done = 0
        rev = Flow(flow.protocol, flow.remote_ip, flow.remote_port, flow.local_ip, flow.local_port)
        for f in (flow, rev):  # the reverse is there only if the remote end is local too
            try:
                tuple(
                    self._ds.nlm_request(
                        destroy_request(f), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK
                    )
                )
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    continue  # no such socket (the other end of a remote connection)
                raise OSError(e.code, f"SOCK_DESTROY refused: {e}") from e
            done += 1
        return done

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None


#: How a child's scan travels to the capture (`encode` in the child, `decode` in the shell).
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[ExistingFlow])


def encode(flows: list[ExistingFlow]) -> bytes:
    return _ENCODER.encode(flows)


def decode(data: bytes) -> list[ExistingFlow]:
    """A child's answer; raises msgspec.DecodeError/ValidationError if it is not one."""
    return _DECODER.decode(data)


def main() -> int:
    """The child process: read this namespace's connections, write them to stdout."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="existing: %(message)s")
    with contextlib.suppress(OSError):
        # Background work: the capture runs at nice -10 (so do we, its child); never take a
        # CPU from its loop or the traffic it serves.
        os.setpriority(os.PRIO_PROCESS, 0, 10)
    try:
        flows = read()
    except OSError as e:
        print(f"existing: socket diagnostics unavailable: {e}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(encode(flows))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
