"""Issue 8 points 3 and 5 against real processes in namespaces the tests create: `status`
shows each interface with its guarded hooks and flags an unguarded one (exit 1); `down`
removes the divert programs a dead capture left and says what it removed; and SIGKILLing the
real capture again and again never piles programs up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kextless.base.rundir import RuntimeDir
from kextless.deploy import cli
from kextless.deploy.filters import divert_filters
from kextless.deploy.options import UpOptions
from kextless.deploy.processes import pid_alive
from kextless.deploy.programs import Program, ip_command
from kextless.deploy.status import status
from kextless.deploy.up import up
from tests.deploy.test_deploy_process import fake_broker, inst  # noqa: F401  (the fixture)
from tests.entry import KEXTLESS

pytestmark = pytest.mark.root

EVERY_HOOK = {f"{dev} {hook}" for dev in ("lo", "va") for hook in ("ingress", "egress")}


def divert_holder(run: RuntimeDir, ns: str) -> Program:
    """A stand-in capture: holds a divert handle that diverts nothing (`false`) and dies of
    SIGTERM without closing it, as a killed capture would."""
    code = "import time, pydivert; h = pydivert.EBPFDivert('false').open(); time.sleep(600)"
    argv = (ip_command(), "netns", "exec", ns, sys.executable, "-c", code, str(run.path))
    return Program("capture", argv, 300)


def hooks_of(lines: list[str]) -> set[str]:
    return {line.split(":")[0] for line in lines}


@pytest.mark.slow
def test_status_flags_an_unguarded_interface_and_down_removes_what_was_left(
    inst: tuple[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns, root = inst
    opts = UpOptions(netns=ns, run_root=root, timeout=15)
    run = opts.run_dir
    # The stand-in capture reports nothing: up need not wait for its readiness.
    up(opts, [fake_broker(run), divert_holder(run, ns)], out=lambda _line: None, await_ready=())
    deadline = time.monotonic() + 10
    while hooks_of(divert_filters(ns)) != EVERY_HOOK and time.monotonic() < deadline:
        time.sleep(0.1)
    base = ["--netns", ns, "--run-root", str(root)]
    assert cli.main(["status", *base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["ingress"], i["egress"], i["guarded"]) for i in report["interfaces"]] == [
        ("lo", True, True, True),
        ("va", True, True, True),
    ]
    # An interface that appears later and nobody attaches to: flagged, and status degraded.
    pair = ["vx", "address", "02:6b:6c:00:00:1a", "type", "veth"]
    peer = ["peer", "name", "vy", "address", "02:6b:6c:00:00:1b"]
    subprocess.run(["ip", "-n", ns, "link", "add", *pair, *peer], check=True, timeout=10)
    code, rep = status(ns, root)
    assert code == 1
    flags = {i["name"]: i["guarded"] for i in rep["interfaces"]}
    assert flags == {"lo": True, "va": True, "vx": False, "vy": False}
    assert cli.main(["status", *base]) == 1
    text = capsys.readouterr().out
    assert "interfaces (divert programs on ingress / egress):" in text
    assert "  lo         loopback up   ingress guarded egress guarded\n" in text
    assert "  vx         veth     down ingress UNGUARDED egress UNGUARDED  <- UNGUARDED" in text

    # SIGTERM kills the stand-in without a close: its programs stay, `down` removes them.
    left = divert_filters(ns)
    assert hooks_of(left) == EVERY_HOOK
    assert cli.main(["down", *base]) == 0
    out = capsys.readouterr().out
    removed = [x for x in out.splitlines() if x.startswith("REMOVED")]
    assert sorted(removed) == sorted(
        f"REMOVED: divert program left in netns {ns}: {x.replace(':', '', 1)}" for x in left
    ), out
    assert "LEFTOVER" not in out
    assert divert_filters(ns) == []


def _capture_pid(ns: str, root: Path, not_pid: int, timeout: float = 20) -> int:
    """The capture's pid once supervisord has it RUNNING under a pid other than `not_pid`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _code, rep = status(ns, root)
        for p in rep["programs"]:
            if p["name"] == "capture" and p["state"] == "RUNNING" and p["pid"] != not_pid:
                return int(p["pid"])
        time.sleep(0.2)
    raise AssertionError(f"capture not RUNNING again within {timeout} s: {rep['programs']}")


@pytest.mark.slow
def test_three_sigkills_of_the_capture_then_down_leave_no_divert_program(
    inst: tuple[str, Path],  # noqa: F811
) -> None:
    ns, root = inst
    base = ["--netns", ns, "--run-root", str(root)]
    started = subprocess.run(
        [*KEXTLESS, "up", *base, "--no-policy"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    pid = _capture_pid(ns, root, 0)
    for _ in range(3):
        before = divert_filters(ns)
        assert hooks_of(before) == EVERY_HOOK and len(before) == 4, before
        os.kill(pid, signal.SIGKILL)
        pid = _capture_pid(ns, root, pid)
        # The restarted capture removed the dead one's programs before adding its own: one
        # program per hook, none of them the dead capture's.
        deadline = time.monotonic() + 10
        now = divert_filters(ns)
        while (len(now) != 4 or set(now) & set(before)) and time.monotonic() < deadline:
            time.sleep(0.1)
            now = divert_filters(ns)
        assert hooks_of(now) == EVERY_HOOK and len(now) == 4 and not set(now) & set(before), now
    log = (RuntimeDir.for_instance(ns, root).log_dir / "capture.log").read_text()
    assert log.count("removed orphan divert program") >= 12, log[-3000:]

    # Status: every interface guarded, and the capture's loss counters (relayed by the ALE).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        code, rep = status(ns, root)
        if code == 0 and rep["divert_counters"] is not None:
            break
        time.sleep(0.3)
    assert code == 0, rep
    assert all(i["guarded"] for i in rep["interfaces"]), rep["interfaces"]
    assert set(rep["divert_counters"]) >= {"ringbuf_full", "queue_full"}
    assert 0 <= rep["divert_counters_age_s"] < 15
    assert rep["broker"]["actors"]["capture"]["pid"] == pid

    stopped = subprocess.run(
        [*KEXTLESS, "down", *base], capture_output=True, text=True, timeout=90, check=False
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "LEFTOVER" not in stopped.stdout
    # A clean stop detaches the live capture's programs: nothing was left for down to remove.
    assert "REMOVED" not in stopped.stdout, stopped.stdout
    assert divert_filters(ns) == []
    assert not pid_alive(pid)
