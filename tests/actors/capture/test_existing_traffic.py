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
from tests.actors.capture.ale_peer import AlePeer, Policy
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
    except ConnectionAbortedError:  # its socket aborted by the capture (SOCK_DESTROY)
        r = "aborted"
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
def _capture(
    pair: NetnsPair, policy: Verdict | Policy, *args: str
) -> Iterator[tuple[AlePeer, Path]]:
    """The capture in namespace a (started now), answered by an ALE peer with `policy`."""
    answer: Policy = policy if callable(policy) else (lambda _m: policy)
    with tempfile.TemporaryDirectory(prefix="klt-ex-") as tmp:
        endpoint = f"ipc://{tmp}/ale.sock"
        log_path = Path(tmp) / "capture.log"
        with AlePeer(endpoint, answer) as ale, log_path.open("wb") as log_file:
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
    [(Verdict.PERMANENT_BLOCK, {"reset", "eof", "aborted"}), (Verdict.PERMANENT_ACCEPT, {"ok"})],
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
            # The replayed verdict is enforced: its socket is aborted by the scan itself.
            assert out.ping() in {"reset", "eof", "aborted"}
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
            assert out.ping() in {"reset", "eof", "aborted"}, log_path.read_text()[-3000:]


#: One end of an idle connection: the server accepts one and says hello, the client reads
#: it; then each waits in recv() without sending and reports how that ended, and when.
_IDLE = r"""
import errno, json, socket, sys, time
role, host, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if role == "server":
    l = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port)); l.listen(4)
    print(json.dumps({"ready": True}), flush=True)
    s, _ = l.accept(); s.sendall(b"hi")
else:
    s = socket.create_connection((host, port), timeout=5); s.recv(10)
print(json.dumps({"local": list(s.getsockname()[:2])}), flush=True)
s.settimeout(wait)
try:
    r = "eof" if not s.recv(100) else "data"
except ConnectionResetError:
    r = "reset"
except ConnectionAbortedError:
    r = "aborted"
except (socket.timeout, TimeoutError):
    r = "timeout"
except OSError as e:
    r = "error " + errno.errorcode.get(e.errno or 0, str(e.errno))
print(json.dumps({"result": r, "at": time.time()}), flush=True)
"""

#: How long an idle blocked connection may take to be reset at both ends after the verdict.
_RESET_BOUND_S = 1.0


def _idle(pair: NetnsPair, ns: str, *args: object) -> subprocess.Popen[bytes]:
    return pair.popen(ns, [sys.executable, "-c", _IDLE, *map(str, args)])


def _line(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    out: dict[str, object] = json.loads(line)
    return out


def test_an_idle_blocked_connection_from_before_the_start_is_reset_at_both_ends_at_once() -> None:
    """Neither end sends after the verdict, so no packet of theirs can carry the reset: the
    capture aborts the local socket (ECONNABORTED here) and the kernel's RST resets the
    remote (ECONNRESET there), within `_RESET_BOUND_S` of the Decision."""
    with NetnsPair() as pair:
        wait = 10  # each end gives up this long after the start: "timeout" fails the test
        srv_b = _idle(pair, pair.b, "server", "0.0.0.0", PORT_B, wait)
        srv_a = _idle(pair, pair.a, "server", "::", PORT_A, wait)
        _line(srv_b), _line(srv_a)
        cli_a = _idle(pair, pair.a, "client", pair.ip4_b, PORT_B, wait)  # outbound, v4
        cli_b = _idle(pair, pair.b, "client", pair.ip6_a, PORT_A, wait)  # inbound, v6
        for p in (srv_b, srv_a, cli_a, cli_b):
            _line(p)  # connected, idle from now on
        decided: dict[Direction, float] = {}

        def block(m: PacketHeld) -> Verdict:
            decided[m.direction] = time.time()  # the Decision leaves right after this
            return Verdict.PERMANENT_BLOCK

        with _capture(pair, block) as (ale, log_path):
            assert ale.wait_for(lambda: len(decided) == 2, 8), log_path.read_text()[-3000:]
            ends = {
                "a client (outbound)": (cli_a, Direction.OUTBOUND, "aborted"),
                "b server (outbound's remote)": (srv_b, Direction.OUTBOUND, "reset"),
                "a server (inbound)": (srv_a, Direction.INBOUND, "aborted"),
                "b client (inbound's remote)": (cli_b, Direction.INBOUND, "reset"),
            }
            seen: dict[str, tuple[str, float]] = {}
            for name, (proc, direction, _want) in ends.items():
                r = _line(proc)
                seen[name] = (str(r["result"]), float(str(r["at"])) - decided[direction])
            print({k: (r, f"{dt * 1000:.1f} ms") for k, (r, dt) in seen.items()})
            for name, (_proc, _direction, want) in ends.items():
                result, dt = seen[name]
                assert result == want, (name, seen, log_path.read_text()[-3000:])
                assert 0 <= dt < _RESET_BOUND_S, (name, seen)
            assert "aborted" in log_path.read_text()
