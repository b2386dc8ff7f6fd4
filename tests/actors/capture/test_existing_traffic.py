"""Real traffic: TCP connections established BEFORE the capture starts are asked about.

Namespace a runs the capture; b is the other host. Two connections exist before the capture
starts: one from a to b (outbound) and one from b to a (inbound). The test plays the ALE.
Outcomes are what the applications see on their next send/recv.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest

from kextless.protocol.enums import Direction, Verdict
from kextless.protocol.messages import CacheSet, Flow, PacketHeld
from tests import apps
from tests.actors.capture.ale_peer import AlePeer
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

PORT_A, PORT_B = 18102, 18101

#: A client that keeps one connection open and, per line on stdin, sends "ping" and reports
#: what came back: ok (the echo), eof, reset, timeout.
_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.recv(1000)  # the server's hello
print(json.dumps({"local": list(s.getsockname()[:2])}), flush=True)
for _ in sys.stdin:
    s.settimeout(3)
    try:
        s.sendall(b"ping")
        d = s.recv(1000)
        r = "ok" if d.startswith(b"echo") else ("eof" if not d else "other")
    except ConnectionResetError:
        r = "reset"
    except (socket.timeout, TimeoutError):
        r = "timeout"
    except OSError as e:
        r = "error " + str(e)
    print(json.dumps({"result": r}), flush=True)
"""


