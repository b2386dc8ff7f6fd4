"""`kextless demo` (issue 11 item 1): the README's first command, end to end, and what it
leaves behind (nothing), also when interrupted; plus its pure parts (decision parsing, the
demo resolver's DNS codec) as unit tests.

The root tests run the real command with their own namespace prefix (`kxd-t<pid>-`) and run
root, so they never meet a user's demo (`kxd-host`, /run/kextless) or each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kextless.base.rundir import RuntimeDir
from kextless.deploy.demo import (
    DecisionFeed,
    Seen,
    parse_decision_line,
    parse_log_line,
    reload_step,
    steps,
)
from kextless.deploy.demo_traffic import dns_answer, dns_first_a, dns_query
from tests.entry import KEXTLESS

# ---- pure parts -------------------------------------------------------------------------------


def test_policy_log_line_parses_v4_and_v6() -> None:
    v4 = parse_log_line(
        "2026-12-01 13:22:58,825 policy[1] INFO id=2 pid=32503 proto=6 10.77.0.1:40430 -> "
        '10.77.0.66:80 verdict=PermanentBlock rule="rule 2 (line 10)"'
    )
    assert v4 == Seen(2, 32503, "", "outbound", "tcp", "10.77.0.1", 40430, "10.77.0.66", 80,
                      "PermanentBlock")  # fmt: skip
    v6 = parse_log_line("x id=7 pid=0 proto=17 fd00:77::1:8022 <- fd00:77::2:5353 verdict=Drop")
    assert v6 is not None
    assert (v6.direction, v6.protocol, v6.local_ip, v6.local_port, v6.remote_ip) == (
        "inbound", "udp", "fd00:77::1", 8022, "fd00:77::2")  # fmt: skip
    assert parse_log_line("policy[1] INFO session open at ipc:///x") is None


def test_decision_line_strips_brackets_and_rejects_garbage() -> None:
    line = json.dumps(
        {"time": 1.0, "id": 1, "pid": 5, "process": "demo-web6", "exe": "/x", "user": "root",
         "direction": "outbound", "protocol": "tcp", "local_ip": "[fd00:77::1]",
         "local_port": 4000, "remote_ip": "[fd00:77::80]", "remote_port": 80,
         "rule": "default", "verdict": "PermanentAccept", "update": False}
    )  # fmt: skip
    d = parse_decision_line(line)
    assert d is not None
    assert (d.process, d.local_ip, d.remote_ip, d.rule) == (
        "demo-web6", "fd00:77::1", "fd00:77::80", "default")  # fmt: skip
    assert parse_decision_line("{not json") is None
    assert parse_decision_line('{"id": 1}') is None


def test_feed_prefers_jsonl_and_reports_each_decision_once(tmp_path: Path) -> None:
    run = RuntimeDir(tmp_path)
    run.log_dir.mkdir()
    log = run.log_dir / "policy.log"
    log.write_text("a id=1 pid=0 proto=6 10.0.0.1:1 -> 10.0.0.2:80 verdict=Accept\n")
    feed = DecisionFeed(run)
    assert [d.id for d in feed.poll()] == [1]
    jsonl = run.log_dir / "decisions.jsonl"
    row = {"time": 1.0, "id": 1, "pid": 0, "direction": "outbound", "protocol": "tcp",
           "local_ip": "10.0.0.1", "local_port": 1, "remote_ip": "10.0.0.2", "remote_port": 80,
           "rule": "default", "verdict": "Accept"}  # fmt: skip
    jsonl.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": 2})[:-3])  # half a line
    assert [d.id for d in feed.poll()] == []  # id 1 already reported; id 2 not complete
    with jsonl.open("a") as f:
        f.write(json.dumps({**row, "id": 2})[-3:] + "\n")
    assert [d.id for d in feed.poll()] == [2]
    with log.open("a") as f:  # once the JSON file exists, log lines are not read any more
        f.write("a id=9 pid=0 proto=6 10.0.0.1:1 -> 10.0.0.2:80 verdict=Accept\n")
    assert feed.poll() == []


def test_resolver_answers_one_a_record_and_ignores_garbage() -> None:
    query = dns_query("www.kextless.demo")
    reply = dns_answer(query, "10.77.0.80")
    assert reply is not None and reply[:2] == query[:2]
    assert dns_first_a(reply) == "10.77.0.80"
    assert dns_answer(b"\x00" * 5, "10.77.0.80") is None
    assert dns_answer(reply, "10.77.0.80") is None  # a response, not a query
    assert dns_first_a(query) is None  # no answer records


def test_steps_cover_every_verdict_the_issue_asks_for() -> None:
    got = {(s.key, s.verdict) for s in steps()}
    got.add((reload_step().key, reload_step().verdict))
    for key, verdict in [("web", "PermanentAccept"), ("blocked", "PermanentBlock"),
                         ("app-rule", "PermanentBlock"), ("reload", "PermanentBlock"),
                         ("dropped", "PermanentDrop"), ("dns", "RedirectNameServer"),
                         ("udp", "PermanentAccept"), ("ping", "PermanentAccept"),
                         ("inbound", "PermanentAccept"), ("bulk", "PermanentAccept")]:  # fmt: skip
        assert (key, verdict) in got


# ---- the real command (root) -------------------------------------------------------------------

STEP_KEYS = [s.key for s in [*steps(), reload_step()]]


@pytest.fixture()
def demo_env() -> Iterator[tuple[str, Path]]:
    """(prefix, run root) of one test; whatever the demo leaves is removed afterwards (and the
    test has already failed if it left anything). The root is short: ipc socket paths are
    limited to 99 bytes, which pytest's tmp_path would exceed."""
    prefix = f"kxd-t{os.getpid() % 100000}-"
    base = Path(tempfile.mkdtemp(prefix="kxd-", dir="/tmp"))
    root = base / "r"
    try:
        yield prefix, root
    finally:
        subprocess.run(_demo(prefix, root, "--cleanup"), capture_output=True, timeout=90)
        shutil.rmtree(base, ignore_errors=True)


