"""`kextless up/status/down` with real supervisord processes, inside namespaces the tests create.

The mechanics are proved with trivial programs (a stand-in broker that answers `S`, a sleeper
inside the namespace), so a failure points at `up`/`down` rather than at an actor; the last
tests run the real actors under the config `up` renders for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervisor.xmlrpc import SupervisorTransport

from kextless.base.rundir import RuntimeDir
from kextless.deploy import cli
from kextless.deploy.down import down
from kextless.deploy.errors import DeployError
from kextless.deploy.filters import divert_filters
from kextless.deploy.options import UpOptions
from kextless.deploy.processes import pid_alive, wait_gone
from kextless.deploy.programs import ACTORS, ActorSpec, Program, ip_command, programs_for
from kextless.deploy.status import status
from kextless.deploy.up import NotReady, up
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

HERE = Path(__file__).parent


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
        if (here + b"\0" in cmdline or here + b"/" in cmdline) and pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def sockets_in(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.is_socket()] if run_dir.exists() else []


def netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.fixture
def inst() -> Iterator[tuple[str, Path]]:
    """(netns, run_root): a fresh namespace (side `a` of a NetnsPair: `lo` and the veth `va`)
    and a short run root (sun_path is 107 bytes).

    Teardown always runs `down`, then kills by PID whatever still names the run dir (only
    processes this test started can), then deletes the namespaces.
    """
    root = Path(tempfile.mkdtemp(prefix="klt-d-", dir="/tmp"))
    try:
        with NetnsPair("d") as pair:
            try:
                yield pair.a, root
            finally:
                run = RuntimeDir.for_instance(pair.a, root)
                with contextlib.suppress(Exception):
                    down(pair.a, root, out=lambda _line: None)
                for pid in instance_pids(run.path):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    finally:
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
        (ip_command(), "netns", "exec", ns, sys.executable, "-c", code, str(run.path)),
        priority,
    )


@pytest.mark.slow
def test_up_status_down_mechanics(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    lines: list[str] = []
    res = up(opts, [fake_broker(run), sleeper(run, ns)], out=lines.append)

    # Up: every program RUNNING, each in the namespace it belongs to, private run dir.
    assert set(res.pids) == {"broker", "sleeper"}
    assert all(pid_alive(p) for p in [res.supervisord_pid, *res.pids.values()])
    assert netns_inode(res.pids["sleeper"]) == os.stat(f"/var/run/netns/{ns}").st_ino
    assert netns_inode(res.pids["broker"]) == netns_inode("self")
    assert run.path.stat().st_mode & 0o777 == 0o700
    assert run.supervisor_socket.is_socket()
    assert lines[-1] == f"client endpoint: {run.kext_endpoint}"
    assert sorted(instance_pids(run.path)) == sorted([res.supervisord_pid, *res.pids.values()])

    # Status: supervisor's view plus the broker's own answer.
    assert cli.main(["status", "--netns", ns, "--run-root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["state"], p["pid"]) for p in report["programs"]] == [
        ("broker", "RUNNING", res.pids["broker"]),
        ("sleeper", "RUNNING", res.pids["sleeper"]),
    ]
    assert report["broker"]["pid"] == res.pids["broker"]
    assert report["broker"]["requests"] == 1
    assert cli.main(["status", "--netns", ns, "--run-root", str(root), "--verbose"]) == 0
    text = capsys.readouterr().out
    assert "broker counters:" in text and "  requests: 2" in text
    assert f"sleeper    RUNNING   pid {res.pids['sleeper']}" in text

    # A second up for the same namespace is refused and changes nothing.
    assert cli.main(["up", "--netns", ns, "--run-root", str(root)]) == 1
    assert "already running" in capsys.readouterr().err
    assert all(pid_alive(p) for p in res.pids.values())

    # Down: nothing of the instance is left, and a second down is a no-op.
    assert cli.main(["down", "--netns", ns, "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "LEFTOVER" not in out and "WARNING" not in out
    assert f"broker (pid {res.pids['broker']})" in out
    assert not any(pid_alive(p) for p in [res.supervisord_pid, *res.pids.values()])
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []
    assert not run.supervisor_conf.exists() and not (run.path / "instance.json").exists()
    assert (run.log_dir / "broker.log").exists()  # logs stay for the post-mortem
    assert cli.main(["down", "--netns", ns, "--run-root", str(root)]) == 0
    assert "not running" in capsys.readouterr().out
    assert cli.main(["status", "--netns", ns, "--run-root", str(root)]) == 3


def test_status_reports_a_missing_broker(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    up(opts, [sleeper(opts.run_dir, ns)], out=lambda _line: None)
    assert cli.main(["status", "--netns", ns, "--run-root", str(root)]) == 1
    text = capsys.readouterr().out
    assert "sleeper    RUNNING" in text
    assert "broker: DOWN" in text


@pytest.mark.slow
def test_down_warns_about_a_program_that_ignores_sigterm(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stubborn = Program("stubborn", (sys.executable, "-c", code, str(run.path)), 200, stopwaitsecs=1)
    res = up(opts, [stubborn, sleeper(run, ns)], out=lambda _line: None)
    assert cli.main(["down", "--netns", ns, "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: stubborn (pid {res.pids['stubborn']}) ignored SIGTERM" in out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    # the sleeper stopped on TERM (a loaded supervisord may log the stubborn kill twice)
    assert warnings and all("stubborn" in w for w in warnings), warnings
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
        up(opts, [fake_broker(run), failing, sleeper(run, ns)], out=lines.append)
    message = str(err.value)
    assert message.startswith("program failing failed to start: FATAL")
    assert token in message  # the tail of its log
    assert lines == []  # the teardown found nothing left over
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []


@pytest.mark.slow
def test_an_actor_that_never_becomes_ready_fails_up_and_is_left_running(
    inst: tuple[str, Path],
) -> None:
    """RUNNING is not ready: a "lifecycle" that never reports to the broker fails `up` at its
    --timeout, naming it with its log tail; the instance stays up for the user to look at."""
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=4)
    run = opts.run_dir
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(NotReady) as err:
        up(opts, [fake_broker(run), sleeper(run, ns, "lifecycle")], out=lines.append)
    took = time.monotonic() - t0
    assert 4 <= took < 10, took
    assert "waiting until ready: lifecycle" in lines
    message = str(err.value)
    assert message.startswith(
        "not ready after 4 s (--timeout):\n"
        "  lifecycle: its FLOW/SOCKET handles are not open yet (no report)\n"
        f"--- last lines of {run.log_dir / 'lifecycle.log'} ---\n"
    ), message
    # No capture guards this namespace: the message must not claim it is fail closed.
    assert "WARNING: lo, va pass(es) packets UNEXAMINED" in message
    assert f"stop it with `kextless down --netns {ns} --run-root {root}`" in message
    _code, report = status(ns, root)
    assert [(p["name"], p["state"]) for p in report["programs"]] == [
        ("broker", "RUNNING"),
        ("lifecycle", "RUNNING"),
    ]
    assert down(ns, root, out=lambda _line: None).problems == []
    assert instance_pids(run.path) == []


@pytest.mark.slow
def test_restart_and_recovery_from_a_killed_supervisord(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    res = up(opts, [fake_broker(run), sleeper(run, ns)], out=lambda _line: None)

    # autorestart: a crashed program comes back with a new pid.
    os.kill(res.pids["sleeper"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    new_pid = 0
    while time.monotonic() < deadline:
        code, report = status(ns, root)
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
    assert wait_gone([res.supervisord_pid], 5) == []
    assert pid_alive(new_pid) and pid_alive(res.pids["broker"])
    assert cli.main(["up", "--netns", ns, "--run-root", str(root)]) == 1
    assert "still alive" in capsys.readouterr().err
    assert cli.main(["down", "--netns", ns, "--run-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"LEFTOVER: program broker pid {res.pids['broker']} outlived supervisord" in out
    assert f"LEFTOVER: program sleeper pid {new_pid} outlived supervisord" in out
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []
    # Clean again: the next down finds nothing and an up works.
    assert cli.main(["down", "--netns", ns, "--run-root", str(root)]) == 0
    res2 = up(opts, [sleeper(run, ns)], out=lambda _line: None)
    assert pid_alive(res2.pids["sleeper"])


@pytest.mark.slow
def test_down_removes_divert_filters_left_in_the_namespace(
    inst: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    up(opts, [sleeper(opts.run_dir, ns)], out=lambda _line: None)
    assert divert_filters(ns) == []
    # A divert holder killed -9 leaves its tc programs attached (docs/measurements.md M15).
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
    left = divert_filters(ns)
    hooks = {line.split(":")[0] for line in left}  # on every interface: lo and the veth
    assert hooks == {"lo ingress", "lo egress", "va ingress", "va egress"}
    # down removes them inside the namespace, saying what it removed...
    assert cli.main(["down", "--netns", ns, "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"REMOVED: divert program left in netns {ns}: lo ingress pref 30001 tc_divert_" in out
    assert f"REMOVED: divert program left in netns {ns}: va egress pref 30001 tc_divert_" in out
    assert len([x for x in out.splitlines() if x.startswith("REMOVED")]) == 4
    assert "LEFTOVER" not in out
    assert divert_filters(ns) == []
    # ...and an up that finds some (left while nothing ran) warns before adding its own.
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], timeout=30)
    left = divert_filters(ns)
    assert len(left) == 4
    lines: list[str] = []
    up(opts, [sleeper(opts.run_dir, ns)], out=lines.append)
    assert [x for x in lines if x.startswith("WARNING")] == [
        f"WARNING: divert filter already attached in netns {ns}: {f}" for f in left
    ]


@pytest.mark.slow
@pytest.mark.parametrize("policy", [True, False], ids=["policy", "no-policy"])
def test_the_real_system_up_status_down_leaves_nothing(
    inst: tuple[str, Path], policy: bool
) -> None:
    ns, root = inst
    run = RuntimeDir.for_instance(ns, root)
    base = ["--netns", ns, "--run-root", str(root)]
    started = subprocess.run(
        [*KEXTLESS, "up", *base, *([] if policy else ["--no-policy"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"client endpoint: {run.kext_endpoint}" in started.stdout
    opts = UpOptions(netns=ns, policy=policy, run_root=root)
    expected = [a.name for a in sorted(ACTORS, key=lambda a: a.priority) if a.enabled(opts)]
    # up returned once every actor reported (status.not_ready): no waiting here.
    assert "ready after " in started.stdout, started.stdout
    st = subprocess.run(
        [*KEXTLESS, "status", *base, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    report = json.loads(st.stdout)
    assert st.returncode == 0, st.stdout
    assert {"ale", "capture", "lifecycle", "bandwidth"} <= set(report["broker"]["actors"])
    assert all(i["guarded"] for i in report["interfaces"]), report["interfaces"]
    if policy:
        assert report["broker"]["session"]["state"] == "open"
    # start order (the actor table's), not alphabetical
    assert [p["name"] for p in report["programs"]] == expected
    assert all(p["state"] == "RUNNING" for p in report["programs"]), report
    pids = {p["name"]: p["pid"] for p in report["programs"]}
    assert report["broker"]["pid"] == pids["broker"]
    assert report["broker"]["actors"]["ale"]["pid"] == pids["ale"]
    # capture talks only to the ALE; it shows by running inside the namespace with its divert
    # programs attached there, and never in the host namespace.
    assert netns_inode(pids["capture"]) == os.stat(f"/var/run/netns/{ns}").st_ino
    assert any(f.startswith("lo ingress") for f in divert_filters(ns))
    stopped = subprocess.run(
        [*KEXTLESS, "down", *base], capture_output=True, text=True, timeout=90, check=False
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "LEFTOVER" not in stopped.stdout and "WARNING" not in stopped.stdout
    assert not any(pid_alive(p) for p in pids.values())
    assert instance_pids(run.path) == []
    assert sockets_in(run.path) == []
    assert divert_filters(ns) == []


def _actors(names: set[str]) -> list[ActorSpec]:
    return [a for a in ACTORS if a.name in names]


@pytest.mark.slow
def test_real_broker_ale_and_policy_register_and_stop_cleanly(inst: tuple[str, Path]) -> None:
    """The real actors that need no divert handle, under the config `up` renders for them."""
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    actors = _actors({"broker", "ale", "policy"})
    res = up(opts, programs_for(opts, actors), out=lambda _line: None)
    assert set(res.ready_s) == {"ale", "policy"}
    code, report = status(ns, root)  # up returned once both reported: no waiting here
    assert code == 0, report
    assert report["broker"]["pid"] == res.pids["broker"]
    assert report["broker"]["actors"]["ale"]["pid"] == res.pids["ale"]
    # the built-in decision maker holds the one client session
    assert report["broker"]["session"]["state"] == "open"
    stopped = down(ns, root, out=lambda _line: None)
    assert stopped.problems == []
    assert stopped.killed == []  # every actor ends on SIGTERM, in time
    assert instance_pids(opts.run_dir.path) == []
    assert sockets_in(opts.run_dir.path) == []


@pytest.mark.slow
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
    res = up(opts, programs_for(opts, _actors({"broker"})), out=lambda _line: None)
    code, report = status(ns, root, client_cert=Path(client_secret))
    assert code == 0, report["broker_error"]
    assert report["broker"]["pid"] == res.pids["broker"]
    code, report = status(ns, root)
    assert code == 1 and "--curve-client-secret" in report["broker_error"]
    code, report = status(ns, root, client_cert=Path(stranger_secret))
    assert code == 1 and "did not answer" in report["broker_error"]


# ---- the configuration file, rules checked at up, supervisord's CRIT lines, reload -------------

_KXP2 = iter(range(1, 1000))


@pytest.fixture
def kxp2() -> Iterator[tuple[str, Path]]:
    """(netns, run_root): a fresh namespace named kxp2-PID-N with `lo` up, nothing else, and a
    short run root; teardown: `down`, kill by PID whatever still names the run dir, delete."""
    ns = f"kxp2-{os.getpid()}-{next(_KXP2)}"
    root = Path(tempfile.mkdtemp(prefix="kxp2-", dir="/tmp"))
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        yield ns, root
    finally:
        run = RuntimeDir.for_instance(ns, root)
        with contextlib.suppress(Exception):
            down(ns, root, out=lambda _line: None)
        for pid in instance_pids(run.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _kextless(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEXTLESS, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bad_rules_fail_up_at_once_with_one_line_and_start_nothing(
    kxp2: tuple[str, Path], tmp_path: Path
) -> None:
    ns, root = kxp2
    rules = tmp_path / "rules.toml"
    rules.write_text('default = "Accept"\n\n[[rule]]\nremote_port = 99999\nverdict = "Block"\n')
    conf = tmp_path / "kextless.toml"
    conf.write_text(
        f'[instance]\nnetns = "{ns}"\nrun_root = "{root}"\n[policy]\nrules = "rules.toml"\n'
    )
    for argv in (
        ["up", "--netns", ns, "--run-root", str(root), "--policy-rules", str(rules)],
        ["up", "--config", str(conf)],  # the same rules, named by the file
    ):
        t0 = time.monotonic()
        r = _kextless(*argv, timeout=30)
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"kextless up: error: policy rules: {rules}:3"), r.stderr
        assert took < 1.5, took  # python start-up included; the check itself is milliseconds
        assert not RuntimeDir.for_instance(ns, root).path.exists()  # nothing was started
        assert instance_pids(RuntimeDir.for_instance(ns, root).path) == []


@pytest.mark.slow
def test_up_from_a_config_file_without_crit_lines_then_reload(
    kxp2: tuple[str, Path], tmp_path: Path
) -> None:
    ns, root = kxp2
    (tmp_path / "rules.toml").write_text('default = "Accept"\n')
    conf = tmp_path / "kextless.toml"
    conf.write_text(
        f'[instance]\nnetns = "{ns}"\nrun_root = "{root}"\n'
        # watch = false: only `kextless reload` reloads, so the test knows which did
        '[verdicts]\ntimeout = 5\n[policy]\nrules = "rules.toml"\nwatch = false\n'
    )
    run = RuntimeDir.for_instance(ns, root)
    started = _kextless("up", "--config", str(conf), "--no-bandwidth")
    assert started.returncode == 0, started.stdout + started.stderr
    inst = json.loads((run.path / "instance.json").read_text())
    assert "bandwidth" not in inst["programs"]  # the flag over the file's default
    ale = inst["programs"]["ale"]["argv"]
    assert ale[ale.index("--verdict-timeout") + 1] == "5"
    policy = inst["programs"]["policy"]["argv"]
    assert policy[policy.index("--config") + 1] == str(conf.resolve())

    # supervisord: no CRIT line (running as root without user=, an unauthenticated socket)
    log = (run.path / "supervisord.log").read_text()
    assert "supervisord started" in log
    assert [line for line in log.splitlines() if " CRIT " in line] == []
    assert (run.path / "supervisor.sock").stat().st_mode & 0o777 == 0o700
    assert (run.path / "supervisor.secret").stat().st_mode & 0o777 == 0o600
    anonymous = xmlrpc.client.ServerProxy(
        "http://127.0.0.1",
        transport=SupervisorTransport(serverurl=f"unix://{run.supervisor_socket}"),
    )
    with pytest.raises(xmlrpc.client.ProtocolError) as refused:
        anonymous.supervisor.getState()
    assert refused.value.errcode == 401

    # reload: supervisord signals the policy, which reloads, says so, and keeps running
    deadline = time.monotonic() + 15  # its session open: past start-up, SIGHUP handled
    while time.monotonic() < deadline:
        code, report = status(ns, root)
        if code == 0 and (report["broker"].get("session") or {}).get("state") == "open":
            break
        time.sleep(0.2)
    programs = status(ns, root)[1]["programs"]
    pid = next(p["pid"] for p in programs if p["name"] == "policy")  # (the watchdog comes last)
    (tmp_path / "rules.toml").write_text('default = "Block"\n')
    r = _kextless("reload", "--config", str(conf))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"sent SIGHUP to the policy of netns {ns} (pid {pid}): ")
    assert "rules reloaded (SIGHUP)" in r.stdout and "default Block" in r.stdout, r.stdout
    # a broken file at reload: refused with its line, the last good rules stay
    (tmp_path / "rules.toml").write_text(
        'default = "Block"\n[[rule]]\nprotocol = "tcpx"\nverdict = "Block"\n'
    )
    r = _kextless("reload", "--config", str(conf))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rules reload (SIGHUP) refused, keeping the last good rules" in r.stderr
    assert f"{tmp_path / 'rules.toml'}:2" in r.stderr and "tcpx" in r.stderr, r.stderr
    after = {p["name"]: p for p in status(ns, root)[1]["programs"]}
    assert after["policy"]["pid"] == pid and after["policy"]["state"] == "RUNNING"

    stopped = _kextless("down", "--config", str(conf), timeout=90)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert instance_pids(run.path) == []


def test_reload_without_a_policy_says_so(kxp2: tuple[str, Path]) -> None:
    ns, root = kxp2
    opts = UpOptions(netns=ns, run_root=root, policy=False, timeout=15)
    up(opts, [fake_broker(opts.run_dir)], out=lambda _line: None)
    r = _kextless("reload", "--netns", ns, "--run-root", str(root))
    assert r.returncode == 1
    assert r.stderr.startswith(f"kextless reload: no policy runs for netns {ns}")
    # and the stand-in broker was never signalled
    assert status(ns, root)[1]["programs"][0]["state"] == "RUNNING"
