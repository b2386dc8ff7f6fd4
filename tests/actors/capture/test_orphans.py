"""A capture SIGKILLed leaves its divert programs attached; the next capture removes them
before it opens its own handle (actors/capture/orphans.py), so kills and restarts never pile
programs up on the namespace's interfaces."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from pyroute2 import NetNS

from kextless.actors.capture import main as capture_main
from kextless.actors.capture import orphans
from kextless.actors.capture.orphans import DivertProgram, Hook
from kextless.actors.capture.shell import CaptureShell, ShellConfig
from kextless.protocol.messages import CaptureReady
from tests.actors.capture.harness import capture_env
from tests.entry import KEXTLESS
from tests.netns import NetnsPair


def programs(ns: str) -> list[DivertProgram]:
    with NetNS(ns) as ipr:
        return orphans.divert_programs(ipr)


def ours(ns: str) -> list[DivertProgram]:
    """Our own programs beside the divert ones (l2pass on every link but lo, guards)."""
    with NetNS(ns) as ipr:
        return [p for p in orphans.leftover_programs(ipr) if p.name.startswith("kextless_")]


def hooks(progs: list[DivertProgram]) -> list[tuple[str, str]]:
    return sorted((p.ifname, p.hook.label) for p in progs)


EVERY_HOOK = sorted((dev, hook.label) for dev in ("lo", "va") for hook in Hook)


@pytest.mark.root
@pytest.mark.slow
def test_the_next_capture_removes_a_killed_captures_programs(tmp_path: Path) -> None:
    """Without the kernel cache every program of the killed capture is an orphan."""
    with capture_env(extra_args=("--no-kernel-cache",)) as env:
        ns = env.pair.a
        first = programs(ns)
        assert hooks(first) == EVERY_HOOK
        first_ours = ours(ns)
        assert hooks(first_ours) == [("va", "egress"), ("va", "ingress")]  # l2pass
        env.proc.send_signal(signal.SIGKILL)
        env.proc.wait(10)
        assert programs(ns) == first  # SIGKILL: the programs stay attached (orphans)
        assert ours(ns) == first_ours

        readies = sum(isinstance(m, CaptureReady) for m in env.ale.received)
        log_path = tmp_path / "capture2.log"
        with log_path.open("wb") as log_file:
            env.proc = env.pair.popen(
                ns,
                [
                    *KEXTLESS,
                    "run",
                    "capture",
                    "--ale-endpoint",
                    env.ale.endpoint,
                    "--no-kernel-cache",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        env.log_path = log_path
        assert env.ale.wait_for(
            lambda: sum(isinstance(m, CaptureReady) for m in env.ale.received) > readies, 15
        ), env.log()
        second = programs(ns)
        # Exactly one program per hook, and none of them the killed capture's.
        assert hooks(second) == EVERY_HOOK
        assert not {p.name for p in second} & {p.name for p in first}
        log = env.log()
        for p in first + first_ours:
            assert f"removed orphan divert program: {p.describe()}" in log, log
        assert hooks(ours(ns)) == hooks(first_ours)  # the new capture's own l2pass, once
        assert log.index("removed orphan divert program") < log.index("handle open")
    # A clean stop detaches the rest (the namespace still exists until capture_env exits).


@pytest.mark.root
def test_remove_orphans_removes_only_divert_programs() -> None:
    """Every divert pref goes, on every hook; another bpf filter on the same hook stays (a
    classic one that matches nothing: `0` means "not classified, go on")."""
    with NetnsPair() as pair:
        ns = pair.a
        tc = ["tc", "-n", ns]
        subprocess.run([*tc, "qdisc", "add", "dev", "va", "clsact"], check=True, timeout=10)
        other = ["filter", "add", "dev", "va", "ingress", "pref", "100", "bpf", "bytecode"]
        subprocess.run([*tc, *other, "1,6 0 0 0,"], check=True, timeout=10)
        for priority in (0, 5):  # two killed holders: prefs 30001 and 29996
            kill9 = (
                "import os, pydivert\n"
                f"h = pydivert.EBPFDivert('false', priority={priority}).open()\n"
                "os.kill(os.getpid(), 9)"
            )
            assert pair.run_py(ns, kill9, timeout=30).returncode in (-9, 137)
        left = programs(ns)
        assert sorted({p.pref for p in left}) == [29996, 30001]
        assert len(left) == 8
        code = (
            "import logging, sys\n"
            "logging.basicConfig(stream=sys.stderr, level=logging.INFO, format='%(message)s')\n"
            "from kextless.actors.capture.orphans import remove_orphans\n"
            "print(len(remove_orphans()))\n"
        )
        res = pair.run_py(ns, code, timeout=30)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "8"
        assert sorted(res.stderr.splitlines()) == sorted(
            f"removed orphan divert program: {p.describe()}" for p in left
        )
        assert programs(ns) == []
        shown = subprocess.run(
            [*tc, "filter", "show", "dev", "va", "ingress"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        assert "bytecode '1,6 0 0 0'" in shown and "pref 100" in shown
        again = pair.run_py(ns, code, timeout=30)
        assert again.stdout.strip() == "0" and "orphan" not in again.stderr


def test_only_the_capture_process_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell built elsewhere (a test's, in the host namespace) never removes or adds tc
    filters; `kextless run capture`, which runs inside the namespace it guards, does."""
    assert ShellConfig("ipc:///nowhere").owns_namespace is False
    built: list[ShellConfig] = []

    def fake_run(self: CaptureShell) -> int:
        built.append(self.cfg)
        return 0

    monkeypatch.setattr(CaptureShell, "run", fake_run)
    monkeypatch.setattr(capture_main, "install_signals", lambda _shell: None)
    monkeypatch.setattr(capture_main.logs, "setup", lambda *_a, **_k: None)  # pytest's handlers
    assert capture_main.main(["--ale-endpoint", "ipc:///nowhere"]) == 0
    assert [c.owns_namespace for c in built] == [True]
