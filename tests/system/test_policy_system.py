"""The main job end to end: `kextless up --netns` with the built-in policy and a rules file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kextless.actors.policy.view import (
    DECISIONS_FILE,
    SNAPSHOT_FILE,
    ConnectionRow,
    Decision,
    read_decisions,
    read_snapshot,
)
from kextless.base.rundir import RuntimeDir
from tests import apps
from tests.entry import KEXTLESS
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

RULES = """
default = "PermanentAccept"

[[rule]]
protocol = "tcp"
remote_port = 22001
verdict = "PermanentBlock"

[[rule]]
protocol = "udp"
remote_port = [22002, 22003]
verdict = "PermanentDrop"
"""


@pytest.fixture(scope="module")
def policy_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsPair, Path]]:
    root = tmp_path_factory.mktemp("run")
    rules = root / "rules.toml"
    rules.write_text(RULES)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with NetnsPair("p") as pair:
        up = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--run-root",
                str(root),
                "--policy-rules",
                str(rules),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            assert "policy" in up.stdout
            apps.start(pair, pair.b, apps.ECHO_SERVER, 22009)
            wait_intercepting(pair, RuntimeDir.for_instance(pair.a, root=root), 22009)
            yield pair, root
        finally:
            down = subprocess.run(
                [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(root)],
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert down.returncode == 0, down.stdout + down.stderr


def wait_intercepting(pair: NetnsPair, run: RuntimeDir, port: int) -> None:
    """Until a fresh connection to `port` (a server in b) is decided: `up` returns once every
    process runs, which can be before the capture has its handle open; a connection made
    before that is not held (it is reported later as an existing one, without its pid)."""

    def probe() -> bool:
        apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, port, 2)
        path = run.log_dir / DECISIONS_FILE
        return path.exists() and any(d.remote_port == port for d in read_decisions(path))

    _wait("the capture to intercept", probe, timeout=20)


def test_rules_decide_real_connections(policy_system: tuple[NetnsPair, Path]) -> None:
    pair, root = policy_system
    for port in (22001, 22002, 22004):
        apps.start(pair, pair.b, apps.ECHO_SERVER, port)
    blocked = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 22001, 3)
    assert blocked["result"] == "refused", blocked
    accepted = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 22004, 3)
    assert accepted["result"] == "ok", accepted
    dropped = apps.run(pair, pair.a, apps.UDP_CLIENT, pair.ip4_b, 22002, 1)
    assert dropped["result"] == "timeout", dropped
    assert apps.run(pair, pair.a, apps.UDP_CLIENT, pair.ip4_b, 22004, 2)["result"] == "ok"
    log = (RuntimeDir.for_instance(pair.a, root=root).log_dir / "policy.log").read_text()
    assert f":{accepted['local'][1]} -> {pair.ip4_b}:22004 verdict=PermanentAccept" in log
    assert f" -> {pair.ip4_b}:22001 verdict=PermanentBlock" in log


def test_bad_rules_file_fails_up_with_the_reason() -> None:
    # A short run root: unix socket paths are limited to 107 bytes.
    tmp_path = Path(tempfile.mkdtemp(prefix="klp"))
    rules = tmp_path / "rules.toml"
    rules.write_text("default = 'Allow'\n")
    with NetnsPair("q") as pair:
        up = subprocess.run(
            [
                *KEXTLESS,
                "up",
                "--netns",
                pair.a,
                "--run-root",
                str(tmp_path / "run"),
                "--policy-rules",
                str(rules),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        try:
            assert up.returncode != 0
            assert "unknown verdict 'Allow'" in up.stdout + up.stderr
        finally:
            subprocess.run(
                [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(tmp_path / "run")],
                capture_output=True,
                timeout=90,
            )
            shutil.rmtree(tmp_path, ignore_errors=True)


# ---- rules reload: UpdateV4 on live connections ---------------------------------------------

#: Connect a UDP socket, say "connected", then for each stdin line send it and print whether
#: an answer came within 1 s (the same socket, so the same 5-tuple, all along).
INTERACTIVE_UDP = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"connected": list(s.getsockname()[:2])}), flush=True)
for line in sys.stdin:
    s.send(line.strip().encode())
    try:
        out = {"result": "ok", "data": s.recv(1000).decode()}
    except (socket.timeout, TimeoutError):
        out = {"result": "timeout"}
    except OSError as e:
        out = {"result": str(e)}
    print(json.dumps(out), flush=True)
"""

