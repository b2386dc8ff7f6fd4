"""Against a real `kextless run broker` process: sessions, reads, writes, malformed input,
permissions, and routing to real actor peers.

Every malformed command and frame is covered case by case by the core tests
(test_broker_core.py); here they prove what the process adds: that such input arrives through
the ROUTER's framing intact, reaches the core and is answered to the right routing id. The
framing cases share one broker process (`shared_broker`), since none of them leaves state.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from kextless.actors.ale.shell import OWNED_COMMANDS
from kextless.broker import wire
from kextless.broker.client import KextClient, KextEOF, KextError, KextTimeout
from kextless.protocol.commands import decode_command
from kextless.protocol.enums import CommandType, InfoType, Severity, Verdict
from kextless.protocol.infos import LogLine
from kextless.protocol.messages import Command, Emit, EmitRefused, Health
from kextless.protocol.stream import InfoStreamDecoder
from tests.broker.broker_testlib import (
    BAD_FRAMES,
    MALFORMED,
    REPO,
    Broker,
    FakeActor,
    bandwidth,
    conn,
    log,
    start_broker,
    stop_broker,
)
from tests.entry import KEXTLESS

ALE_OWNS = OWNED_COMMANDS  # what the real ALE claims


def stats(b: Broker) -> dict:
    s = b.dealer()
    try:
        return json.loads(b.request(s, wire.STATS)[1])
    finally:
        s.close(0)


def wait_for(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def read_logs(k: KextClient) -> list[LogLine]:
    """GetLogs, then read until the LogLines it queued are in (no other infos are queued)."""
    k.get_logs()
    out = []
    while True:
        try:
            data = k.read(65536, timeout=0.3)
        except KextTimeout:
            return out
        dec = InfoStreamDecoder()
        out.extend(i for i in dec.feed(data) if isinstance(i, LogLine))


# ---- version, sessions ---------------------------------------------------------------------------


def test_version_and_stats_need_no_session(shared_broker: Broker) -> None:
    s = shared_broker.dealer()
    assert shared_broker.request(s, wire.VERSION) == [wire.VERSION, bytes([2, 1, 0, 0])]
    reply = shared_broker.request(s, wire.STATS)
    assert reply[0] == wire.STATS
    counters = json.loads(reply[1])
    assert counters["session"]["state"] == "none"
    assert counters["queue"]["depth"] == 0
    # The process facts the shell passes the core: its own pid and resident memory.
    assert counters["pid"] == shared_broker.proc.pid
    assert 0 < counters["rss_kib"] < 10 * shared_broker.rss_kib()
    s.close(0)


@pytest.mark.parametrize(
    "frames", [[wire.READ, wire.U32.pack(1024)], [wire.WRITE, b"\x05"], [wire.CLOSE]]
)
def test_reads_writes_and_close_without_session_are_refused(
    shared_broker: Broker, frames: list[bytes]
) -> None:
    s = shared_broker.dealer()
    reply = shared_broker.request(s, *frames)
    assert reply[0] == wire.ERROR and b"no open session" in reply[1]
    s.close(0)


def test_second_opener_is_busy_until_the_owner_closes(broker: Broker) -> None:
    a, b2 = broker.dealer(), broker.dealer()
    assert broker.request(a, wire.OPEN) == [wire.OPEN]
    assert broker.request(a, wire.OPEN) == [wire.OPEN]  # idempotent for the owner
    reply = broker.request(b2, wire.OPEN)
    assert reply[0] == wire.ERROR and b"device busy" in reply[1]
    reply = broker.request(b2, wire.CLOSE)
    assert reply[0] == wire.ERROR and b"not the session owner" in reply[1]
    assert broker.request(a, wire.CLOSE) == [wire.CLOSE]
    assert broker.request(b2, wire.OPEN) == [wire.OPEN]
    assert stats(broker)["session"]["busy_refused"] == 1
    a.close(0)
    b2.close(0)


def test_a_vanished_owner_releases_the_session(broker: Broker) -> None:
    a = broker.dealer()
    assert broker.request(a, wire.OPEN) == [wire.OPEN]
    a.close(0)
    b2 = broker.dealer()
    deadline = time.monotonic() + 5
    while (reply := broker.request(b2, wire.OPEN))[0] != wire.OPEN:
        assert time.monotonic() < deadline, reply
        time.sleep(0.02)
    assert stats(broker)["session"]["owner_disconnects"] == 1
    b2.close(0)


# ---- reads -------------------------------------------------------------------------------------


def test_read_timeout_consumes_nothing(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    with KextClient(broker.endpoint) as k:
        t0 = time.monotonic()
        with pytest.raises(KextTimeout):
            k.read(1024, timeout=0.2)
        assert 0.18 < time.monotonic() - t0 < 2.0
        ale.emit(conn(1))
        wait_for(lambda: stats(broker)["queue"]["depth"] == 1)
        assert k.read(1024, timeout=1) == conn(1).encode()
    ale.close()


def test_parked_read_is_answered_when_an_info_arrives(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    with KextClient(broker.endpoint) as k:
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(k.read(1024)))
        t.start()
        wait_for(lambda: stats(broker)["session"]["reader_waiting"])
        ale.emit(conn(5, payload=20))
        t.join(5)
        assert got == [conn(5, payload=20).encode()]
    ale.close()


def test_concurrent_writers_while_a_reader_is_blocked(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    with KextClient(broker.endpoint) as k:
        result: list[object] = []

        def reader() -> None:
            try:
                result.append(k.recv_info())
            except Exception as exc:  # pragma: no cover - reported below
                result.append(exc)

        rt = threading.Thread(target=reader)
        rt.start()
        wait_for(lambda: stats(broker)["session"]["reader_waiting"])
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for i in range(100):
                    k.send_verdict(n * 1000 + i + 1, Verdict.ACCEPT)
            except BaseException as exc:
                errors.append(exc)

        writers = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        t0 = time.monotonic()
        for w in writers:
            w.start()
        for w in writers:
            w.join(20)
        assert not errors
        assert time.monotonic() - t0 < 15
        assert rt.is_alive(), "the reader must still be waiting: nothing was queued"
        ids = set()
        for _ in range(800):
            msg = ale.recv()
            assert isinstance(msg, Command) and msg.type == CommandType.VERDICT
            ids.add(decode_command(msg.raw).id)  # type: ignore[union-attr]
        assert ids == {n * 1000 + i + 1 for n in range(8) for i in range(100)}
        ale.emit(conn(77))
        rt.join(5)
        assert result == [conn(77)]
    assert stats(broker)["commands"]["Verdict"]["ok"] == 800
    ale.close()


def test_many_infos_split_over_small_reads_reassemble(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    infos = [conn(i, payload=i * 7 % 300) for i in range(1, 200)] + [bandwidth(500)]
    for i in range(0, len(infos), 50):
        ale.emit(*infos[i : i + 50], batch=i % 100 == 0)  # Emits messages and multipart
    wait_for(lambda: stats(broker)["queue"]["depth"] == len(infos))
    with KextClient(broker.endpoint, read_size=1024) as k:
        got = [k.recv_info(timeout=2) for _ in infos]
        assert got == infos
    ale.close()


# ---- shutdown, close, reopen ----------------------------------------------------------------


def test_shutdown_wakes_the_reader_discards_and_reopen_starts_fresh(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    k = KextClient(broker.endpoint).open()
    ended: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                k.read(1024)
        except BaseException as exc:
            ended.append(exc)

    rt = threading.Thread(target=reader)
    rt.start()
    wait_for(lambda: stats(broker)["session"]["reader_waiting"])
    k.shutdown()
    rt.join(5)
    assert len(ended) == 1 and isinstance(ended[0], KextEOF)
    msg = ale.recv()
    assert isinstance(msg, Command) and msg.type == CommandType.SHUTDOWN and msg.raw == b"\x00"
    # Infos queued after the Shutdown are held for the next session; reads until close get E.
    ale.emit(conn(10))
    wait_for(lambda: stats(broker)["queue"]["depth"] == 1)
    with pytest.raises(KextEOF):
        k.read(1024)
    k.get_logs()  # a ticker firing after Shutdown is tolerated
    k.close()
    with KextClient(broker.endpoint) as k2:
        ale.emit(conn(11))
        assert [k2.recv_info(timeout=2), k2.recv_info(timeout=2)] == [conn(10), conn(11)]
    s = stats(broker)
    assert s["session"]["shutdowns"] == 1 and s["session"]["opened"] == 2
    ale.close()


def test_shutdown_discards_undelivered_infos(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    with KextClient(broker.endpoint) as k:
        ale.emit(conn(1), conn(2), log("x.rs:1 l"))
        wait_for(lambda: stats(broker)["queue"]["depth"] == 3)
        k.shutdown()
        with pytest.raises(KextEOF):
            k.read(1024)
        assert list(k.infos()) == []
    s = stats(broker)
    assert s["queue"]["depth"] == 0
    assert s["infos"]["discarded"]["ConnectionIpv4"] == 2
    ale.close()


def test_close_without_shutdown_keeps_the_queue_and_rewinds_a_partial_info(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    big, small = conn(1, payload=1000), conn(2)
    ale.emit(big, small)
    wait_for(lambda: stats(broker)["queue"]["depth"] == 2)
    with KextClient(broker.endpoint) as k:
        assert k.read(100) == big.encode()[:100]
    with KextClient(broker.endpoint, read_size=64) as k:
        assert [k.recv_info(timeout=2), k.recv_info(timeout=2)] == [big, small]
    ale.close()


def test_sigterm_answers_a_parked_read_with_eof() -> None:
    b = start_broker()
    try:
        k = KextClient(b.endpoint).open()
        ended: list[BaseException] = []

        def reader() -> None:
            try:
                k.read(1024)
            except BaseException as exc:
                ended.append(exc)

        rt = threading.Thread(target=reader)
        rt.start()
        wait_for(lambda: stats(b)["session"]["reader_waiting"])
        assert stop_broker(b) == 0
        rt.join(5)
        assert len(ended) == 1 and isinstance(ended[0], KextEOF)
        assert not b.sock_path.exists()
        k.close_sockets()
    finally:
        stop_broker(b)


# ---- writes: routing and rejection --------------------------------------------------------------


def test_commands_go_to_their_owners(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    bw = FakeActor(broker, "bandwidth", (CommandType.GET_BANDWIDTH_STATS,))
    life = FakeActor(broker, "lifecycle", (CommandType.CLEAN_ENDED_CONNECTIONS,))
    with KextClient(broker.endpoint) as k:
        k.send_verdict(42, Verdict.PERMANENT_BLOCK)
        k.send_update_v4(6, b"\x0a\x00\x00\x01", 1234, b"\x01\x01\x01\x01", 443, Verdict.BLOCK)
        k.send_update_v6(17, bytes(16), 53, bytes(15) + b"\x01", 5353, Verdict.ACCEPT)
        k.clear_cache()
        k.clean_ended_connections()
        k.get_bandwidth_stats()
        seen = [ale.recv() for _ in range(5)]
        assert [m.type for m in seen] == [
            CommandType.VERDICT,
            CommandType.UPDATE_V4,
            CommandType.UPDATE_V6,
            CommandType.CLEAR_CACHE,
            CommandType.CLEAN_ENDED_CONNECTIONS,
        ]
        assert decode_command(seen[0].raw).id == 42
        assert decode_command(seen[1].raw).local_port == 1234
        assert all(m.received_ns > 0 for m in seen)
        assert life.recv().type == CommandType.CLEAN_ENDED_CONNECTIONS
        assert bw.recv().type == CommandType.GET_BANDWIDTH_STATS
        assert ale.nothing() and bw.nothing() and life.nothing()
    for a in (ale, bw, life):
        a.close()


def test_unowned_commands(broker: Broker) -> None:
    with KextClient(broker.endpoint) as k:
        with pytest.raises(KextError, match="no actor handles Verdict") as e:
            k.send_verdict(1, Verdict.ACCEPT)
        assert e.value.status == wire.Status.UNHANDLED
        with pytest.raises(KextError, match="no actor handles UpdateV4"):
            k.send_update_v4(6, bytes(4), 1, bytes(4), 2, Verdict.ACCEPT)
        with pytest.raises(KextError, match="no actor handles ClearCache"):
            k.clear_cache()
        # Nothing to report or clean when no actor keeps that state: success, like empty maps.
        k.get_bandwidth_stats()
        k.clean_ended_connections()
        k.print_memory_stats()
        lines = read_logs(k)
        assert len(lines) == 1 and lines[0].severity == Severity.INFO
        assert "memory: rss" in lines[0].line and "queue 0 infos" in lines[0].line
        k.shutdown()


def test_malformed_commands_reach_the_core_and_are_answered(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    with KextClient(broker.endpoint) as k:
        for raw, why in MALFORMED:
            with pytest.raises(KextError) as e:
                k.write(raw)
            assert e.value.status == wire.Status.MALFORMED
            assert why in str(e.value)
        assert ale.nothing(), "a malformed command must change nothing"
        lines = read_logs(k)
        assert [ln.severity for ln in lines] == [Severity.ERROR] * len(MALFORMED)
        for line, (_, why) in zip(lines, MALFORMED, strict=True):
            assert line.line.startswith("broker/core.py:")
            assert f"Malformed command rejected: {why}" in line.line
        k.send_verdict(3, Verdict.ACCEPT)  # and the broker carries on
        assert ale.recv().type == CommandType.VERDICT
    counts = stats(broker)["commands"]
    assert counts["Verdict"] == {"ok": 1, "malformed": 4, "unhandled": 0}
    ale.close()


# ---- frame-level garbage ------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "why"), BAD_FRAMES)
def test_bad_frames_get_x_and_the_broker_carries_on(
    shared_broker: Broker, frames: list[bytes], why: bytes
) -> None:
    b = shared_broker
    s, other = b.dealer(), b.dealer()
    assert b.request(s, wire.OPEN) == [wire.OPEN]
    other.send(wire.VERSION)  # a request from another routing id, in flight meanwhile
    reply = b.request(s, *frames)
    assert reply[0] == wire.ERROR and why in reply[1] and len(reply) == 2, reply
    assert other.poll(5000) and other.recv_multipart()[0] == wire.VERSION  # its own answer
    assert b.request(s, wire.VERSION)[0] == wire.VERSION
    assert b.request(s, wire.CLOSE) == [wire.CLOSE]
    s.close(0)
    other.close(0)


def test_actor_garbage_is_dropped(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    ale.sock.send_multipart([b"\xc1garbage", b"", b"\x93\xa4Emit\x01"])
    ale.send(EmitRefused(1, "not for the broker"))
    ale.send(Emit(InfoType.CONNECTION_IPV4, b"\x02\x00\x00\x00\x00", 3))  # type mismatch
    ale.send(Health("ale", os.getpid(), {"pending": 7, "connections": 12}))
    wait_for(lambda: stats(broker)["pending_verdicts"] == 7)
    s = stats(broker)
    assert s["actor_garbage"] == 5
    assert s["connections_tracked"] == 12
    assert s["queue"]["depth"] == 0
    assert "dropped undecodable message" in broker.stderr_text()
    ale.close()


# ---- queue policy through the process ------------------------------------------------------------


def test_connection_infos_are_refused_back_to_the_emitter_when_full() -> None:
    b = start_broker(["--queue-bytes", "4096"])
    try:
        ale = FakeActor(b, "ale", ALE_OWNS)
        size = len(conn(1, payload=60).encode())
        n = 4096 // size + 5
        ale.emit(*(conn(i, payload=60) for i in range(1, n + 1)))
        refused = [ale.recv() for _ in range(n - 4096 // size)]
        assert all(isinstance(m, EmitRefused) for m in refused)
        assert [m.id for m in refused] == list(range(4096 // size + 1, n + 1))
        assert "queue full" in refused[0].reason
        s = stats(b)
        assert s["infos"]["refused"]["ConnectionIpv4"] == n - 4096 // size
        assert s["infos"]["dropped"]["ConnectionIpv4"] == 0
        ale.close()
    finally:
        stop_broker(b)


def test_bulk_overflow_drops_oldest_and_logs_one_warning() -> None:
    b = start_broker(["--queue-bytes", "4096"])
    try:
        bw = FakeActor(b, "bandwidth", (CommandType.GET_BANDWIDTH_STATS,))
        tables = [bandwidth(10) for _ in range(40)]  # 290 bytes each
        bw.emit(*tables)
        wait_for(lambda: stats(b)["infos"]["dropped"]["BandwidthStatsV4"] > 0)
        with KextClient(b.endpoint) as k:
            got = []
            while True:
                try:
                    got.append(k.recv_info(timeout=0.3))
                except KextTimeout:
                    break
            assert len(got) == 40 - stats(b)["infos"]["dropped"]["BandwidthStatsV4"]
            lines = read_logs(k)
            warnings = [ln for ln in lines if ln.severity == Severity.WARNING]
            assert len(warnings) == 1 and "info queue full" in warnings[0].line
        bw.close()
    finally:
        stop_broker(b)


def test_verdict_latency_is_measured(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    with KextClient(broker.endpoint) as k:
        ale.emit(*(conn(i) for i in range(1, 11)))
        for _ in range(10):
            info = k.recv_info(timeout=2)
            k.send_verdict(info.id, Verdict.ACCEPT)  # type: ignore[union-attr]
        rtt = k.stats()["verdict_rtt_us"]
        assert rtt["samples"] == 10 and 0 < rtt["p50"] <= rtt["max"] < 5_000_000
    ale.close()


# ---- endpoint security --------------------------------------------------------------------------


def test_endpoint_directory_and_socket_permissions(shared_broker: Broker) -> None:
    path = shared_broker.sock_path
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE((path.parent / "actors.sock").stat().st_mode) == 0o600


def test_tcp_is_refused_without_curve(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *KEXTLESS,
            "run",
            "broker",
            "--endpoint",
            "tcp://127.0.0.1:0",
            "--actors-endpoint",
            f"ipc://{tmp_path}/a.sock",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert "tcp://" in r.stderr and "CURVE" in r.stderr


def test_tcp_with_curve_serves_authorized_clients_only(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    clients = tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    _, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    (clients / "client.key").write_text(Path(client_public).read_text())
    server_key, _ = zmq.auth.load_certificate(server_secret)
    pair = zmq.auth.load_certificate(client_secret)
    with zmq.Context() as probe_ctx:
        s = probe_ctx.socket(zmq.REP)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(0)
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            *KEXTLESS,
            "run",
            "broker",
            "--endpoint",
            endpoint,
            "--actors-endpoint",
            f"ipc://{tmp_path}/run2/actors.sock",
            "--curve-server-secret",
            str(server_secret),
            "--curve-clients",
            str(clients),
        ],
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with KextClient(
                    endpoint, request_timeout=0.5, curve_server_key=server_key, curve_keypair=pair
                ) as k:  # type: ignore[arg-type]
                    assert k.version() == bytes([2, 1, 0, 0])
                break
            except KextTimeout:
                assert proc.poll() is None and time.monotonic() < deadline
        stranger = KextClient(
            endpoint,
            request_timeout=0.5,
            curve_server_key=server_key,
            curve_keypair=zmq.curve_keypair(),
        )
        with pytest.raises(KextTimeout):
            stranger.open()
    finally:
        proc.terminate()
        proc.wait(10)


def test_client_errors_are_typed(shared_broker: Broker) -> None:
    with KextClient(shared_broker.endpoint) as k:
        other = KextClient(shared_broker.endpoint)
        with pytest.raises(KextError, match="device busy"):
            other.open()
        assert k.version() == bytes([2, 1, 0, 0])
    with pytest.raises(KextError, match="client is closed"):
        KextClient(shared_broker.endpoint).write(b"\x05")  # never opened: refused locally


def test_default_endpoint_lives_in_the_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "rt" / "host"
    proc = subprocess.Popen(
        [*KEXTLESS, "run", "broker", "--run-dir", str(run_dir)], stderr=subprocess.PIPE, cwd=REPO
    )
    try:
        sock = run_dir / "kext.sock"
        deadline = time.monotonic() + 10
        while not (sock.exists() and (run_dir / "actors.sock").exists()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert KextClient(f"ipc://{sock}").version() == bytes([2, 1, 0, 0])
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert b"stopped" in err
    assert not (run_dir / "kext.sock").exists()


def test_an_oversized_request_frame_drops_only_that_peer(shared_broker: Broker) -> None:
    big = shared_broker.dealer()
    big.send_multipart([wire.WRITE, bytes(1024 * 1024)])
    assert not big.poll(300)  # libzmq disconnected it: MAXMSGSIZE
    big.close(0)
    s = shared_broker.dealer()
    assert shared_broker.request(s, wire.VERSION)[0] == wire.VERSION
    s.close(0)


def test_close_from_another_thread_ends_a_blocked_infos_loop(broker: Broker) -> None:
    ale = FakeActor(broker, "ale", ALE_OWNS)
    k = KextClient(broker.endpoint).open()
    got: list[object] = []
    done = threading.Event()

    def reader() -> None:
        got.extend(k.infos())  # must end cleanly, not raise
        done.set()

    rt = threading.Thread(target=reader)
    rt.start()
    ale.emit(conn(1))
    wait_for(lambda: stats(broker)["session"]["reader_waiting"])
    k.close()
    assert done.wait(5)
    assert got == [conn(1)]
    assert stats(broker)["session"]["state"] == "none"
    ale.close()


def test_no_broker_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    k = KextClient(f"ipc://{tmp_path}/nobody.sock", request_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(KextTimeout, match="no reply to O"):
        k.open()
    assert time.monotonic() - t0 < 2