@dataclass
class Client:
    proc: subprocess.Popen[bytes]
    local: tuple[str, int]

    def ping(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "client died"
        return str(json.loads(line)["result"])


def _client(pair: NetnsPair, ns: str, host: str, port: int) -> Client:
    proc = pair.popen(ns, [sys.executable, "-c", _CLIENT, host, port], stdin=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    host_, port_ = json.loads(line)["local"]
    return Client(proc, (host_, port_))


@contextmanager
def _capture(pair: NetnsPair, policy: Verdict, *args: str) -> Iterator[tuple[AlePeer, Path]]:
    """The capture in namespace a (started now), answered by an ALE peer with `policy`."""
    with tempfile.TemporaryDirectory(prefix="klt-ex-") as tmp:
        endpoint = f"ipc://{tmp}/ale.sock"
        log_path = Path(tmp) / "capture.log"
        with AlePeer(endpoint, lambda _m: policy) as ale, log_path.open("wb") as log_file:
            proc = pair.popen(
                pair.a,
                [*KEXTLESS, "run", "capture", "--ale-endpoint", endpoint, *args],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
            try:
                assert ale.ready.wait(10), log_path.read_text()
                yield ale, log_path
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait(5)
                if os.environ.get("KLT_SHOW_CAPTURE_LOG"):
                    print(log_path.read_text(), file=sys.stderr)
            assert rc == 0, log_path.read_text()[-4000:]


def _existing(pair: NetnsPair) -> tuple[Client, Client]:
    """Servers on both sides; a connection a -> b over v4 and b -> a over v6, both idle."""
    apps.start(pair, pair.b, apps.ECHO_SERVER, PORT_B)
    apps.start(pair, pair.a, apps.ECHO_SERVER, PORT_A)
    out = _client(pair, pair.a, pair.ip4_b, PORT_B)
    inc = _client(pair, pair.b, pair.ip6_a, PORT_A)
    assert out.ping() == "ok" and inc.ping() == "ok"
    return out, inc


def _packed(text: str) -> bytes:
    return ip_address(text).packed


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [(Verdict.PERMANENT_BLOCK, {"reset", "eof"}), (Verdict.PERMANENT_ACCEPT, {"ok"})],
    ids=["PermanentBlock", "PermanentAccept"],
)
def test_connections_from_before_the_start_are_reported_and_decided(
    verdict: Verdict, expected: set[str]
) -> None:
    with NetnsPair() as pair:
        out, inc = _existing(pair)
        with _capture(pair, verdict) as (ale, log_path):

            def held(flow: Flow) -> list[PacketHeld]:
                return ale.held_matching(lambda m: m.flow == flow)

            out_flow = Flow(6, _packed(pair.ip4_a), out.local[1], _packed(pair.ip4_b), PORT_B)
            in_flow = Flow(6, _packed(pair.ip6_a), PORT_A, _packed(pair.ip6_b), inc.local[1])
            assert ale.wait_for(lambda: bool(held(out_flow) and held(in_flow)), 8), (
                ale.held,
                log_path.read_text(),
            )
            (m_out,) = held(out_flow)
            (m_in,) = held(in_flow)
            assert m_out.direction is Direction.OUTBOUND and m_in.direction is Direction.INBOUND
            # The payload agrees with the metadata: a packet of the flow, in its direction.
            assert m_out.packet[0] >> 4 == 4 and m_in.packet[0] >> 4 == 6
            assert m_out.packet[12:16] == out_flow.local_ip
            assert m_in.packet[8:24] == in_flow.remote_ip
            time.sleep(0.3)  # the Decision is applied
            assert out.ping() in expected, log_path.read_text()[-3000:]
            assert inc.ping() in expected, log_path.read_text()[-3000:]
            if verdict is Verdict.PERMANENT_ACCEPT:
                assert out.ping() == "ok" and inc.ping() == "ok"
            # Asked once each: the real packets did not make new requests.
            assert len(held(out_flow)) == 1 and len(held(in_flow)) == 1


def test_accept_mode_asks_nothing_and_keeps_them_working() -> None:
    with NetnsPair() as pair:
        out, inc = _existing(pair)
        with _capture(pair, Verdict.PERMANENT_BLOCK, "--existing-connections", "accept") as (
            ale,
            log_path,
        ):
            assert ale.wait_for(lambda: "existing connections:" in log_path.read_text(), 8)
            assert out.ping() == "ok" and inc.ping() == "ok"
            assert ale.held == []
            assert "0 asked, 2 accepted silently" in log_path.read_text()


def test_a_flow_whose_verdict_the_ale_replays_is_not_asked_again() -> None:
    with NetnsPair() as pair:
        out, inc = _existing(pair)
        out_flow = Flow(6, _packed(pair.ip4_a), out.local[1], _packed(pair.ip4_b), PORT_B)
        with _capture(pair, Verdict.PERMANENT_ACCEPT) as (ale, log_path):
            # What the ALE's CaptureReady replay does for a connection it already knows.
            ale.send(CacheSet(out_flow, Verdict.PERMANENT_BLOCK))
            assert ale.wait_for(lambda: "existing connections:" in log_path.read_text(), 8)
            # The scan's requests leave together, after its log line: wait for them to arrive.
            assert ale.wait_for(lambda: bool(ale.held), 5), log_path.read_text()[-3000:]
            time.sleep(0.3)
            assert [m.flow.local_port for m in ale.held] == [PORT_A]  # only the inbound one
            assert out.ping() in {"reset", "eof"}  # the replayed verdict is enforced
            assert inc.ping() == "ok"


def test_a_restarted_capture_asks_about_connections_made_under_its_predecessor() -> None:
    """A capture restart is a start: the connection its predecessor let through (and this
    ALE peer does not replay) is asked about again, and blocked."""
    with NetnsPair() as pair:
        apps.start(pair, pair.b, apps.ECHO_SERVER, PORT_B)
        with _capture(pair, Verdict.PERMANENT_ACCEPT) as (ale, _log):
            out = _client(pair, pair.a, pair.ip4_b, PORT_B)
            assert out.ping() == "ok"
            flow = Flow(6, _packed(pair.ip4_a), out.local[1], _packed(pair.ip4_b), PORT_B)
            (syn,) = ale.held_matching(lambda m: m.flow == flow)  # asked by its SYN
            assert syn.packet[33] & 0x12 == 0x02
        with _capture(pair, Verdict.PERMANENT_BLOCK) as (ale, log_path):
            assert ale.wait_for(lambda: bool(ale.held_matching(lambda m: m.flow == flow)), 8), (
                log_path.read_text()
            )
            time.sleep(0.3)
            assert out.ping() in {"reset", "eof"}, log_path.read_text()[-3000:]
