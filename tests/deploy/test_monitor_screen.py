"""The live monitor under a real terminal: tmux (its own server socket, 160x40) runs
`kextless monitor` on a temp run dir; the test writes snapshots with view.write_snapshot,
reads the screen with `capture-pane`, presses keys and checks their effect and a clean exit.

textual draws on stderr, so a traceback would show on the pane after the exit. Needs the tmux
binary (`apt-get install tmux`); without it these tests fail rather than skip, because the
screen would otherwise go untested."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from kextless.actors.policy.view import (
    DECISIONS_FILE,
    SNAPSHOT_FILE,
    ConnectionRow,
    Decision,
    Snapshot,
    write_snapshot,
)
from kextless.base.rundir import RuntimeDir

pytestmark = pytest.mark.slow

NETNS = "kxp3-screen"


def row(id: int, process: str, **over: object) -> ConnectionRow:
    now = time.time()
    fields: dict[str, object] = {
        "id": id,
        "pid": 4000 + id,
        "process": process,
        "direction": "outbound",
        "protocol": "tcp",
        "local_ip": "10.9.0.1",
        "local_port": 41000 + id,
        "remote_ip": "10.9.0.2",
        "remote_port": 8000 + id,
        "verdict": "PermanentAccept",
        "rule": f"rule {id} (line {id * 3})",
        "sent": 1000 * id,
        "received": 2048 * id,
        "started": now - 5 * id,
    }
    return ConnectionRow(**(fields | over))  # type: ignore[arg-type]


def write(run: RuntimeDir, *rows: ConnectionRow) -> None:
    snap = Snapshot(
        taken=time.time(),
        rules_file="/tmp/rules.toml",
        rules_loaded=time.time(),
        connections=[*rows],
    )
    write_snapshot(run.path / SNAPSHOT_FILE, snap)


class Screen:
    """One tmux server (socket of its own) running the monitor in a 160x40 pane."""

    def __init__(self, tmp: Path, run_root: Path, *args: str, netns: str = NETNS) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed (apt-get install -y tmux): the screen is untested")
        # A server of its own, its socket in the test's directory (nothing left in /tmp/tmux-*).
        self.socket = str(tmp / "tmux.sock")
        self.rc_file = tmp / "rc"
        monitor = " ".join(
            [
                sys.executable,
                "-m",
                "kextless.deploy.monitor",
                "--netns",
                netns,
                "--run-root",
                str(run_root),
                *args,
            ]
        )
        self.tmux(
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "40",
            "-s",
            "mon",
            # textual draws on stderr, so nothing is redirected: after the exit the pane shows
            # the restored screen, with a traceback if there was one, and the exit status.
            # COLUMNS/LINES (set under pytest) would override the pane's size.
            f"env -u COLUMNS -u LINES TERM=xterm-256color {monitor}; "
            f"echo $? > {self.rc_file}; sleep 60",
        )

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
        )

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "mon").stdout

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.text()
            if pred(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")
            time.sleep(0.1)

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "mon", *(["-l"] if literal else []), *keys)

    def exit_code(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rc_file.exists() and self.rc_file.read_text().strip():
                return int(self.rc_file.read_text())
            time.sleep(0.1)
        raise AssertionError(f"the monitor did not exit; screen:\n{self.text()}")

    def close(self) -> None:
        self.tmux("kill-server")
        Path(self.socket).unlink(missing_ok=True)


def table_lines(screen: str, marker: str = "10.9.0.2:") -> list[str]:
    """The rows of the table: lines holding `marker` (by default our rows' remote address)."""
    return [line for line in screen.splitlines() if marker in line]


def names(screen: str) -> list[str]:
    """The process column of the table's rows, top to bottom."""
    return [line.split()[0] for line in table_lines(screen)]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[RuntimeDir, Path, Path]]:
    root = tmp_path / "run"
    run = RuntimeDir.for_instance(NETNS, root).create()
    yield run, root, tmp_path


