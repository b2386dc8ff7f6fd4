"""`kextless up` returns only once the namespace is really guarded (issue 11/12): a connection
made the moment `up` returns is held and decided (a fresh connection info with its opener's
pid, not an "existing" one with pid 0), a blocked port is refused, and a connection closed at
once gets its end event.

The client process is started in namespace `a` before `up` and waits on its stdin, so its
connections start within a millisecond of `up` returning (no interpreter start in between);
the test's client opens its session only after that, so the infos wait for it (no-client
mode "wait"). Before `up` waited for readiness, `up` returned 2-5 s before the capture's divert
handle was open: the same connection then completed undecided.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.protocol.enums import Direction, IpProtocol, Verdict
from kextless.protocol.infos import ConnectionEndEventV4, ConnectionIpv4
from tests import apps
from tests.netns import NetnsPair
from tests.system.harness import Answerer, Rules, System, addr

pytestmark = [pytest.mark.root, pytest.mark.slow]

_PORTS = itertools.count(23600)

#: Waits for a line on stdin, then: one TCP connection to the open port (greeting read, closed
#: at once), one to the blocked port; prints its pid, the first one's local port, what each saw.
CLIENT = r"""
import json, os, socket, sys, time
host, ok, blocked = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
s = socket.create_connection((host, ok), timeout=8)
greeting = s.recv(1000)
lport = s.getsockname()[1]
s.close()
try:
    socket.create_connection((host, blocked), timeout=8).close()
    res = "connected"
except ConnectionRefusedError:
    res = "refused"
except OSError as e:
    res = repr(e)
print(json.dumps({"pid": os.getpid(), "port": lport, "greeting": greeting.decode(),
                  "blocked": res}), flush=True)
"""


@pytest.fixture()
def pair() -> Iterator[NetnsPair]:
    with NetnsPair("kxu") as p:
        yield p


def _tcp_flags(packet: bytes) -> int:
    ihl = (packet[0] & 0x0F) * 4
    return packet[ihl + 13]


def test_a_connection_made_the_moment_up_returns_is_decided_and_ends(pair: NetnsPair) -> None:
    ok, blocked = next(_PORTS), next(_PORTS)
    for port in (ok, blocked):
        apps.start(pair, pair.b, apps.ECHO_SERVER, port, "0.0.0.0")
    client = pair.popen(pair.a, [sys.executable, "-c", CLIENT, pair.ip4_b, ok, blocked], stdin=-1)
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline() == b"ready\n"

    system = System(pair, Path(tempfile.mkdtemp(prefix="kxu-", dir="/tmp")))  # short sun_path
    answerer: Answerer | None = None
    try:
        client.stdin.write(b"go\n")  # the connections start now, before anything else
        client.stdin.flush()
        returned = time.monotonic()
        rules = Rules()
        rules.by_port[(IpProtocol.TCP, blocked)] = Verdict.PERMANENT_BLOCK
        answerer = Answerer(system.endpoint)
        answerer.decide = rules
        answerer.start()
        out, err = client.communicate(timeout=20)
        assert client.returncode == 0, err.decode() + system.logs()
        seen = json.loads(out.decode().splitlines()[-1])
        print(f"up took {system.up_seconds:.2f} s:\n{system.up_output}")

        # up said what it waited for, and that it became ready.
        assert "waiting until ready: ale, capture, lifecycle, bandwidth" in system.up_output
        assert "ready after " in system.up_output

        # The open port: one fresh connection info (its SYN, its opener's pid), accepted.
        assert seen["greeting"].startswith("hello from"), seen
        mine = answerer.wait_for(
            lambda i: i.protocol == IpProtocol.TCP and i.remote_port == ok, timeout=5
        )
        assert len(mine) == 1, mine
        info = mine[0]
        assert isinstance(info, ConnectionIpv4)
        assert info.local_port == seen["port"] and info.remote_ip == addr(pair.ip4_b)
        assert info.direction == Direction.OUTBOUND
        assert _tcp_flags(info.payload) & 0x02, "a synthetic ACK: reported as existing"
        assert info.process_id == seen["pid"]
        assert answerer.answered[info.id] == Verdict.PERMANENT_ACCEPT

        # The blocked port: asked too, and refused at once (RST), never connected.
        refused = answerer.wait_for(
            lambda i: i.protocol == IpProtocol.TCP and i.remote_port == blocked, timeout=5
        )
        assert refused and answerer.answered[refused[0].id] == Verdict.PERMANENT_BLOCK
        assert seen["blocked"] == "refused", seen

        # The connection closed at once ends with exactly one end event.
        deadline = time.monotonic() + 5
        ends: list[ConnectionEndEventV4] = []
        while time.monotonic() < deadline and not ends:
            with answerer._cond:
                ends = [
                    i
                    for i in answerer.infos
                    if isinstance(i, ConnectionEndEventV4)
                    and i.protocol == IpProtocol.TCP
                    and i.local_port == seen["port"]
                ]
            time.sleep(0.05)
        assert len(ends) == 1, f"no end event for :{seen['port']}\n{system.logs()}"
        assert ends[0].process_id == seen["pid"]
        print(f"decided and ended within {time.monotonic() - returned:.2f} s of up returning")
    finally:
        if answerer is not None:
            answerer.stop()
        system.close()
