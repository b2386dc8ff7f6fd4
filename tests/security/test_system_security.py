"""Only the owner steers a running system (issue 12, Security), shown on real instances in
throw-away namespaces named kxs-*:

* ipc (the default): another local user cannot even reach RUN/kext.sock (permission denied),
  while root opens a session;
* tcp:// with CURVE and the built-in policy as a CURVE client: the policy decides real
  connections; a client without the server's key, with a key not in the allowed set, or
  without CURVE opens no session; a second authorized client is refused while the policy holds
  the session; and with every connection PermanentBlocked, a connection on the control port
  is never asked about (the capture excludes it), so control traffic needs no verdict.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth

from kextless.actors.policy.view import DECISIONS_FILE, read_decisions
from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextError, KextTimeout, load_curve_certs
from tests import apps
from tests.entry import KEXTLESS
from tests.netns import NetnsPair
from tests.system.harness import System

pytestmark = [pytest.mark.root, pytest.mark.slow]

NOBODY = 65534


class KxsPair(NetnsPair):
    """NetnsPair under this suite's own prefix (kxs-), so no other suite's names collide."""

    def __init__(self, tag: str = "") -> None:
        super().__init__(tag)
        base = self.a.removesuffix("-a").replace("klt-", "kxs-", 1)
        self.a, self.b = f"{base}-a", f"{base}-b"


# ---- ipc: owner only ------------------------------------------------------------------------

#: As another user (stdlib only: the venv's interpreter may live in root's home): what
#: ZeroMQ's ipc connect does first, connect(2) to the socket, and a look into the run dir.
PROBE = r"""
import json, os, socket, sys
out = {}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    out["connect"] = "connected"
except OSError as e:
    out["connect"] = e.strerror
try:
    os.listdir(sys.argv[2])
    out["listdir"] = "ok"
except OSError as e:
    out["listdir"] = e.strerror
print(json.dumps(out))
"""
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _probe_as(uid: int, run: RuntimeDir) -> dict[str, str]:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 for the other user to run")
    r = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", PROBE, str(run.path / "kext.sock"), str(run.path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        user=uid,
        group=uid,
        extra_groups=[],
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _opened(endpoint: str, **keys: object) -> int:
    """Sessions the broker has opened so far (a sessionless S request)."""
    client = KextClient(endpoint, **keys)  # type: ignore[arg-type]
    try:
        session = client.stats()["session"]
    finally:
        client.close_sockets()
    return int(session["opened"])


@pytest.fixture(scope="module")
def ipc_system() -> Iterator[System]:
    root = Path(tempfile.mkdtemp(prefix="kxs-", dir="/tmp"))
    with KxsPair() as pair:
        s = System(pair, root)
        try:
            yield s
        finally:
            s.close()


def test_another_user_cannot_reach_the_ipc_socket_root_can(ipc_system: System) -> None:
    run = ipc_system.run
    assert run.path.stat().st_mode & 0o777 == 0o700
    assert (run.path / "kext.sock").stat().st_mode & 0o777 == 0o600
    opened = _opened(ipc_system.endpoint)
    nobody = _probe_as(NOBODY, run)
    assert nobody == {"connect": "Permission denied", "listdir": "Permission denied"}
    assert _opened(ipc_system.endpoint) == opened  # nothing of theirs reached the broker
    assert _probe_as(0, run) == {"connect": "connected", "listdir": "ok"}
    with KextClient(ipc_system.endpoint, request_timeout=5) as k:  # root opens a session
        assert k.version() == bytes([2, 1, 0, 0])
    assert _opened(ipc_system.endpoint) == opened + 1


# ---- tcp with CURVE and the built-in policy -----------------------------------------------------

ACCEPTED_PORT, BLOCKED_PORT = 24001, 24002

RULES = f"""
default = "PermanentBlock"