def test_rows_appear_keys_sort_filter_and_q_exits_cleanly(
    setup: tuple[RuntimeDir, Path, Path],
) -> None:
    run, root, tmp = setup
    screen = Screen(tmp, root)
    try:
        # No snapshot yet: a message on the screen, not a traceback; it keeps looking.
        screen.wait(lambda s: "no snapshot at" in s, "the no-snapshot message")
        write(run, row(1, "alpha"), row(2, "bravo", verdict="PermanentBlock"), row(3, "charlie"))
        totals3 = "shown 3 [all, sort age asc]: 3 connections (3 live, 0 ended)"
        # Each wait names the rows and the totals both: the screen may be caught between them.
        s = screen.wait(lambda s: len(table_lines(s)) == 3 and totals3 in s, "three rows")
        assert "PermanentAccept 2  PermanentBlock 1" in s
        first = table_lines(s)[0].split()
        assert first[:6] == ["alpha", "4001", "out", "tcp", "10.9.0.1:41001", "10.9.0.2:8001"]
        assert "1000 B" in table_lines(s)[0] and "2.0 KiB" in table_lines(s)[0]

        # r reverses (oldest first), s moves the sort to the next column (ended).
        screen.keys("r")
        screen.wait(
            lambda s: "sort age desc" in s and names(s) == ["charlie", "bravo", "alpha"],
            "reversed sort, oldest first",
        )
        screen.keys("s")
        screen.wait(lambda s: "sort ended desc" in s and "ended v" in s, "sort by ended")

        # A refreshed snapshot shows up by itself: one more row, one ended.
        write(
            run,
            row(1, "alpha"),
            row(2, "bravo", verdict="PermanentBlock", ended=time.time() - 1),
            row(3, "charlie"),
            row(4, "delta", verdict="Drop"),
        )
        screen.wait(
            lambda s: len(table_lines(s)) == 4 and "4 connections (3 live, 1 ended)" in s,
            "the refreshed snapshot",
        )

        # / opens the filter; typed words narrow the rows; Escape goes back to the table.
        screen.keys("/")
        time.sleep(0.3)
        screen.keys("bra", literal=True)
        screen.wait(lambda s: names(s) == ["bravo"] and "shown 1 of 4" in s, "the filtered row")
        screen.keys("Escape")
        time.sleep(0.3)
        screen.keys("BSpace")  # in the table, not the input: the filter stays
        time.sleep(0.3)
        assert len(table_lines(screen.text())) == 1
        screen.keys("/")
        time.sleep(0.3)
        screen.keys("C-u")  # clear the input
        screen.wait(lambda s: len(table_lines(s)) == 4 and "shown 4 [" in s, "all rows again")
        screen.keys("Enter")
        time.sleep(0.3)

        # l cycles all -> live -> ended.
        screen.keys("l")
        screen.wait(
            lambda s: "[live," in s and sorted(names(s)) == ["alpha", "charlie", "delta"],
            "live only",
        )
        screen.keys("l")
        screen.wait(lambda s: "[ended," in s and names(s) == ["bravo"], "ended only")

        screen.keys("q")
        assert screen.exit_code() == 0
        assert "Traceback" not in screen.text()
    finally:
        screen.close()


def test_ctrl_c_exits_cleanly_and_a_stale_snapshot_is_flagged(
    setup: tuple[RuntimeDir, Path, Path],
) -> None:
    run, root, tmp = setup
    old = Snapshot(
        taken=time.time() - 30,
        rules_file="/tmp/rules.toml",
        rules_loaded=time.time() - 60,
        rules_error="line 7: unknown verdict 'Allow'",
        connections=[row(1, "alpha")],
    )
    write_snapshot(run.path / SNAPSHOT_FILE, old)
    screen = Screen(tmp, root, "--filter", "alpha")
    try:
        s = screen.wait(lambda s: len(table_lines(s)) == 1 and "REFUSED" in s, "the row")
        assert "policy not writing (is it running?)" in s
        assert "REFUSED: line 7: unknown verdict 'Allow'" in s
        screen.keys("C-c")
        assert screen.exit_code() == 0
        assert "Traceback" not in screen.text()
    finally:
        screen.close()


def test_a_large_table_lists_the_first_rows_and_counts_them_all(
    setup: tuple[RuntimeDir, Path, Path],
) -> None:
    """Headless (textual's test driver): more rows than MAX_DRAWN are counted, not listed."""
    from textual.widgets import DataTable, Static

    from kextless.deploy.monitor_app import MAX_DRAWN, MonitorApp
    from kextless.deploy.monitor_rows import ViewOptions

    run, _, _ = setup
    write(run, *(row(i, f"p{i}") for i in range(1, MAX_DRAWN + 101)))

    async def check() -> None:
        app = MonitorApp(run, ViewOptions(), interval=60)
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.pause()
            assert app.query_one(DataTable).row_count == MAX_DRAWN
            totals = str(app.query_one("#totals", Static).render())
            assert f"shown {MAX_DRAWN + 100} (first {MAX_DRAWN} listed" in totals, totals
            assert f"{MAX_DRAWN + 100} connections" in totals

    asyncio.run(check())


def test_d_switches_to_the_decision_log_and_back(setup: tuple[RuntimeDir, Path, Path]) -> None:
    run, root, tmp = setup
    write(run, row(1, "alpha"))
    run.log_dir.mkdir()
    now = time.time()
    lines = [
        Decision(
            time=now - 2 + i,
            id=i,
            pid=4000 + i,
            process=name,
            exe=f"/usr/bin/{name}",
            user="root",
            direction="outbound",
            protocol="tcp",
            local_ip="10.9.0.1",
            local_port=41000 + i,
            remote_ip="10.9.0.2",
            remote_port=8000 + i,
            rule=rule,
            verdict=verdict,
            update=update,
        )
        for i, (name, verdict, rule, update) in enumerate(
            [
                ("alpha", "PermanentAccept", "default", False),
                ("bravo", "PermanentBlock", "rule 2 (line 6)", False),
                ("alpha", "PermanentBlock", "update rule 2 (line 6)", True),
            ],
            start=1,
        )
    ]
    (run.log_dir / DECISIONS_FILE).write_bytes(
        b"".join(msgspec.json.encode(d) + b"\n" for d in lines)
    )
    screen = Screen(tmp, root)
    try:
        screen.wait(lambda s: len(table_lines(s)) == 1, "the connection")
        screen.keys("d")
        s = screen.wait(
            lambda s: (
                "3 of the last 3, 1 reload update(s)" in s
                # newest first: the update on top (column 2 is the process)
                and [ln.split()[1] for ln in table_lines(s)] == ["alpha", "bravo", "alpha"]
            ),
            "the decision log",
        )
        assert "update rule 2 (line 6)" in table_lines(s)[0]
        screen.keys("d")
        screen.wait(
            lambda s: "connections (1 live" in s and names(s) == ["alpha"], "the connections again"
        )
        screen.keys("q")
        assert screen.exit_code() == 0
    finally:
        screen.close()
