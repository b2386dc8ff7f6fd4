"""Aborting existing connections' sockets (sock_diag SOCK_DESTROY), on real sockets in a
namespace of the test's own; and that a shell which does not own its namespace never does."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from kextless.actors.capture import existing
from kextless.protocol.messages import Flow
from tests.netns import NetnsPair

#: Run in namespace a: an idle loopback connection (v4 or v6), then first a shell that does
#: not own the namespace is told to abort it, then a Destroyer does; each end reports.
_SNIPPET = r"""
import json, socket, sys
from kextless.actors.capture import existing
from kextless.actors.capture.core import CaptureCore, DestroySocket
from kextless.actors.capture.shell import CaptureShell, ShellConfig
fam, host = (socket.AF_INET6, "::1") if sys.argv[1] == "6" else (socket.AF_INET, "127.0.0.1")
l = socket.socket(fam); l.bind((host, 7400)); l.listen(2)
cli = socket.create_connection((host, 7400)); srv, _ = l.accept()
def alive(s, peer):
    s.sendall(b"x"); return peer.recv(10) == b"x"
def outcome(s):
    s.settimeout(2)
    try:
        return "data" if s.recv(10) else "eof"
    except ConnectionAbortedError:
        return "aborted"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return repr(e)
(e,) = existing.read()
out = {"flow_local_port": e.flow.local_port, "client_port": cli.getsockname()[1]}
shell = CaptureShell(CaptureCore(), ShellConfig("ipc:///nonexistent/ale.sock"))
shell._run(DestroySocket(e.flow))  # owns_namespace unset: must do nothing
out["after_unowned"] = alive(cli, srv) and alive(srv, cli)
d = existing.Destroyer()
out["destroyed"] = d.destroy(e.flow)
out["client"], out["server"] = outcome(cli), outcome(srv)
out["again"] = d.destroy(e.flow)  # gone: no error, nothing destroyed
out["left"] = len(existing.read())
d.close()
print(json.dumps(out))
"""


@pytest.mark.root
@pytest.mark.parametrize("family", ["4", "6"])
def test_a_destroyed_local_connection_fails_at_both_ends_and_an_unowned_shell_never_destroys(
    family: str,
) -> None:
    with NetnsPair() as pair:
        r = pair.run(pair.a, [sys.executable, "-c", _SNIPPET, family], timeout=20)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        assert lines, r.stderr[-3000:]
        out = json.loads(lines[-1])
    assert out["flow_local_port"] == out["client_port"]  # reported as the client's end
    assert out["after_unowned"] is True, r.stderr[-2000:]
    assert out["destroyed"] >= 1
    # Whichever end was aborted first sees ECONNABORTED; the other is reset by the kernel's
    # RST, or aborted too if it was reached before that RST arrived.
    assert out["client"] in {"aborted", "reset"} and out["server"] in {"aborted", "reset"}
    assert "aborted" in (out["client"], out["server"])
    assert out["again"] == 0 and out["left"] == 0


@pytest.mark.parametrize(
    ("flow", "family", "src", "dst"),
    [
        (
            Flow(6, bytes([10, 0, 0, 1]), 40000, bytes([10, 0, 0, 2]), 80),
            socket.AF_INET,
            (0x0A000001, 0, 0, 0),
            (0x0A000002, 0, 0, 0),
        ),
        (
            Flow(6, bytes.fromhex("fd00" + "00" * 13 + "01"), 8080, b"\0" * 15 + b"\2", 50000),
            socket.AF_INET6,
            (0xFD000000, 0, 0, 1),
            (0, 0, 0, 2),
        ),
    ],
    ids=["v4", "v6"],
)
def test_the_destroy_request_names_the_local_socket(
    flow: Flow, family: int, src: tuple[int, ...], dst: tuple[int, ...]
) -> None:
    req = existing.destroy_request(flow)
    assert req["sdiag_family"] == family and req["sdiag_protocol"] == socket.IPPROTO_TCP
    assert (req["idiag_sport"], req["idiag_dport"]) == (flow.local_port, flow.remote_port)
    assert req["idiag_src"] == src and req["idiag_dst"] == dst
    assert req["idiag_cookie"] == (1 << 64) - 1  # any socket with this tuple
    req.encode()  # pyroute2 can build it
    assert len(req.data) == 16 + 56  # nlmsghdr + inet_diag_req_v2