RELOAD_RULES = """
default = "PermanentAccept"

[[rule]]
name = "drop udp 23002"
protocol = "udp"
remote_port = 23002
verdict = "PermanentDrop"
"""


class Interactive:
    """A client program in namespace a that sends a line per `say` and reports the answer."""

    def __init__(self, pair: NetnsPair, code: str, host: str, port: int) -> None:
        self.proc = pair.popen(
            pair.a, [sys.executable, "-c", code, host, port], stdin=subprocess.PIPE
        )
        self.first = self._line()
        assert "connected" in self.first, self.first

    def _line(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"client ended: {err.decode(errors='replace')[-2000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def say(self, text: str) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self._line()


def _up(pair: NetnsPair, root: Path, rules: Path, *extra: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    up = subprocess.run(
        [
            *KEXTLESS,
            "up",
            "--netns",
            pair.a,
            "--run-root",
            str(root),
            "--policy-rules",
            str(rules),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert up.returncode == 0, up.stdout + up.stderr


def _down(pair: NetnsPair, root: Path) -> None:
    down = subprocess.run(
        [*KEXTLESS, "down", "--netns", pair.a, "--run-root", str(root)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert down.returncode == 0, down.stdout + down.stderr


def _replace(path: Path, text: str) -> None:
    """As editors save: a new file renamed over the old one (a new inode)."""
    tmp = path.with_name(path.name + ".swp~")
    tmp.write_text(text)
    tmp.replace(path)


def _wait(what: str, check: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Reloadable:
    def __init__(self, pair: NetnsPair, root: Path, rules: Path) -> None:
        self.pair, self.root, self.rules = pair, root, rules
        self.run = RuntimeDir.for_instance(pair.a, root=root)

    def policy_log(self) -> str:
        path = self.run.log_dir / "policy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def updates(self, port: int) -> list[Decision]:
        path = self.run.log_dir / DECISIONS_FILE
        found = read_decisions(path) if path.exists() else []
        return [d for d in found if d.update and d.remote_port == port]

    def row(self, port: int) -> ConnectionRow | None:
        path = self.run.path / SNAPSHOT_FILE
        if not path.exists():
            return None
        return next((r for r in read_snapshot(path).connections if r.remote_port == port), None)

    def policy_pid(self) -> int:
        """Our own instance's policy process (its argv names our run dir)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"policy" in argv and str(self.run.path).encode() in argv:
                return int(proc.name)
        raise AssertionError("the policy process is not running")


@contextmanager
def _reloadable(tag: str, *extra: str) -> Iterator[Reloadable]:
    root = Path(tempfile.mkdtemp(prefix="kxp1"))  # short: unix socket paths <= 107 bytes
    rules = root / "rules.toml"
    rules.write_text(RELOAD_RULES)
    try:
        with NetnsPair(f"kxp1{tag}") as pair:
            for port in (23001, 23002, 23003):
                apps.start(pair, pair.b, apps.ECHO_SERVER, port)
            _up(pair, root, rules, *extra)
            system = Reloadable(pair, root, rules)
            wait_intercepting(pair, system.run, 23003)
            try:
                yield system
            except BaseException:
                for log in sorted(system.run.log_dir.glob("*.log")):  # shown on failure
                    print(f"==> {log.name}\n{log.read_text(errors='replace')[-3000:]}")
                raise
            finally:
                _down(pair, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(100)
def test_a_rules_file_change_blocks_a_live_connection_and_a_broken_one_is_refused() -> None:
    with _reloadable("w") as s:
        pair = s.pair
        live = Interactive(pair, apps.INTERACTIVE_TCP, pair.ip4_b, 23001)
        assert live.say("before")["result"] == "ok"
        live6 = Interactive(pair, apps.INTERACTIVE_TCP, pair.ip6_b, 23001)
        assert live6.say("before")["result"] == "ok"
        _wait("its decision in the snapshot", lambda: s.row(23001))
        row = s.row(23001)
        assert row is not None and row.verdict == "PermanentAccept" and row.rule == "default"
        # The pid comes from the capture/lifecycle (0 when they did not know it); when known,
        # the policy read its process from /proc.
        assert row.pid > 0 and row.process.startswith("python"), row
        assert _wait("its bytes", lambda: (r := s.row(23001)) and r.received > 0 and r.sent > 0)
        # Edit the rules as an editor does: the live connection gets an UpdateV4 to block.
        _replace(
            s.rules,
            RELOAD_RULES
            + '\n[[rule]]\nname = "block tcp 23001"\nprotocol = "tcp"\n'
            + 'remote_port = 23001\nverdict = "PermanentBlock"\n',
        )
        # One UpdateV4 and one UpdateV6, each with its decision line.
        updates = _wait("the update lines", lambda: len(s.updates(23001)) == 2 and s.updates(23001))
        by_ip = {u.remote_ip: u for u in updates}  # type: ignore[attr-defined]
        update = by_ip[pair.ip4_b]
        assert (update.verdict, update.rule, update.protocol) == (
            "PermanentBlock",
            "block tcp 23001",
            "tcp",
        )
        assert update.local_port == live.first["connected"][1]  # type: ignore[index]
        assert by_ip[f"[{pair.ip6_b}]"].verdict == "PermanentBlock"
        assert "rules reloaded (file changed)" in s.policy_log()
        for conn in (live, live6):
            after = conn.say("after")
            assert after["result"] != "ok", after  # reset (ECONNRESET / EPIPE), not answered
        _wait(
            "the block in the snapshot",
            lambda: (r := s.row(23001)) and r.verdict == "PermanentBlock",
        )
        # New connections follow the new rules too.
        refused = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 23001, 3)
        assert refused["result"] == "refused", refused
        # A broken file: refused with file, line and problem; the last good rules stay.
        _replace(s.rules, RELOAD_RULES + '\n[[rule]]\nprotocol = "tcp"\nverdict = "Nope"\n')
        _wait("the refusal", lambda: "refused, keeping the last good rules" in s.policy_log())
        _wait("rules_error", lambda: read_snapshot(s.run.path / SNAPSHOT_FILE).rules_error)
        snap = read_snapshot(s.run.path / SNAPSHOT_FILE)
        assert snap.rules_error.startswith(f"{s.rules}:10: rule 2: unknown verdict 'Nope'")
        still = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 23001, 3)
        assert still["result"] == "refused", still  # the block rule is still in force
        other = apps.run(pair, pair.a, apps.TCP_CLIENT, pair.ip4_b, 23003, 3)
        assert other["result"] == "ok", other


@pytest.mark.timeout(100)
def test_sighup_reloads_and_a_dropped_live_udp_flow_starts_working() -> None:
    # The watcher is off here: only SIGHUP reloads, so the test shows SIGHUP alone does it.
    with _reloadable("h", "--actor-arg", "policy=--no-watch") as s:
        pair = s.pair
        flow = Interactive(pair, INTERACTIVE_UDP, pair.ip4_b, 23002)
        assert flow.say("one")["result"] == "timeout"  # dropped by "drop udp 23002"
        _wait("its decision in the snapshot", lambda: s.row(23002))
        row = s.row(23002)
        assert row is not None and row.verdict == "PermanentDrop" and row.rule == "drop udp 23002"
        _replace(s.rules, 'default = "PermanentAccept"\n')
        time.sleep(1.5)
        assert flow.say("two")["result"] == "timeout"  # not watched: no reload yet
        assert not s.updates(23002)
        os.kill(s.policy_pid(), signal.SIGHUP)
        (update,) = _wait("the update line", lambda: s.updates(23002))  # type: ignore[misc]
        assert (update.verdict, update.rule) == ("PermanentAccept", "default")
        assert "rules reloaded (SIGHUP)" in s.policy_log()
        answer = flow.say("three")
        assert answer["result"] == "ok", answer  # the same 5-tuple, now accepted
        _wait("the bytes in the snapshot", lambda: (r := s.row(23002)) and r.sent > 0)
        row = s.row(23002)
        assert row is not None and row.verdict == "PermanentAccept" and row.received > 0
