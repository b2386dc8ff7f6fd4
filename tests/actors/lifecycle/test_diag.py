"""The sock_diag reader and the divert-event decoding, against real loopback sockets."""

from __future__ import annotations

import socket
import struct
from types import SimpleNamespace

from pydivert.consts import Layer

from kextless.actors.lifecycle.core import FlowEvent, SocketEvent
from kextless.actors.lifecycle.diag import SockDiag
from kextless.actors.lifecycle.shell import address, event_from

SO_COOKIE = 57
_SYN_SENT, _ESTABLISHED, _LISTEN = 2, 1, 10


def cookie(s: socket.socket) -> int:
    return int(struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def test_a_connected_socket_is_found_by_its_cookie_with_its_tuple() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as c:
            d = SockDiag()
            try:
                rows = {r.cookie: r for r in d.dump(socket.AF_INET, 6, 1 << _ESTABLISHED)}
                listening = {r.cookie: r for r in d.dump(socket.AF_INET, 6, 1 << _LISTEN)}
            finally:
                d.close()
            r = rows[cookie(c)]
            assert (r.src, r.sport) == (bytes([127, 0, 0, 1]), c.getsockname()[1])
            assert (r.dst, r.dport) == (bytes([127, 0, 0, 1]), srv.getsockname()[1])
            assert r.state == _ESTABLISHED and r.inode > 0
            assert cookie(srv) in listening and cookie(c) not in listening


def test_ipv6_and_v4_mapped_addresses() -> None:
    with socket.socket(socket.AF_INET6) as srv:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind(("::", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with (
            socket.create_connection(("::1", port)) as c6,
            socket.create_connection(("127.0.0.1", port)),
        ):
            d = SockDiag()
            try:
                rows = d.dump(socket.AF_INET6, 6, 1 << _ESTABLISHED)
            finally:
                d.close()
            mine = [r for r in rows if r.dport == port]
            assert {r.src for r in mine} >= {socket.inet_pton(socket.AF_INET6, "::1")}
            accepted = [r for r in rows if r.sport == port]
            assert bytes([127, 0, 0, 1]) in {r.src for r in accepted}  # v4-mapped, as 4 bytes
            assert cookie(c6) in {r.cookie for r in rows}


def test_divert_addresses_least_significant_word_first() -> None:
    assert address([0x7F000001, 0xFFFF, 0, 0]) == bytes([127, 0, 0, 1])
    assert address([0, 0xFFFF, 0, 0]) == bytes(4)  # 0.0.0.0 comes v4-mapped too
    assert address([1 << 24, 0, 0, 0]) == socket.inet_pton(socket.AF_INET6, "::100:0")


def test_event_from_reads_flow_and_socket_events() -> None:
    data = SimpleNamespace(
        Protocol=6,
        LocalAddr=[0x0A000001, 0xFFFF, 0, 0],
        RemoteAddr=[0x0A000002, 0xFFFF, 0, 0],
        LocalPort=40000,
        RemotePort=443,
        ProcessId=77,
        EndpointId=9,
    )
    ev = event_from(Layer.FLOW, 1, data)
    assert ev is not None and ev.event is FlowEvent.ESTABLISHED
    assert (ev.process_id, ev.endpoint_id, ev.flow.local_port) == (77, 9, 40000)
    assert ev.flow.remote_ip == bytes([10, 0, 0, 2])
    sock = event_from(Layer.SOCKET, 4, data)
    assert sock is not None and sock.event is SocketEvent.CONNECT
    assert event_from(Layer.SOCKET, 99, data) is None
    assert event_from(Layer.FLOW, 1, SimpleNamespace(**{**vars(data), "Protocol": 1})) is None
