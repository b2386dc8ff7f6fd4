"""`kextless up/status/down` with real supervisord processes, inside namespaces the tests create.

The mechanics are proved with trivial programs (a stand-in broker that answers `S`, a sleeper
inside the namespace), so they hold before every actor exists; the last test runs the real
actors and is skipped only while one of their modules is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.base.rundir import RuntimeDir
from kextless.deploy import cli, supervise
from kextless.deploy.supervise import DeployError, Program, UpOptions

pytestmark = pytest.mark.root

HERE = Path(__file__).parent
_COUNTER = itertools.count(1)


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)


def instance_pids(run_dir: Path) -> list[int]:
    """Every live process that names this (unique, temporary) run dir in its argv."""
    here = str(run_dir).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (here + b"\0" in cmdline or here + b"/" in cmdline) and supervise.pid_alive(
            int(proc.name)
        ):
            found.append(int(proc.name))
    return found


def sockets_in(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.is_socket()] if run_dir.exists() else []


def netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.fixture
def inst() -> Iterator[tuple[str, Path]]:
    """(netns, run_root): a fresh namespace and a short run root (sun_path is 107 bytes).

    Teardown always runs `down`, then kills by PID whatever still names the run dir (only
    processes this test started can), then deletes the namespace.
    """
    ns = f"klt-deploy-{os.getpid()}-{next(_COUNTER)}"
    root = Path(tempfile.mkdtemp(prefix="klt-d-", dir="/tmp"))
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, root
    finally:
        run = RuntimeDir.for_instance(ns, root)
        with contextlib.suppress(Exception):
            supervise.down(ns, root, out=lambda _line: None)
        for pid in instance_pids(run.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(root, ignore_errors=True)


def fake_broker(run: RuntimeDir) -> Program:
    return Program(
        "broker",
        (sys.executable, str(HERE / "fake_broker.py"), run.kext_endpoint, str(run.path)),
        100,
    )


def sleeper(run: RuntimeDir, ns: str, name: str = "sleeper", priority: int = 300) -> Program:
    code = "import time; time.sleep(600)"
    return Program(
        name,
        (supervise.ip_command(), "netns", "exec", ns, sys.executable, "-c", code, str(run.path)),
        priority,
    )


def test_up_status_down_mechanics(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    lines: list[str] = []
    res = supervise.up(opts, [fake_broker(run), sleeper(run, ns)], out=lines.append)

    # Up: every program RUNNING, each in the namespace it belongs to, private run dir.
    assert set(res.pids) == {"broker", "sleeper"}
    assert all(supervise.pid_alive(p) for p in [res.supervisord_pid, *res.pids.values()])
    assert netns_inode(res.pids["sleeper"]) == os.stat(f"/var/run/netns/{ns}").st_ino
    assert netns_inode(res.pids["broker"]) == netns_inode("self")
    assert run.path.stat().st_mode & 0o777 == 0o700
    assert run.supervisor_socket.is_socket()
    assert lines[-1] == f"client endpoint: {run.kext_endpoint}"
    assert sorted(instance_pids(run.path)) == sorted([res.supervisord_pid, *res.pids.values()])

    # Status: supervisor's view plus the broker's own answer.
    assert supervise.main("status", ["--netns", ns, "--run-root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["state"], p["pid"]) for p in report["programs"]] == [
        ("broker", "RUNNING", res.pids["broker"]),
        ("sleeper", "RUNNING", res.pids["sleeper"]),
    ]
    assert report["broker"]["pid"] == res.pids["broker"]
    assert report["broker"]["requests"] == 1
    assert supervise.main("status", ["--netns", ns, "--run-root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "broker counters:" in text and "  requests: 2" in text
    assert f"sleeper    RUNNING   pid {res.pids['sleeper']}" in text

    # A second up for the same namespace is refused and changes nothing.
    assert supervise.main("up", ["--netns", ns, "--run-root", str(root)]) == 1
    assert "already running" in capsys.readouterr().err
    assert all(supervise.pid_alive(p) for p in res.pids.values())

    # Down: nothing of the instance is left, and a second down is a no-op.
    assert supervise.main("down", ["--netns", ns, "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "LEFTOVER" not in out and "WARNING" not in out
    assert f"broker (pid {res.pids['broker']})" in out
    assert not any(supervise.pid_alive(p) for p in [res.supervisord_pid, *res.pids.values()])
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []
    assert not run.supervisor_conf.exists() and not (run.path / "instance.json").exists()
    assert (run.log_dir / "broker.log").exists()  # logs stay for the post-mortem
    assert supervise.main("down", ["--netns", ns, "--run-root", str(root)]) == 0
    assert "not running" in capsys.readouterr().out
    assert supervise.main("status", ["--netns", ns, "--run-root", str(root)]) == 3


def test_status_reports_a_missing_broker(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    supervise.up(opts, [sleeper(opts.run_dir, ns)], out=lambda _line: None)
    assert supervise.main("status", ["--netns", ns, "--run-root", str(root)]) == 1
    text = capsys.readouterr().out
    assert "sleeper    RUNNING" in text
    assert "broker: DOWN" in text


def test_down_warns_about_a_program_that_ignores_sigterm(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stubborn = Program("stubborn", (sys.executable, "-c", code, str(run.path)), 200, stopwaitsecs=1)
    res = supervise.up(opts, [stubborn, sleeper(run, ns)], out=lambda _line: None)
    assert supervise.main("down", ["--netns", ns, "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: stubborn (pid {res.pids['stubborn']}) ignored SIGTERM" in out
    assert "sleeper" not in out.split("WARNING", 1)[1]  # the sleeper stopped on TERM
    assert instance_pids(run.path) == []


@pytest.mark.slow
def test_a_program_that_cannot_start_fails_up_and_leaves_nothing(inst: tuple[str, Path]) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=20)
    run = opts.run_dir
    token = f"boom-{os.getpid()}-{time.monotonic_ns()}"
    failing = Program(
        "failing",
        (sys.executable, "-c", f"import sys; print({token!r}); sys.exit(3)", str(run.path)),
        200,
    )
    lines: list[str] = []
    with pytest.raises(DeployError) as err:
        supervise.up(opts, [fake_broker(run), failing, sleeper(run, ns)], out=lines.append)
    message = str(err.value)
    assert message.startswith("program failing failed to start: FATAL")
    assert token in message  # the tail of its log
    assert lines == []  # the teardown found nothing left over
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []


@pytest.mark.slow
def test_restart_and_recovery_from_a_killed_supervisord(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    res = supervise.up(opts, [fake_broker(run), sleeper(run, ns)], out=lambda _line: None)

    # autorestart: a crashed program comes back with a new pid.
    os.kill(res.pids["sleeper"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    new_pid = 0
    while time.monotonic() < deadline:
        code, report = supervise.status(ns, root)
        states = {p["name"]: p for p in report["programs"]}
        if (
            states["sleeper"]["state"] == "RUNNING"
            and states["sleeper"]["pid"] != res.pids["sleeper"]
        ):
            new_pid = states["sleeper"]["pid"]
            break
        time.sleep(0.2)
    assert new_pid and code == 0

    # supervisord dies without stopping its programs: down must find and end the orphans.
    os.kill(res.supervisord_pid, signal.SIGKILL)
    assert supervise.wait_gone([res.supervisord_pid], 5) == []
    assert supervise.pid_alive(new_pid) and supervise.pid_alive(res.pids["broker"])
    assert supervise.main("up", ["--netns", ns, "--run-root", str(root)]) == 1
    assert "still alive" in capsys.readouterr().err
    assert supervise.main("down", ["--netns", ns, "--run-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"LEFTOVER: program broker pid {res.pids['broker']} outlived supervisord" in out
    assert f"LEFTOVER: program sleeper pid {new_pid} outlived supervisord" in out
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []
    # Clean again: the next down finds nothing and an up works.
    assert supervise.main("down", ["--netns", ns, "--run-root", str(root)]) == 0
    res2 = supervise.up(opts, [sleeper(run, ns)], out=lambda _line: None)
    assert supervise.pid_alive(res2.pids["sleeper"])


def test_down_reports_divert_filters_left_in_the_namespace(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    supervise.up(opts, [sleeper(opts.run_dir, ns)], out=lambda _line: None)
    assert supervise.divert_filters(ns) == []
    # A divert holder killed -9 leaves its tc programs attached (reference §4.3).
    code = (
        "import os, pydivert\nh = pydivert.EBPFDivert('false')\nh.open()\nos.kill(os.getpid(), 9)"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == -9 or proc.returncode == 137, proc.stderr
    left = supervise.divert_filters(ns)
    assert {line.split(":")[0] for line in left} == {"lo ingress", "lo egress"}
    assert supervise.main("down", ["--netns", ns, "--run-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"LEFTOVER: divert filter left in netns {ns}: lo ingress" in out
    assert f"LEFTOVER: divert filter left in netns {ns}: lo egress" in out
    # ...and the next up warns before adding its own.
    lines: list[str] = []
    supervise.up(opts, [sleeper(opts.run_dir, ns)], out=lines.append)
    assert [x for x in lines if x.startswith("WARNING")] == [
        f"WARNING: divert filter already attached in netns {ns}: {f}" for f in left
    ]


def _actors_missing() -> list[str]:
    return [
        name for name, module in cli._ACTORS.items() if importlib.util.find_spec(module) is None
    ]


@pytest.mark.slow
@pytest.mark.skipif(bool(_actors_missing()), reason=f"actors not written yet: {_actors_missing()}")
@pytest.mark.parametrize("policy", [True, False], ids=["policy", "no-policy"])
def test_the_real_system_up_status_down_leaves_nothing(
    inst: tuple[str, Path], policy: bool
) -> None:
    ns, root = inst
    run = RuntimeDir.for_instance(ns, root)
    kextless = [*supervise.kextless_command()]
    base = ["--netns", ns, "--run-root", str(root)]
    up = subprocess.run(
        [*kextless, "up", *base, *([] if policy else ["--no-policy"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"client endpoint: {run.kext_endpoint}" in up.stdout
    expected = {"broker", "ale", "capture"} | ({"policy"} if policy else set())
    report: dict = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # actors announce themselves to the broker
        st = subprocess.run(
            [*kextless, "status", *base, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        report = json.loads(st.stdout)
        if st.returncode == 0 and "ale" in report["broker"]["actors"]:
            break
        time.sleep(0.3)
    assert [p["name"] for p in report["programs"]] == [  # start order, not alphabetical
        n for n in ("broker", "ale", "capture", "policy") if n in expected
    ]
    assert all(p["state"] == "RUNNING" for p in report["programs"]), report
    pids = {p["name"]: p["pid"] for p in report["programs"]}
    assert report["broker"]["pid"] == pids["broker"]
    assert report["broker"]["actors"]["ale"]["pid"] == pids["ale"]
    # capture talks only to the ALE; it shows by running inside the namespace with its divert
    # programs attached there, and never in the host namespace.
    assert netns_inode(pids["capture"]) == os.stat(f"/var/run/netns/{ns}").st_ino
    assert any(f.startswith("lo ingress") for f in supervise.divert_filters(ns))
    down = subprocess.run(
        [*kextless, "down", *base], capture_output=True, text=True, timeout=90, check=False
    )
    assert down.returncode == 0, down.stdout + down.stderr
    assert "LEFTOVER" not in down.stdout and "WARNING" not in down.stdout
    assert not any(supervise.pid_alive(p) for p in pids.values())
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []
    assert supervise.divert_filters(ns) == []


def _present(names: set[str]) -> list[supervise.ActorSpec]:
    return [
        a
        for a in supervise.ACTORS
        if a.name in names and importlib.util.find_spec(cli._ACTORS[a.name]) is not None
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("kextless.broker.main") is None, reason="no broker yet"
)
def test_real_broker_ale_and_policy_register_and_stop_cleanly(inst: tuple[str, Path]) -> None:
    """The real actors that need no divert handle, under the config `up` renders for them."""
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    actors = _present({"broker", "ale", "policy"})
    res = supervise.up(opts, supervise.programs_for(opts, actors), out=lambda _line: None)
    report: dict = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        code, report = supervise.status(ns, root)
        if code == 0 and "ale" in report["broker"].get("actors", {}):
            break
        time.sleep(0.2)
    assert report["broker"]["pid"] == res.pids["broker"]
    if "ale" in res.pids:
        assert report["broker"]["actors"]["ale"]["pid"] == res.pids["ale"]
    if "policy" in res.pids:  # the built-in decision maker holds the one client session
        assert report["broker"]["session"]["state"] == "open"
    stopped = supervise.down(ns, root, out=lambda _line: None)
    assert stopped.problems == []
    assert stopped.killed == []  # every actor ends on SIGTERM, in time
    assert instance_pids(opts.run_dir.path) == []
    assert sockets_in(opts.run_dir.path) == []


@pytest.mark.skipif(
    importlib.util.find_spec("kextless.broker.main") is None, reason="no broker yet"
)
def test_tcp_endpoint_status_speaks_curve_to_the_real_broker(
    inst: tuple[str, Path], tmp_path: Path
) -> None:
    import socket

    import zmq.auth

    ns, root = inst
    keys, clients, strangers = tmp_path / "keys", tmp_path / "clients", tmp_path / "other"
    for d in (keys, clients, strangers):
        d.mkdir()
    _, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    shutil.copy(client_public, clients)
    _, stranger_secret = zmq.auth.create_certificates(strangers, "stranger")
    with socket.socket() as s:  # a free port on loopback for the broker's client ROUTER
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = UpOptions(
        netns=ns,
        run_root=root,
        endpoint=f"tcp://127.0.0.1:{port}",
        policy=False,
        curve_server_secret=Path(server_secret),
        curve_clients=clients,
        timeout=15,
    )
    res = supervise.up(
        opts, supervise.programs_for(opts, _present({"broker"})), out=lambda _line: None
    )
    code, report = supervise.status(ns, root, client_cert=Path(client_secret))
    assert code == 0, report["broker_error"]
    assert report["broker"]["pid"] == res.pids["broker"]
    code, report = supervise.status(ns, root)
    assert code == 1 and "--curve-client-secret" in report["broker_error"]
    code, report = supervise.status(ns, root, client_cert=Path(stranger_secret))
    assert code == 1 and "did not answer" in report["broker_error"]