def _demo(prefix: str, root: Path, *extra: str) -> list[str]:
    return [*KEXTLESS, "demo", "--prefix", prefix, "--run-root", str(root), *extra]


def _pids(output: str) -> set[int]:
    """Every pid the demo printed: its clients and servers (`name[pid]`) and kextless's
    programs (`pid N` in up's output)."""
    found = {int(p) for p in re.findall(r"\[(\d+)\]", output)}
    found |= {int(p) for p in re.findall(r"\bpid (\d+)", output)}
    return {p for p in found if p > 1}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _netns_left(prefix: str) -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(prefix)] if os.path.isdir(
        "/run/netns") else []  # fmt: skip


def _procs_mentioning(text: str) -> list[str]:
    """Command lines of live processes naming `text` (e.g. the run root): supervisord and
    every kextless program carry their run dir."""
    hits = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and _alive(int(entry.name)):
            hits.append(f"{entry.name}: {cmd}")
    return hits


def _assert_nothing_left(prefix: str, root: Path, output: str) -> None:
    assert _netns_left(prefix) == [], output  # namespaces (and their tc/BPF and nft) gone
    alive = [p for p in _pids(output) if _alive(p)]
    assert alive == [], f"still running: {alive}\n{output}"
    assert _procs_mentioning(str(root)) == [], output
    leftovers = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert leftovers == [], f"left in the run root: {leftovers}"


