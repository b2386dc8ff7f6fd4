"""The client's convenience values: ipaddress objects and a version tuple beside the raw fields,
and `kextless run broker --no-client default` as a process (its log says what it refused)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from kextless.broker import wire
from kextless.broker.client import KextClient, ip, local_address, remote_address
from kextless.protocol.enums import CommandType, Direction, PayloadLayer
from kextless.protocol.infos import BandwidthEntry, ConnectionIpv6
from kextless.protocol.messages import EmitRefused
from tests.broker.broker_testlib import Broker, FakeActor, conn, start_broker, stop_broker


def test_addresses_as_ipaddress_objects_keep_the_raw_fields() -> None:
    info = conn(1)
    assert local_address(info) == ipaddress.IPv4Address("10.0.0.1")
    assert remote_address(info) == ipaddress.IPv4Address("1.2.3.4")
    assert info.local_ip == b"\x0a\x00\x00\x01"  # unchanged
    v6 = ConnectionIpv6(
        2, 7, Direction.INBOUND, 17, bytes(15) + b"\x01", bytes([0xFD] + [0] * 14 + [2]),
        53, 5353, PayloadLayer.NETWORK, b"",
    )  # fmt: skip
    assert local_address(v6) == ipaddress.IPv6Address("::1")
    assert remote_address(v6) == ipaddress.IPv6Address("fd00::2")
    entry = BandwidthEntry(b"\x7f\x00\x00\x01", 1, b"\x7f\x00\x00\x02", 2, 0, 0)
    assert remote_address(entry) == ipaddress.IPv4Address("127.0.0.2")


def test_an_address_of_another_length_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="4 or 16 bytes, got 5"):
        ip(b"\x01\x02\x03\x04\x05")


def test_version_tuple_beside_the_raw_bytes(shared_broker: Broker) -> None:
    k = KextClient(shared_broker.endpoint)
    try:
        assert k.version() == bytes([2, 1, 0, 0])
        assert k.version_tuple() == (2, 1, 0, 0) and k.version_tuple() >= (2, 0)
    finally:
        k.close_sockets()


def test_no_client_default_as_a_process() -> None:
    b = start_broker(["--no-client", "default"])
    try:
        ale = FakeActor(b, "ale", (CommandType.VERDICT,))
        ale.emit(conn(5))
        msg = ale.recv()
        assert isinstance(msg, EmitRefused) and msg.id == 5
        with KextClient(b.endpoint) as k:
            ale.emit(conn(6))
            assert ale.nothing(0.3)  # a session is open: it waits for the reader
            assert k.read(65536, timeout=2)
            assert k.stats()["no_client"] == {"mode": "default", "refused": 1}
        deadline = time.monotonic() + 3
        while "connection info 5 refused at once" not in b.stderr_text():
            assert time.monotonic() < deadline, b.stderr_text()
            time.sleep(0.05)
        s = b.dealer()
        try:
            assert b.request(s, wire.WRITE, b"\x01")[0] == wire.ERROR  # no session
        finally:
            s.close(0)
        deadline = time.monotonic() + 3
        while "refused: W from client" not in b.stderr_text():
            assert time.monotonic() < deadline, b.stderr_text()
            time.sleep(0.05)
        ale.close()
    finally:
        stop_broker(b)


def test_a_bad_no_client_value_is_refused_by_name() -> None:
    with pytest.raises(AssertionError, match="invalid NoClient value: 'maybe'"):
        start_broker(["--no-client", "maybe"])