[[rule]]
name = "the one allowed port"
protocol = "tcp"
remote_port = {ACCEPTED_PORT}
verdict = "PermanentAccept"
"""


@dataclass
class CurveSystem:
    pair: NetnsPair
    run: RuntimeDir
    endpoint: str
    port: int
    server_public: Path
    tester: Path  # an authorized client's secret certificate
    stranger: Path  # a client's secret certificate that is not authorized


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def curve_system() -> Iterator[CurveSystem]:
    top = Path(tempfile.mkdtemp(prefix="kxs-", dir="/tmp"))
    keys, clients, others = top / "keys", top / "clients", top / "others"
    for d in (keys, clients, others):
        d.mkdir(mode=0o700)
    server_public, _ = zmq.auth.create_certificates(keys, "server")
    for name in ("policy", "tester"):
        public, _ = zmq.auth.create_certificates(keys, name)
        shutil.copy(public, clients)
    _, stranger = zmq.auth.create_certificates(others, "stranger")
    for f in keys.glob("*.key_secret"):
        f.chmod(0o600)
    (top / "rules.toml").write_text(RULES)
    port = _free_port()
    cfg = top / "kextless.toml"
    cfg.write_text(
        "[instance]\n"
        f'endpoint = "tcp://127.0.0.1:{port}"\n'
        'curve_server_secret = "keys/server.key_secret"\n'
        'curve_clients = "clients"\n'
        "[policy]\n"
        'rules = "rules.toml"\n'
        'curve_client_secret = "keys/policy.key_secret"\n'
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    root = top / "run"
    with KxsPair("c") as pair:
        up = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--run-root",
                str(root),
                "--config",
                str(cfg),
                "--timeout",
                "15",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            yield CurveSystem(
                pair,
                RuntimeDir.for_instance(pair.a, root),
                f"tcp://127.0.0.1:{port}",
                port,
                Path(server_public),
                keys / "tester.key_secret",
                Path(stranger),
            )
        finally:
            subprocess.run(
                [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(root)],
                capture_output=True,
                timeout=90,
            )
            shutil.rmtree(top, ignore_errors=True)


def _decisions(cs: CurveSystem) -> list[tuple[int, str]]:
    path = cs.run.log_dir / DECISIONS_FILE
    return [(d.remote_port, d.verdict) for d in read_decisions(path)] if path.exists() else []


def _stats(cs: CurveSystem) -> dict[str, object]:
    client = KextClient(
        cs.endpoint, curve_server_cert=cs.server_public, curve_client_cert=cs.tester
    )
    try:
        return client.stats()
    finally:
        client.close_sockets()


def test_the_built_in_policy_decides_over_a_curve_endpoint(curve_system: CurveSystem) -> None:
    cs, p = curve_system, curve_system.pair
    for port in (ACCEPTED_PORT, BLOCKED_PORT):
        apps.start(p, p.b, apps.ECHO_SERVER, port)
    assert apps.run(p, p.a, apps.TCP_CLIENT, p.ip4_b, ACCEPTED_PORT, 3)["result"] == "ok"
    assert apps.run(p, p.a, apps.TCP_CLIENT, p.ip4_b, BLOCKED_PORT, 3)["result"] == "refused"
    seen = _decisions(cs)
    assert (ACCEPTED_PORT, "PermanentAccept") in seen and (BLOCKED_PORT, "PermanentBlock") in seen
    assert "CURVE client of tcp://127.0.0.1" in (cs.run.log_dir / "policy.log").read_text()
    session = _stats(cs)["session"]
    assert isinstance(session, dict) and session["state"] == "open"


def test_only_authorized_curve_clients_reach_the_broker(curve_system: CurveSystem) -> None:
    cs = curve_system
    before = _stats(cs)["session"]
    assert isinstance(before, dict)
    server_key, tester = load_curve_certs(cs.server_public, cs.tester)
    _, stranger = load_curve_certs(cs.server_public, cs.stranger)
    wrong_server = zmq.curve_keypair()[0]
    outsiders = {
        "a key not in the allowed set": dict(curve_server_key=server_key, curve_keypair=stranger),
        "without the server's key": dict(curve_server_key=wrong_server, curve_keypair=tester),
        "without CURVE": {},
    }
    for why, keys in outsiders.items():
        k = KextClient(cs.endpoint, request_timeout=1.5, **keys)  # type: ignore[arg-type]
        with pytest.raises(KextTimeout):
            k.open()
            pytest.fail(f"a client {why} opened a session")
    # The one authorized client gets an answer, but the session is the policy's: one at a time.
    k = KextClient(cs.endpoint, curve_server_key=server_key, curve_keypair=tester)
    with pytest.raises(KextError, match="device busy"):
        k.open()
    after = _stats(cs)["session"]
    assert isinstance(after, dict) and after["state"] == "open"
    # Only the authorized client's open reached the broker; the others never got through.
    assert after["busy_refused"] == before["busy_refused"] + 1  # type: ignore[operator]


def test_the_control_port_never_waits_for_a_verdict(curve_system: CurveSystem) -> None:
    """Everything but one port is PermanentBlock, yet a connection on the endpoint's port is
    never asked about: the capture keeps that port out of interception (for `--host`, where
    the control channel crosses the guarded interfaces; for a namespace it is in the host's)."""
    cs, p = curve_system, curve_system.pair
    apps.start(p, p.b, apps.ECHO_SERVER, cs.port)
    assert apps.run(p, p.a, apps.TCP_CLIENT, p.ip4_b, cs.port, 3)["result"] == "ok"
    assert apps.run(p, p.a, apps.TCP_CLIENT, p.ip4_b, BLOCKED_PORT, 3)["result"] == "refused"
    time.sleep(1.5)  # the policy writes decisions.jsonl a pass later
    assert all(port != cs.port for port, _ in _decisions(cs))
    assert (BLOCKED_PORT, "PermanentBlock") in _decisions(cs)
    # and the policy's own session, the control traffic, still works under that rule set
    session = _stats(cs)["session"]
    assert isinstance(session, dict) and session["state"] == "open"
