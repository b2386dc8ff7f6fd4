"""A real `kextless run ale` across restarts (issue 12 fault 1): its broker replaced by a new
one, and the ALE itself SIGKILLed and started again on the same run directory."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import zmq

from kextless.actors.ale.journal import FILE_NAME
from kextless.protocol import messages as m
from kextless.protocol.commands import UpdateV4Command, VerdictCommand, encode_command
from kextless.protocol.enums import CommandType, Direction, Verdict
from kextless.protocol.infos import decode_info
from tests.actors.ale.test_shell_process import FLOW, PKT, REPO, Ale, ale
from tests.entry import KEXTLESS

__all__ = ["ale"]  # the fixture


def emits(msgs: list[m.Message]) -> list[m.Emit]:
    out: list[m.Emit] = []
    for msg in msgs:
        if isinstance(msg, m.Emits):
            out += msg.emits
        elif isinstance(msg, m.Emit):
            out.append(msg)
    return out


def until_emits(sock: zmq.Socket[bytes], n: int, timeout: float = 5.0) -> list[m.Emit]:
    got: list[m.Emit] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), got
        _ident, *frames = sock.recv_multipart()
        got += emits([m.decode(f) for f in frames])
    return got


def command(sock: zmq.Socket[bytes], cmd: object) -> None:
    raw = encode_command(cmd)  # type: ignore[arg-type]
    sock.send_multipart([b"ale", m.encode(m.Command(CommandType(raw[0]), raw, 0))])


def test_a_new_broker_gets_hello_and_the_pending_infos_again(ale: Ale) -> None:
    ale.hold(1, port=41001)
    ale.hold(2, port=41002)
    first = until_emits(ale.broker, 2)
    endpoint = ale.broker.getsockopt(zmq.LAST_ENDPOINT).decode()
    ale.broker.close(0)  # the broker dies with both infos in its queue
    time.sleep(0.3)
    new = zmq.Context.instance().socket(zmq.ROUTER)
    new.setsockopt(zmq.LINGER, 0)
    new.bind(endpoint)
    ale.broker = new
    t0 = time.monotonic()
    msgs = ale.broker_messages_until(m.Hello, timeout=3)
    assert time.monotonic() - t0 < 0.9  # at once, not at the next 1 s keepalive
    again = emits(msgs) or until_emits(new, 2)
    assert [e.id for e in again] == [e.id for e in first]  # same ids, in order
    assert again == first
    assert "emitted 2 pending connection info(s) again" in ale.log.read_text()


def start(run: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*KEXTLESS, "run", "ale", "--run-dir", str(run), "--verdict-timeout", "5"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def test_a_killed_ale_keeps_its_decided_connections_and_its_ids(tmp_path: Path) -> None:
    ctx = zmq.Context.instance()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    broker.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the real broker: a restarted ALE takes over
    broker.bind(f"ipc://{run}/actors.sock")
    log = tmp_path / "ale.log"
    procs: list[subprocess.Popen[bytes]] = []
    capture = ctx.socket(zmq.DEALER)
    capture.setsockopt(zmq.LINGER, 0)
    capture.connect(f"ipc://{run}/ale.sock")
    try:
        procs.append(start(run, log))
        capture.send(m.encode(m.PacketHeld(7, FLOW, Direction.OUTBOUND, PKT, 0, 321)))
        (emit,) = until_emits(broker, 1, timeout=10)
        command(broker, VerdictCommand(emit.id, Verdict.PERMANENT_ACCEPT))
        assert capture.poll(5000)
        capture.recv()  # the CacheSet + Decision
        time.sleep(0.2)
        procs[0].send_signal(signal.SIGKILL)  # only the pid this test started
        procs[0].wait(5)
        assert (run / FILE_NAME).stat().st_size > 0
        procs.append(start(run, log))
        deadline = time.monotonic() + 10
        while "restored 1 decided connection(s)" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # The capture sees the ALE come back and says so (actors/capture/shell.py): the
        # restored verdict is replayed to it.
        capture.send(m.encode(m.CaptureReady(4242)))
        assert capture.poll(5000), "no replay of the restored verdict"
        assert m.decode(capture.recv()) == m.CacheSet(FLOW, Verdict.PERMANENT_ACCEPT)
        pid = procs[1].pid
        deadline = time.monotonic() + 5
        while True:  # the new process's Hello: the broker can route to it
            assert broker.poll(max(1, int((deadline - time.monotonic()) * 1000)))
            _ident, *frames = broker.recv_multipart()
            if any(isinstance(x, m.Hello) and x.pid == pid for x in map(m.decode, frames)):
                break
        f = FLOW
        update = UpdateV4Command(
            f.protocol, f.local_ip, f.local_port, f.remote_ip, f.remote_port, Verdict.BLOCK
        )
        command(broker, update)
        assert capture.poll(5000), "the restarted ALE ignored the Update"
        assert m.decode(capture.recv()) == m.CacheSet(FLOW, Verdict.BLOCK)
        # Its ids go on past everything the killed process may have issued.
        other = m.Flow(6, f.local_ip, 41999, f.remote_ip, 443)
        capture.send(m.encode(m.PacketHeld(8, other, Direction.OUTBOUND, PKT, 0, 321)))
        (later,) = until_emits(broker, 1)
        assert later.id > emit.id + 4000
        assert decode_info(later.info).process_id == 321
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        capture.close(0)
        broker.close(0)