def _summary(output: str) -> dict[str, str]:
    """step key -> its summary row (after the `[4/4] summary` line)."""
    rows: dict[str, str] = {}
    tail = output.split("[4/4] summary", 1)[-1].splitlines()
    for line in tail:
        parts = line.split()
        if parts and parts[0] in STEP_KEYS:
            rows[parts[0]] = line
    return rows


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_end_to_end_exits_0_and_leaves_nothing(demo_env: tuple[str, Path]) -> None:
    prefix, root = demo_env
    t0 = time.monotonic()
    res = subprocess.run(_demo(prefix, root), capture_output=True, text=True, timeout=170)
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    rows = _summary(out)
    assert sorted(rows) == sorted(STEP_KEYS), out
    expected = {s.key: s.verdict for s in [*steps(), reload_step()]}
    for key, row in rows.items():
        assert " OK " in f"{row} ", row
        assert row.count(expected[key]) == 2, row  # expected and seen
    # Every decision was shown live, with the step's own process where one owns it.
    live = [("demo-web", "PermanentAccept"), ("demo-blocked", "PermanentBlock"),
            ("demo-dropped", "PermanentDrop"), ("demo-dns", "RedirectNameServer"),
            ("demo-service", "PermanentAccept"), ("demo-bulk", "PermanentAccept"),
            ("demo-tracker", "PermanentBlock"), ("demo-chat", "PermanentAccept"),
            ("demo-chat", "PermanentBlock UPDATE")]  # fmt: skip
    for name, verdict in live:
        assert re.search(rf"\d\d:\d\d:\d\d {name}\[\d+\] .* {verdict}", out), (name, out)
    assert "A 10.77.0.80 (reply from 10.77.0.53:53)" in out  # the local resolver answered
    assert f"{len(STEP_KEYS)}/{len(STEP_KEYS)} steps behaved as expected" in out
    _assert_nothing_left(prefix, root, out)
    assert took < 120, f"took {took:.0f} s"


class _Reader:
    """The demo's output as it comes, so a test can interrupt it at a given point."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self.thread.start()

    def _run(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    @property
    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("sig", "when", "code"),
    [
        (signal.SIGINT, "-- dns:", 130),  # Ctrl-C mid-traffic
        (signal.SIGTERM, "[2/4] kextless up", 143),  # while `up` is starting everything
        (signal.SIGHUP, "-- reload:", 129),  # the terminal went away during the last step
    ],
    ids=["sigint-mid-traffic", "sigterm-during-up", "sighup-in-reload-step"],
)
def test_interrupted_demo_cleans_up(
    demo_env: tuple[str, Path], sig: signal.Signals, when: str, code: int
) -> None:
    prefix, root = demo_env
    proc = subprocess.Popen(
        _demo(prefix, root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    reader = _Reader(proc)
    try:
        assert reader.wait_for(when, 90), reader.text
        if sig == signal.SIGTERM:
            time.sleep(0.5)  # up is under way: supervisord and some programs started
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, reader.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    reader.thread.join(timeout=5)
    out = reader.text
    assert "cleanup: kextless down" in out, out
    _assert_nothing_left(prefix, root, out)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keep_leaves_a_working_sandbox_and_cleanup_removes_it(
    demo_env: tuple[str, Path],
) -> None:
    prefix, root = demo_env
    res = subprocess.run(_demo(prefix, root, "--keep"), capture_output=True, text=True,
                         timeout=170)  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"kextless demo --cleanup --run-root {root} --prefix {prefix}" in out
    host = f"{prefix}host"
    assert sorted(_netns_left(prefix)) == [f"{prefix}host", f"{prefix}net"]
    status = subprocess.run([*KEXTLESS, "status", "--netns", host, "--run-root", str(root),
                             "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(status.stdout)["running"] is True, status.stdout + status.stderr
    # The sandbox still decides: a new connection to the refused host is refused again.
    probe = subprocess.run(
        ["ip", "netns", "exec", host, "python3", "-c",
         "import socket\ntry:\n socket.create_connection(('10.77.0.66', 80), 3)\n"
         "except ConnectionRefusedError: print('refused')"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert probe.stdout.strip() == "refused", probe
    clean = subprocess.run(_demo(prefix, root, "--cleanup"), capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert clean.returncode == 0, clean.stdout + clean.stderr
    _assert_nothing_left(prefix, root, out)


@pytest.mark.root
def test_refuses_when_its_namespaces_exist(demo_env: tuple[str, Path]) -> None:
    prefix, root = demo_env
    ns = f"{prefix}net"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        res = subprocess.run(_demo(prefix, root), capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"{ns} already exists" in res.stderr and "--cleanup" in res.stderr
        assert _netns_left(prefix) == [ns]  # neither removed nor joined by a kxd-...host
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10)
